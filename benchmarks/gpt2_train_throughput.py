"""GPT-2 small training throughput: the original recipe against chinese_gpt2/train.py.

    python benchmarks/gpt2_train_throughput.py                       # one GPU, default variants
    python benchmarks/gpt2_train_throughput.py --variants baseline,recipe --steps 6
    python benchmarks/gpt2_train_throughput.py --tiny                # CPU smoke test, 2 layers, seconds

Trains GPT-2 small (12 layers x 12 heads x 768, context 1024, vocabulary 21,128 as
bert-base-chinese) for a fixed number of optimizer steps in several ways, each in its own
child process (clean CUDA memory statistics, compiler and accelerate state), one after
the other in this one command:

  baseline   the original recipe: HF GPT2LMHeadModel with GPT2Config's defaults
             (dropout 0.1) and eager attention, fp32, TrainingArguments' defaults
             (only the batch size, step count and output options set).
  recipe     chinese_gpt2/train.py with chinese_gpt2/configs/gpt2_small_gpu.yaml, through
             train.py's own `parse` and `build_trainer` (the Trainer `main` trains); only
             data_dir, output_dir, max_steps, no evaluation / saving, one log line at
             the end and no progress bar are set on the command line.
  others     ablations: the recipe with one change (see VARIANTS below, or --list).

Data: synthetic, written in prepare_data.py's format (the token shards of common/shards.py:
uniformly random uint16 token ids), with a BERT-style tokenizer of exactly 21,128 tokens
(BERT's 5 special tokens, [BOS], [EOS], printable ASCII and CJK characters from U+4E00).
Throughput does not depend on the token values.

Timing: each variant first trains --warmup_tokens (at least 2 optimizer steps; compilation
and allocator warm-up happen there), then --measure_tokens (the baseline, 10x slower:
--baseline_measure_tokens), both rounded up to whole optimizer steps. A TrainerCallback
synchronises the GPU at the end of the last warm-up step and of the last measured step
and divides the measured tokens by the time between: two synchronisations in all, so
the Trainer's own overlap of CPU and GPU work is left as it is.
MFU = tokens/s x (6 N + 12 L T d) / peak, with N the parameters without the position
embedding (the tied output layer counted once), L layers, T context, d width: the
PaLM / nanoGPT formula, attention counted as if not causal. Peak: --peak_tflops (989,
the H100 SXM dense bf16 figure; used for the fp32 baseline too, as the ratio to the
chip's best). Peak memory: torch.cuda.max_memory_allocated over the whole run.

Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recipe_loader import load_recipe_script  # benchmarks/ is on sys.path when a benchmark runs
from shapes import write_synthetic_source

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "chinese_gpt2" / "configs" / "gpt2_small_gpu.yaml"
VOCAB_SIZE = 21128

# name -> how it differs from the recipe: "yaml" entries replace keys of the GPU config,
# "args" are extra train.py command-line flags.
VARIANTS: dict[str, dict] = {
    "baseline": {"help": "original recipe: fp32, eager attention, dropout 0.1, TrainingArguments defaults"},
    "recipe": {"help": "train.py + gpt2_small_gpu.yaml"},
    "recipe_hf_loss": {"help": "recipe with the model's own loss (full logits): --loss_chunk_size 0",
                       "yaml": {"loss_chunk_size": 0}},
    "recipe_sdpa_mask": {"help": "recipe with attn_implementation sdpa: under compile transformers 5.17 passes "
                         "SDPA a [B,1,T,T] causal mask tensor instead of is_causal",
                         "yaml": {"attn_implementation": "sdpa"}},
    "recipe_step_syncs": {"help": "recipe with the Trainer's defaults for NaN check and batch copies "
                          "(a GPU sync every step), no loader workers",
                          "yaml": {"logging_nan_inf_filter": True, "accelerator_config": {"non_blocking": False},
                                   "dataloader_num_workers": 0, "dataloader_persistent_workers": False}},
    "recipe_no_compile": {"help": "recipe without torch.compile", "yaml": {"torch_compile": False}},
    "plain_compile": {"help": "the STACK.md anchor through train.py: bf16 + SDPA + compile, batch 16, "
                      "model's own loss, Trainer defaults otherwise",
                      "yaml": {"attn_implementation": "sdpa", "loss_chunk_size": 0, "per_device_train_batch_size": 16,
                               "gradient_accumulation_steps": 1, "logging_nan_inf_filter": True,
                               "accelerator_config": {"non_blocking": False}, "dataloader_num_workers": 0,
                               "dataloader_persistent_workers": False}},
    "recipe_b32": {"help": "recipe at 32 sequences x 8 accumulation steps (same tokens per optimizer step)",
                   "yaml": {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 8}},
    "recipe_max_autotune": {"help": "recipe with --torch_compile_mode max-autotune-no-cudagraphs (minutes of autotuning)",
                            "args": ["--torch_compile_mode", "max-autotune-no-cudagraphs"]},
    "recipe_cudagraphs": {"help": "recipe with --torch_compile_mode reduce-overhead (CUDA graphs)",
                          "args": ["--torch_compile_mode", "reduce-overhead"]},
}
DEFAULT_VARIANTS = ("baseline,recipe,recipe_sdpa_mask,recipe_hf_loss,recipe_step_syncs,recipe_b32,plain_compile,"
                    "recipe_no_compile")

# --tiny: the same code paths with a 2-layer model, short context, no bf16 / compile (CPU).
TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 128}
TINY_YAML = {**TINY_MODEL, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
             "loss_chunk_size": 256, "bf16": False, "tf32": False, "torch_compile": False,
             "dataloader_num_workers": 0, "dataloader_persistent_workers": False}


# ------------------------------------------------------------------- one variant (child)
def plan_steps(tokens_per_step: int, warmup_tokens: int, measure_tokens: int) -> tuple[int, int]:
    """(warm-up, measured) optimizer steps covering at least the given token counts."""
    return max(2, -(-warmup_tokens // tokens_per_step)), max(1, -(-measure_tokens // tokens_per_step))


def make_timer(warmup_steps: int, measured_steps: int, profile: bool):
    """A TrainerCallback timing optimizer steps warmup+1 .. warmup+measured (and, with
    `profile`, recording the step after them with torch.profiler)."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start = self.t0 = self.t1 = None
            self.profiler = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup_steps:
                sync()
                self.t0 = time.perf_counter()
            elif state.global_step == warmup_steps + measured_steps:
                sync()
                self.t1 = time.perf_counter()
                if profile and cuda:
                    self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    self.profiler.__enter__()
                    self.profile_t0 = time.perf_counter()
            elif self.profiler is not None and state.global_step == warmup_steps + measured_steps + 1:
                sync()
                self.profile_wall = time.perf_counter() - self.profile_t0
                self.profiler.__exit__(None, None, None)

    return StepTimer()


def profile_summary(timer, rows: int = 22) -> dict:
    events = timer.profiler.key_averages()
    kernels = [e for e in events if e.device_time_total > 0]
    total_us = sum(e.self_device_time_total for e in kernels)
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines = [f"{'GPU time %':>10} {'ms':>8} {'calls':>6}  kernel"]
    for e in kernels[:rows]:
        lines.append(f"{100 * e.self_device_time_total / total_us:10.1f} {e.self_device_time_total / 1e3:8.2f} "
                     f"{e.count:6d}  {e.key[:110]}")
    groups = {"attention": ("flash", "fmha", "sdpa", "cudnn", "attention"), "matmul": ("nvjet", "gemm", "cutlass", "xmma"),
              "triton": ("triton_",)}
    by_group = {group: sum(e.self_device_time_total for e in kernels if any(k in e.key.lower() for k in keys)) / 1e3
                for group, keys in groups.items()}
    return {"wall_ms": timer.profile_wall * 1e3, "kernel_ms": total_us / 1e3,
            "gpu_busy": total_us / 1e3 / (timer.profile_wall * 1e3), "kernel_ms_by_kind": by_group,
            "top_kernels": "\n".join(lines)}


def run_variant(name: str, opts: argparse.Namespace) -> dict:
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    spec = VARIANTS[name]
    cuda = torch.cuda.is_available()
    data_dir = Path(opts.data_dir)
    output_dir = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    profile = name in (opts.profile or "").split(",")

    if name == "baseline":
        from common.shards import TokenShards
        from common.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(data_dir / "tokenizer")
        block_size = TINY_MODEL["block_size"] if opts.tiny else 1024
        sizes = {k: TINY_MODEL[k] for k in ("n_layer", "n_head", "n_embd")} if opts.tiny else {}
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=block_size, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
        batch, accumulation = (4, 1) if opts.tiny else (opts.baseline_batch_size, 1)
        warmup_steps, measured_steps = plan_steps(batch * block_size, opts.warmup_tokens // 4,
                                                  opts.baseline_measure_tokens)
        max_steps = warmup_steps + measured_steps
        timer = make_timer(warmup_steps, measured_steps, profile=False)
        args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=batch,
                                 max_steps=max_steps, save_strategy="no", report_to="none", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, data_collator=default_data_collator, callbacks=[timer],
                          train_dataset=TokenShards(data_dir, "train", block_size))
        settings = {"dtype": "fp32", "attention": "eager", "compile": False, "loss": "model (full logits)",
                    "optim": str(args.optim.value if hasattr(args.optim, "value") else args.optim)}
    else:
        import yaml

        train = load_recipe_script("chinese_gpt2")
        config_yaml = yaml.safe_load(CONFIG.read_text())
        if opts.tiny:
            config_yaml.update(TINY_YAML)
        config_yaml.update(copy.deepcopy(spec.get("yaml", {})))
        tokens_per_step = (config_yaml["per_device_train_batch_size"] * config_yaml["gradient_accumulation_steps"]
                           * config_yaml["block_size"])
        warmup_steps, measured_steps = plan_steps(tokens_per_step, opts.warmup_tokens, opts.measure_tokens)
        max_steps = warmup_steps + measured_steps + int(profile)
        timer = make_timer(warmup_steps, measured_steps, profile)
        yaml_path = output_dir / "config.yaml"
        yaml_path.write_text(yaml.safe_dump(config_yaml, sort_keys=False))
        argv = [str(yaml_path), "--data_dir", str(data_dir), "--output_dir", str(output_dir),
                "--max_steps", str(max_steps), "--eval_strategy", "no", "--save_strategy", "no",
                "--logging_steps", str(max_steps), "--disable_tqdm", "true", *spec.get("args", [])]
        data_args, model_args, training_args = train.parse(argv)
        trainer = train.build_trainer(data_args, model_args, training_args)
        trainer.add_callback(timer)
        args, block_size = training_args, data_args.block_size
        batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
        settings = {"dtype": "bf16 autocast" if args.bf16 else "fp32",
                    "attention": model_args.attn_implementation,
                    "compile": bool(args.torch_compile),
                    "compile_mode": args.torch_compile_mode,
                    "loss": f"chunked ({model_args.loss_chunk_size})" if model_args.loss_chunk_size else "model (full logits)",
                    "optim": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
                    "nan_check": args.logging_nan_inf_filter, "loader_workers": args.dataloader_num_workers,
                    "non_blocking": bool(args.accelerator_config.non_blocking), "config": str(CONFIG.relative_to(REPO)),
                    "yaml_changes": spec.get("yaml", {}), "extra_args": spec.get("args", [])}

    model = trainer.model
    n_layer, n_embd = model.config.n_layer, model.config.n_embd
    params_no_pos = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    flops_per_token = 6 * params_no_pos + 12 * n_layer * block_size * n_embd
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if timer.t1 is None:
        raise RuntimeError("the measured steps did not finish")
    seconds = timer.t1 - timer.t0
    tokens = measured_steps * batch * accumulation * block_size
    tokens_per_s = tokens / seconds
    result = {
        "variant": name, "description": spec["help"], "settings": settings,
        "batch": batch, "gradient_accumulation_steps": accumulation, "block_size": block_size,
        "tokens_per_optimizer_step": batch * accumulation * block_size,
        "warmup_steps": warmup_steps, "measured_steps": measured_steps, "measured_tokens": tokens,
        "measured_seconds": round(seconds, 3), "warmup_seconds": round(timer.t0 - timer.start, 1),
        "tokens_per_s": round(tokens_per_s), "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token,
        "mfu": tokens_per_s * flops_per_token / (opts.peak_tflops * 1e12) if cuda else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    }
    if timer.profiler is not None:
        result["profile"] = profile_summary(timer)
    return result


# -------------------------------------------------------------------------- parent
def environment() -> dict:
    import accelerate
    import torch
    import transformers

    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "cuda": torch.version.cuda, "device": "cpu"}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    return env


def table(results: list[dict]) -> str:
    ok = [r for r in results if "tokens_per_s" in r]
    base = next((r["tokens_per_s"] for r in ok if r["variant"] == "baseline"), None)
    lines = [f"{'variant':<24} {'batch x acc':>11} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'x baseline':>10}  warm-up s"]
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"{r['variant']:<24} {r.get('error', '?')[-150:]}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        mem = f"{r['peak_memory_gib']:9.1f}" if r["peak_memory_gib"] is not None else "      n/a"
        ratio = f"{r['tokens_per_s'] / base:9.2f}x" if base else "       n/a"
        lines.append(f"{r['variant']:<24} {r['batch']:>6} x {r['gradient_accumulation_steps']:<2} "
                     f"{r['tokens_per_s']:>10,} {mfu} {mem} {ratio}  {r['warmup_seconds']:9.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, run in this order (default: %(default)s); all: {', '.join(VARIANTS)}")
    parser.add_argument("--list", action="store_true", help="describe the variants and exit")
    parser.add_argument("--measure_tokens", type=int, default=2_000_000,
                        help="tokens timed per variant, rounded up to whole optimizer steps (default: %(default)s)")
    parser.add_argument("--baseline_measure_tokens", type=int, default=400_000,
                        help="tokens timed for the (slow) baseline (default: %(default)s)")
    parser.add_argument("--warmup_tokens", type=int, default=500_000,
                        help="tokens trained before timing starts, at least 2 optimizer steps; compilation "
                        "happens in the first (the baseline warms up on a quarter) (default: %(default)s)")
    parser.add_argument("--baseline_batch_size", type=int, default=16,
                        help="the baseline's per-device batch (no accumulation); 16 as in STACK.md (default: %(default)s)")
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for MFU; H100 SXM 989 (default: %(default)s)")
    parser.add_argument("--data_dir", default=None,
                        help="where the synthetic token files go (default: a new temporary folder)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "benchmarks" / "gpt2_train_throughput.json"),
                        help="JSON results (default: %(default)s)")
    parser.add_argument("--time_limit", type=float, default=None,
                        help="seconds for all variants: a child still running then is stopped and reported as "
                        "timed out, and the table is printed (default: no limit)")
    parser.add_argument("--log", default=None, help="write the children's output here instead of the console")
    parser.add_argument("--profile", nargs="?", const="recipe", default=None, metavar="VARIANTS",
                        help="record one optimizer step after the measured ones with torch.profiler for these "
                        "comma-separated variants (no value: recipe) and print the top GPU kernels and GPU-busy share")
    parser.add_argument("--tiny", action="store_true",
                        help="2 layers x 64 wide, context 128, fp32, no compile: a CPU smoke test of every code path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if opts.child:
        result = run_variant(opts.child, opts)
        Path(opts.child_out).write_text(json.dumps(result, indent=2))
        return

    if opts.list:
        for name, spec in VARIANTS.items():
            print(f"{name:<24} {spec['help']}")
        return
    names = [n.strip() for n in opts.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; see --list")
    if min(opts.measure_tokens, opts.baseline_measure_tokens, opts.warmup_tokens) < 1:
        parser.error("token counts must be positive")
    if opts.tiny:  # seconds on a CPU
        opts.measure_tokens, opts.baseline_measure_tokens, opts.warmup_tokens = 4096, 2048, 2048

    # enough blocks for every variant's steps, so no variant reads a block twice
    largest_step = 64 * 8 * 1024 if not opts.tiny else 16 * 128
    train_tokens = opts.warmup_tokens + opts.measure_tokens + 4 * largest_step
    data_dir = Path(opts.data_dir or tempfile.mkdtemp(prefix="gpt2_bench_data_"))
    opts.data_dir = str(data_dir)
    write_synthetic_source(data_dir, train_tokens, VOCAB_SIZE, valid_tokens=64 * 1024)
    env = environment()
    print(f"synthetic data: {train_tokens:,} random train tokens, vocabulary {VOCAB_SIZE}, in {data_dir}", flush=True)
    print(f"environment: {json.dumps(env)}", flush=True)

    results, out, begin = [], Path(opts.out), time.time()
    log = open(opts.log, "a") if opts.log else None
    passthrough = ["--measure_tokens", str(opts.measure_tokens), "--baseline_measure_tokens",
                   str(opts.baseline_measure_tokens), "--warmup_tokens", str(opts.warmup_tokens),
                   "--baseline_batch_size", str(opts.baseline_batch_size), "--peak_tflops", str(opts.peak_tflops),
                   "--data_dir", opts.data_dir]
    passthrough += ["--tiny"] * opts.tiny + (["--profile", opts.profile] if opts.profile else [])
    for name in names:
        child_out = data_dir / f"result_{name}.json"
        child_out.unlink(missing_ok=True)
        started = time.time()
        print(f"--- {name}: {VARIANTS[name]['help']}", flush=True)
        if log:
            log.write(f"\n===== {name}\n")
            log.flush()
        remaining = None if opts.time_limit is None else opts.time_limit - (time.time() - begin)
        if remaining is not None and remaining < 30:
            results.append({"variant": name, "description": VARIANTS[name]["help"], "error": "not run: --time_limit reached"})
            continue
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *passthrough, "--child", name,
                                   "--child_out", str(child_out)], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT if log else None, timeout=remaining)
            status = f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            proc, status = None, "stopped at --time_limit"
        if proc is not None and proc.returncode == 0 and child_out.is_file():
            result = json.loads(child_out.read_text())
            print(f"    {result['tokens_per_s']:,} tokens/s, {time.time() - started:.0f} s in all", flush=True)
        else:
            result = {"variant": name, "description": VARIANTS[name]["help"],
                      "error": status + (f" (see {opts.log})" if log else "")}
            print(f"    failed: {result['error']}", flush=True)
        results.append(result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")

    for r in results:
        if "profile" in r:
            p = r["profile"]
            print(f"\nprofile of one optimizer step of {r['variant']}: wall {p['wall_ms']:.1f} ms, "
                  f"GPU kernels {p['kernel_ms']:.1f} ms ({100 * p['gpu_busy']:.0f}% busy); by kind (ms, name match): "
                  f"{json.dumps({k: round(v, 1) for k, v in p['kernel_ms_by_kind'].items()})}\n{p['top_kernels']}")
    print(f"\n{env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['date']}; "
          f"MFU against {opts.peak_tflops:g} TFLOP/s")
    print(table(results))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
