"""SFT step time with the LM head on every position (the Trainer's default) against only the
positions that predict a reply token (`common.sft.ReplyLossTrainer`), side by side.

    python model_clm/train.py model_clm/configs/glm_tiny.yaml && python chatglm_lora/prepare_data.py
    python benchmarks/reply_loss_speed.py                      # chatglm_lora's default config, CPU
    python benchmarks/reply_loss_speed.py --tiny               # smoke test: a random 2 x 32 GLM, built-in data

Both run chatglm_lora/train.py's own setup (its default YAML: tokenizer with the template's
markers, packed rows, LoRA) from the same initial adapter on the same batches, alternating
A B A B so that a machine whose speed drifts hurts neither side more. Prints steps/s, the
ratio and the loss of both (equal up to float noise), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, set_seed

from common.config import parse_args
from common.sft import PackedCollator, ReplyLossTrainer
from common.sft_train import add_adapter, load_model, load_split
from common.templates import ensure_template_tokens, resolve_template
from common.tokenizer import load_tokenizer

from recipe_loader import load_recipe_script  # benchmarks/ is on sys.path when a benchmark runs


def tiny_model_and_data(work: Path) -> list[str]:
    """A random tiny GLM with a tokenizer built from the corpora, and chatglm_lora's built-in data."""
    import subprocess
    import sys

    from transformers import GlmConfig, GlmForCausalLM

    from common.corpora import load_peoples_daily, load_reviews
    from common.tokenizer import build_chinese_tokenizer

    tokenizer = build_chinese_tokenizer(load_peoples_daily()[:500] + [t for t, _ in load_reviews()[::50]],
                                        vocab_size=2000)
    GlmForCausalLM(GlmConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, intermediate_size=64,
                             pad_token_id=tokenizer.pad_token_id)).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "chatglm_lora/prepare_data.py"), "--output_dir", str(work / "data"),
                    "--sentiment_items", "150", "--segmentation_items", "50"], check=True, cwd=repo,
                   stdout=subprocess.DEVNULL)
    return ["--model_name_or_path", str(work / "model"), "--data_dir", str(work / "data"), "--max_length", "128"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="chatglm_lora/configs/default.yaml")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per round and side.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="outputs/benchmarks/reply_loss_speed.json")
    parser.add_argument("--tiny", action="store_true", help="Smoke test: a random 2 x 32 GLM and 200 built-in items "
                        "(prepared in a temporary folder), 3 steps, one round.")
    opts = parser.parse_args()
    overrides = []
    if opts.tiny:
        opts.steps, opts.rounds = 3, 1
        overrides = tiny_model_and_data(Path(tempfile.mkdtemp(prefix="reply_loss_speed_")))

    train = load_recipe_script("chatglm_lora")
    data_args, model_args, training_args = parse_args(
        [train.DataArguments, train.ModelArguments, train.SFTTrainingArguments],
        [opts.config, "--output_dir", "/tmp/reply_loss_speed", "--max_steps", str(opts.steps),
         "--save_strategy", "no", "--eval_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1000",
         *overrides])
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    template = resolve_template(model_args.template, tokenizer, model_args.model_name_or_path)
    added = ensure_template_tokens(tokenizer, template)
    dataset, _ = load_split(data_args, tokenizer, template, "train")
    model = load_model(model_args, training_args, len(tokenizer))
    model = add_adapter(model, model_args, training_args, tokenizer.convert_tokens_to_ids(added))
    start_state = {k: v.clone() for k, v in model.state_dict().items()}

    results: dict[str, list] = {"Trainer": [], "ReplyLossTrainer": []}
    losses: dict[str, float] = {}
    for _ in range(opts.rounds):
        for name, trainer_class in (("Trainer", Trainer), ("ReplyLossTrainer", ReplyLossTrainer)):
            model.load_state_dict(start_state)
            set_seed(training_args.seed)
            trainer = trainer_class(model=model, args=training_args, train_dataset=dataset,
                                    data_collator=PackedCollator(), processing_class=tokenizer)
            begin = time.perf_counter()
            trainer.train()
            results[name].append(opts.steps / (time.perf_counter() - begin))
            losses[name] = trainer.state.log_history[-1]["train_loss"]
    steps_per_s = {name: max(runs) for name, runs in results.items()}
    ratio = steps_per_s["ReplyLossTrainer"] / steps_per_s["Trainer"]
    print(f"{'trainer':<18} {'steps/s (best round)':>20} {'train loss':>11}")
    for name in results:
        print(f"{name:<18} {steps_per_s[name]:>20.3f} {losses[name]:>11.4f}")
    print(f"ReplyLossTrainer / Trainer: {ratio:.2f}x ({torch.get_num_threads()} threads, "
          f"{opts.steps} steps x {opts.rounds} rounds, rows of {data_args.max_length} tokens x "
          f"{training_args.per_device_train_batch_size})")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps({"steps_per_s": results, "best": steps_per_s, "ratio": ratio,
                                          "train_loss": losses, "config": opts.config, "steps": opts.steps,
                                          "rounds": opts.rounds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
