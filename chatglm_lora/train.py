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
rendered with a chat template, the same code serving uses; loss falls on every assistant
reply and its end markers only. `--template auto` (the default) takes the model's own Jinja
chat_template (Qwen2.5, Llama-3.x, ... checkpoints carry one; each reply's span is found by
rendering the conversation prefix by prefix); a registry entry of common/templates.py
(chatml, qwen2.5, qwen3, qwen3-thinking, llama3, deepseek-r1, glm4, glm4.5, chatglm3,
chatglm2, baichuan2, llama2-chinese, alpaca, dolly, plain) is used where a model has no
template, or one that cannot be masked (Qwen3, DeepSeek-R1, GLM-4: the error names the entry).
The tuned model carries that template as Jinja and its end tokens in generation_config.json,
so vLLM, SGLang, `transformers serve` or llama.cpp prompt it exactly as it was trained. Conversations over `max_length` lose whole turns
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
Everything lands in `<output_dir>/metrics.json` and `loss.png` (train and valid loss per step);
the adapter (or the full model), the tokenizer (with its chat template) in `<output_dir>`.
The run below goes: arguments -> checks -> tokenizer and template -> data -> model (scored
before any update) -> adapter -> Trainer -> train / evaluate / save -> scores -> metrics.json;
the building blocks it calls are common/sft_train.py's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed

from common.config import parse_args
from common.errors import cli_main
from common.plots import plot_losses
from common.sft import PackedCollator, PaddingCollator, ReplyLossTrainer
from common.sft_train import (
    TEMPLATE_HELP,
    SFTDataArguments,
    SFTModelArguments,
    add_adapter,
    check_sft_run,
    count_parameters,
    evaluate_tasks,
    load_model,
    load_sft_tokenizer,
    load_split,
    load_test_items,
    resume_checkpoint,
    sft_metrics,
)
from common.sft_train import SFTTrainingArguments as _SFTTrainingArguments
from common.templates import save_chat_template

PREPARE = "python chatglm_lora/prepare_data.py"
BUILT_IN_BASE = "python model_clm/train.py model_clm/configs/glm_tiny.yaml"


# ----------------------------------------------------------------------------- arguments
@dataclass
class DataArguments(SFTDataArguments):
    data_dir: str = field(default="data/chatglm_lora", metadata={"help": "Folder of prepare_data.py's JSONL files."})


@dataclass
class ModelArguments(SFTModelArguments):
    model_name_or_path: str = field(default="outputs/model_clm_glm",
                                    metadata={"help": "Local base (or chat) model directory."})
    template: str = field(default="auto", metadata={"help": TEMPLATE_HELP})


@dataclass
class SFTTrainingArguments(_SFTTrainingArguments):
    output_dir: str = field(default="outputs/chatglm_lora", metadata={"help": "Where adapter and metrics go."})


# ------------------------------------------------------------------------------- main
@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse_args([DataArguments, ModelArguments, SFTTrainingArguments], argv,
                                                      description=__doc__)
    start = time.time()
    set_seed(training_args.seed)
    check_sft_run(model_args, training_args, BUILT_IN_BASE)
    tokenizer, template, added = load_sft_tokenizer(model_args)

    # data: prepare_data.py's conversations, rendered with the template, packed into rows
    train_dataset, train_report = load_split(data_args, tokenizer, template, "train", PREPARE)
    valid_dataset, valid_report = load_split(data_args, tokenizer, template, "valid", PREPARE)
    test_items = load_test_items(data_args)

    # model: the base, scored on the test items before any update, then the adapter
    model = load_model(model_args, training_args, len(tokenizer))
    single_process = training_args.world_size == 1
    base = (None, [])
    if single_process and not model_args.adapter_path:
        if model_args.finetuning_type != "qlora" and not model_args.device_map:
            model.to(training_args.device)
        base = evaluate_tasks(model, tokenizer, template, test_items, data_args, "scoring the base model")
    if model_args.finetuning_type != "full":
        model = add_adapter(model, model_args, training_args, tokenizer.convert_tokens_to_ids(added))
    parameters = count_parameters(model)
    print(f"training {parameters['trainable']:,} of {parameters['total']:,} parameters "
          f"({100 * parameters['trainable_share']:.2f}%), {model_args.finetuning_type}", flush=True)

    # trainer: loss on the replies only
    collator = PackedCollator() if data_args.packing else PaddingCollator(tokenizer.pad_token_id)
    trainer = ReplyLossTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=valid_dataset,
                               data_collator=collator, processing_class=tokenizer)

    # train (valid loss first, unless resuming), evaluate, save
    resume = resume_checkpoint(training_args)
    trainer.args.eval_on_start = not resume  # inside train(): DeepSpeed can only evaluate through its engine
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.evaluate()
    trainer.save_model(training_args.output_dir)
    if not trainer.is_world_process_zero():
        return {}
    save_chat_template(training_args.output_dir, tokenizer, template)  # the Jinja of what training rendered
    tuned = (None, [])
    if single_process:
        tuned = evaluate_tasks(trainer.model, tokenizer, template, test_items, data_args, "scoring the tuned model")

    # metrics.json and loss.png
    metrics = sft_metrics(trainer, result, resume, template, model_args, data_args, parameters,
                          {"train": train_report, "valid": valid_report}, test_items, base, tuned, start)
    out = Path(training_args.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    plot_losses(trainer.state.log_history, out / "loss.png", f"chatglm_lora: {model_args.finetuning_type} SFT")
    print(f"adapter / model, tokenizer, metrics.json and loss.png in {out}")
    return metrics


if __name__ == "__main__":
    main()
