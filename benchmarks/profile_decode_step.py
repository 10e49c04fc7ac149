"""Where a decode step's time goes: the serving engine's step (`common/serving/batcher.py`,
`_decode_step` over a `SlotCache`) for a 7B Llama at several batch widths and attention spans,
its GPU kernels grouped (matrix products, attention, the rest) by torch.profiler, against what
reading the weights and the KV cache once would take at the measured copy bandwidth. And the
attention call alone (SDPA on the step's shapes) per backend.

    python benchmarks/profile_decode_step.py            # one GPU
    python benchmarks/profile_decode_step.py --tiny     # CPU smoke test

The step runs eagerly here (no torch.compile, so kernel names stay readable): matrix products
and attention run the same kernels as in the compiled step; the rest (norms, RoPE, masks:
fused by inductor there) is an upper bound. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
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
from common.serving.batcher import DECODE_ATTENTION, SlotCache, _cache_argument, _decode_step  # noqa: E402
from common.serving.loading import weight_bytes  # noqa: E402


def kernel_group(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("fmha", "attention", "flash", "attn")):
        return "attention"
    if any(k in lowered for k in ("gemm", "gemv", "cutlass", "sm90_xmma", "matmul", "splitk", "nvjet")):
        return "matmul"
    return "other"


def profile(fn, steps: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Milliseconds of device time per call by kernel group, and the top kernels."""
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
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or 0
        if device_us <= 0 or event.key.startswith(("aten::", "cuda", "Memset")):  # kernels and copies only
            continue
        groups[kernel_group(event.key)] += device_us / 1e3 / steps
        kernels[event.key] += device_us / 1e3 / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:6]
    return dict(groups), [(name[:90], round(ms, 3)) for name, ms in top]


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
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="outputs/benchmarks/profile_decode_step.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    model = build_model("tiny" if args.tiny else "llama2-7b", device)
    config = model.config
    dtype = next(model.parameters()).dtype
    weights = weight_bytes(model)
    head_dim = config.hidden_size // config.num_attention_heads
    kv_per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    bandwidth = copy_bandwidth(device)
    widths = [int(w) for w in args.widths.split(",")]
    spans = [int(s) for s in args.spans.split(",")]
    decode = partial(_decode_step, model, dtype, _cache_argument(model))

    def step(*args):  # with the attention kernels the server's step may use
        backends = DECODE_ATTENTION if device.type == "cuda" else [torch.nn.attention.SDPBackend.MATH]
        with torch.nn.attention.sdpa_kernel(backends):
            return decode(*args)

    rows = []
    with torch.inference_mode():
        for width in widths:
            cache = SlotCache(width, max(spans), device)
            ids = torch.randint(3, config.vocab_size, (width, 1), device=device)
            step(cache, ids, torch.zeros((width, 1), dtype=torch.long, device=device))  # allocates every layer's cache
            for span in spans:
                cache.span = span
                cache.position.fill_(span - 1)
                positions = torch.full((width, 1), span - 1, device=device)
                one_step = partial(step, cache, ids, positions)
                groups, top = profile(one_step, steps=5)
                bytes_read = weights + width * span * kv_per_slot
                row = {"width": width, "span": span, "step_ms": round(timed_ms(one_step, repeats=5 if args.tiny else 20), 3),
                       **{f"{k}_ms": round(v, 3) for k, v in sorted(groups.items())},
                       "bytes_GB": round(bytes_read / 1e9, 2),
                       "bytes_at_copy_bandwidth_ms": round(bytes_read / bandwidth * 1e3, 3) if bandwidth else None,
                       "top_kernels": top}
                # the attention call alone, per SDPA backend, on this step's shapes
                heads = config.num_attention_heads
                q = torch.randn(width, heads, 1, head_dim, device=device, dtype=dtype)
                k = torch.randn(width, config.num_key_value_heads, span, head_dim, device=device, dtype=dtype)
                v = torch.randn_like(k)
                mask = torch.zeros(width, 1, 1, span, device=device, dtype=dtype)
                sdpa = {}
                sdp = torch.nn.attention.SDPBackend
                for name, backend, with_mask in (("efficient", sdp.EFFICIENT_ATTENTION, True), ("math", sdp.MATH, True),
                                                  ("cudnn", sdp.CUDNN_ATTENTION, True),
                                                  ("flash_no_mask", sdp.FLASH_ATTENTION, False)):
                    try:
                        with torch.nn.attention.sdpa_kernel(backend):
                            attention = partial(F.scaled_dot_product_attention, q, k, v,
                                                attn_mask=mask if with_mask else None)
                            ms = timed_ms(attention, repeats=5 if args.tiny else 50)
                        sdpa[name] = round(ms * config.num_hidden_layers, 3)  # every layer
                    except RuntimeError as err:
                        sdpa[name] = f"unavailable: {str(err).splitlines()[0][:80]}"
                row["sdpa_all_layers_ms"] = sdpa
                rows.append(row)
                print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, {weights / 1e9:.2f} GB of weights, KV {kv_per_slot / 1e3:.0f} kB a slot, "
          f"copy bandwidth {bandwidth / 1e9 if bandwidth else 0:.0f} GB/s")
    print(f"{'width':>5s} {'span':>5s} {'step ms':>8s} {'matmul':>7s} {'attn':>7s} {'other':>7s} {'bytes ms':>8s}  sdpa x layers")
    for row in rows:
        print(f"{row['width']:5d} {row['span']:5d} {row['step_ms']:8.3f} {row.get('matmul_ms', 0):7.3f} "
              f"{row.get('attention_ms', 0):7.3f} {row.get('other_ms', 0):7.3f} {row['bytes_at_copy_bandwidth_ms'] or 0:8.3f}  "
              f"{row['sdpa_all_layers_ms']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": f"{name}, torch {torch.__version__}", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
