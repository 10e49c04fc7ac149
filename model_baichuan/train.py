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
The run itself (data, LoRA over q/k/v/o/gate/up/down, Trainer, scoring of the starting and
the tuned model on the built-in tasks, metrics.json) is common/sft_train.py's, shared with
chatglm_lora. A remote-code Baichuan directory (model_type "baichuan") is refused with the
conversion command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import parse_args
from common.errors import cli_main
from common.sft_train import TEMPLATE_HELP, SFTDataArguments, SFTModelArguments, run_sft
from common.sft_train import SFTTrainingArguments as _SFTTrainingArguments


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


@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse_args([DataArguments, ModelArguments, SFTTrainingArguments], argv,
                                                      description=__doc__)
    return run_sft(data_args, model_args, training_args, prepare_hint="python model_baichuan/prepare_data.py",
                   base_hint="python model_clm/train.py model_clm/configs/default.yaml, or convert.py's output")


if __name__ == "__main__":
    main()
