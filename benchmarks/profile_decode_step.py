"""Where a decode step's time goes: the serving engine's step (`common/serving/batcher.py`,
`_decode_step` over a `SlotCache`) for a 7B Llama at several batch widths and attention spans,
its GPU kernels grouped (matrix products, attention, the rest) by torch.profiler, against what
reading the weights and the KV cache once would take at the measured copy bandwidth. And the
attention call alone on the step's shapes: SDPA per backend, and on CUDA the Triton kernel of
`--decode_attention triton` with every slot visible and with rows of different lengths.

    python benchmarks/profile_decode_step.py            # one GPU
    python benchmarks/profile_decode_step.py --compiled --widths 1 --spans 256 --quantize none,int8_rowwise,fp8_rowwise
    python benchmarks/profile_decode_step.py --tiny     # CPU smoke test

By default the step runs eagerly (kernel names stay readable): matrix products and attention run
cuBLAS's and SDPA's kernels, the rest (norms, RoPE, masks: fused by inductor when compiled) is an
upper bound. `--compiled` profiles the step as the server compiles it (inductor with
coordinate-descent tuning, "max-autotune" at one row) but without CUDA graphs, so that each
kernel is timed on its own: one row's products are then inductor's reductions (kernel names
with "mm"), and `step_ms` includes the host's launch gaps that CUDA graphs remove (the
kernel groups do not). Caution: on an H200 its kernels summed to about twice the GPU time of
the server's graphed step (benchmarks/RESULTS.md), so read it for which kernels run, not for
how long the server's take. `--quantize` profiles quantised weights too (common/serving/loading.py).
Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.decode_throughput import build_model, copy_bandwidth  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.serving.batcher import (  # noqa: E402
    DECODE_ATTENTION,
    SlotCache,
    _cache_argument,
    _decode_step,
    attention_window,
)
from common.serving.loading import QUANTIZATIONS, prepare_weights, weight_bytes, weights_variant  # noqa: E402
from common.serving.runtime import apply_serving_settings  # noqa: E402


def kernel_group(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("fmha", "attention", "flash", "attn")):
        return "attention"
    if any(k in lowered for k in ("gemm", "gemv", "cutlass", "sm90_xmma", "matmul", "splitk", "nvjet")):
        return "matmul"
    if lowered.startswith("triton") and re.search(r"_b?mm(_|\d*$)", lowered):  # inductor's, named after aten.mm
        return "matmul"
    return "other"


def profile(fn, steps: int) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
    """Milliseconds of device time per call by kernel group, and the top kernels (name, ms and
    launches per call: a kernel of every decoder layer launches num_hidden_layers times)."""
    for _ in range(3):  # past compilation and any tuning done at a kernel's first launches
        fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    groups: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or 0
        if device_us <= 0 or event.key.startswith(("aten::", "cuda", "Memset")):  # kernels and copies only
            continue
        groups[kernel_group(event.key)] += device_us / 1e3 / steps
        kernels[event.key] += device_us / 1e3 / steps
        launches[event.key] += event.count
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:10]
    return dict(groups), [(name[:90], round(ms, 3), launches[name] / steps) for name, ms in top]


def timed_ms(fn, repeats: int = 50) -> float:
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="1,16,32,64")
    parser.add_argument("--spans", default="256,512")
    parser.add_argument("--compiled", action="store_true",
                        help="Profile the step compiled as the server compiles it, without CUDA graphs (see above).")
    parser.add_argument("--quantize", default="none",
                        help="Weights, comma-separated: " + ", ".join(QUANTIZATIONS) + ", each optionally followed by "
                             "'+fused' (q/k/v and gate/up merged first), '+triton' (one row's products through "
                             "common/serving/matvec.py's kernel), '+attn' (the step's attention through "
                             "common/serving/decode_attention.py's kernel) and / or '+glu' (with +fused+triton: "
                             "SiLU(gate) x up taken in the gate/up kernel). Default: none (bf16).")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="outputs/benchmarks/profile_decode_step.json")
    args = parser.parse_args()
    kinds = args.quantize.split(",")
    try:
        variants = {kind: weights_variant(kind) for kind in kinds}
    except UserError as err:
        parser.error(str(err))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    base = build_model("tiny" if args.tiny else "llama2-7b", device)
    config = base.config
    dtype = next(base.parameters()).dtype
    head_dim = config.hidden_size // config.num_attention_heads
    kv_per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    bandwidth = copy_bandwidth(device)
    widths = [int(w) for w in args.widths.split(",")]
    spans = [int(s) for s in args.spans.split(",")]
    if args.compiled:
        apply_serving_settings(device, compile_decode=True)
    rows = []
    for kind in kinds:
        model = base if kind == "none" else prepare_weights(copy.deepcopy(base), *variants[kind])
        rows += profile_model(model, kind, args, widths, spans, kv_per_slot, bandwidth, device, dtype,
                              with_attention=kind == kinds[0])
        del model
        torch._dynamo.reset()
    weights = weight_bytes(base)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, {weights / 1e9:.2f} GB of {dtype} weights, KV {kv_per_slot / 1e3:.0f} kB a "
          f"slot, copy bandwidth {bandwidth / 1e9 if bandwidth else 0:.0f} GB/s, "
          f"{'compiled (no CUDA graphs)' if args.compiled else 'eager'}")
    print(f"{'weights':>12s} {'width':>5s} {'span':>5s} {'step ms':>8s} {'matmul':>7s} {'attn':>7s} {'other':>7s} "
          f"{'bytes ms':>8s}  attention alone x layers")
    for row in rows:
        print(f"{row['quantize']:>12s} {row['width']:5d} {row['span']:5d} {row['step_ms']:8.3f} {row.get('matmul_ms', 0):7.3f} "
              f"{row.get('attention_ms', 0):7.3f} {row.get('other_ms', 0):7.3f} {row['bytes_at_copy_bandwidth_ms'] or 0:8.3f}  "
              f"{row.get('attention_all_layers_ms', '')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    setup = f"{name}, torch {torch.__version__}, {'compiled without CUDA graphs' if args.compiled else 'eager'}"
    Path(args.out).write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")


def attention_alone(config, width: int, span: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    """Milliseconds of the attention call alone on a step's shapes, times the layers: per SDPA
    backend, every slot visible; on CUDA also decode_attention.py's kernel, every slot visible
    ("triton") and with the rows' lengths spread evenly, row r seeing the first (r + 1/2) / width
    of the span, half on average ("triton_spread": a batch of requests of different lengths;
    SDPA reads every slot whatever its mask, the kernel skips the blocks the mask hides)."""
    head_dim = config.hidden_size // config.num_attention_heads
    q = torch.randn(width, config.num_attention_heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.randn(width, config.num_key_value_heads, span, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.zeros(width, 1, 1, span, device=device, dtype=dtype)
    times = {}
    sdp = torch.nn.attention.SDPBackend
    for name, backend, with_mask in (("efficient", sdp.EFFICIENT_ATTENTION, True), ("math", sdp.MATH, True),
                                      ("cudnn", sdp.CUDNN_ATTENTION, True), ("flash_no_mask", sdp.FLASH_ATTENTION, False)):
        try:
            with torch.nn.attention.sdpa_kernel(backend):
                attention = partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask if with_mask else None)
                ms = timed_ms(attention, repeats=repeats)
            times[name] = round(ms * config.num_hidden_layers, 3)  # every layer
        except RuntimeError as err:
            times[name] = f"unavailable: {str(err).splitlines()[0][:80]}"
    if device.type == "cuda":
        from common.serving.decode_attention import attend

        seen = ((torch.arange(width, device=device) + 0.5) * span / width).ceil()  # slots each row sees
        spread = mask.masked_fill((torch.arange(span, device=device) >= seen[:, None])[:, None, None, :],
                                  torch.finfo(dtype).min)
        for name, m in (("triton", mask), ("triton_spread", spread)):
            times[name] = round(timed_ms(partial(attend, q, k, v, m, head_dim ** -0.5), repeats=repeats)
                                * config.num_hidden_layers, 3)
    return times


def profile_model(model, kind: str, args, widths: list[int], spans: list[int], kv_per_slot: int,
                  bandwidth: float | None, device: torch.device, dtype: torch.dtype, with_attention: bool) -> list[dict]:
    """One row per width x span: the step's kernels grouped, its time, the bytes it reads, and
    (`with_attention`) the attention call alone on its shapes (`attention_alone`)."""
    config = model.config
    weights = weight_bytes(model)
    decode = partial(_decode_step, model, dtype, _cache_argument(model), attention_window(model))
    rows = []
    with torch.inference_mode():
        for width in widths:
            # as the Batcher compiles it (a function per width), minus CUDA graphs
            compiled = torch.compile(decode, mode="max-autotune-no-cudagraphs" if width == 1 else None) \
                if args.compiled else decode

            def step(*step_args, compiled=compiled):  # with the attention kernels the server's step may use
                backends = DECODE_ATTENTION if device.type == "cuda" else [torch.nn.attention.SDPBackend.MATH]
                with torch.nn.attention.sdpa_kernel(backends):
                    return compiled(*step_args)

            cache = SlotCache(width, max(spans), device)
            ids = torch.randint(3, config.vocab_size, (width, 1), device=device)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # eager: allocates every layer's cache
                decode(cache, ids, torch.zeros((width, 1), dtype=torch.long, device=device))
            for span in spans:
                cache.span = span
                cache.position.fill_(span - 1)
                positions = torch.full((width, 1), span - 1, device=device)
                one_step = partial(step, cache, ids, positions)
                groups, top = profile(one_step, steps=5)
                bytes_read = weights + width * span * kv_per_slot
                row = {"quantize": kind, "width": width, "span": span, "step_ms": round(timed_ms(one_step, repeats=5 if args.tiny else 20), 3),
                       **{f"{k}_ms": round(v, 3) for k, v in sorted(groups.items())},
                       "bytes_GB": round(bytes_read / 1e9, 2),
                       "bytes_at_copy_bandwidth_ms": round(bytes_read / bandwidth * 1e3, 3) if bandwidth else None,
                       "top_kernels": top}
                if with_attention:  # (the same for every quantisation)
                    row["attention_all_layers_ms"] = attention_alone(config, width, span, dtype, device,
                                                                     repeats=5 if args.tiny else 50)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
