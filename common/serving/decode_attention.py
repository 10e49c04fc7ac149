"""Attention of one new token per row over its cached keys and values, as one Triton kernel: the
attention of a decode step (`serve.py --decode_attention triton`, and by default for Llama,
Mistral and Qwen2 models on CUDA: on an H100, 7B bf16, same run, it served 16 / 32 / 64 clients
1.04x / 1.12x / 1.07x faster than SDPA, one client 0.99x: benchmarks/RESULTS.md, 2026-12-06).

With one query per row, attention reads the cache once: one program per (row, head) walks the
span in blocks, scores each block's keys against the query, keeps a running maximum and sum for
the softmax, and accumulates the weighted values, all in float32. A block the mask hides wholly
(slots after the row's position: rows shorter than the span) is not read, where SDPA reads every
slot: the call alone on an H100, 64 rows x 1024 slots, took 356 us with every slot visible
(cuDNN's SDPA 355 us) and 220 us with the rows' lengths spread evenly over the span. With few
rows (one client: 32 programs for an H100's 132 multiprocessors) each span is cut into pieces,
one program each, and a second kernel combines their sums (`split_count`). What it is for: on
one H200 (7B shape, one row, 256 slots, the step profiled eagerly: benchmarks/RESULTS.md,
profile_decode_step.py) the attention kernels took 0.27 ms of a step's 32 layers, ~8 us a layer
for ~4 MB that the memory reads in ~1 us. Registered as a torch operator
(`torch.library.triton_op`), so the compiled, CUDA-graphed decode step contains it, and as a
transformers attention function ("serving_decode") that takes it for one-query calls inside that
compiled step and SDPA's otherwise (prefill, scoring, eager calls, shapes it does not take). CUDA only (this module imports Triton), but for a CPU test
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

NAME = "serving_decode"  # the attn_implementation loading.prepare_weights gives a model
# Cache slots a loop step reads, and warps a program runs: of 32 / 64 / 128 slots x 2 / 4 / 8 warps,
# what read 16 and 64 rows (7B shape, 256 and 1024 slots, all visible) fastest on an H100: 64 x 1024
# in 356 us, 3.0 TB/s, as cuDNN's SDPA (355 us). At 1-4 rows, where launching dominates, within 7%
# of the fastest (benchmarks/RESULTS.md).
BLOCK_S = 128
WARPS = 2
# A mask value at or below this hides its slot: float16's lowest (what masks fill in float16;
# bfloat16 and float32 masks fill lower), past which exp underflows to 0 in float32.
MASKED = tl.constexpr(-65504.0)
PROCESSORS_OFF_CUDA = 132  # an H100's multiprocessors: how the CPU test (Triton's interpreter) splits


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, S, SPLIT, scale,
                             q_row, q_head, k_row, k_head, k_slot, v_row, v_head, v_slot, mask_row, mask_slot,
                             out_row, out_head, GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                             HAS_MASK: tl.constexpr, SPLITS: tl.constexpr):
    row, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // GROUP  # grouped-query attention: GROUP query heads share a key/value head
    dims = tl.arange(0, D)
    q = (tl.load(q_ptr + row * q_row + head * q_head + dims).to(tl.float32) * scale).to(tl.float32)  # (a scale inductor passes as float64)
    keys = k_ptr + row.to(tl.int64) * k_row + kv_head * k_head
    values = v_ptr + row.to(tl.int64) * v_row + kv_head * v_head
    best = -float("inf")  # running maximum of the scores
    total = 0.0  # running sum of exp(score - best)
    acc = tl.zeros((D,), dtype=tl.float32)  # running sum of exp(score - best) * value
    end = tl.minimum(S, (split + 1) * SPLIT)
    for start in range(split * SPLIT, end, BLOCK):
        slots = start + tl.arange(0, BLOCK)
        inside = slots < end
        if HAS_MASK:
            bias = tl.load(mask_ptr + row * mask_row + slots * mask_slot, mask=inside, other=-float("inf")).to(tl.float32)
            read = tl.max(bias, axis=0) > MASKED  # a block the mask hides wholly: its keys and values are not read
        else:
            bias = 0.0
            read = True
        if read:
            k = tl.load(keys + slots[:, None] * k_slot + dims[None, :], mask=inside[:, None], other=0.0)
            scores = tl.where(inside, tl.sum(k.to(tl.float32) * q[None, :], axis=1) + bias, -float("inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            shrink = tl.exp(best - new_best)
            weights = tl.exp(scores - new_best)
            v = tl.load(values + slots[:, None] * v_slot + dims[None, :], mask=inside[:, None], other=0.0)
            acc = acc * shrink + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
            total = total * shrink + tl.sum(weights, axis=0)
            best = new_best
    if SPLITS == 1:  # (a row whose mask hides every slot: zeros)
        tl.store(out_ptr + row * out_row + head * out_head + dims,
                 tl.where(total > 0, acc / total, 0.0).to(out_ptr.dtype.element_ty))
    else:  # this split's share: acc, best, total side by side, for _combine_kernel
        part = part_ptr + ((row * tl.num_programs(1) + head) * SPLITS + split) * (D + 2)
        tl.store(part + dims, acc)
        tl.store(part + D, best)
        tl.store(part + D + 1, total)


@triton.jit
def _combine_kernel(part_ptr, out_ptr, out_row, out_head, D: tl.constexpr, SPLITS: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    parts = part_ptr + (row * tl.num_programs(1) + head) * SPLITS * (D + 2) + tl.arange(0, SPLITS) * (D + 2)
    dims = tl.arange(0, D)
    best, total = tl.load(parts + D), tl.load(parts + D + 1)
    top = tl.max(best, axis=0)  # (-inf where the mask hides every slot of the row)
    weights = tl.exp(best - tl.where(top > -float("inf"), top, 0.0))  # (a split past the span or hidden: weight 0)
    acc = tl.sum(weights[:, None] * tl.load(parts[:, None] + dims[None, :]), axis=0)
    total = tl.sum(weights * total, axis=0)
    tl.store(out_ptr + row * out_row + head * out_head + dims,
             tl.where(total > 0, acc / total, 0.0).to(out_ptr.dtype.element_ty))


def split_count(rows: int, heads: int, slots: int, device: torch.device) -> int:
    """Pieces each (row, head)'s span is cut into, a power of 2: enough programs for about two per
    multiprocessor (one client's 32 heads would leave most of an H100's 132 idle), none shorter
    than a loop step. Many rows (a batch) take one piece each, and no second kernel."""
    processors = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
                  else PROCESSORS_OFF_CUDA)
    splits = 1
    while splits * 2 * rows * heads <= 2 * processors and splits * BLOCK_S < slots:
        splits *= 2
    return splits


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float,
           kernels=(None, None)) -> torch.Tensor:
    """query [B, H, 1, D], key / value [B, Hkv, S, D] (H a multiple of Hkv, D a power of 2; any
    strides with the last dimension contiguous), mask None or additive [B, 1, 1, S]: the attention
    output as [B, 1, H, D] (the layout transformers' attention functions return). `kernels`: the
    two Triton kernels as called (the operator's are wrapped for tracing)."""
    rows, heads, _, dims = query.shape
    slots = key.shape[2]
    splits = split_count(rows, heads, slots, query.device)
    split = triton.cdiv(triton.cdiv(slots, splits), BLOCK_S) * BLOCK_S
    out = query.new_empty(rows, 1, heads, dims)
    part = torch.empty(rows, heads, splits, dims + 2, device=query.device, dtype=torch.float32) if splits > 1 else out
    has_mask = mask is not None
    mask_row, mask_slot = (mask.stride(0), mask.stride(3)) if has_mask else (0, 0)
    (kernels[0] or _decode_attention_kernel)[(rows, heads, splits)](
        query, key, value, mask if has_mask else query, out, part, slots, split, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask_row, mask_slot, out.stride(0), out.stride(2),
        GROUP=heads // key.shape[1], D=dims, BLOCK=BLOCK_S, HAS_MASK=has_mask, SPLITS=splits, num_warps=WARPS)
    if splits > 1:
        (kernels[1] or _combine_kernel)[(rows, heads)](part, out, out.stride(0), out.stride(2), D=dims, SPLITS=splits)
    return out


@triton_op("serving::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:  # noqa: UP045  (as in matvec.py)
    """`attend` as a torch operator, which torch.compile keeps in the graph it captures."""
    return attend(query, key, value, mask, scale, kernels=(wrap_triton(_decode_attention_kernel),
                                                            wrap_triton(_combine_kernel)))


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attend` computes this call: one query per row, a head size that is a power of 2
    and equal for keys and values, whole groups of query heads, a mask shared by the heads."""
    dims = query.shape[-1]
    return (query.shape[2] == 1 and dims == key.shape[-1] == value.shape[-1] and dims & (dims - 1) == 0
            and query.shape[1] % key.shape[1] == 0 and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and (mask is None or (mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1 and mask.dtype != torch.bool
                                  and mask.shape[0] == query.shape[0] and mask.shape[3] == key.shape[2])))


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
