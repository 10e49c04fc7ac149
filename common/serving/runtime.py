"""The process-wide settings serving changes, in one place. `Engine` applies them when it
starts (and chinese_gpt2/generate.py before its HF `generate`): each one changes the whole
process (torch.compile's: from torch 2.12 on, the thread that sets them and the threads started
in a copy of its context, as the batcher's is), so they are listed here rather than set where
they first mattered."""

from __future__ import annotations

import gc
import gzip
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
RECOMPILE_LIMIT = 64  # compiled graphs that the engines of one process may hold together


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
        # Every torch.compile of a functools.partial (each engine's prefill and decode widths) runs
        # through one wrapper function of dynamo's, so all their graphs count against one code
        # object's recompile_limit (default 8): an engine takes 3-6 (prefill, widths x spans), and
        # a second weight kind in the same process (the benchmark, the GPU tests) went over it, after
        # which dynamo runs the step eagerly without an error (tests/test_serving.py).
        # (From torch 2.12 on, these two settings hold for this thread only: the batcher's thread,
        # which compiles, starts in a copy of its creator's context: batcher._Decoder._start.)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def freeze_what_warm_up_left() -> None:
    """Collect the garbage compiling left and move every object still alive into the garbage
    collector's permanent generation (`gc.freeze`), where its full collections no longer scan
    them. A compiled warm-up leaves up to a million objects or more (a 32-layer model's on the CPU:
    1.38 million tracked, 0.53 million of them garbage; 0.77 million with its kernels cached), and a
    full collection over them took 0.46-0.56 s with nothing to free, 1.27 s the first time (the
    CPU; benchmarks/RESULTS.md), holding the GIL: the batcher and every stream would wait that long
    if one came while a server is busy."""
    gc.collect()
    gc.freeze()


def load_compile_cache(path: str | Path) -> int:
    """Put the compiled kernels an earlier run saved in `path` (`save_compile_cache`) into this
    machine's torch.compile caches, so that compiling the same graphs again finds them (their
    generation and tuning skipped; kernels built by another torch, triton or GPU are not
    matched, and are compiled anew). Returns how many artefacts it loaded (0: no file)."""
    path = Path(path)
    if not path.is_file():
        return 0
    info = torch.compiler.load_cache_artifacts(gzip.decompress(path.read_bytes()))
    loaded = sum(len(found) for found in info.artifacts.values()) if info else 0
    logger.info("compile cache %s: %d artefacts loaded", path, loaded)
    return loaded


def save_compile_cache(path: str | Path) -> int:
    """Write what this process has compiled so far (also what it found in the caches) to `path`:
    torch.compile's portable "mega-cache", gzipped (mostly generated source: a tiny model's compiled
    on the CPU, 0.49 MB, took 0.06 MB). Returns how many artefacts (0: nothing compiled)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, info = saved
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(gzip.compress(data, compresslevel=6))
    partial.replace(path)  # never a half-written cache
    count = sum(len(found) for found in info.artifacts.values())
    logger.info("compile cache %s: %d artefacts written (%.1f MB, %.1f MB gzipped)", path, count, len(data) / 1e6,
                path.stat().st_size / 1e6)
    return count
