"""Attention of one new token per row over its cached keys and values, as one Triton kernel: the
attention of a decode step (`serve.py --decode_attention triton`; opt-in, its speed not yet
measured on a GPU).

With one query per row, attention reads the cache once: one program per (row, head) walks the
span in blocks, scores each block's keys against the query, keeps a running maximum and sum for
the softmax, and accumulates the weighted values, all in float32. One H200, 7B shape, one client,
256 slots: SDPA's kernels took 0.27 ms a step for 32 layers (~8 us a layer, for ~4 MB read at
~1 us of bandwidth: benchmarks/RESULTS.md, profile_decode_step.py), which is what this kernel
is for. Registered as a torch operator (`torch.library.triton_op`), so the compiled, CUDA-graphed
decode step contains it, and as a transformers attention function ("serving_decode") that takes
it for one-query calls inside that compiled step and SDPA's otherwise (prefill, scoring, eager
calls, shapes it does not take). CUDA only (this module imports Triton), but for a CPU test
through Triton's interpreter.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "serving_decode"  # the attn_implementation `use_decode_attention` gives a model
BLOCK_S = 64  # cache slots a loop step reads


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, S, scale,
                             q_row, q_head, k_row, k_head, k_slot, v_row, v_head, v_slot, mask_row, mask_slot,
                             out_row, out_head,
                             GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    kv_head = head // GROUP  # grouped-query attention: GROUP query heads share a key/value head
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + row * q_row + head * q_head + dims).to(tl.float32) * scale
    keys = k_ptr + row.to(tl.int64) * k_row + kv_head * k_head
    values = v_ptr + row.to(tl.int64) * v_row + kv_head * v_head
    best = -float("inf")  # running maximum of the scores
    total = 0.0  # running sum of exp(score - best)
    acc = tl.zeros((D,), dtype=tl.float32)
    for start in range(0, S, BLOCK):
        slots = start + tl.arange(0, BLOCK)
        inside = slots < S
        k = tl.load(keys + slots[:, None] * k_slot + dims[None, :], mask=inside[:, None], other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if HAS_MASK:
            scores += tl.load(mask_ptr + row * mask_row + slots * mask_slot, mask=inside, other=0.0).to(tl.float32)
        scores = tl.where(inside, scores, -float("inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        shrink = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best)
        v = tl.load(values + slots[:, None] * v_slot + dims[None, :], mask=inside[:, None], other=0.0)
        acc = acc * shrink + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
        total = total * shrink + tl.sum(weights, axis=0)
        best = new_best
    tl.store(out_ptr + row * out_row + head * out_head + dims, (acc / total).to(out_ptr.dtype.element_ty))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float,
           kernel=None) -> torch.Tensor:
    """query [B, H, 1, D], key / value [B, Hkv, S, D] (H a multiple of Hkv, D a power of 2; any
    strides with the last dimension contiguous), mask None or additive [B, 1, 1, S]: the attention
    output as [B, 1, H, D] (the layout transformers' attention functions return)."""
    rows, heads, _, dims = query.shape
    out = query.new_empty(rows, 1, heads, dims)
    has_mask = mask is not None
    mask_row, mask_slot = (mask.stride(0), mask.stride(3)) if has_mask else (0, 0)
    (kernel or _decode_attention_kernel)[(rows, heads)](
        query, key, value, mask if has_mask else query, out, key.shape[2], scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask_row, mask_slot, out.stride(0), out.stride(2),
        GROUP=heads // key.shape[1], D=dims, BLOCK=BLOCK_S, HAS_MASK=has_mask, num_warps=4)
    return out


@triton_op("serving::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:  # noqa: UP045  (as in matvec.py)
    """`attend` as a torch operator, which torch.compile keeps in the graph it captures."""
    return attend(query, key, value, mask, scale, kernel=wrap_triton(_decode_attention_kernel))


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attend` computes this call: one query per row, a head size that is a power of 2
    and equal for keys and values, whole groups of query heads, a mask shared by the heads."""
    dims = query.shape[-1]
    return (query.shape[2] == 1 and dims == key.shape[-1] == value.shape[-1] and dims & (dims - 1) == 0
            and query.shape[1] % key.shape[1] == 0 and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and (mask is None or (mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1
                                  and mask.shape[0] == query.shape[0] and mask.dtype != torch.bool)))


def serving_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A transformers attention function: the kernel for a one-query call inside the compiled
    decode step (CUDA), transformers' SDPA function for anything else."""
    if (torch.compiler.is_compiling() and query.is_cuda and not dropout and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and takes(query, key, value, attention_mask)):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return torch.ops.serving.decode_attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(NAME, serving_decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # masks transformers builds (prefill): SDPA's
