"""DPO of a 7B-shaped model on one GPU: peak memory and pairs/s, reference model kept how?

    python benchmarks/dpo_memory_speed.py                        # Baichuan2-7B shape, bf16, one GPU, all variants
    python benchmarks/dpo_memory_speed.py --variants lora_adapter_off,lora_ref_copy --measure_steps 10
    python benchmarks/dpo_memory_speed.py --tiny                 # CPU smoke test (2 x 64 model), seconds

The model: `LlamaForCausalLM` in Baichuan2-7B's shape as model_baichuan/convert.py writes it
(32 layers x 4096, 32 heads, MLP 11008, vocabulary 125,696; 7.5B parameters), random weights
built in bf16 on the GPU. The trainer is baichuan2_dpo/train.py's (TRL's DPOTrainer on
pre-tokenised pairs), sigmoid DPO loss, bf16, AdamW, --batch pairs per step, every pair a
--prompt_tokens prompt with --reply_tokens chosen and rejected replies of random ids. Each
variant runs in its own child process, so each peak is its own:

  lora_adapter_off   LoRA r=16 on every linear layer (the recipe's default); the reference is the
                     same model with the adapter switched off: one copy of the weights.
  lora_ref_copy      the same LoRA, the reference a second, separate copy of the model.
  lora_precomputed   the same LoRA, the reference log-probs computed once before training
                     (`precompute_ref_log_probs`, adapter off); training runs the policy only.
                     The up-front pass over the data is timed apart.
  full_ref_copy      full fine-tuning (AdamW states for all 7.5B parameters) with a reference copy:
                     expected not to fit in one GPU.
  full_precomputed   full fine-tuning, reference log-probs precomputed (no reference in memory).

Timing: --warmup_steps optimizer steps, then --measure_steps between two
`torch.cuda.synchronize()` calls. Peak memory: `torch.cuda.max_memory_allocated()` over the
whole child (weights, the optimizer, the steps). Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from children import child_row, print_row  # benchmarks/ is on sys.path when a benchmark runs
from recipe_loader import load_recipe_script
from shapes import BAICHUAN2_7B

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # Baichuan2-7B as convert.py writes it; a tiny one for the CPU
    "baichuan2-7b": BAICHUAN2_7B,
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000, max_position_embeddings=1024),
}
# name -> (fine-tuning, how the reference is kept)
VARIANTS = {
    "lora_adapter_off": ("lora", "adapter_off"),
    "lora_ref_copy": ("lora", "copy"),
    "lora_precomputed": ("lora", "precomputed"),
    "full_ref_copy": ("full", "copy"),
    "full_precomputed": ("full", "precomputed"),
}


def build_model(opts):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cuda = torch.cuda.is_available()
    config = LlamaConfig(**SHAPES["tiny" if opts.tiny else opts.shape], bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, rms_norm_eps=1e-6)
    torch.manual_seed(0)  # the reference copy gets the same weights
    with torch.device("cuda" if cuda else "cpu"):  # random weights made where they are used, in bf16 at once
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = False
    return model


def pairs_dataset(opts, vocab_size: int, count: int):
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(0)

    def ids(n: int) -> list[list[int]]:
        return rng.integers(3, vocab_size, size=(count, n)).tolist()

    return Dataset.from_dict({"prompt_ids": ids(opts.prompt_tokens), "chosen_ids": ids(opts.reply_tokens),
                              "rejected_ids": ids(opts.reply_tokens)})


def tokenizer_stub(vocab_size: int):
    """The trainer only pads: a word-level tokenizer with the model's pad / eos ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", eos_token="w2")


def run_variant(opts, name: str) -> dict:
    import torch
    from transformers import TrainerCallback

    train = load_recipe_script("baichuan2_dpo")
    cuda = torch.cuda.is_available()
    finetuning, reference = VARIANTS[name]
    steps = opts.warmup_steps + opts.measure_steps
    out = {"variant": name, "finetuning": finetuning, "reference": reference}
    times: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (opts.warmup_steps, steps):
                if cuda:
                    torch.cuda.synchronize()
                times[state.global_step] = time.perf_counter()

    try:
        model = build_model(opts)
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None
        ref_model = build_model(opts).eval() if reference == "copy" else None
        peft_config = None
        if finetuning == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"])
        args = train.PreferenceArguments(
            output_dir=tempfile.mkdtemp(), bf16=cuda, per_device_train_batch_size=opts.batch, max_steps=steps,
            learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=steps,
            eval_strategy="no", save_strategy="no", max_length=opts.prompt_tokens + opts.reply_tokens,
            gradient_checkpointing=opts.gradient_checkpointing, precompute_ref_log_probs=reference == "precomputed",
            dataloader_num_workers=0, report_to="none", disable_tqdm=True)
        dataset = pairs_dataset(opts, model.config.vocab_size, opts.batch * steps)
        start = time.perf_counter()
        trainer = train.TemplateDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                                           processing_class=tokenizer_stub(model.config.vocab_size),
                                           peft_config=peft_config, callbacks=[Timer()])
        if reference == "precomputed":
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            out["precompute_s"] = round(seconds, 1)
            out["precompute_pairs_per_s"] = round(len(dataset) / seconds, 2)  # (unrounded: a tiny run takes < 0.05 s)
        out["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        result = trainer.train()
        seconds = times[steps] - times[opts.warmup_steps]
        out["pairs_per_s"] = round(opts.measure_steps * opts.batch / seconds, 3)
        out["step_s"] = round(seconds / opts.measure_steps, 3)
        out["train_loss"] = round(result.training_loss, 4)
        out["oom"] = False
    except torch.OutOfMemoryError as err:
        out["oom"] = True
        out["error"] = str(err).splitlines()[0][:200]
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, of {list(VARIANTS)}.")
    parser.add_argument("--shape", default="baichuan2-7b", choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--batch", type=int, default=4, help="Pairs per optimizer step.")
    parser.add_argument("--prompt_tokens", type=int, default=256)
    parser.add_argument("--reply_tokens", type=int, default=256, help="Tokens of chosen and of rejected.")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--measure_steps", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model.")
    parser.add_argument("--out", default=str(REPO / "outputs" / "benchmarks" / "dpo_memory_speed.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.tiny:
        opts.prompt_tokens, opts.reply_tokens, opts.warmup_steps, opts.measure_steps = 16, 16, 1, 2
    if opts.child:
        print_row(run_variant(opts, opts.child))
        return

    import torch

    names = [v for v in opts.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for name in names:
        row = child_row(__file__, name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{device}, {opts.batch} pairs/step of {opts.prompt_tokens} + 2 x {opts.reply_tokens} tokens, "
          f"gradient checkpointing {'on' if opts.gradient_checkpointing else 'off'}")
    print(f"{'variant':<18} {'peak GiB':>9} {'pairs/s':>8} {'step s':>7}  note")
    for row in rows:
        note = "out of memory" if row.get("oom") else "failed" if "error" in row else \
            f"precompute {row['precompute_pairs_per_s']} pairs/s" if "precompute_s" in row else ""
        print(f"{row['variant']:<18} {row.get('peak_gib') or '-':>9} {row.get('pairs_per_s', '-'):>8} "
              f"{row.get('step_s', '-'):>7}  {note}")
    record = {"device": device, "date": time.strftime("%Y-%m-%d"), "shape": "tiny" if opts.tiny else opts.shape,
              "settings": {k: getattr(opts, k) for k in ("batch", "prompt_tokens", "reply_tokens",
                                                          "gradient_checkpointing", "warmup_steps", "measure_steps")},
              "rows": rows}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
