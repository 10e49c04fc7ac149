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
Everything lands in `<output_dir>/metrics.json`; the adapter (or the full model), the
tokenizer (with its chat template) in `<output_dir>`. The steps, in this order, are
common/sft_train.py's `run_sft`, shared with model_baichuan; this file holds the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import parse_args
from common.errors import cli_main
from common.sft_train import (  # noqa: F401  (benchmarks/ reach add_adapter, load_model, load_split here)
    TEMPLATE_HELP,
    SFTDataArguments,
    SFTModelArguments,
    add_adapter,
    load_model,
    load_split,
    run_sft,
)
from common.sft_train import SFTTrainingArguments as _SFTTrainingArguments


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
    return run_sft(data_args, model_args, training_args, prepare_hint="python chatglm_lora/prepare_data.py",
                   base_hint="python model_clm/train.py model_clm/configs/glm_tiny.yaml")


if __name__ == "__main__":
    main()
