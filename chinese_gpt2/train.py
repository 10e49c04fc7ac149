"""Train a Chinese GPT-2 from scratch (or continue a local checkpoint) with the Trainer.

    python chinese_gpt2/prepare_data.py
    python chinese_gpt2/train.py chinese_gpt2/configs/default.yaml             # tiny, CPU minutes
    python chinese_gpt2/train.py chinese_gpt2/configs/gpt2_small_gpu.yaml      # 12 x 768, context 1024
    python chinese_gpt2/train.py chinese_gpt2/configs/default.yaml --resume_from_checkpoint last

Several GPUs: `torchrun --nproc_per_node 4 chinese_gpt2/train.py chinese_gpt2/configs/gpt2_small_gpu.yaml`.

Reads the packed token files of prepare_data.py as fixed-length blocks through a memory
map. The model is `GPT2LMHeadModel` with SDPA attention, built from the sizes below or
loaded from `--model_name_or_path`. Validation loss and perplexity go to
`<output_dir>/metrics.json`, next to the perplexity of an add-one-smoothed character-bigram
model fitted on the same train tokens and scored on the same validation positions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from common.config import parse_args
from common.data import PackedTokenDataset
from common.errors import UserError, cli_main
from common.tokenizer import load_tokenizer

logger = logging.getLogger("train")


# ----------------------------------------------------------------------------- arguments
@dataclass
class DataArguments:
    data_dir: str = field(default="data/chinese_gpt2", metadata={"help": "Output folder of prepare_data.py."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence (the context length)."})
    bigram_max_tokens: int = field(
        default=50_000_000, metadata={"help": "Train tokens the bigram baseline is fitted on (0 = no baseline)."},
    )


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local causal-LM checkpoint to continue. Unset: GPT-2 from the sizes below."},
    )
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = field(default=0.0, metadata={"help": "Residual, embedding and attention dropout."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})


@dataclass
class GPT2TrainingArguments(TrainingArguments):
    """TrainingArguments with this recipe's defaults (every field can be set in YAML or CLI)."""

    output_dir: str = field(default="outputs/chinese_gpt2", metadata={"help": "Where model and metrics go."})
    eval_strategy: str = "steps"
    eval_steps: float = 200
    save_strategy: str = "steps"
    save_steps: float = 200
    save_total_limit: int = 2
    lr_scheduler_type: str = "cosine"
    report_to: str = "none"
    logging_steps: int = 20


# -------------------------------------------------------------------- bigram baseline
def bigram_perplexity(train: np.ndarray, valid_blocks: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed token-bigram model on the positions the LM is
    scored on: every token of a validation block but the first, given the one before."""
    train = train.astype(np.int64)
    pair_codes, pair_counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    context_counts = np.bincount(train[:-1], minlength=vocab_size)
    prev = valid_blocks[:, :-1].astype(np.int64).ravel()
    nxt = valid_blocks[:, 1:].astype(np.int64).ravel()
    codes = prev * vocab_size + nxt
    where = np.clip(np.searchsorted(pair_codes, codes), 0, len(pair_codes) - 1)
    counts = np.where(pair_codes[where] == codes, pair_counts[where], 0)
    log_p = np.log(counts + 1.0) - np.log(context_counts[prev] + float(vocab_size))
    return float(np.exp(-log_p.mean()))


@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse_args(
        [DataArguments, ModelArguments, GPT2TrainingArguments], argv, description=__doc__
    )
    set_seed(training_args.seed)
    start = time.time()

    # ------------------------------------------------------------------------- data
    data_dir = Path(data_args.data_dir)
    if not (data_dir / "meta.json").is_file():
        raise UserError(f"{data_dir}/meta.json not found: run chinese_gpt2/prepare_data.py first")
    meta = json.loads((data_dir / "meta.json").read_text())
    train_blocks = PackedTokenDataset(data_dir / "train.bin", data_args.block_size, meta["dtype"])
    valid_blocks = PackedTokenDataset(data_dir / "valid.bin", data_args.block_size, meta["dtype"])
    logger.info("blocks of %d tokens: %d train, %d valid", data_args.block_size, len(train_blocks), len(valid_blocks))

    # ------------------------------------------------------------- tokenizer and model
    tokenizer = load_tokenizer(data_dir / meta["tokenizer"])
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, attn_implementation=model_args.attn_implementation,
            trust_remote_code=False,
        )
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=data_args.block_size,
            n_layer=model_args.n_layer,
            n_head=model_args.n_head,
            n_embd=model_args.n_embd,
            resid_pdrop=model_args.dropout,
            embd_pdrop=model_args.dropout,
            attn_pdrop=model_args.dropout,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel._from_config(config, attn_implementation=model_args.attn_implementation)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, the model only {model.config.vocab_size}")
    logger.info("model: %s, %.2fM parameters", type(model).__name__, model.num_parameters() / 1e6)

    # --------------------------------------------------------------------------- train
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=valid_blocks,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            logger.info("no checkpoint in %s: starting from scratch", training_args.output_dir)
    if resume:
        logger.info("resuming from %s", resume)
    train_result = trainer.train(resume_from_checkpoint=resume)

    # ------------------------------------------------------------- evaluate and save
    eval_metrics = trainer.evaluate()
    trainer.save_model(training_args.output_dir)
    if not trainer.is_world_process_zero():
        return eval_metrics
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "valid_loss": eval_metrics["eval_loss"],
        "valid_perplexity": math.exp(eval_metrics["eval_loss"]),
        "train": {
            "first_logged_loss": logged[0] if logged else None,
            "last_logged_loss": logged[-1] if logged else None,
            "steps": trainer.state.global_step,
            "tokens": trainer.state.global_step * training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps * training_args.world_size * data_args.block_size,
            "runtime_s": round(train_result.metrics["train_runtime"], 1),
        },
        "parameters": model.num_parameters(),
        "block_size": data_args.block_size,
    }
    if data_args.bigram_max_tokens:
        train_tokens = train_blocks.tokens[: data_args.bigram_max_tokens]
        valid = valid_blocks.tokens[: len(valid_blocks) * data_args.block_size].reshape(-1, data_args.block_size)
        metrics["bigram_baseline"] = {
            "valid_perplexity": bigram_perplexity(np.asarray(train_tokens), np.asarray(valid), len(tokenizer)),
            "train_tokens": int(len(train_tokens)),
        }
    metrics["runtime_s"] = round(time.time() - start, 1)
    output_dir = Path(training_args.output_dir)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    line = f"valid perplexity {metrics['valid_perplexity']:.1f}"
    if "bigram_baseline" in metrics:
        line += f" | character-bigram baseline {metrics['bigram_baseline']['valid_perplexity']:.1f}"
    print(line)
    print(f"model and metrics.json in {output_dir}")
    return metrics


if __name__ == "__main__":
    main()
