"""(Continued) pretraining of any causal LM on token shards, one source or several mixed.

    python model_clm/prepare_data.py
    python model_clm/train.py model_clm/configs/default.yaml                       # tiny Llama, CPU minutes
    python model_clm/train.py model_clm/configs/default.yaml --resume_from_checkpoint last
    python model_clm/train.py ... --model_name_or_path /models/Qwen2.5-0.5B        # continue a local checkpoint
    torchrun --nproc_per_node 4 model_clm/train.py model_clm/configs/llama_1b_gpu.yaml --gradient_accumulation_steps 4 \
        --deepspeed model_clm/configs/ds_zero2.json
    accelerate launch --config_file model_clm/configs/fsdp.yaml model_clm/train.py model_clm/configs/llama_1b_gpu.yaml

Model: `--model_name_or_path` (any local `AutoModelForCausalLM` checkpoint: Llama, Qwen,
BLOOM, Falcon, GPT-NeoX, GLM, GPT-2), or one built from `--model_type` and the sizes below
with random weights. Data: the shards of prepare_data.py, read as blocks of `block_size`
tokens through memory maps. One `data_dir`: epochs over its blocks in a seeded random
order. Several: each training sample is drawn from a source with weights that move
linearly from `mix_weights` at step 0 to `mix_weights_end` at the last step (see
`common.shards.MixedTokens`: the draw depends only on the seed and the sample's position,
so loader workers, several GPUs and resuming all see the same data); the proportions
realised since the last log line are logged as `mix_<source>`.

Everything else is a Trainer option in the YAML or on the command line: bf16, tf32,
gradient_checkpointing, torch_compile, use_liger_kernel (when liger-kernel is installed),
`--deepspeed ds.json`, FSDP through accelerate. Evaluation: loss and perplexity on each
source's held-out shards before and after training, in `<output_dir>/metrics.json`.
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
from transformers import (
    CONFIG_MAPPING,
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.trainer_utils import get_last_checkpoint

from common.config import parse_args
from common.errors import UserError, cli_main
from common.parameters import parameter_count
from common.plots import plot_losses
from common.shards import MixedTokens, TokenShards, read_index
from common.tokenizer import load_tokenizer

logger = logging.getLogger("train")


# ----------------------------------------------------------------------------- arguments
@dataclass
class DataArguments:
    data_dir: list[str] = field(
        default_factory=lambda: ["data/model_clm/news"],
        metadata={"help": "Output folders of prepare_data.py: one source, or several to mix (same tokenizer)."},
    )
    mix_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each source at step 0 (default: equal)."},
    )
    mix_weights_end: list[float] | None = field(
        default=None, metadata={"help": "Weight of each source at the last step (default: mix_weights throughout)."},
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence (the context length)."})
    max_eval_blocks: int = field(default=0, metadata={"help": "Evaluate on at most this many blocks per source "
                                                      "(0 = all)."})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local causal-LM checkpoint to continue. Unset: a new model of model_type."},
    )
    model_type: str = field(default="llama", metadata={"help": "Architecture of a new model (llama, qwen2, "
                                                       "mistral, gpt_neox, bloom, falcon, gpt2, glm, ...)."})
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Grouped-query attention (None = "
                                                                    "num_attention_heads)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width (None: the config's rule)."})
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "sdpa, sdpa_causal, flash_attention_2 (when installed) or eager. sdpa_causal: SDPA with "
                  "is_causal=True and no mask tensor, exact here (blocks are never padded) and faster under "
                  "torch.compile."},
    )


@dataclass
class CLMTrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/model_clm", metadata={"help": "Where model and metrics go."})
    eval_strategy: str = "steps"
    eval_steps: float = 200
    save_strategy: str = "steps"
    save_steps: float = 200
    save_total_limit: int = 2
    lr_scheduler_type: str = "cosine"
    report_to: str = "none"
    logging_steps: int = 20


# -------------------------------------------------------------------------------- data
def load_sources(data_args: DataArguments, training_args: CLMTrainingArguments):
    """The training dataset (one source's blocks, or a MixedTokens over all), a held-out
    dataset per source, the source names and the sources' (shared) tokenizer folder."""
    indexes = [read_index(d) for d in data_args.data_dir]
    if len({(i["vocab_size"], i.get("vocab_sha256"), i["eos_token_id"]) for i in indexes}) > 1:
        raise UserError("the data_dir sources were prepared with different tokenizers; prepare every source with "
                        "the same --tokenizer")
    names = [Path(d).name for d in data_args.data_dir]
    if len(set(names)) < len(names):
        raise UserError(f"give sources folders with distinct names, got {names}")
    train = [TokenShards(d, "train", data_args.block_size) for d in data_args.data_dir]
    valid = {}
    for name, d in zip(names, data_args.data_dir):
        blocks = TokenShards(d, "valid", data_args.block_size)
        if data_args.max_eval_blocks:
            blocks = torch.utils.data.Subset(blocks, range(min(len(blocks), data_args.max_eval_blocks)))
        valid[name] = blocks
    tokenizer_dir = Path(data_args.data_dir[0]) / indexes[0]["tokenizer"]
    if len(train) == 1 and data_args.mix_weights_end is None:
        return train[0], valid, names, tokenizer_dir
    global_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                    * training_args.world_size)
    mixed = MixedTokens(train, names, data_args.mix_weights or [1.0] * len(train), data_args.mix_weights_end,
                        training_args.max_steps, global_batch, training_args.seed)
    return mixed, valid, names, tokenizer_dir


class CLMTrainer(Trainer):
    """A mixed dataset is read in order (it is its own random draw) and its realised
    proportions are logged with the loss."""

    def _get_train_sampler(self, *args, **kwargs):
        if isinstance(self.train_dataset, MixedTokens):
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if isinstance(self.train_dataset, MixedTokens) and "loss" in logs:
            # since the previous loss line (log_history survives a resume)
            since = next((h["step"] for h in reversed(self.state.log_history) if "loss" in h), 0)
            for name, share in self.train_dataset.proportions(since, self.state.global_step).items():
                logs[f"mix_{name}"] = round(share, 4)
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------- tokenizer and model
def build_model(model_args: ModelArguments, tokenizer, block_size: int):
    # Training blocks are never padded: an attention function registered without a mask
    # function gets no mask from transformers, so SDPA runs with is_causal=True (under
    # torch.compile transformers otherwise passes a [B, 1, T, T] mask and a slower kernel).
    AttentionInterface.register("sdpa_causal", sdpa_attention_forward)
    if model_args.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError("attn_implementation flash_attention_2 needs the flash-attn package; use sdpa")
    if model_args.model_name_or_path:
        model = with_attention_fallback(
            lambda attn: AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, attn_implementation=attn,
                                                              trust_remote_code=False, dtype=torch.float32),
            model_args.attn_implementation)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    sizes = {"hidden_size": model_args.hidden_size, "num_hidden_layers": model_args.num_hidden_layers,
             "num_attention_heads": model_args.num_attention_heads,
             "num_key_value_heads": model_args.num_key_value_heads or model_args.num_attention_heads,
             "max_position_embeddings": block_size, "rope_theta": model_args.rope_theta,
             "tie_word_embeddings": model_args.tie_word_embeddings}
    config_class = CONFIG_MAPPING[model_args.model_type] if model_args.model_type in CONFIG_MAPPING else None
    if config_class is not None and not isinstance(getattr(config_class, "head_dim", None), property):
        # some configs (GLM: 128) fix head_dim instead of deriving it from the sizes
        sizes["head_dim"] = model_args.hidden_size // model_args.num_attention_heads
    sizes.update(family_sizes(model_args))
    try:
        config = AutoConfig.for_model(
            model_args.model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes,
        )
    except ValueError as err:
        raise UserError(f"--model_type {model_args.model_type}: {err}") from None
    return with_attention_fallback(lambda attn: AutoModelForCausalLM.from_config(config, attn_implementation=attn),
                                   model_args.attn_implementation)


def family_sizes(model_args: ModelArguments) -> dict:
    """The MLP width and key/value heads of a new model under its family's own config names.
    transformers' configs keep names they do not know without a word, so a size that a family
    spells differently, or cannot take, would be dropped silently: GPT-2 calls the MLP width
    n_inner and Falcon ffn_hidden_size; Falcon has one key/value head (multi_query) or one per
    head; BLOOM's MLP is always 4 x hidden_size; GPT-2, GPT-NeoX and BLOOM have no grouped-query
    attention."""
    family, heads = model_args.model_type, model_args.num_attention_heads
    kv_heads = model_args.num_key_value_heads or heads
    sizes = {}
    if family in ("gpt2", "gpt_neox", "bloom") and kv_heads != heads:
        raise UserError(f"--model_type {family} has no grouped-query attention: leave --num_key_value_heads unset")
    if family == "falcon":
        if kv_heads not in (1, heads):
            raise UserError("--model_type falcon takes --num_key_value_heads 1 (multi-query attention) or unset "
                            "(one per head)")
        sizes["multi_query"] = kv_heads == 1
    width = model_args.intermediate_size
    if width:
        if family == "bloom" and width != 4 * model_args.hidden_size:
            raise UserError(f"--model_type bloom's MLP is 4 x hidden_size ({4 * model_args.hidden_size}): "
                            "leave --intermediate_size unset")
        sizes[{"gpt2": "n_inner", "falcon": "ffn_hidden_size"}.get(family, "intermediate_size")] = width
    return sizes


def with_attention_fallback(make_model, attn_implementation: str):
    """Build with the asked attention; a class without SDPA support (BLOOM, say) gets eager."""
    try:
        return make_model(attn_implementation)
    except ValueError as err:
        if not attn_implementation.startswith("sdpa") or "does not support" not in str(err):
            raise
        logger.warning("%s: using eager attention", str(err).split(".")[0])
        return make_model("eager")


def parse(argv: list[str] | None = None) -> tuple[DataArguments, ModelArguments, CLMTrainingArguments]:
    return parse_args([DataArguments, ModelArguments, CLMTrainingArguments], argv, description=__doc__)


def build_trainer(data_args: DataArguments, model_args: ModelArguments,
                  training_args: CLMTrainingArguments) -> CLMTrainer:
    """Data, tokenizer, model and Trainer, as `main` trains them (benchmarks build theirs here)."""
    set_seed(training_args.seed)
    if training_args.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("use_liger_kernel needs the liger-kernel package (pip install liger-kernel)")
    train, valid, names, tokenizer_dir = load_sources(data_args, training_args)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(model_args, tokenizer, data_args.block_size)
    logger.info("model: %s, %.2fM parameters; train: %s of %d blocks of %d tokens", type(model).__name__,
                parameter_count(model) / 1e6, type(train).__name__, len(train), data_args.block_size)
    return CLMTrainer(model=model, args=training_args, train_dataset=train,
                      eval_dataset=valid if len(valid) > 1 else valid[names[0]],
                      processing_class=tokenizer, data_collator=default_data_collator)


def perplexities(metrics: dict, names: list[str]) -> dict:
    """{source: {"loss", "perplexity"}} from the Trainer's eval metrics (one or several sets)."""
    keys = {name: f"eval_{name}_loss" for name in names} if len(names) > 1 else {names[0]: "eval_loss"}
    return {name: {"loss": metrics[key], "perplexity": math.exp(min(metrics[key], 50))} for name, key in keys.items()}


# ------------------------------------------------------------------------------- main
@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse(argv)
    start = time.time()
    trainer = build_trainer(data_args, model_args, training_args)
    names = [Path(d).name for d in data_args.data_dir]

    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            logger.info("no checkpoint in %s: starting from scratch", training_args.output_dir)
    # Evaluating inside train() (eval_on_start) rather than before it: DeepSpeed ZeRO-1/2 can
    # only evaluate through the engine that train() builds.
    trainer.args.eval_on_start = not resume
    result = trainer.train(resume_from_checkpoint=resume)
    start_logs = {k: v for h in trainer.state.log_history if h.get("step") == 0 for k, v in h.items()}
    before = perplexities(start_logs, names) if not resume else None
    after = perplexities(trainer.evaluate(), names)
    trainer.save_model(training_args.output_dir)
    if not trainer.is_world_process_zero():
        return {}

    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    metrics = {
        "valid": {name: {"before": before[name] if before else None, "after": after[name]} for name in names},
        "train": {"first_logged_loss": logged[0] if logged else None, "last_logged_loss": logged[-1] if logged else None,
                  "steps": steps, "runtime_s": round(result.metrics["train_runtime"], 1),
                  "tokens_per_s": round(steps * trainer.args.per_device_train_batch_size
                                        * trainer.args.gradient_accumulation_steps * trainer.args.world_size
                                        * data_args.block_size / result.metrics["train_runtime"], 1)},
        "parameters": parameter_count(trainer.model),
        "model_type": trainer.model.config.model_type,
        "distributed": {"world_size": trainer.args.world_size, "engine": type(trainer.model_wrapped).__name__,
                        "zero_stage": trainer.model_wrapped.zero_optimization_stage()
                        if trainer.is_deepspeed_enabled else None},
        "block_size": data_args.block_size,
    }
    if isinstance(trainer.train_dataset, MixedTokens):
        mixed, tenth = trainer.train_dataset, max(steps // 10, 1)
        windows = {"first_10pct": (0, tenth), "last_10pct": (steps - tenth, steps), "all": (0, steps)}
        metrics["mix"] = {window: {"planned": mixed.planned(a, b), "realised": mixed.proportions(a, b)}
                          for window, (a, b) in windows.items()}
    metrics["runtime_s"] = round(time.time() - start, 1)
    out = Path(training_args.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    plot_losses(trainer.state.log_history, out / "loss.png", "model_clm")
    for name in names:
        was = f"{before[name]['perplexity']:.1f} -> " if before else ""
        print(f"{name}: valid perplexity {was}{after[name]['perplexity']:.1f}")
    for window, shares in metrics.get("mix", {}).items():
        print(f"mix over {window.replace('_10pct', ' 10%')} of steps, planned / realised: " + ", ".join(
            f"{name} {shares['planned'][name]:.2f} / {shares['realised'][name]:.2f}" for name in names))
    print(f"model and metrics.json in {out}")
    return metrics


if __name__ == "__main__":
    main()
