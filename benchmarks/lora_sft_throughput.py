"""LoRA SFT throughput of a GLM-4-9B-shaped model: PEFT + Trainer defaults against chatglm_lora's way.

    python benchmarks/lora_sft_throughput.py                       # one GPU (H100 / H200), all variants
    python benchmarks/lora_sft_throughput.py --variants baseline,recipe_flex --measure_steps 5
    python benchmarks/lora_sft_throughput.py --tiny                # CPU smoke test, a tiny GLM, seconds

The model: `GlmForCausalLM` in GLM-4-9B's shape (40 layers x 4096, 32 heads, 2 key/value heads,
head dim 128, half-rotary, MLP 13696 with fused gate_up_proj, vocabulary 151,552; 9.4B
parameters), random weights built directly in bf16 on the GPU. LoRA as chatglm_lora/train.py
adds it (`add_adapter`: r=16, alpha=32, dropout 0.05 on q k v o gate_up down, PEFT's defaults
otherwise) in every variant; the HF `Trainer` runs every variant (bf16, its default AdamW).

Data: synthetic conversations of random token ids, lengths log-normal (median 300,
sigma --sigma) clipped to [50, 2048], fixed seed; labels -100 on the first 40% (the prompt).
Each variant in its own child process:

  baseline          PEFT + Trainer defaults: common.sft.PaddingCollator (right padding to the
                    longest example of the batch, attention_mask), SDPA, batch 4 in random order
                    (the Trainer's sampler), gradient checkpointing (batch 4 does not fit without).
  baseline_nogc     the same without gradient checkpointing (expected: out of memory).
  baseline_b1       batch 1 without gradient checkpointing (no padding at all; the largest power
                    of two that fits without checkpointing).
  recipe_sdpa       chatglm_lora's packing: common.sft.pack into rows of 8192 tokens (4 x 2048,
                    the baseline's token budget), positions restarting per example, batch 1,
                    common.sft.PackedCollator (no attention_mask: transformers builds a
                    block-diagonal mask from the positions, no attention across examples),
                    gradient checkpointing, Liger kernels (RMSNorm, SwiGLU, fused linear
                    cross-entropy) through `use_liger_kernel=True`, SDPA.
  recipe_flex       the same with attn_implementation="flex_attention" (the block-diagonal mask
                    as a BlockMask: blocks across examples are skipped, not computed and masked).
  recipe_flex_no_liger  recipe_flex without Liger.
  check             correctness, on a 4-layer GLM of the same widths and vocabulary: the loss of
                    a packed row (SDPA, flex, SDPA + Liger) against its examples run one by one,
                    and the LoRA gradients with Liger against without.

Liger and GLM: liger-kernel (0.8.5) has apply functions for `glm4` (Glm4ForCausalLM, GLM-4-0414)
but none for `glm` (GlmForCausalLM, the GLM-4-9B `-hf` checkpoints), so the Trainer's
`use_liger_kernel=True` does nothing for this model (it logs that at INFO level only). GLM-4-9B
is Glm4 without the two extra sandwich norms, so `common.sft.register_liger_glm` (which
chatglm_lora/train.py calls too) registers `apply_liger_kernel_to_glm` for the `glm` model
type with Liger's own pieces for Glm4 (Llama-style RMSNorm, Phi3's fused
gate_up SwiGLU, Glm4's fused-linear-cross-entropy forward; no Liger RoPE: GLM's partial
interleaved rotary has none) before the Trainer applies it; `check` verifies it against the
unpatched model.

Timing: --warmup_steps optimizer steps (compilation happens there), then the timed steps between
two `torch.cuda.synchronize()` calls (--measure_steps for the packed variants, 3x as many for
batch 4, 8x for batch 1). Real tokens = tokens that are not padding
(attention_mask.sum() for the padded variants, the row length for packed ones), counted in
`training_step`; processed tokens = the batch tensor's size. The first warm-up step also runs
the variant's worst-case batch (the 4 longest examples padded to 2048, or the longest packed
row, then the shortest, so that compiled flex kernels settle on dynamic shapes before the timed
steps), so the peak memory (`torch.cuda.max_memory_allocated()`) is the whole epoch's, not that
of the few batches timed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from children import child_row, print_row  # benchmarks/ is on sys.path when a benchmark runs
from recipe_loader import load_recipe_script
from shapes import GLM4_9B

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, attention_bias=True,
            max_position_embeddings=2048, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=1)
PAD_ID = 151329  # GLM-4's <|endoftext|>, its pad token
# name -> packed?, batch, gradient checkpointing, attention, Liger, timed steps x --measure_steps
VARIANTS = {
    "check": {},
    "baseline": {"packed": False, "batch": 4, "gc": True, "attention": "sdpa", "liger": False, "steps_x": 3},
    "baseline_nogc": {"packed": False, "batch": 4, "gc": False, "attention": "sdpa", "liger": False, "steps_x": 3},
    "baseline_b1": {"packed": False, "batch": 1, "gc": False, "attention": "sdpa", "liger": False, "steps_x": 8},
    "recipe_sdpa": {"packed": True, "batch": 1, "gc": True, "attention": "sdpa", "liger": True, "steps_x": 1},
    "recipe_flex": {"packed": True, "batch": 1, "gc": True, "attention": "flex_attention", "liger": True,
                    "steps_x": 1},
    "recipe_flex_no_liger": {"packed": True, "batch": 1, "gc": True, "attention": "flex_attention",
                             "liger": False, "steps_x": 1},
}
DEFAULT_VARIANTS = ["check", "baseline", "baseline_nogc", "recipe_flex", "recipe_sdpa", "baseline_b1",
                    "recipe_flex_no_liger"]


# ------------------------------------------------------------------------------------ data
def data_shape(opts) -> dict:
    if opts.tiny:
        return {"examples": 200, "median": 40, "sigma": opts.sigma, "min_len": 8, "max_len": 256, "row": 1024}
    return {"examples": opts.examples, "median": 300, "sigma": opts.sigma, "min_len": 50, "max_len": 2048,
            "row": 8192}


def make_examples(shape: dict, vocab_size: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Random ids, log-normal lengths; labels -100 on the first 40% of each example (the prompt)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(shape["median"]), shape["sigma"], shape["examples"])),
                      shape["min_len"], shape["max_len"]).astype(int)
    ids = rng.integers(2, min(vocab_size, 150000), size=int(lengths.sum())).tolist()
    input_ids, labels, at = [], [], 0
    for n in lengths.tolist():
        row = ids[at:at + n]
        at += n
        prompt = int(0.4 * n)
        input_ids.append(row)
        labels.append([-100] * prompt + row[prompt:])
    return input_ids, labels


def epoch_padding_efficiency(lengths: list[int], batch: int, seed: int = 0, multiple_of: int = 8) -> float:
    """Real / processed tokens over a whole epoch in random order (PaddingCollator's rounding)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(lengths))
    real = processed = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start:start + batch]]
        real += sum(chunk)
        processed += len(chunk) * -(-max(chunk) // multiple_of) * multiple_of
    return real / processed


def liger_applied(model) -> bool:
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base.forward, "__func__", None) is not type(base).forward


# ----------------------------------------------------------------------------------- model
def build_model(opts, attention: str):
    import torch
    from transformers import AutoModelForCausalLM, GlmConfig

    cuda = torch.cuda.is_available()
    config = GlmConfig(**(TINY if opts.tiny else GLM4_9B))
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):  # random weights, never materialised in fp32 on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    model.config.use_cache = False
    return model


def small_glm(attention: str, tiny: bool):
    """4 layers of GLM-4-9B's widths and vocabulary (the check), or the tiny GLM."""
    import torch
    from transformers import AutoModelForCausalLM, GlmConfig

    cuda = torch.cuda.is_available()
    config = GlmConfig(**(TINY if tiny else GLM4_9B | {"num_hidden_layers": 4}))
    with torch.device("cuda" if cuda else "cpu"):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32,
                                                attn_implementation=attention)


# ------------------------------------------------------------------------------- children
def run_check(opts) -> dict:
    """Loss of one packed row = its examples' losses run one by one; Liger = no Liger."""
    import torch
    from datasets import Dataset

    from common.sft import PackedCollator, apply_liger_kernel_to_glm, pack, register_liger_glm
    from common.sft_train import add_adapter

    train = load_recipe_script("chatglm_lora")
    cuda = torch.cuda.is_available()
    shape = data_shape(opts) | {"examples": 64}
    input_ids, labels = make_examples(shape, (TINY if opts.tiny else GLM4_9B)["vocab_size"], seed=1)
    row = pack(Dataset.from_dict({"input_ids": input_ids, "labels": labels}), shape["row"])[0]
    batch = PackedCollator()([row])
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    device = "cuda" if cuda else "cpu"
    out = {"variant": "check", "row_tokens": len(row["input_ids"]), "examples_in_row": len(starts) - 1}

    def lora(model):
        args = train.SFTTrainingArguments(output_dir=tempfile.gettempdir(), report_to="none")
        torch.manual_seed(1)  # the same LoRA weights for both
        return add_adapter(model, train.ModelArguments(lora_dropout=0.0), args, [])

    def packed_loss(model):
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return model(**inputs).loss

    with torch.no_grad():
        model = small_glm("sdpa", opts.tiny).eval()
        total = count = 0.0
        for a, b in zip(starts[:-1], starts[1:]):  # one example at a time, no packing
            ids = torch.tensor([row["input_ids"][a:b]], device=device)
            lab = torch.tensor([row["labels"][a:b]], device=device)
            n = int((lab[0, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=lab).loss) * n
            count += n
        out["loss_one_by_one"] = total / count
        out["loss_packed_sdpa"] = float(packed_loss(model))
        del model
        try:
            out["loss_packed_flex"] = float(packed_loss(small_glm("flex_attention", opts.tiny).eval()))
        except Exception as err:
            out["loss_packed_flex"] = f"failed: {err!r}"[:300]
    if register_liger_glm() and cuda:
        grads = {}
        for name in ("plain", "liger"):
            model = lora(small_glm("sdpa", opts.tiny))
            if name == "liger":
                apply_liger_kernel_to_glm(model=model.get_base_model())
            model.train()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = packed_loss(model)
            loss.backward()
            out[f"loss_packed_sdpa_{name}_train"] = float(loss.detach())
            grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
            del model
        out["liger_grad_cosine"] = float(torch.nn.functional.cosine_similarity(grads["plain"], grads["liger"], dim=0))
        out["liger_grad_rel_diff"] = float((grads["plain"] - grads["liger"]).norm() / grads["plain"].norm())
    return out


def run_variant(name: str, opts) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from common.sft import PackedCollator, PaddingCollator, pack, register_liger_glm
    from common.sft_train import add_adapter, count_parameters

    spec = VARIANTS[name]
    train = load_recipe_script("chatglm_lora")
    cuda = torch.cuda.is_available()
    warmup, measured = opts.warmup_steps, opts.measure_steps * spec["steps_x"]
    shape = data_shape(opts)
    input_ids, labels = make_examples(shape, (TINY if opts.tiny else GLM4_9B)["vocab_size"], seed=opts.seed)
    examples = Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    liger = spec["liger"] and register_liger_glm() and cuda
    workdir = tempfile.TemporaryDirectory(prefix=f"lora_{name}_")
    common = dict(output_dir=workdir.name, per_device_train_batch_size=spec["batch"], max_steps=warmup + measured,
                  gradient_checkpointing=spec["gc"], bf16=cuda, use_cpu=not cuda, save_strategy="no",
                  report_to="none", disable_tqdm=True, logging_steps=10**6, seed=opts.seed)
    if spec["packed"]:  # chatglm_lora's own TrainingArguments class (remove_unused_columns=False, ...)
        args = train.SFTTrainingArguments(**common, eval_strategy="no", use_liger_kernel=liger)
        dataset, collator = pack(examples, shape["row"]), PackedCollator()
        by_length = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
        # the longest row, then the shortest: compiled flex kernels turn dynamic in the warm-up, not later
        probes = [collator([dataset[by_length[0]]]), collator([dataset[by_length[-1]]])]
    else:  # what a PEFT user gets from TrainingArguments' defaults
        args = TrainingArguments(**common)
        pad_id = TINY["pad_token_id"] if opts.tiny else PAD_ID
        dataset, collator = examples, PaddingCollator(pad_id)
        longest = sorted(range(len(examples)), key=lambda i: -len(input_ids[i]))[:spec["batch"]]
        probes = [collator([examples[i] for i in longest])]

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = build_model(opts, spec["attention"])
    model = add_adapter(model, train.ModelArguments(), args, [])  # r=16, alpha=32, GLM's six projections
    parameters = count_parameters(model)
    build_s = time.perf_counter() - start
    marks, counts, memory = {}, {"real": 0, "processed": 0, "label": 0, "steps": 0}, {}

    class TimedTrainer(Trainer):
        def training_step(self, model, inputs, *rest, **kwargs):
            if "probes" not in counts:  # the epoch's worst batch first: the peak memory is the epoch's
                counts["probes"] = 0
                for probe in probes:
                    super().training_step(model, dict(probe))
                    counts["probes"] += 1
                model.zero_grad(set_to_none=True)
            if warmup <= self.state.global_step < warmup + measured:
                ids = inputs["input_ids"]
                mask = inputs.get("attention_mask")
                counts["real"] += int(mask.sum()) if mask is not None else ids.numel()
                counts["processed"] += ids.numel()
                counts["label"] += int((inputs["labels"][:, 1:] != -100).sum())
                counts["steps"] += 1
            return super().training_step(model, inputs, *rest, **kwargs)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + measured):
                if cuda:
                    torch.cuda.synchronize()
                    if state.global_step == warmup:  # peak so far (build, worst batch, warm-up); then the window's
                        memory["before_window"] = torch.cuda.max_memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                marks[state.global_step] = time.perf_counter()

    trainer = TimedTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                           callbacks=[Clock()])
    try:
        trainer.train()
    except torch.OutOfMemoryError as err:
        where = "the worst-case batch" if not counts.get("probes") else f"step {trainer.state.global_step + 1}"
        return {"variant": name, "error": f"out of memory at {where}",
                "detail": str(err)[:200], "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    seconds = marks[warmup + measured] - marks[warmup]
    peak = max(memory.get("before_window", 0), torch.cuda.max_memory_allocated()) if cuda else None
    lengths = [len(x) for x in input_ids]
    return {
        "variant": name, "settings": spec | {"attention_used": model.config._attn_implementation,
                                             "liger_applied": liger_applied(trainer.model),
                                             "optimizer": args.optim, "bf16": args.bf16},
        "parameters": parameters, "build_s": round(build_s, 1), "warmup_steps": warmup,
        "measured_steps": counts["steps"], "seconds": round(seconds, 3), "step_s": round(seconds / measured, 4),
        "real_tokens": counts["real"], "processed_tokens": counts["processed"], "label_tokens": counts["label"],
        "real_tokens_per_s": round(counts["real"] / seconds, 1),
        "processed_tokens_per_s": round(counts["processed"] / seconds, 1),
        "padding_efficiency": round(counts["real"] / counts["processed"], 4),
        "epoch_padding_efficiency": round(1.0 if spec["packed"] else epoch_padding_efficiency(lengths, spec["batch"]),
                                          4),
        "rows": len(dataset), "worst_batch_shape": list(probes[0]["input_ids"].shape),
        "peak_memory_gib": round(peak / 2**30, 2) if peak else None,
        "peak_memory_window_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


# --------------------------------------------------------------------------------- parent
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"Comma-separated, from {list(VARIANTS)}.")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--measure_steps", type=int, default=10,
                        help="Timed steps of the packed variants (x3 for batch 4, x8 for batch 1).")
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--sigma", type=float, default=1.0, help="Log-normal sigma of the example lengths.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--time_limit", type=float, default=0, help="Start no child after this many seconds (0: none).")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "lora_sft_throughput.json")
    parser.add_argument("--log", type=Path, help="Append every child's stdout and stderr here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.tiny:
        opts.warmup_steps, opts.measure_steps = 1, 2
    if opts.child:
        row = run_check(opts) if opts.child == "check" else run_variant(opts.child, opts)
        print_row(row)
        return

    import numpy as np
    import torch
    import transformers

    started = time.time()
    header = f"torch {torch.__version__}, transformers {transformers.__version__}, {time.strftime('%Y-%m-%d')}"
    shape = data_shape(opts)
    lengths = [len(x) for x in make_examples(shape, 1024, opts.seed)[0]]
    data = shape | {"tokens": sum(lengths), "mean": round(float(np.mean(lengths)), 1),
                    "p50": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
                    "p99": float(np.percentile(lengths, 99)), "at_max": sum(n == shape["max_len"] for n in lengths)}
    print(header, flush=True)
    print(f"data: {json.dumps(data)}", flush=True)
    rows = []
    for name in opts.variants.split(","):
        if VARIANTS[name].get("attention") == "flex_attention" and not torch.cuda.is_available():
            rows.append({"variant": name, "skipped": "flex attention has no backward on the CPU"})
            continue
        if opts.time_limit and time.time() - started > opts.time_limit:
            rows.append({"variant": name, "error": "not run (time limit)"})
            continue
        t0 = time.time()
        rows.append(child_row(__file__, name, log=opts.log))
        rows[-1]["child_s"] = round(time.time() - t0, 1)
        print(json.dumps(rows[-1]), flush=True)
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps({"environment": header, "data": data, "rows": rows}, indent=2) + "\n")

    # only now: CUDA initialised in this process would hold GPU memory while the children run
    header = f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, {header}"
    base = next((r for r in rows if r["variant"] == "baseline" and "real_tokens_per_s" in r), None)
    recipes = [r for r in rows if r["variant"].startswith("recipe") and "real_tokens_per_s" in r]
    summary = None
    if base and recipes:  # the goal: the best recipe variant >= 2x the baseline's real tokens/s, no more memory
        best = max(recipes, key=lambda r: r["real_tokens_per_s"])
        ratio = best["real_tokens_per_s"] / base["real_tokens_per_s"]
        memory_ok = best["peak_memory_gib"] is None or best["peak_memory_gib"] <= base["peak_memory_gib"]
        summary = {"recipe": best["variant"], "real_tokens_per_s_ratio": round(ratio, 2),
                   "peak_memory_gib": [best["peak_memory_gib"], base["peak_memory_gib"]],
                   "goal_met": ratio >= 2 and memory_ok}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({"environment": header, "data": data, "summary": summary, "rows": rows},
                                   indent=2) + "\n")
    print(header)
    print(f"{'variant':<22}{'batch':>7}{'GC':>4}{'attention':>16}{'Liger':>6}{'real tok/s':>12}{'proc tok/s':>12}"
          f"{'pad eff':>8}{'peak GiB':>9}{'step s':>8}{'x baseline':>11}")
    for row in rows:
        if row["variant"] == "check":
            print("check: " + json.dumps({k: v for k, v in row.items() if k != "variant"}))
            continue
        if "real_tokens_per_s" not in row:
            print(f"{row['variant']:<22} {row.get('error')}")
            continue
        s = row["settings"]
        ratio = f"{row['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}" if base else "-"
        memory = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
        batch = f"1x{shape['row']}" if s["packed"] else f"{s['batch']}"
        print(f"{row['variant']:<22}{batch:>7}{'yes' if s['gc'] else 'no':>4}{s['attention_used']:>16}"
              f"{'yes' if s['liger_applied'] else 'no':>6}{row['real_tokens_per_s']:>12,.0f}"
              f"{row['processed_tokens_per_s']:>12,.0f}{row['padding_efficiency']:>8.1%}{memory:>9}"
              f"{row['step_s']:>8.3f}{ratio:>11}")
    if summary:
        print(f"recipe = {summary['recipe']}: {summary['real_tokens_per_s_ratio']:.2f}x the baseline's real tokens/s, "
              f"peak {summary['peak_memory_gib'][0]} vs {summary['peak_memory_gib'][1]} GiB: goal (>= 2x, no more "
              f"memory) {'met' if summary['goal_met'] else 'NOT met'}")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
