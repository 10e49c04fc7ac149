"""1B-class Llama pretraining throughput: the Trainer's defaults against model_clm/train.py.

    python benchmarks/clm_train_throughput.py                      # one GPU, all variants
    python benchmarks/clm_train_throughput.py --variants recipe --measure_steps 8
    python benchmarks/clm_train_throughput.py --tiny               # CPU smoke test, seconds

The model: model_clm/configs/llama_1b_gpu.yaml's Llama (16 layers x 2048, 32 heads, 8
key/value heads, MLP 8192, tied embeddings, context 2048) with a 32,000-token vocabulary,
random weights. Data: random token ids written in common/shards.py's format (throughput
does not depend on the values). Each variant runs in its own child process:

  baseline          what the plain Trainer gives: `AutoModelForCausalLM.from_config` (SDPA
                    attention, transformers' default), fp32, TrainingArguments' defaults; only
                    batch size and step count set (batch 4 x 2048: fp32 activations).
  recipe            model_clm/train.py (its own parse / build_trainer) with llama_1b_gpu.yaml:
                    bf16 autocast, torch.compile, causal SDPA without a mask tensor, fused
                    AdamW, 8 x 2048 x 16 accumulation steps, pinned non-blocking batches.
  recipe_sdpa_mask  the recipe with attn_implementation sdpa (a [B, 1, T, T] mask under compile).
  recipe_no_compile the recipe without torch.compile.
  ddp_4gpu          the recipe on 4 GPUs under torchrun (DDP), accumulation 4: the same
                    262,144 tokens per optimizer step.
  zero2_4gpu        the same with DeepSpeed ZeRO-2 (model_clm/configs/ds_zero2.json).
  zero2_1gpu        ZeRO-2 on one GPU (what DeepSpeed itself costs).
Scaling efficiency = tokens/s / (GPUs x the one-GPU recipe's tokens/s), in the same run.

Timing: --warmup_steps optimizer steps (compilation happens there), then --measure_steps
timed between two `torch.cuda.synchronize()` calls. MFU = tokens/s x (6 N + 12 L T d) /
--peak_tflops (989: H100 SXM dense bf16; used for fp32 too, as the ratio to the chip's
best), N = parameters (tied embedding once), L layers, T context, d width.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from children import child_row, print_row  # benchmarks/ is on sys.path when a benchmark runs
from recipe_loader import load_recipe_script
from shapes import write_synthetic_source

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "model_clm" / "configs" / "llama_1b_gpu.yaml"
VOCAB_SIZE = 32000
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "block_size": 64, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "bf16": False, "tf32": False, "torch_compile": False, "dataloader_num_workers": 0,
        "dataloader_persistent_workers": False}
ZERO2 = str(REPO / "model_clm" / "configs" / "ds_zero2.json")
# name -> YAML keys changed, extra train.py flags, GPUs (processes under torchrun)
VARIANTS = {
    "baseline": {},
    "recipe": {},
    "recipe_sdpa_mask": {"yaml": {"attn_implementation": "sdpa"}},
    "recipe_no_compile": {"yaml": {"torch_compile": False}},
    # several GPUs, the same 262,144 tokens per optimizer step (accumulation 16 / 4)
    "ddp_4gpu": {"yaml": {"gradient_accumulation_steps": 4}, "gpus": 4},
    "zero2_4gpu": {"yaml": {"gradient_accumulation_steps": 4}, "args": ["--deepspeed", ZERO2], "gpus": 4},
    "zero2_1gpu": {"args": ["--deepspeed", ZERO2]},
}
SINGLE_GPU = ["baseline", "recipe", "recipe_sdpa_mask", "recipe_no_compile"]


def run_variant(name: str, opts) -> dict:
    import torch
    import yaml
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from common.shards import TokenShards

    cuda = torch.cuda.is_available()
    warmup, measured = opts.warmup_steps, opts.measure_steps
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + measured):
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    config = yaml.safe_load(CONFIG.read_text()) | (TINY if opts.tiny else {}) | VARIANTS[name].get("yaml", {})
    workdir = tempfile.TemporaryDirectory(prefix=f"clm_{name}_")  # removed when this child exits
    out = workdir.name
    train = load_recipe_script("model_clm")
    if name == "baseline":
        from transformers import AutoConfig

        block = config["block_size"]
        model_config = AutoConfig.for_model(
            "llama", vocab_size=VOCAB_SIZE, hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"], intermediate_size=config["intermediate_size"],
            max_position_embeddings=block, tie_word_embeddings=True)
        model = AutoModelForCausalLM.from_config(model_config)
        batch, accumulation = (2, 1) if opts.tiny else (opts.baseline_batch_size, 1)
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=warmup + measured,
                                 save_strategy="no", report_to="none", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, data_collator=default_data_collator,
                          train_dataset=TokenShards(opts.data_dir, "train", block))
        settings = {"dtype": "fp32", "compile": False, "attention": model.config._attn_implementation}
    else:
        path = Path(out) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        data_args, model_args, args = train.parse([
            str(path), "--data_dir", str(opts.data_dir), "--output_dir", out, "--max_steps", str(warmup + measured),
            "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "100000", "--disable_tqdm", "true",
            *VARIANTS[name].get("args", [])])
        trainer = train.build_trainer(data_args, model_args, args)
        model, block = trainer.model, data_args.block_size
        batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
        settings = {"dtype": "bf16 autocast" if args.bf16 else "fp32", "compile": bool(args.torch_compile),
                    "attention": model_args.attn_implementation, "changes": VARIANTS[name],
                    "world_size": args.world_size}
    trainer.add_callback(Clock())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = marks[warmup + measured] - marks[warmup]
    world = trainer.args.world_size
    tokens = measured * batch * accumulation * block * world
    c = model.config
    parameters = sum(p.numel() for p in model.parameters())  # a tied embedding is one parameter
    flops_per_token = 6 * parameters + 12 * c.num_hidden_layers * block * c.hidden_size
    return {"variant": name, "settings": settings, "batch": batch, "accumulation": accumulation, "gpus": world,
            "block_size": block, "parameters": parameters, "measured_steps": measured, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds),
            "mfu": tokens / seconds / world * flops_per_token / (opts.peak_tflops * 1e12),  # per GPU
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(SINGLE_GPU),
                        help=f"Comma-separated, from {list(VARIANTS)} (the *_4gpu ones need 4 GPUs).")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--measure_steps", type=int, default=4)
    parser.add_argument("--baseline_batch_size", type=int, default=4)
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--data_dir", type=Path, default=Path(tempfile.gettempdir()) / "clm_throughput_data")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "clm_train_throughput.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.tiny:
        opts.data_dir = opts.data_dir.with_name(opts.data_dir.name + "_tiny")
        opts.warmup_steps, opts.measure_steps = 1, 2
    if opts.child:
        row = run_variant(opts.child, opts)
        if int(os.environ.get("RANK", 0)) == 0:
            print_row(row)
        return
    if not (opts.data_dir / "index.json").is_file():
        write_synthetic_source(opts.data_dir, 8_000_000, VOCAB_SIZE)

    import torch
    import transformers

    rows = []
    for name in opts.variants.split(","):
        gpus = VARIANTS[name].get("gpus", 1)
        launcher = [sys.executable] if gpus == 1 and "args" not in VARIANTS[name] else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
        env = dict(os.environ)
        if torch.cuda.device_count() > gpus:  # else the Trainer of a lone process spreads over all (DataParallel)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(gpus)))
        rows.append(child_row(__file__, name, launcher=launcher, env=env))
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    header = f"{device}, torch {torch.__version__}, transformers {transformers.__version__}, {time.strftime('%Y-%m-%d')}"
    print(header)
    base = next((r for r in rows if r["variant"] == "baseline" and "error" not in r), None)
    one_gpu = next((r for r in rows if r["variant"] == "recipe" and "error" not in r), None)
    print(f"{'variant':<19}{'GPUs':>5}{'batch x acc':>12}{'tokens/s':>11}{'MFU/GPU':>9}{'peak GiB':>10}"
          f"{'x baseline':>12}{'scaling':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<19} failed: {row['error']}")
            continue
        ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        if one_gpu and row["variant"] != "baseline":  # tokens/s against the one-GPU recipe times the GPU count
            row["scaling_efficiency"] = row["tokens_per_s"] / (row["gpus"] * one_gpu["tokens_per_s"])
        scaling = f"{row['scaling_efficiency']:.1%}" if "scaling_efficiency" in row else "-"
        memory = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
        print(f"{row['variant']:<19}{row['gpus']:>5}{row['batch']:>6} x {row['accumulation']:<3}{row['tokens_per_s']:>11,}"
              f"{row['mfu']:>9.1%}{memory:>10}{ratio:>12}{scaling:>9}")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({"environment": header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
