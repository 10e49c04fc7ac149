"""One row of activations times a weight matrix, as one Triton kernel: the product a decode step
for one client does in every linear layer.

A token for one client reads every weight once, so the step's speed is how close these products
read to the memory's bandwidth. Inductor turns a one-row product into a generated reduction whose
launch parameters it tunes (runtime.py, batcher.py); this kernel is the same arithmetic with the
tile, warp count and loop pipelining chosen for the shapes of a decoder layer by measurement
(`benchmarks/quantized_matvec.py --sweep_matvec`), for bf16 / fp16 weights and for 8-bit weights (int8, fp8 e4m3)
with a scale per output row (loading.RowScaledLinear), the weight converted to float32 as it is
read and the scale applied to the sums. For a merged SwiGLU MLP's gate/up product it can also take
SiLU(gate) x up from the float32 sums (`glu`; loading.GluMatvecMLP), saving the step a kernel per
layer (3.93 against 4.08 ms per 7B bf16 step on an H200: benchmarks/RESULTS.md). It is registered as a torch operator
(`torch.library.triton_op`), so the compiled, CUDA-graphed decode step contains it like its own
kernels. CUDA only (this module imports Triton), but for a CPU test through Triton's interpreter.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _matvec_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GLU: tl.constexpr):
    if GLU:  # rows in pairs: gate row r, then its up row r + N / 2
        pair = tl.arange(0, BLOCK_N)
        rows = tl.program_id(0) * (BLOCK_N // 2) + pair // 2 + (pair % 2) * (N // 2)
    else:
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # N is a multiple of BLOCK_N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    sums = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
            x = tl.load(x_ptr + cols)
        else:
            inside = cols < K
            w = tl.load(w_rows + cols[None, :], mask=inside[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + cols, mask=inside, other=0.0)
        sums += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(sums, axis=1)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + rows).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rows).to(tl.float32)
    if GLU:  # SiLU(gate) x up, on the float32 sums
        gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        outputs = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + outputs, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty))


def launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None,
           bias: torch.Tensor | None, block_n: int, block_k: int, warps: int, stages: int, kernel=None,
           glu: bool = False) -> None:
    """out[N] = (weight[N, K] @ x[K]) * scale + bias with the given launch parameters (`kernel`:
    the Triton kernel as called, wrapped for tracing inside a triton_op). `glu`: the weight is
    gate and up stacked (a merged SwiGLU MLP's), out[N / 2] = SiLU(gate) * up."""
    n, k = weight.shape
    (kernel or _matvec_kernel)[(n // block_n,)](
        x, weight, x if scale is None else scale, x if bias is None else bias, out, n, k,
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0, GLU=glu, num_warps=warps)


def launch_parameters(n: int, k: int, element_size: int) -> tuple[int, int, int, int]:
    """(rows per program, columns per loop step, warps, pipelined loop stages) for a [n, k] weight
    of `element_size`-byte elements. On one H200 (2026-12-05), of 2-16 rows, 512-2048 columns (4096
    for 8 bits), 4 or 8 warps and 1 or 3 stages, these were the fastest for each merged product of a
    7B Llama (q/k/v 12288 x 4096, o 4096 x 4096, gate/up 22016 x 4096, down 4096 x 11008), bf16 and
    fp8, and within 5% of the fastest for its output head (32000 x 4096): benchmarks/RESULTS.md."""
    if n % 2:
        raise ValueError(f"matvec: {n} output rows, not a multiple of 2 (the fewest rows a program takes)")
    if element_size >= 2:
        block_n, block_k, warps, stages = 4, 2048 if k % 2048 == 0 else 1024, 4, 1
    else:  # 8-bit weights: more rows per program, loads pipelined over three stages
        block_n, block_k, warps, stages = 8, 512 if k % 512 == 0 else 1024, 4, 3
    while n % block_n:
        block_n //= 2
    return block_n, min(block_k, triton.next_power_of_2(k)), warps, stages


@triton_op("serving::matvec", mutates_args=())
def matvec(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,  # noqa: UP045
           bias: Optional[torch.Tensor] = None, glu: bool = False) -> torch.Tensor:  # noqa: UP045  (the operator's schema reads typing's form)
    """x [..., K] with one row in all, weight [N, K] (16-bit, or 8-bit with `scale` [N] per output
    row): x @ weight.T * scale + bias, in x's dtype. `glu`: the weight's first N / 2 rows are a
    SwiGLU MLP's gate, the rest its up: SiLU(gate) * up, N / 2 outputs."""
    n, k = weight.shape
    out = x.new_empty(*x.shape[:-1], n // 2 if glu else n)
    launch(x.reshape(-1).contiguous(), weight, out.view(-1), scale, bias,
           *launch_parameters(n, k, weight.element_size()), kernel=wrap_triton(_matvec_kernel), glu=glu)
    return out
