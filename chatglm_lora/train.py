"""Instruction-tune a causal LM (GLM by default) with LoRA, QLoRA or full fine-tuning.

    python model_clm/prepare_data.py --dedup true                                   # built-in base model:
    python model_clm/train.py model_clm/configs/glm_tiny.yaml                       #   a tiny GLM, pretrained
    python chatglm_lora/prepare_data.py                                             # built-in instructions
    python chatglm_lora/train.py chatglm_lora/configs/default.yaml                  # LoRA SFT + evaluation
    python chatglm_lora/train.py chatglm_lora/configs/glm4_9b_lora.yaml \\
        --model_name_or_path /models/glm-4-9b-chat-hf                                # one GPU, bf16
    torchrun --nproc_per_node 4 chatglm_lora/train.py chatglm_lora/configs/glm4_9b_lora.yaml \\
        --deepspeed model_clm/configs/ds_zero2.json
    python chatglm_lora/train.py ... --resume_from_checkpoint last                  # resume a stopped run
    python chatglm_lora/train.py ... --adapter_path outputs/chatglm_lora            # continue a saved adapter

Data: `train.jsonl` / `valid.jsonl` of prepare_data.py (messages). Each conversation is
rendered with the chat template `--template` (common/templates.py: glm4, chatglm3, chatglm2,
baichuan2, llama2-chinese, alpaca, plain), the same code serving uses; loss falls on every
assistant reply and its end token only. Conversations over `max_length` lose whole turns
from the end (counted, printed, in metrics.json). `packing` puts several conversations in
one row with positions restarting per conversation: no padding, and no attention across
conversations (see common/sft.py). The LM head runs only where a reply token is predicted
(`common.sft.ReplyLossTrainer`): most positions are prompt.

Model: a local checkpoint (`--model_name_or_path`). Markers of the template missing from
its vocabulary (the GLM role tokens for a model that never saw them) are added as special
tokens; LoRA then also trains those embedding rows (PEFT's trainable_token_indices).
- lora: adapters on `lora_target` (default: every linear layer of the family; GLM:
  q_proj k_proj v_proj o_proj gate_up_proj down_proj);
- qlora: the same over a 4-bit NF4 base (needs bitsandbytes and a GPU);
- full: every weight.
Trainer options (bf16, gradient_checkpointing, use_liger_kernel, --deepspeed, ...) come
from the YAML or the command line.

Evaluation: loss on valid before and after training; when test.jsonl holds scored tasks
(the built-in data does), greedy replies of the starting model and of the tuned one are
scored side by side (sentiment accuracy, segmentation F1, beside the trivial answers).
Everything lands in `<output_dir>/metrics.json`; the adapter (or the full model), the
tokenizer and the template name in `<output_dir>`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from common.config import parse_args
from common.errors import UserError, cli_main
from common.instructions import generate_replies, score
from common.sft import (
    PackedCollator,
    PaddingCollator,
    ReplyLossTrainer,
    format_report,
    pack,
    read_conversations,
    real_tokens,
    register_liger_glm,
    tokenize_conversations,
)
from common.templates import ensure_template_tokens, get_template, save_template_name
from common.tokenizer import load_tokenizer

logger = logging.getLogger("train")

# Linear layers of each family that LoRA adapts by default (all of them except the LM head).
LORA_TARGETS = {
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


# ----------------------------------------------------------------------------- arguments
@dataclass
class DataArguments:
    data_dir: str = field(default="data/chatglm_lora", metadata={"help": "Folder of prepare_data.py's JSONL files."})
    max_length: int = field(default=512, metadata={"help": "Longest training sequence in tokens (also a packed "
                                                   "row's length)."})
    packing: bool = field(default=True, metadata={"help": "Pack conversations into rows without cross-attention "
                                                  "(False: pad each batch to its longest)."})
    eval_samples: int = field(default=400, metadata={"help": "Test items scored before and after (0 = all, "
                                                     "-1 = skip task evaluation)."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Longest generated reply when scoring."})
    eval_batch_size: int = 32


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="outputs/model_clm_glm",
                                    metadata={"help": "Local base (or chat) model directory."})
    template: str = field(default="glm4", metadata={"help": "Chat template (common/templates.py)."})
    finetuning_type: str = field(default="lora", metadata={"help": "lora, qlora or full."})
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (default: every linear layer of the family, else "
                                "PEFT's all-linear)."})
    adapter_path: str | None = field(default=None, metadata={"help": "Continue training this saved adapter."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})


@dataclass
class SFTTrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/chatglm_lora", metadata={"help": "Where adapter and metrics go."})
    eval_strategy: str = "steps"
    eval_steps: float = 200
    save_strategy: str = "steps"
    save_steps: float = 200
    save_total_limit: int = 2
    lr_scheduler_type: str = "cosine"
    report_to: str = "none"
    logging_steps: int = 20
    remove_unused_columns: bool = False  # the collators use position_ids


# -------------------------------------------------------------------------------- data
def load_split(data_args: DataArguments, tokenizer, template, split: str):
    path = Path(data_args.data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: run chatglm_lora/prepare_data.py first")
    dataset, report = tokenize_conversations(tokenizer, template, read_conversations(str(path)), data_args.max_length)
    print(format_report(split, report), flush=True)
    if len(dataset) == 0:
        raise UserError(f"{path}: no conversation fits max_length {data_args.max_length}")
    return (pack(dataset, data_args.max_length) if data_args.packing else dataset), report


def load_test_items(data_args: DataArguments) -> list[dict]:
    path = Path(data_args.data_dir) / "test.jsonl"
    if data_args.eval_samples < 0 or not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        items = [row for row in map(json.loads, f) if row.get("task") and row.get("answer")]
    return items[:data_args.eval_samples] if data_args.eval_samples else items


# ---------------------------------------------------------------------- tokenizer and model
def load_model(model_args: ModelArguments, training_args: SFTTrainingArguments, vocab_size: int):
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": model_args.attn_implementation, "trust_remote_code": False}
    if model_args.finetuning_type == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise UserError("qlora needs a CUDA GPU and the bitsandbytes package; use --finetuning_type lora")
        from transformers import BitsAndBytesConfig

        kwargs["device_map"] = {"": training_args.local_process_index}  # 4-bit weights are placed at load
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    model.config.use_cache = False  # training; packed rows are only recognised without a KV cache
    return model


def add_adapter(model, model_args: ModelArguments, training_args: SFTTrainingArguments, new_token_ids: list[int]):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if model_args.finetuning_type == "qlora":
        model = prepare_model_for_kbit_training(model, training_args.gradient_checkpointing)
    elif training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if model_args.adapter_path:
        return PeftModel.from_pretrained(model, model_args.adapter_path, is_trainable=True)
    targets = model_args.lora_target or LORA_TARGETS.get(model.config.model_type, "all-linear")
    config = LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha,
                        lora_dropout=model_args.lora_dropout, target_modules=targets, task_type="CAUSAL_LM",
                        trainable_token_indices=new_token_ids or None)
    return get_peft_model(model, config)


def count_parameters(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_share": round(trainable / total, 5)}


def evaluate_tasks(model, tokenizer, template, items: list[dict], data_args: DataArguments, desc: str):
    if not items:
        return None, []
    replies = generate_replies(model, tokenizer, template, [i["messages"][:-1] for i in items],
                               data_args.eval_max_new_tokens, data_args.eval_batch_size, desc=desc)
    return score(items, replies), replies


# ------------------------------------------------------------------------------- main
@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse_args([DataArguments, ModelArguments, SFTTrainingArguments], argv,
                                                      description=__doc__)
    start = time.time()
    set_seed(training_args.seed)
    if training_args.use_liger_kernel:  # fused RMSNorm / SwiGLU / linear + cross-entropy (no [T, vocab] logits)
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("use_liger_kernel needs the liger-kernel package (pip install liger-kernel)")
        register_liger_glm()  # Liger itself covers glm4 but not glm (GLM-4-9B)
    if not Path(model_args.model_name_or_path, "config.json").is_file():
        raise UserError(f"no model in {model_args.model_name_or_path}: give --model_name_or_path a local checkpoint "
                        "(the built-in base: python model_clm/train.py model_clm/configs/glm_tiny.yaml)")
    if model_args.finetuning_type not in ("lora", "qlora", "full"):
        raise UserError(f"--finetuning_type must be lora, qlora or full, got {model_args.finetuning_type}")
    template = get_template(model_args.template)
    tokenizer = load_tokenizer(model_args.adapter_path or model_args.model_name_or_path)
    added = ensure_template_tokens(tokenizer, template)
    if added:
        print(f"added the template's markers {added} to the vocabulary (trained with the adapter)", flush=True)

    train_dataset, train_report = load_split(data_args, tokenizer, template, "train")
    valid_dataset, valid_report = load_split(data_args, tokenizer, template, "valid")
    test_items = load_test_items(data_args)

    model = load_model(model_args, training_args, len(tokenizer))
    single_process = training_args.world_size == 1
    base_scores = base_replies = None
    if single_process and not model_args.adapter_path:  # the starting model, before any update
        if model_args.finetuning_type != "qlora":
            model.to(training_args.device)
        base_scores, base_replies = evaluate_tasks(model, tokenizer, template, test_items, data_args,
                                                   "scoring the base model")
    if model_args.finetuning_type != "full":
        new_ids = tokenizer.convert_tokens_to_ids(added)
        model = add_adapter(model, model_args, training_args, new_ids)
    parameters = count_parameters(model)
    print(f"training {parameters['trainable']:,} of {parameters['total']:,} parameters "
          f"({100 * parameters['trainable_share']:.2f}%), {model_args.finetuning_type}", flush=True)

    collator = PackedCollator() if data_args.packing else PaddingCollator(tokenizer.pad_token_id)
    trainer = ReplyLossTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=valid_dataset,
                               data_collator=collator, processing_class=tokenizer)
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            logger.info("no checkpoint in %s: starting from scratch", training_args.output_dir)
    trainer.args.eval_on_start = not resume  # inside train(): DeepSpeed can only evaluate through its engine
    result = trainer.train(resume_from_checkpoint=resume)
    before = next((h["eval_loss"] for h in trainer.state.log_history if h.get("step") == 0 and "eval_loss" in h), None)
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(training_args.output_dir)
    if not trainer.is_world_process_zero():
        return {}
    tokenizer.save_pretrained(training_args.output_dir)
    save_template_name(training_args.output_dir, template.name)

    tuned_scores = tuned_replies = None
    if single_process:
        tuned_scores, tuned_replies = evaluate_tasks(trainer.model, tokenizer, template, test_items, data_args,
                                                     "scoring the tuned model")
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    runtime = result.metrics["train_runtime"]
    train_tokens = real_tokens(train_dataset)
    rows_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                     * training_args.world_size)
    epochs = trainer.state.global_step * rows_per_step / len(train_dataset)  # rows are alike: mean tokens per row
    metrics = {
        "template": template.name,
        "finetuning_type": model_args.finetuning_type,
        "base_model": str(model_args.model_name_or_path),
        "parameters": parameters,
        "data": {"train": train_report, "valid": valid_report, "packing": data_args.packing,
                 "train_rows": len(train_dataset), "train_tokens": train_tokens},
        "train": {"first_logged_loss": logged[0] if logged else None, "last_logged_loss": logged[-1] if logged else None,
                  "steps": trainer.state.global_step, "runtime_s": round(runtime, 1),
                  "real_tokens_per_s": round(train_tokens * epochs / runtime, 1)},
        "valid": {"loss_before": before, "loss_after": after,
                  "perplexity_before": math.exp(min(before, 50)) if before is not None else None,
                  "perplexity_after": math.exp(min(after, 50))},
        "test": {"base": base_scores, "tuned": tuned_scores},
        "examples": [{"prompt": item["messages"][0]["content"], "answer": item["answer"],
                      "base": base_replies[i] if base_replies else None, "tuned": tuned_replies[i]}
                     for i, item in enumerate(test_items[:6])] if tuned_replies else [],
        "runtime_s": round(time.time() - start, 1),
    }
    out = Path(training_args.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"valid loss {before if before is None else round(before, 3)} -> {after:.3f}")
    for task, keys in (("sentiment", ("accuracy", "majority_class_accuracy")),
                       ("segmentation", ("f1", "one_char_per_word_f1"))):
        if tuned_scores and task in tuned_scores:
            base = base_scores[task][keys[0]] if base_scores else float("nan")
            print(f"{task}: {keys[0]} base {base:.3f} -> tuned {tuned_scores[task][keys[0]]:.3f} "
                  f"({keys[1]} {tuned_scores[task][keys[1]]:.3f})")
    print(f"adapter / model, tokenizer and metrics.json in {out}")
    return metrics


if __name__ == "__main__":
    main()
