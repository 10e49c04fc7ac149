"""Instruction-tune Baichuan / Baichuan2-7B (converted to Llama) with LoRA or full fine-tuning.

    # the built-in default (CPU, minutes): a tiny Llama pretrained by model_clm stands in for Baichuan-7B
    python model_clm/prepare_data.py --dedup true && python model_clm/train.py model_clm/configs/default.yaml
    python model_baichuan/prepare_data.py
    python model_baichuan/train.py model_baichuan/configs/default.yaml

    # a real checkpoint: convert once (no remote code afterwards), then tune
    python model_baichuan/convert.py --input /models/Baichuan2-7B-Chat --output outputs/baichuan2_7b_chat
    python model_baichuan/train.py model_baichuan/configs/baichuan2_7b_lora.yaml     # one GPU, LoRA, bf16
    torchrun --nproc_per_node 4 model_baichuan/train.py model_baichuan/configs/baichuan2_7b_full_zero3.yaml \\
        --deepspeed model_baichuan/configs/ds_zero3.json                               # full, ZeRO-3
    python model_baichuan/train.py ... --resume_from_checkpoint last                  # resume a stopped run

Conversations are rendered with the baichuan2 template: `<reserved_106>` opens a user turn,
`<reserved_107>` the reply (ids 195 / 196 in Baichuan2's vocabulary; a model without them, like
the built-in base, gets them as new special tokens trained with the adapter). `--template`
takes auto / official / any registry entry as in chatglm_lora. Loss falls on the replies and
their end token only; conversations are packed without cross-attention. The tuned model
carries the template as Jinja and its end tokens as eos ids, for any serving stack.
The run below: checks -> tokenizer and template -> data -> model (scored on the built-in tasks
before any update) -> LoRA over q/k/v/o/gate/up/down -> Trainer -> train / evaluate / save ->
scores -> metrics.json and loss.png, with common/sft_train.py's building blocks (chatglm_lora's
train.py runs the same steps). A remote-code Baichuan directory (model_type "baichuan") is
refused with the conversion command.
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

PREPARE = "python model_baichuan/prepare_data.py"
BUILT_IN_BASE = "python model_clm/train.py model_clm/configs/default.yaml, or convert.py's output"


# ----------------------------------------------------------------------------- arguments
@dataclass
class DataArguments(SFTDataArguments):
    data_dir: str = field(default="data/model_baichuan", metadata={"help": "Folder of prepare_data.py's JSONL files."})


@dataclass
class ModelArguments(SFTModelArguments):
    model_name_or_path: str = field(default="outputs/model_clm",
                                    metadata={"help": "Local Llama-format model (convert.py's output, or any Llama)."})
    template: str = field(default="baichuan2", metadata={"help": TEMPLATE_HELP})


@dataclass
class SFTTrainingArguments(_SFTTrainingArguments):
    output_dir: str = field(default="outputs/model_baichuan", metadata={"help": "Where adapter and metrics go."})


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
    plot_losses(trainer.state.log_history, out / "loss.png", f"model_baichuan: {model_args.finetuning_type} SFT")
    print(f"adapter / model, tokenizer, metrics.json and loss.png in {out}")
    return metrics


if __name__ == "__main__":
    main()
