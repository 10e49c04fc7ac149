"""The process-wide settings serving changes, in one place. `Engine` applies them when it
starts (and chinese_gpt2/generate.py before its HF `generate`): each one changes the whole
process, so they are listed here rather than set where they first mattered."""

from __future__ import annotations

import sys

import torch


def apply_serving_settings(device: torch.device, compile_decode: bool) -> None:
    # Python hands the GIL to a waiting thread every 5 ms by default: with streams' readers and
    # the HTTP server busy, the batcher thread would wait that long for it after every step.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    if device.type == "cuda":
        # SDPA's cuDNN backend builds an execution plan for every new key length and caches it
        # per thread: token-by-token decoding (a new length each step, a new thread per request)
        # then spent ~50 ms per token on plan building (H100: 13 vs 125 tokens/s). The flash /
        # memory-efficient kernels need no plans. (The Batcher's compiled decode step, whose
        # shapes are few and fixed, turns it back on for itself: batcher.DECODE_ATTENTION.)
        torch.backends.cuda.enable_cudnn_sdp(False)
    if compile_decode:
        # Tuning the generated kernels' launch parameters: a 7B step at batch 1 on an H100 took
        # 5.9 instead of 6.3 ms (benchmarks/RESULTS.md), for a longer first compile.
        from torch._inductor import config as inductor_config

        inductor_config.coordinate_descent_tuning = True
