"""Building blocks of the instruction-tuning recipes (chatglm_lora, model_baichuan; baichuan2_dpo
starts from their checkpoints): prepare_data's split, the argument dataclasses (each recipe
subclasses them with its own defaults), data loading, model + LoRA adapter, task scoring,
metrics.json and the loss plot. Each recipe's train.py runs them, in order, itself.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from common.device_map import align_adapter_inputs, load_chained, parse_device_map, require_gpus
from common.errors import UserError
from common.instructions import (
    builtin_items,
    generate_replies,
    item_messages,
    paired_change,
    score,
    split_of,
    to_conversations,
)
from common.parameters import parameter_count
from common.sft import (
    format_report,
    pack,
    read_conversations,
    real_tokens,
    register_liger_glm,
    tokenize_conversations,
)
from common.templates import ensure_template_tokens, resolve_template
from common.tokenizer import load_tokenizer

logger = logging.getLogger("sft")


# ------------------------------------------------------------------------ prepare_data
@dataclass
class SFTPrepareArguments:
    input: list[str] | None = field(
        default=None, metadata={"help": "Your JSON / JSONL / CSV files, folders or globs. Default: the built-in tasks."},
    )
    output_dir: str = field(default="data/sft", metadata={"help": "Where the JSONL files go."})
    valid_ratio: float = field(default=0.05, metadata={"help": "Share of conversations held out for validation."})
    test_ratio: float = field(default=0.05, metadata={"help": "Share held out for the final test."})
    sentiment_items: int = field(default=6000, metadata={"help": "Built-in: reviews drawn (all splits)."})
    segmentation_items: int = field(default=1500, metadata={"help": "Built-in: sentences drawn (all splits)."})
    multi_turn_share: float = field(default=0.2, metadata={"help": "Built-in: share of training items merged "
                                                          "pairwise into two-turn conversations."})
    seed: int = 42


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare_sft_data(args: SFTPrepareArguments) -> dict:
    """prepare_data.py of an SFT recipe: the built-in tasks, or the user's conversations,
    deduplicated and split by a seeded hash; JSONL files + report.json in args.output_dir."""
    if not (0 <= args.valid_ratio < 1 and 0 <= args.test_ratio < 1 and args.valid_ratio + args.test_ratio < 1):
        raise UserError("need 0 <= valid_ratio, test_ratio and valid_ratio + test_ratio < 1")
    out = Path(args.output_dir)
    if args.input is None:
        items = builtin_items({"sentiment": args.sentiment_items, "segmentation": args.segmentation_items},
                              args.seed, args.valid_ratio, args.test_ratio)
        splits = {
            "train": [{"messages": m} for m in to_conversations(items["train"], args.multi_turn_share, args.seed)],
            "valid": [{"messages": item_messages(i)} for i in items["valid"]],
            "test": [{"messages": item_messages(i), **i} for i in items["test"]],
        }
        report = {"source": "built-in", "items": {s: len(v) for s, v in items.items()},
                  "conversations": {s: len(v) for s, v in splits.items()},
                  "multi_turn_train_conversations": sum(len(r["messages"]) > 2 for r in splits["train"])}
    else:
        conversations = read_conversations(args.input)
        splits = {"train": [], "valid": [], "test": []}
        seen = set()
        for conversation in conversations:
            key = json.dumps(conversation.messages, ensure_ascii=False, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            splits[split_of(key, args.seed, args.valid_ratio, args.test_ratio)].append(
                {"messages": conversation.messages})
        report = {"source": args.input, "read": len(conversations), "duplicates_dropped": len(conversations) - len(seen),
                  "conversations": {s: len(v) for s, v in splits.items()}}
    if not splits["train"]:
        raise UserError("no training conversations left after the split")
    return write_splits(out, splits, report)


def write_splits(out: Path, splits: dict[str, list[dict]], report: dict) -> dict:
    """`<split>.jsonl` files and report.json in `out`; the report printed and returned."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, ensure_ascii=False))
    print(f"wrote {', '.join(f'{n}.jsonl' for n in splits)} to {out}")
    return report


# ------------------------------------------------------------------------- training
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
TEMPLATE_HELP = ("How conversations are written: auto (the model's own Jinja chat_template, or the entry a tuned "
                 "model was trained with), official (the tokenizer's chat_template, required), or a registry entry "
                 "of common/templates.py (chatml, qwen2.5, qwen3, qwen3-thinking, llama3, deepseek-r1, glm4, glm4.5, "
                 "chatglm3, chatglm2, baichuan2, llama2-chinese, alpaca, dolly, plain).")


@dataclass
class SFTDataArguments:
    data_dir: str = field(default="data/sft", metadata={"help": "Folder of prepare_data.py's JSONL files."})
    max_length: int = field(default=512, metadata={"help": "Longest training sequence in tokens (also a packed "
                                                   "row's length)."})
    packing: bool = field(default=True, metadata={"help": "Pack conversations into rows without cross-attention "
                                                  "(False: pad each batch to its longest)."})
    eval_samples: int = field(default=400, metadata={"help": "Test items scored before and after (0 = all, "
                                                     "-1 = skip task evaluation)."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Longest generated reply when scoring."})
    eval_batch_size: int = 32


@dataclass
class SFTModelArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Local base (or chat) model directory (each "
                                                          "recipe sets its built-in one)."})
    template: str = field(default="auto", metadata={"help": TEMPLATE_HELP})
    finetuning_type: str = field(default="lora", metadata={"help": "lora, qlora or full."})
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt, or all-linear (every linear layer but the LM head). "
                                "Default: every linear layer of the family, else all-linear."})
    adapter_path: str | None = field(default=None, metadata={"help": "Continue training this saved adapter."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})
    device_map: str | None = field(
        default=None, metadata={"help": "Chain the model's layers over this machine's GPUs in one process (a model "
                                "too large for one GPU; one GPU works at a time): balanced, balanced_low_0 (less on "
                                "GPU 0) or sizes per GPU like \"0:20GiB,1:30GiB\". Plain python only: not with "
                                "torchrun / accelerate launch, --deepspeed, FSDP or qlora."})
    random_init: bool = field(
        default=False, metadata={"help": "Build the model from --model_name_or_path's config.json with random "
                                 "weights (no weights read): to measure speed and memory of a shape you have no "
                                 "checkpoint of. Under ZeRO-3 each weight is made already partitioned over the "
                                 "processes (deepspeed.zero.Init), so no process ever holds the whole model."})


@dataclass
class SFTTrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/sft", metadata={"help": "Where adapter and metrics go."})
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
def load_split(data_args: SFTDataArguments, tokenizer, template, split: str, prepare_hint: str = "prepare_data.py"):
    path = Path(data_args.data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: run {prepare_hint} first")
    dataset, report = tokenize_conversations(tokenizer, template, read_conversations(str(path)), data_args.max_length)
    print(format_report(split, report), flush=True)
    if len(dataset) == 0:
        raise UserError(f"{path}: no conversation fits max_length {data_args.max_length}")
    return (pack(dataset, data_args.max_length) if data_args.packing else dataset), report


def load_test_items(data_args: SFTDataArguments) -> list[dict]:
    path = Path(data_args.data_dir) / "test.jsonl"
    if data_args.eval_samples < 0 or not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        items = [row for row in map(json.loads, f) if row.get("task") and row.get("answer")]
    return items[:data_args.eval_samples] if data_args.eval_samples else items


# ---------------------------------------------------------------------- tokenizer and model
def check_device_map(model_args: SFTModelArguments, training_args: SFTTrainingArguments) -> None:
    """Refuse --device_map where it cannot work, before any data or weights are read."""
    if not model_args.device_map:
        return
    strategy, max_memory = parse_device_map(model_args.device_map)
    world_size = max(int(os.environ.get("WORLD_SIZE", "1")), training_args.world_size)
    if world_size > 1:
        raise UserError(f"--device_map chains one model over the GPUs of one process, but this is one of {world_size} "
                        "processes (torchrun / accelerate launch): start it with plain python, or drop --device_map "
                        "to train data-parallel")
    if training_args.deepspeed:
        raise UserError("--device_map and --deepspeed exclude each other: DeepSpeed places the model itself; drop one")
    if training_args.fsdp:
        raise UserError("--device_map and --fsdp exclude each other: FSDP shards the model itself; drop one")
    if model_args.finetuning_type == "qlora":
        raise UserError("--device_map does not work with --finetuning_type qlora (its 4-bit weights are placed on one "
                        "GPU at load): use lora, or drop --device_map")
    require_gpus(max_memory)


def refuse_data_parallel(training_args, device_map: str | None = None) -> None:
    """One process that sees several GPUs would train through nn.DataParallel (the Trainer's
    fallback): slower than either real option, and its logged loss was not the single-GPU loss
    (4.69 against 2.30 for the same data on 2 H200s). Refused with the commands that work."""
    n = training_args.n_gpu
    if n > 1 and not device_map:
        raise UserError(f"this one process sees {n} GPUs, so the Trainer would wrap the model in nn.DataParallel: "
                        f"train data-parallel with `torchrun --nproc_per_node {n} <script> ...`, chain one large model "
                        "over them with --device_map balanced, or pick one GPU with CUDA_VISIBLE_DEVICES=0")


def weights_dtype(finetuning_type: str, training_args) -> torch.dtype:
    """The dtype weights are loaded in. Full fine-tuning without DeepSpeed keeps fp32 master
    weights and computes under the Trainer's bf16 / fp16 autocast: with bf16 weights the
    optimizer's small updates round away (bf16 has 8 bits of mantissa: an update below 1/256
    of a weight is lost). The cost: fp32 weights + gradients + Adam states, 16 bytes per
    parameter against 8 in pure bf16. DeepSpeed keeps fp32 master copies itself; frozen
    (LoRA / QLoRA) bases stay in the half precision."""
    half = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    return torch.float32 if finetuning_type == "full" and not training_args.deepspeed else half


def nf4_config(compute_dtype: torch.dtype):
    """QLoRA's base: NF4 weights with double quantisation, matmuls in `compute_dtype` (merge.py
    quantises the base the same way to merge an adapter into what it was trained over)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(model_args: SFTModelArguments, training_args: SFTTrainingArguments, vocab_size: int):
    dtype = weights_dtype(model_args.finetuning_type, training_args)
    compute = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": model_args.attn_implementation, "trust_remote_code": False}
    if model_args.device_map:  # several GPUs, layers chained; the Trainer sees hf_device_map and leaves it in place
        check_device_map(model_args, training_args)
        model = load_chained(model_args.model_name_or_path, model_args.device_map, **kwargs)
        if model.get_input_embeddings().num_embeddings < vocab_size:  # new rows on the embedding's own GPU
            model.resize_token_embeddings(vocab_size, mean_resizing=True)
        model.config.use_cache = False
        return model
    if model_args.finetuning_type == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise UserError("qlora needs a CUDA GPU and the bitsandbytes package; use --finetuning_type lora")
        kwargs["device_map"] = {"": training_args.local_process_index}  # 4-bit weights are placed at load
        kwargs["quantization_config"] = nf4_config(compute)
    if model_args.random_init:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=False)
        logger.warning("--random_init: %s built from its config with random weights, none read",
                       config.architectures or config.model_type)
        # (from_config runs under deepspeed.zero.Init when a ZeRO-3 config is active)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    model.config.use_cache = False  # training; packed rows are only recognised without a KV cache
    return model


def lora_target_modules(model, requested: list[str] | None) -> list[str] | str:
    """LoRA's target_modules: the requested module names (checked against the model, with one
    clear message listing its linear layers), else the family's linear layers, else all-linear."""
    targets = requested or LORA_TARGETS.get(model.config.model_type, "all-linear")
    if targets in (["all-linear"], "all-linear"):  # PEFT's keyword is a string; the command line gives a list
        return "all-linear"
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")})
        raise UserError(f"--lora_target {' '.join(missing)}: no such module in this {model.config.model_type} model; "
                        f"its linear layers are {', '.join(linear)} (or give all-linear)")
    return targets


def lora_config(model, model_args, new_token_ids: list[int] | None = None):
    """LoRA of `model_args` (lora_rank / alpha / dropout / target) on `model`; `new_token_ids`: the
    embedding rows of markers training added, trained with the adapter."""
    from peft import LoraConfig

    return LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=lora_target_modules(model, model_args.lora_target), task_type="CAUSAL_LM",
                      trainable_token_indices=new_token_ids or None)


def add_adapter(model, model_args: SFTModelArguments, training_args: SFTTrainingArguments, new_token_ids: list[int]):
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if model_args.finetuning_type == "qlora":
        model = prepare_model_for_kbit_training(model, training_args.gradient_checkpointing)
    elif training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if model_args.adapter_path:
        model = PeftModel.from_pretrained(model, model_args.adapter_path, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(model, model_args, new_token_ids))
    if model_args.device_map:
        align_adapter_inputs(model)  # the LM head's LoRA, outside any decoder layer, must see inputs on its GPU
    return model


def count_parameters(model) -> dict:
    trainable, total = parameter_count(model, trainable_only=True), parameter_count(model)
    return {"trainable": trainable, "total": total, "trainable_share": round(trainable / total, 5)}


def evaluate_tasks(model, tokenizer, template, items: list[dict], data_args: SFTDataArguments, desc: str):
    if not items:
        return None, []
    replies = generate_replies(model, tokenizer, template, [i["messages"][:-1] for i in items],
                               data_args.eval_max_new_tokens, data_args.eval_batch_size, desc=desc)
    return score(items, replies), replies

def check_local_model(path: str, base_hint: str) -> None:
    config = Path(path, "config.json")
    if not config.is_file():
        raise UserError(f"no model in {path}: give --model_name_or_path a local checkpoint (the built-in base: "
                        f"{base_hint})")
    if json.loads(config.read_text(encoding="utf-8")).get("model_type") == "baichuan":
        raise UserError(f"{path} is a remote-code Baichuan checkpoint: convert it to Llama first "
                        f"(python model_baichuan/convert.py --input {path} --output <dir>) and train that")


@dataclass
class StartModelArguments:
    """The model preference / reward training (baichuan2_dpo) starts from, and its adapter."""
    model_name_or_path: str = field(default="outputs/model_baichuan",
                                    metadata={"help": "Local chat model, or an SFT LoRA adapter (merged into its base)."})
    template: str | None = field(default=None, metadata={"help": TEMPLATE_HELP + " Default: auto, else baichuan2."})
    finetuning_type: str = field(default="lora", metadata={"help": "lora (reference = adapter off) or full "
                                                           "(reference = a frozen copy)."})
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target: list[str] | None = field(default=None, metadata={"help": "Modules to adapt (default: every "
                                                                  "linear layer of the family; not lm_head)."})


@dataclass
class ScoredDataArguments:
    """A prepare_data.py folder whose test.jsonl items (with a `task`) are scored before and after."""
    data_dir: str = field(default="data/baichuan2_dpo", metadata={"help": "Folder of prepare_data.py's JSONL files."})
    train_samples: int = field(default=0, metadata={"help": "Use at most this many training rows (0 = all)."})
    eval_samples: int = field(default=400, metadata={"help": "Test items scored before and after (0 = all, -1 = "
                                                     "skip task evaluation)."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Longest generated reply when scoring."})
    eval_batch_size: int = 32


def scored_test_items(data_args: ScoredDataArguments, prepare_hint: str) -> list[dict]:
    """test.jsonl's items that have a task, with their messages, at most eval_samples (0 = all, < 0 = none)."""
    if data_args.eval_samples < 0:
        return []
    rows = read_jsonl(Path(data_args.data_dir) / "test.jsonl", prepare_hint)
    return [{**row, "messages": item_messages(row)} for row in rows if row.get("task")][:data_args.eval_samples or None]


def start_vs_tuned(items: list[dict], start: tuple, tuned: tuple) -> dict:
    """metrics.json's test scores of the starting and the tuned model (each `evaluate_tasks`'
    (scores, replies)), items better / worse with the sign test, six examples; printed per task."""
    (start_scores, start_replies), (tuned_scores, tuned_replies) = start, tuned
    change = paired_change(items, start_replies, tuned_replies) if items else None
    for task, key in (("sentiment", "accuracy"), ("segmentation", "f1")):
        if tuned_scores and task in tuned_scores:
            print(f"{task}: {key} start {start_scores[task][key]:.3f} -> tuned {tuned_scores[task][key]:.3f} "
                  f"({change[task]['better']} items better, {change[task]['worse']} worse of {change[task]['n']}; "
                  f"sign test p = {change[task]['sign_test_p']:.3g})")
    return {"test": {"start": start_scores, "tuned": tuned_scores, "change": change},
            "examples": [{"prompt": item["messages"][0]["content"], "answer": item["answer"],
                          "start": start_replies[i], "tuned": tuned_replies[i]} for i, item in enumerate(items[:6])]}


def read_jsonl(path: Path, prepare_hint: str) -> list[dict]:
    """The rows of a prepare_data.py JSONL file; a missing file names the command that makes it."""
    if not path.is_file():
        raise UserError(f"{path} not found: run {prepare_hint} first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_start_model(path: str, dtype: torch.dtype):
    """The model preference / reward training starts from, plain: an SFT adapter directory is
    merged into its base first. Returns (model, tokenizer)."""
    from common.serving.loading import adapter_base, load_adapter

    if not Path(path, "config.json").is_file() and not Path(path, "adapter_config.json").is_file():
        raise UserError(f"no model in {path}: train one first (model_baichuan/train.py or chatglm_lora/train.py) "
                        "or give --model_name_or_path")
    tokenizer = load_tokenizer(path)
    base = adapter_base(path)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False), tokenizer
    model = load_adapter(path, base, tokenizer, dtype).merge_and_unload()
    return model.requires_grad_(True), tokenizer  # PEFT froze the base weights; a full run trains them


# ------------------------------------------------------------------------- run steps
def check_sft_run(model_args: SFTModelArguments, training_args: SFTTrainingArguments, base_hint: str) -> None:
    """Refuse what cannot run before any data or weights are read. `base_hint`: the command that
    makes the recipe's built-in base, named when the model directory is missing."""
    if training_args.use_liger_kernel:  # fused RMSNorm / SwiGLU / linear + cross-entropy (no [T, vocab] logits)
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("use_liger_kernel needs the liger-kernel package (pip install liger-kernel)")
        register_liger_glm()  # Liger itself covers glm4 but not glm (GLM-4-9B)
    check_local_model(model_args.model_name_or_path, base_hint)
    if model_args.finetuning_type not in ("lora", "qlora", "full"):
        raise UserError(f"--finetuning_type must be lora, qlora or full, got {model_args.finetuning_type}")
    if model_args.random_init and (model_args.finetuning_type == "qlora" or model_args.device_map):
        raise UserError("--random_init builds a plain model: not with qlora or --device_map")
    check_device_map(model_args, training_args)
    refuse_data_parallel(training_args, model_args.device_map)


def load_sft_tokenizer(model_args: SFTModelArguments):
    """The tokenizer (of the adapter being continued, else of the model), the chat template chosen
    by --template, and the template's markers added to the vocabulary (trained with the adapter).
    Returns (tokenizer, template, added marker strings)."""
    tokenizer_dir = model_args.adapter_path or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_dir)
    template = resolve_template(model_args.template, tokenizer, tokenizer_dir)
    print(f"chat template: {template.name}" + (f" ({template.source})" if template.name == "official" else ""),
          flush=True)
    added = ensure_template_tokens(tokenizer, template)
    if added:
        print(f"added the template's markers {added} to the vocabulary (trained with the adapter)", flush=True)
    tokenizer.chat_template = template.jinja()  # checkpoints carry it too
    return tokenizer, template, added


def resume_checkpoint(training_args: SFTTrainingArguments) -> str | None:
    """--resume_from_checkpoint as given; `last` = the newest checkpoint in output_dir (none: a fresh start)."""
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            logger.info("no checkpoint in %s: starting from scratch", training_args.output_dir)
    return resume


def sft_metrics(trainer, result, resume: str | None, template, model_args: SFTModelArguments,
                data_args: SFTDataArguments, parameters: dict, reports: dict, test_items: list[dict],
                base: tuple, tuned: tuple, start: float) -> dict:
    """metrics.json of an SFT run: data, training speed, valid loss before / after (the logged
    evaluation at step 0 and a final one), task scores of the base and the tuned model
    (`evaluate_tasks`' (scores, replies) each), six examples. Printed in short."""
    (base_scores, base_replies), (tuned_scores, tuned_replies) = base, tuned
    args = trainer.args
    history = trainer.state.log_history
    before = next((h["eval_loss"] for h in history if h.get("step") == 0 and "eval_loss" in h), None)
    after = next(h["eval_loss"] for h in reversed(history) if "eval_loss" in h)
    logged = [h["loss"] for h in history if "loss" in h]
    runtime = result.metrics["train_runtime"]
    train_tokens = real_tokens(trainer.train_dataset)
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    resumed_at = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0  # steps before this process
    # rows are alike: mean tokens per row; only the steps this process ran count against its runtime
    epochs = (trainer.state.global_step - resumed_at) * rows_per_step / len(trainer.train_dataset)
    metrics = {
        "template": template.name,
        "finetuning_type": model_args.finetuning_type,
        "base_model": str(model_args.model_name_or_path),
        "parameters": parameters,
        "data": {**reports, "packing": data_args.packing, "train_rows": len(trainer.train_dataset),
                 "train_tokens": train_tokens},
        "train": {"first_logged_loss": logged[0] if logged else None, "last_logged_loss": logged[-1] if logged else None,
                  "steps": trainer.state.global_step, "runtime_s": round(runtime, 1),
                  "real_tokens_per_s": round(train_tokens * epochs / runtime, 1),
                  "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                  if torch.cuda.is_available() else None},
        "valid": {"loss_before": before, "loss_after": after,
                  "perplexity_before": math.exp(min(before, 50)) if before is not None else None,
                  "perplexity_after": math.exp(min(after, 50))},
        "test": {"base": base_scores, "tuned": tuned_scores},
        "examples": [{"prompt": item["messages"][0]["content"], "answer": item["answer"],
                      "base": base_replies[i] if base_replies else None, "tuned": tuned_replies[i]}
                     for i, item in enumerate(test_items[:6])] if tuned_replies else [],
        "runtime_s": round(time.time() - start, 1),
    }
    print(f"valid loss {before if before is None else round(before, 3)} -> {after:.3f}")
    for task, keys in (("sentiment", ("accuracy", "majority_class_accuracy")),
                       ("segmentation", ("f1", "one_char_per_word_f1"))):
        if tuned_scores and task in tuned_scores:
            base_value = base_scores[task][keys[0]] if base_scores else float("nan")
            print(f"{task}: {keys[0]} base {base_value:.3f} -> tuned {tuned_scores[task][keys[0]]:.3f} "
                  f"({keys[1]} {tuned_scores[task][keys[1]]:.3f})")
    return metrics
