"""Preference-tune a chat model with DPO (or IPO, ... : TRL's loss types), LoRA or full.

    python baichuan2_dpo/prepare_data.py                                        # built-in pairs
    python baichuan2_dpo/train.py baichuan2_dpo/configs/default.yaml            # from model_baichuan's SFT adapter
    python baichuan2_dpo/train.py ... --model_name_or_path outputs/chatglm_lora  # any SFT checkpoint or adapter
    python baichuan2_dpo/train.py ... --loss_type ipo --beta 0.5
    python baichuan2_dpo/train.py ... --finetuning_type full --precompute_ref_log_probs true

Model: `--model_name_or_path` is a local chat model or an SFT LoRA adapter directory (its base
is loaded and the SFT adapter merged in first). With `lora`, a new adapter is trained and the
reference model is that same model with the adapter switched off: one model in memory; the
result is the adapter (over a plain starting model) or, when the start was itself an adapter,
the policy merged into one plain model (the merged SFT model it would belong to is not on
disk). With
`full`, the reference is a second copy (or its log-probs are computed once up front with
`--precompute_ref_log_probs true`, after which only the policy stays in memory).

Data: prepare_data.py's pairs. Each prompt is rendered with the chat template the model was
tuned with (the chat template it carries, or `--template`) by common/templates.py's `encode_chat`, the
code SFT and serving use, so DPO sees exactly the token layout of the SFT run; the chosen and
rejected replies end with the template's end token. Pairs whose prompt alone reaches
`max_length` are dropped and counted.

Evaluation (metrics.json): on the held-out pairs, the implicit DPO reward accuracy and margin
after training (TRL's), and for the starting and the tuned model the share of pairs whose
chosen reply is more likely than the rejected one; on the test items with known answers,
greedy replies of both models scored (sentiment accuracy, segmentation F1).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, set_seed
from trl import DPOConfig, DPOTrainer

from common.config import parse_args
from common.errors import UserError, cli_main
from common.plots import plot_losses
from common.preference import preference_accuracy, tokenize_pairs
from common.serving.loading import adapter_base
from common.sft_train import (
    ScoredDataArguments,
    StartModelArguments,
    count_parameters,
    evaluate_tasks,
    load_start_model,
    lora_config,
    read_jsonl,
    refuse_data_parallel,
    scored_test_items,
    start_vs_tuned,
    weights_dtype,
)
from common.templates import (
    ensure_template_tokens,
    get_template,
    resolve_template,
    save_chat_template,
)

PREPARE = "python baichuan2_dpo/prepare_data.py"


# ----------------------------------------------------------------------------- arguments
@dataclass
class DataArguments(ScoredDataArguments):
    """data_dir (prepare_data.py's pairs), train_samples, eval_samples, ... (common/sft_train.py)."""


@dataclass
class ModelArguments(StartModelArguments):
    """model_name_or_path, template, finetuning_type (lora or full), lora_* (common/sft_train.py)."""


@dataclass
class PreferenceArguments(DPOConfig):
    output_dir: str = field(default="outputs/baichuan2_dpo", metadata={"help": "Where adapter and metrics go."})
    beta: float = 0.1
    max_length: int | None = 256
    bf16: bool = False  # TRL defaults to True, which a CPU refuses; the GPU configs set it
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    save_total_limit: int = 1
    lr_scheduler_type: str = "cosine"
    report_to: str = "none"
    logging_steps: int = 20


# -------------------------------------------------------------------------------- data
def shared_on_disk(dataset: Dataset, path: Path, args: PreferenceArguments) -> Dataset:
    """The dataset saved once (by the main process) and read back from that one folder by every
    process. TRL caches precomputed reference log-probs next to the dataset's own file; an
    in-memory dataset has that file in a per-process temporary folder, which the other ranks
    cannot read."""
    with args.main_process_first(desc=f"saving {path.name}"):
        if args.process_index == 0:
            shutil.rmtree(path, ignore_errors=True)
            dataset.save_to_disk(str(path))
    return load_from_disk(str(path))


class TemplateDPOTrainer(DPOTrainer):
    """DPOTrainer on pairs this script tokenised with the chat template: TRL's own preparation
    renders prompts with the tokenizer's Jinja template (or plain text), not ours."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


# ---------------------------------------------------------------------- model and scores
# ------------------------------------------------------------------------------- main
@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, args = parse_args([DataArguments, ModelArguments, PreferenceArguments], argv,
                                             description=__doc__)
    start = time.time()
    set_seed(args.seed)
    if model_args.finetuning_type not in ("lora", "full"):
        raise UserError(f"--finetuning_type must be lora or full, got {model_args.finetuning_type}")
    refuse_data_parallel(args)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    # the policy: fp32 master weights for full fine-tuning without DeepSpeed (weights_dtype says why)
    model, tokenizer = load_start_model(model_args.model_name_or_path, weights_dtype(model_args.finetuning_type, args))
    template = resolve_template(model_args.template, tokenizer, model_args.model_name_or_path) or get_template("baichuan2")
    if ensure_template_tokens(tokenizer, template):
        raise UserError(f"the model's vocabulary lacks the {template.name} template's markers: start DPO from a "
                        "model tuned with that template (SFT first)")
    model.config.use_cache = False

    data_dir = Path(data_args.data_dir)
    train_rows = read_jsonl(data_dir / "train.jsonl", PREPARE)
    if data_args.train_samples:
        train_rows = train_rows[:data_args.train_samples]
    train_dataset, train_report = tokenize_pairs(train_rows, tokenizer, template, args.max_length)
    valid_dataset, valid_report = tokenize_pairs(read_jsonl(data_dir / "valid.jsonl", PREPARE), tokenizer, template,
                                                 args.max_length)
    test_items = scored_test_items(data_args, PREPARE)
    print(f"pairs: train {train_report}, valid {valid_report}", flush=True)
    if len(train_dataset) == 0:
        raise UserError(f"no training pair fits max_length {args.max_length}")

    if args.precompute_ref_log_probs and args.world_size > 1:
        train_dataset = shared_on_disk(train_dataset, Path(args.output_dir, "pairs", "train"), args)
        valid_dataset = shared_on_disk(valid_dataset, Path(args.output_dir, "pairs", "valid"), args)
    model.to(args.device)
    start_preference = preference_accuracy(model, valid_dataset)
    start_scores, start_replies = evaluate_tasks(model, tokenizer, template, test_items, data_args,
                                                 "scoring the starting model")
    peft_config = None
    ref_model = None
    if model_args.finetuning_type == "lora":
        peft_config = lora_config(model, model_args)
    elif not args.precompute_ref_log_probs:  # full: a frozen copy of the starting model
        ref_model, _ = load_start_model(model_args.model_name_or_path, dtype)
    trainer = TemplateDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                                 eval_dataset=valid_dataset, processing_class=tokenizer, peft_config=peft_config)
    parameters = count_parameters(trainer.model)
    result = trainer.train()
    dpo_eval = trainer.evaluate()
    merged_start = adapter_base(model_args.model_name_or_path) is not None
    if merged_start and peft_config is not None:
        # the new adapter belongs over the merged SFT model, which exists nowhere on disk: save
        # the policy merged into one plain model instead (serve.py / chatbot.py load it directly)
        if trainer.is_world_process_zero():
            trainer.model.merge_and_unload().save_pretrained(args.output_dir)
    else:
        trainer.save_model(args.output_dir)
    if not trainer.is_world_process_zero():
        return {}
    save_chat_template(args.output_dir, tokenizer, template)

    tuned = trainer.model if not merged_start or peft_config is None else \
        AutoModelForCausalLM.from_pretrained(args.output_dir, dtype=dtype).to(args.device)
    tuned_preference = preference_accuracy(tuned, valid_dataset)
    tuned_scores, tuned_replies = evaluate_tasks(tuned, tokenizer, template, test_items, data_args,
                                                 "scoring the tuned model")
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "template": template.name, "finetuning_type": model_args.finetuning_type,
        "start_model": str(model_args.model_name_or_path), "loss_type": args.loss_type, "beta": args.beta,
        "parameters": parameters, "data": {"train": train_report, "valid": valid_report},
        "train": {"first_logged_loss": logged[0] if logged else None, "last_logged_loss": logged[-1] if logged else None,
                  "steps": trainer.state.global_step, "runtime_s": round(result.metrics["train_runtime"], 1)},
        "valid": {"dpo": {k.removeprefix("eval_"): v for k, v in dpo_eval.items()},
                  "start": start_preference, "tuned": tuned_preference},
        **start_vs_tuned(test_items, (start_scores, start_replies), (tuned_scores, tuned_replies)),
        "runtime_s": round(time.time() - start, 1),
    }
    out = Path(args.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    plot_losses(trainer.state.log_history, out / "loss.png", "baichuan2_dpo: DPO")
    print(f"held-out pairs, chosen more likely: start {start_preference['chosen_more_likely']:.3f} -> "
          f"tuned {tuned_preference['chosen_more_likely']:.3f}; DPO reward accuracy "
          f"{dpo_eval.get('eval_rewards/accuracies', math.nan):.3f}")
    print(f"adapter / model, tokenizer and metrics.json in {out}")
    return metrics


if __name__ == "__main__":
    main()
