"""Train a Chinese GPT-2 from scratch (or continue a local checkpoint) with the Trainer.

    python chinese_gpt2/prepare_data.py
    python chinese_gpt2/train.py chinese_gpt2/configs/default.yaml             # tiny, CPU minutes
    python chinese_gpt2/train.py chinese_gpt2/configs/gpt2_small_gpu.yaml      # 12 x 768, context 1024
    python chinese_gpt2/train.py chinese_gpt2/configs/default.yaml --resume_from_checkpoint last

Several GPUs: `torchrun --nproc_per_node 4 chinese_gpt2/train.py chinese_gpt2/configs/gpt2_small_gpu.yaml
--gradient_accumulation_steps 1` (the same global batch as one GPU with 4).

Reads the token shards of prepare_data.py (common/shards.py) as fixed-length blocks through a
memory map. The model is `GPT2LMHeadModel` with SDPA attention (`sdpa_causal` in the GPU config:
is_causal and no mask tensor, see `build_trainer`), built from the sizes below or loaded
from `--model_name_or_path`. With `--loss_chunk_size N` the training loss is
computed N positions at a time, so the [tokens, vocabulary] logits are never held whole
(the GPU config uses it; evaluation and generation use the model's own forward). The
speed options (bf16, torch.compile, fused AdamW, pinned non-blocking batches from
worker processes, no per-step NaN check) are Trainer options set in the GPU config;
`benchmarks/gpt2_train_throughput.py` measures what each buys.
Validation loss and perplexity go to `<output_dir>/metrics.json`, next to the perplexity
of an add-one-smoothed character-bigram model fitted on the same train tokens and scored
on the same validation positions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import CausalLMOutput
from transformers.trainer_utils import get_last_checkpoint

from common.config import parse_args
from common.errors import UserError, cli_main
from common.plots import plot_losses
from common.shards import TokenShards, read_index
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
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "sdpa, sdpa_causal, eager or flash_attention_2. sdpa_causal: SDPA with is_causal=True and "
                  "no mask tensor, exact here (training blocks are never padded) and fast under torch.compile."},
    )
    loss_chunk_size: int = field(
        default=0,
        metadata={"help": "Compute the training loss this many token positions at a time, never holding all "
                  "[tokens, vocabulary] logits (0 = the model's own loss). Saves memory and time on GPU."},
    )


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


# ----------------------------------------------------------------- chunked loss
IGNORE_INDEX = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) / divisor, `chunk` rows at a time.

    A [tokens, vocabulary] logit matrix is large (32 x 1024 x 21128 is 1.4 GB in bf16, 2.8 GB
    more as the fp32 copy the usual loss makes) and is read and written several times. Here
    each chunk's logits exist only inside the loop: the forward pass also computes that
    chunk's gradients (softmax minus one-hot, times the chunk's hidden states / weight) and
    keeps only those, [tokens, hidden] and [vocabulary, hidden]. Rows whose target is -100
    count neither in the loss nor in the gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk: int, compute_dtype: torch.dtype):
        # Casting here rather than under autocast keeps one dtype per product; the weight
        # gradient is accumulated over chunks in fp32.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
            classes = torch.arange(weight.shape[0], device=hidden.device)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden_c[start:start + chunk]
                target = targets[start:start + chunk]
                logits = (h @ weight_c.t()).float()
                valid = target != IGNORE_INDEX
                safe_target = torch.where(valid, target, 0)
                log_norm = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, safe_target[:, None]).squeeze(1)
                loss = loss + torch.where(valid, log_norm - target_logit, 0.0).sum()
                grad_logits = torch.exp(logits - log_norm[:, None]) - (classes[None, :] == safe_target[:, None]).float()
                grad_logits = (grad_logits * (valid.float() / divisor)[:, None]).to(compute_dtype)
                grad_hidden[start:start + chunk] = (grad_logits @ weight_c).to(hidden.dtype)
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch: torch.Tensor | int | None, chunk: int) -> torch.Tensor:
    """The loss of transformers' ForCausalLMLoss (position t predicts label t + 1, the sum over
    non-ignored positions divided by `num_items_in_batch` or else by their count), computed
    by `ChunkedLinearCrossEntropy` from the final hidden states and the output embedding."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    divisor = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = hidden.dtype
    return ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, divisor,
                                           chunk, compute_dtype)


def use_chunked_loss(model, chunk: int) -> None:
    """Make the model's training forward (labels given, `model.training`) return only the
    chunked loss; evaluation and generation keep its own forward and logits. The model
    object and its saved checkpoint stay a plain `GPT2LMHeadModel`."""
    output_embeddings = model.get_output_embeddings()
    if not isinstance(output_embeddings, torch.nn.Linear) or output_embeddings.bias is not None:
        raise UserError(f"--loss_chunk_size needs an output layer without bias; {type(model).__name__} has "
                        f"{type(output_embeddings).__name__}: use --loss_chunk_size 0")
    model_forward = model.forward

    def forward(input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or not model.training:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return model_forward(input_ids=input_ids, labels=labels, **kwargs)
        kwargs["use_cache"] = False  # a training step has no use for a key/value cache
        hidden = model.base_model(input_ids=input_ids, **kwargs).last_hidden_state
        return CausalLMOutput(
            loss=chunked_causal_lm_loss(hidden, output_embeddings.weight, labels, num_items_in_batch, chunk)
        )

    model.forward = forward  # an instance attribute: nn.Module.__call__ and the Trainer find it


def parse(argv: list[str] | None = None) -> tuple[DataArguments, ModelArguments, GPT2TrainingArguments]:
    return parse_args([DataArguments, ModelArguments, GPT2TrainingArguments], argv, description=__doc__)


def build_trainer(data_args: DataArguments, model_args: ModelArguments,
                  training_args: GPT2TrainingArguments) -> Trainer:
    """Data, tokenizer, model and Trainer, exactly as `main` trains them (the throughput
    benchmark builds its Trainer here too)."""
    set_seed(training_args.seed)

    # ------------------------------------------------------------------------- data
    data_dir = Path(data_args.data_dir)
    index = read_index(data_dir)  # names prepare_data.py when there is none
    train_blocks = TokenShards(data_dir, "train", data_args.block_size)
    valid_blocks = TokenShards(data_dir, "valid", data_args.block_size)
    logger.info("blocks of %d tokens: %d train, %d valid", data_args.block_size, len(train_blocks), len(valid_blocks))

    # ------------------------------------------------------------- tokenizer and model
    tokenizer = load_tokenizer(data_dir / index["tokenizer"])
    # Training blocks are never padded, so every attention mask is the plain causal one. Under
    # torch.compile, transformers 5.17 still hands SDPA that mask as a [B, 1, T, T] tensor, and
    # SDPA then computes all T x T scores on a slower kernel (on an H100: attention 29% of the
    # step). An attention function registered without a mask function gets no mask from
    # transformers, so SDPA runs with is_causal=True. Checkpoints do not record it.
    AttentionInterface.register("sdpa_causal", sdpa_attention_forward)
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
    # GPT2LMHeadModel's name maps to no loss type; naming it spares a warning that also
    # splits the compiled graph in two.
    model.loss_type = "ForCausalLM"
    if model_args.loss_chunk_size > 0:
        use_chunked_loss(model, model_args.loss_chunk_size)
    logger.info("model: %s, %.2fM parameters", type(model).__name__, model.num_parameters() / 1e6)

    # --------------------------------------------------------------------------- trainer
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=valid_blocks,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    return trainer


@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse(argv)
    start = time.time()
    trainer = build_trainer(data_args, model_args, training_args)
    model, tokenizer = trainer.model, trainer.processing_class
    train_blocks, valid_blocks = trainer.train_dataset, trainer.eval_dataset

    # --------------------------------------------------------------------------- train
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
        train_tokens = train_blocks.tokens(data_args.bigram_max_tokens)
        valid = np.stack([valid_blocks[i]["input_ids"].numpy() for i in range(len(valid_blocks))])
        metrics["bigram_baseline"] = {
            "valid_perplexity": bigram_perplexity(train_tokens, valid, len(tokenizer)),
            "train_tokens": int(len(train_tokens)),
        }
    metrics["runtime_s"] = round(time.time() - start, 1)
    output_dir = Path(training_args.output_dir)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_losses(trainer.state.log_history, output_dir / "loss.png", "chinese_gpt2")
    line = f"valid perplexity {metrics['valid_perplexity']:.1f}"
    if "bigram_baseline" in metrics:
        line += f" | character-bigram baseline {metrics['bigram_baseline']['valid_perplexity']:.1f}"
    print(line)
    print(f"model and metrics.json in {output_dir}")
    return metrics


if __name__ == "__main__":
    main()
