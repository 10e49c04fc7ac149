"""Training a 7B Llama over 2 and 4 GPUs: layer chaining against pipeline schedules (GPipe, 1F1B,
interleaved 1F1B), same global batch, at one or several microbatch counts.

    python benchmarks/pipeline_vs_chaining.py --gpus 2,4            # a machine with 4 GPUs: 1F1B, 16 microbatches
    python benchmarks/pipeline_vs_chaining.py --gpus 4 --schedules gpipe,1f1b,interleaved1f1b --microbatches 8,16,32
    python benchmarks/pipeline_vs_chaining.py --gpus 2 --tiny       # a small model (on the CPU without GPUs)

The model: Llama-2-7B's shape (32 layers x 4096, MLP 11008, 32 heads, vocabulary 32000; 6.74B
parameters), random weights, float32 weights and AdamW states with bf16 autocast (as
pipeline_parallel/train.py trains), sequences of --block_size random tokens, --batch_size
sequences per optimizer step cut into --microbatches microbatches. Each row runs in its own
process(es) on the first N GPUs:

  chaining   one process; the layers spread over the N GPUs by common/device_map.py (balanced),
             accelerate's hooks moving activations between them; the microbatches run one after
             another with gradient accumulation: one GPU works at a time.
  pipeline   `torchrun --nproc_per_node N pipeline_parallel/train.py --schedule S`: one stage per
             GPU (interleaved 1F1B: --stages_per_rank stages per GPU, looped), microbatches in
             flight on every stage at once.

Each GPU count x microbatch count gets its own chaining row, the baseline of its pipeline rows.

Timing: --warmup_steps optimizer steps, then --steps timed between synchronisations. Memory:
`torch.cuda.max_memory_allocated` per GPU. Bubble: the schedule's ideal idle share (p - 1)/(v m + p - 1)
(v stages per GPU, 1 but for interleaving), and a measured one: chaining keeps one GPU busy at a time, so its step time is about the
model's compute time on one GPU, T1; a pipeline with no idle time would take T1 / N; measured
idle share = 1 - T1 / (N x T_pipeline) (communication and imbalance count as idle).
Without GPUs (--tiny on a CPU) chaining runs the model whole on the CPU and the pipeline's
processes use gloo: a check of the script, not a measurement. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from children import child_row, print_row  # benchmarks/ is on sys.path when a benchmark runs
from shapes import LLAMA2_7B

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1000)


def shape(opts) -> dict:
    return TINY if opts.tiny else LLAMA2_7B


def run_chaining(opts, n: int, microbatches: int) -> dict:
    """The model chained over the visible GPUs (whole on the CPU without GPUs), microbatches one
    after another."""
    import torch
    import torch.nn.functional as F
    from accelerate import dispatch_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from common.device_map import build_device_map

    config = LlamaConfig(**shape(opts), max_position_embeddings=max(opts.block_size, 128), tie_word_embeddings=False,
                         attn_implementation="sdpa")
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    if cuda:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        device_map = build_device_map(model, num_devices=n, strategy="balanced")
        # each module's weights created and initialised on its own GPU (a 7B float32 copy on the CPU first
        # would cost 27 GB and minutes); common.device_map.dispatch is for a model already built
        for name, device in device_map.items():
            module = model.get_submodule(name) if name else model
            module.to_empty(device=torch.device("cuda", device))
            module.apply(model._init_weights)
        model.model.rotary_emb = LlamaRotaryEmbedding(config).to(torch.device("cuda", device_map.get(
            "model.rotary_emb", device_map.get("model.embed_tokens", 0))))
        model = dispatch_model(model, device_map=device_map)
        first = torch.device("cuda", device_map.get("model.embed_tokens", 0))
    else:
        model, device_map, first = LlamaForCausalLM(config), {}, torch.device("cpu")
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), foreach=True)
    micro = opts.batch_size // microbatches
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        batch = torch.randint(0, config.vocab_size, (opts.batch_size, opts.block_size), generator=generator)
        total = 0.0
        for k in range(microbatches):
            ids = batch[k * micro:(k + 1) * micro].to(first)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(input_ids=ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten().to(logits.device))
            (loss / microbatches).backward()
            total += loss.item() / microbatches
        optimizer.step()
        return total

    def sync() -> None:
        for d in range(n if cuda else 0):
            torch.cuda.synchronize(d)

    for _ in range(opts.warmup_steps):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(opts.steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / opts.steps
    layers = [device_map.get(f"model.layers.{i}") for i in range(config.num_hidden_layers)]
    return {"mode": "chaining", "gpus": n, "microbatches": microbatches, "step_s": round(seconds, 3),
            "tokens_per_s": round(opts.batch_size * opts.block_size / seconds, 1),
            "peak_memory_gib": [round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in range(n)] if cuda else None,
            "layers_per_gpu": [layers.count(d) for d in range(n)] if cuda else None, "loss": round(loss, 4)}


def run_pipeline(opts, n: int, schedule: str, microbatches: int) -> dict:
    import torch

    out = Path(tempfile.mkdtemp())
    size = shape(opts)
    per_rank = opts.stages_per_rank if schedule == "interleaved1f1b" else 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               str(REPO / "pipeline_parallel" / "train.py"), "--synthetic_data", "true", "--schedule", schedule,
               "--stages_per_rank", str(per_rank),
               "--microbatches", str(microbatches), "--batch_size", str(opts.batch_size),
               "--block_size", str(opts.block_size), "--max_steps", str(opts.warmup_steps + opts.steps),
               "--timing_warmup_steps", str(opts.warmup_steps), "--bf16", str(torch.cuda.is_available()).lower(),
               "--learning_rate", "1e-5",
               "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--logging_steps", "1",
               "--save_model", "false", "--resume", "false", "--output_dir", str(out),
               *[f"--{k}={v}" for k, v in size.items()]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n))), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    row = {"mode": schedule, "gpus": n, "microbatches": microbatches, "stages_per_gpu": per_rank}
    if proc.returncode:
        return row | {"error": proc.stderr[-3000:]}
    metrics = json.loads((out / "metrics.json").read_text())
    return row | {"step_s": metrics["step_s"], "tokens_per_s": metrics["tokens_per_s"],
            "peak_memory_gib": metrics["peak_memory_gib"], "layers_per_stage": metrics["layers_per_stage"],
            "loss": metrics["last_loss"], "bubble_ideal": metrics["bubble_fraction_ideal"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="2,4", help="GPU counts to compare, comma-separated.")
    parser.add_argument("--batch_size", type=int, default=64, help="Sequences per optimizer step.")
    parser.add_argument("--microbatches", default="16", help="Microbatch counts, comma-separated.")
    parser.add_argument("--schedules", default="1f1b", help="Pipeline schedules, comma-separated: gpipe, 1f1b, "
                        "interleaved1f1b.")
    parser.add_argument("--stages_per_rank", type=int, default=2, help="interleaved1f1b: stages per GPU.")
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="A small model (quick check of the script).")
    parser.add_argument("--out", default=str(REPO / "outputs" / "benchmarks" / "pipeline_vs_chaining.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "GPUs,microbatches": a chaining row
    opts = parser.parse_args()
    if opts.child:
        n, microbatches = map(int, opts.child.split(","))
        print_row(run_chaining(opts, n, microbatches))
        return

    import torch

    schedules = opts.schedules.split(",")
    unknown = set(schedules) - {"gpipe", "1f1b", "interleaved1f1b"}
    if unknown:
        parser.error(f"unknown schedules: {', '.join(sorted(unknown))}")
    rows = []
    for n in map(int, opts.gpus.split(",")):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n))), "PYTHONPATH": str(REPO)}
        for microbatches in map(int, opts.microbatches.split(",")):
            chain = {"mode": "chaining", "gpus": n, "microbatches": microbatches} | \
                child_row(__file__, f"{n},{microbatches}", env=env)
            rows.append(chain)
            print(json.dumps(chain), flush=True)
            for schedule in schedules:
                pipe = run_pipeline(opts, n, schedule, microbatches)
                if "step_s" in chain and "step_s" in pipe:
                    pipe["speedup_vs_chaining"] = round(pipe["tokens_per_s"] / chain["tokens_per_s"], 3)
                    pipe["bubble_measured"] = round(1 - chain["step_s"] / (n * pipe["step_s"]), 4)
                rows.append(pipe)
                print(json.dumps(pipe), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n{device}; {opts.batch_size} x {opts.block_size} tokens per step")
    print(f"{'mode':<16} {'GPUs':>4} {'micro':>5} {'tokens/s':>10} {'speedup':>8} {'step s':>7} "
          f"{'bubble ideal/measured':>22}  peak GiB per GPU")
    for row in rows:
        if "error" in row:
            print(f"{row['mode']:<16} {row['gpus']:>4} {row['microbatches']:>5} failed")
            continue
        bubble = f"{row['bubble_ideal']:.3f} / {row.get('bubble_measured', float('nan')):.3f}" \
            if row["mode"] != "chaining" else f"{1 - 1 / row['gpus']:.3f} / -"
        print(f"{row['mode']:<16} {row['gpus']:>4} {row['microbatches']:>5} {row['tokens_per_s']:>10} "
              f"{row.get('speedup_vs_chaining', 1.0):>8} {row['step_s']:>7} {bubble:>22}  {row['peak_memory_gib']}")
    record = {"device": device, "date": time.strftime("%Y-%m-%d"), "model": "tiny" if opts.tiny else "llama2-7b",
              "settings": {k: getattr(opts, k) for k in ("batch_size", "microbatches", "schedules", "stages_per_rank",
                                                          "block_size", "warmup_steps", "steps")}, "rows": rows}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
