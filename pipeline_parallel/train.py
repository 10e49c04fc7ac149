"""Pipeline-parallel training of a Llama-family model with torch.distributed.pipelining.

    python model_clm/prepare_data.py --dedup true                                   # token shards (once)
    torchrun --nproc_per_node 2 pipeline_parallel/train.py pipeline_parallel/configs/default.yaml
    torchrun --nproc_per_node 2 pipeline_parallel/train.py ... --schedule gpipe --microbatches 8
    torchrun --nproc_per_node 4 pipeline_parallel/train.py ... --schedule interleaved1f1b --stages_per_rank 2
    torchrun --nproc_per_node 4 pipeline_parallel/train.py pipeline_parallel/configs/llama_7b.yaml   # GPUs

The decoder layers are cut into consecutive stages, one per process (or `stages_per_rank` per
process for the interleaved schedule); the first stage also holds the embedding, the last the
final norm and the LM head. Each optimizer step splits the batch into `microbatches` that flow
through the stages: GPipe runs every forward and then every backward; 1F1B alternates them once
the pipeline is full (fewer activations alive); interleaved 1F1B gives each process several
smaller stages (a smaller bubble, more communication). Loss and gradients equal those of the
whole model on the whole batch (tests/test_pipeline_parallel.py checks it).

Model: `--model_name_or_path` a local Llama checkpoint (LlamaForCausalLM, also Baichuan2-7B
converted by model_baichuan/convert.py), or a new model from the size options (random weights).
Data: model_clm/prepare_data.py's token shards (`data_dir`, one or several sources read as one),
or `--synthetic_data true` (random tokens, for benchmarks). On CPU it runs with gloo.

Saving: at the end (and every `save_steps`: a resumable checkpoint per process, picked up by a
rerun with the same options) the stages are gathered into one Hugging Face checkpoint
(safetensors) that `from_pretrained` loads; `verify_save` reloads it and compares its logits with
the pipeline's on a held-out batch. metrics.json: losses, tokens/s, peak memory per GPU, the
schedule's bubble fraction.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, get_scheduler
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from common.config import parse_args
from common.errors import UserError, cli_main

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B}


@dataclass
class PipelineArguments:
    # model
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A local Llama checkpoint to train. Default: a new model of the size below (random weights)."})
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = field(default=0, metadata={"help": "New model: 0 = the data's tokenizer's."})
    # data
    data_dir: list[str] | None = field(default_factory=lambda: ["data/model_clm/news"], metadata={
        "help": "model_clm/prepare_data.py output folders (read as one dataset)."})
    synthetic_data: bool = field(default=False, metadata={"help": "Random tokens instead (benchmarks)."})
    block_size: int = 128
    # pipeline
    schedule: str = field(default="1f1b", metadata={"help": "gpipe, 1f1b or interleaved1f1b."})
    microbatches: int = field(default=4, metadata={"help": "Microbatches per optimizer step (divides batch_size)."})
    stages_per_rank: int = field(default=1, metadata={"help": "interleaved1f1b: stages per process (>= 2)."})
    layers_per_stage: list[int] | None = field(default=None, metadata={
        "help": "Decoder layers of each stage, in order (default: balanced, the LM head counted on the last)."})
    # optimisation
    batch_size: int = field(default=16, metadata={"help": "Sequences per optimizer step (the global batch)."})
    max_steps: int = 200
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (float32 weights and optimizer)."})
    seed: int = 42
    # output
    output_dir: str = "outputs/pipeline_parallel"
    logging_steps: int = 20
    save_steps: int = field(default=0, metadata={"help": "Resumable checkpoint every N steps (0 = none)."})
    resume: bool = field(default=True, metadata={"help": "Continue from the newest checkpoint in output_dir."})
    save_model: bool = field(default=True, metadata={"help": "Gather the stages into one checkpoint at the end."})
    verify_save: bool = field(default=True, metadata={"help": "Reload the saved model, compare its logits."})
    timing_warmup_steps: int = field(default=2, metadata={"help": "Steps left out of the tokens/s figure."})
    dump_first_step: str | None = field(default=None, metadata={"help": "Tests: write each process's loss and "
                                                                "gradients after the first step here."})


# ------------------------------------------------------------------------------ stages
def stage_costs(config: LlamaConfig) -> tuple[float, float]:
    """(one decoder layer, the final norm + LM head) in multiply-adds per token."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return float(layer), float(h * config.vocab_size)


def split_layers(num_layers: int, num_stages: int, head_cost: float = 0.0) -> list[int]:
    """Layer counts of consecutive stages minimising the largest stage's cost (a layer costs 1;
    the last stage also pays `head_cost` for the LM head)."""
    if num_stages > num_layers:
        raise UserError(f"{num_stages} stages need at least as many decoder layers, the model has {num_layers}")
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}

    def solve(start: int, stages: int) -> tuple[float, list[int]]:
        if (start, stages) in best:
            return best[start, stages]
        left = num_layers - start
        if stages == 1:
            result = (left + head_cost, [left])
        else:
            result = min(((max(n, solve(start + n, stages - 1)[0]), [n, *solve(start + n, stages - 1)[1]])
                          for n in range(1, left - stages + 2)), key=lambda r: r[0])
        best[start, stages] = result
        return result

    return solve(0, num_stages)[1]


def bubble_fraction(schedule: str, ranks: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle share of each process in the ideal schedule (equal stage times, no communication):
    (p - 1) / (v * m + p - 1) for p processes, v stages each, m microbatches."""
    v = stages_per_rank if schedule == "interleaved1f1b" else 1
    return (ranks - 1) / (v * microbatches + ranks - 1)


class LlamaStage(nn.Module):
    """Consecutive decoder layers of a Llama, with the embedding (first stage) and the final norm
    and LM head (last stage). Parameter names are the model's without the `model.` prefix, so
    `hf_names` maps them back. Attention is causal through SDPA's own flag (no mask tensor is
    built or passed between stages)."""

    def __init__(self, model: LlamaForCausalLM, first: int, last: int, is_first: bool, is_last: bool):
        super().__init__()
        self.first = first
        self.embed_tokens = model.model.embed_tokens if is_first else None
        self.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in range(first, last)})
        self.norm = model.model.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None
        self.rotary_emb = LlamaRotaryEmbedding(model.config)
        self.autocast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            rotary = self.rotary_emb(hidden, positions)
            for layer in self.layers.values():
                hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            if self.lm_head is None:
                return hidden
            return self.lm_head(self.norm(hidden))

    def hf_names(self) -> dict[str, str]:
        return {name: name if name.startswith("lm_head") else f"model.{name}" for name, _ in self.named_parameters()}


def build_model(args: PipelineArguments, vocab_size: int) -> LlamaForCausalLM:
    """The whole model: loaded on the CPU, or a new one on the meta device (each process then
    creates only its own stages' weights)."""
    if args.model_name_or_path:
        if not Path(args.model_name_or_path, "config.json").is_file():
            raise UserError(f"no model in {args.model_name_or_path}")
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32,
                                                     attn_implementation="sdpa")
        if not isinstance(model, LlamaForCausalLM):
            raise UserError(f"{args.model_name_or_path} is a {type(model).__name__}: this recipe splits Llama-family "
                            "models (LlamaForCausalLM; Baichuan2-7B after model_baichuan/convert.py)")
        return model
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
                         num_key_value_heads=args.num_key_value_heads, max_position_embeddings=max(args.block_size, 128),
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def make_stages(model: LlamaForCausalLM, args: PipelineArguments, rank: int, world: int,
                device: torch.device) -> tuple[list[LlamaStage], list[int], list[int]]:
    """This process's stages (on `device`), their indices, and every stage's layer count."""
    config = model.config
    if config.tie_word_embeddings and world * args.stages_per_rank > 1:
        raise UserError("the model ties its input and output embeddings, which would sit on different stages: "
                        "untie them first (or train it on one process)")
    num_stages = world * args.stages_per_rank
    if args.layers_per_stage:
        counts = list(args.layers_per_stage)
        if len(counts) != num_stages or sum(counts) != config.num_hidden_layers or min(counts) < 1:
            raise UserError(f"layers_per_stage {counts} must give {num_stages} stages of >= 1 layer summing to "
                            f"{config.num_hidden_layers}")
    else:
        layer, head = stage_costs(config)
        counts = split_layers(config.num_hidden_layers, num_stages, head / layer)
    bounds = [sum(counts[:i]) for i in range(num_stages + 1)]
    indices = [rank + k * world for k in range(args.stages_per_rank)]  # looped placement (interleaving)
    stages = []
    for s in indices:
        stage = LlamaStage(model, bounds[s], bounds[s + 1], s == 0, s == num_stages - 1)
        if any(p.is_meta for p in stage.parameters()):  # a new model: create and initialise only these weights
            stage.to_empty(device=device)
            torch.manual_seed(args.seed + s)
            stage.apply(model._init_weights)
            stage.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were emptied too
        stages.append(stage.to(device))
        stage.autocast = args.bf16
    return stages, indices, counts


# --------------------------------------------------------------------------------- data
class Batches:
    """Batch k of the run: `batch_size` blocks of a seeded permutation per epoch (the same on
    every process, and after a resume)."""

    def __init__(self, args: PipelineArguments, vocab_size: int):
        self.args, self.vocab_size = args, vocab_size
        if args.synthetic_data:
            self.dataset = None
            self.length = 1 << 30
        else:
            from common.shards import TokenShards

            self.dataset = torch.utils.data.ConcatDataset([TokenShards(d, "train", args.block_size)
                                                           for d in args.data_dir])
            self.valid = torch.utils.data.ConcatDataset([TokenShards(d, "valid", args.block_size)
                                                         for d in args.data_dir])
            self.length = len(self.dataset)
        if self.length < args.batch_size:
            raise UserError(f"{self.length} blocks of {args.block_size} tokens, fewer than one batch of "
                            f"{args.batch_size}")
        self.per_epoch = self.length // args.batch_size
        self.order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)

    def get(self, step: int, valid: bool = False) -> torch.Tensor:
        args = self.args
        if self.dataset is None:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step + (1 << 40 if valid else 0))
            return torch.randint(0, self.vocab_size, (args.batch_size, args.block_size), generator=g)
        if valid:
            n = min(len(self.valid), args.batch_size)
            return torch.stack([self.valid[i]["input_ids"] for i in range(n)])
        epoch, k = divmod(step, self.per_epoch)
        if self.order is None or self.order[0] != epoch:
            self.order = (epoch, torch.randperm(self.length, generator=torch.Generator().manual_seed(args.seed + epoch)))
        order = self.order[1]
        return torch.stack([self.dataset[int(i)]["input_ids"] for i in order[k * args.batch_size:(k + 1) * args.batch_size]])


def data_vocabulary(args: PipelineArguments) -> tuple[int, Path | None]:
    """The tokenizer's vocabulary size and folder (from the first source's index)."""
    if args.synthetic_data:
        return args.vocab_size or 32000, None
    from common.shards import read_index

    if not args.data_dir:
        raise UserError("give data_dir (model_clm/prepare_data.py output) or --synthetic_data true")
    index = read_index(args.data_dir[0])
    return args.vocab_size or index["vocab_size"], Path(args.data_dir[0]) / index["tokenizer"]


# ----------------------------------------------------------------------------- helpers
def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python train.py`: a pipeline of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29512"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


def clip_gradients(parameters: list[nn.Parameter], max_norm: float, device: torch.device) -> float:
    """Clip by the norm over every stage's gradients (all processes), as one model would be."""
    grads = [p.grad for p in parameters if p.grad is not None]
    local = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros((), device=device)
    dist.all_reduce(local)
    norm = local.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return float(norm)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())


def hf_state_dict(stages: list[LlamaStage]) -> dict[str, torch.Tensor]:
    state = {}
    for stage in stages:
        names = stage.hf_names()
        state.update({names[n]: p.detach().cpu() for n, p in stage.named_parameters()})
    return state


def save_hf(stages, config: LlamaConfig, out: Path, rank: int, tokenizer_dir: Path | None) -> None:
    """Gather every process's stages into one Hugging Face checkpoint (rank 0 writes it)."""
    parts = out / ".stage_parts"
    parts.mkdir(parents=True, exist_ok=True)
    torch.save(hf_state_dict(stages), parts / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        state = {}
        for path in sorted(parts.glob("rank*.pt")):
            state.update(torch.load(path, weights_only=True))
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise RuntimeError(f"stages left out {sorted(missing)[:5]}")
        model.load_state_dict(state, assign=True, strict=True)
        model.save_pretrained(out)
        if tokenizer_dir is not None:
            from common.tokenizer import load_tokenizer

            load_tokenizer(tokenizer_dir).save_pretrained(out)
        shutil.rmtree(parts)
    dist.barrier()


def save_checkpoint(out: Path, step: int, stages, indices, optimizer, scheduler, rank: int, world: int,
                    counts: list[int]) -> None:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"stages": {s: stage.state_dict() for s, stage in zip(indices, stages)},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
               path / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (path / "meta.json").write_text(json.dumps({"step": step, "world": world, "layers_per_stage": counts}))
        for old in out.glob("checkpoint-*"):
            if old != path:
                shutil.rmtree(old)
    dist.barrier()


def find_checkpoint(out: Path, world: int, counts: list[int]) -> Path | None:
    done = [p for p in out.glob("checkpoint-*") if (p / "meta.json").is_file()]
    if not done:
        return None
    latest = max(done, key=lambda p: int(p.name.split("-")[1]))
    meta = json.loads((latest / "meta.json").read_text())
    if meta["world"] != world or meta["layers_per_stage"] != counts:
        raise UserError(f"{latest} was written by {meta['world']} processes with stages {meta['layers_per_stage']}; "
                        f"this run has {world} with {counts}: use the same launch, or --resume false")
    return latest


# ---------------------------------------------------------------------------------- main
@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PipelineArguments], argv, description=__doc__)
    if args.schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {list(SCHEDULES)}, got {args.schedule}")
    if args.schedule != "interleaved1f1b" and args.stages_per_rank != 1:
        raise UserError(f"stages_per_rank > 1 needs --schedule interleaved1f1b (got {args.schedule})")
    if args.schedule == "interleaved1f1b" and args.stages_per_rank < 2:
        raise UserError("interleaved1f1b needs --stages_per_rank 2 or more")
    if args.batch_size % args.microbatches:
        raise UserError(f"batch_size {args.batch_size} is not a multiple of microbatches {args.microbatches}")
    vocab_size, tokenizer_dir = data_vocabulary(args)
    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    start = time.time()

    model = build_model(args, vocab_size)
    config = model.config
    if not args.synthetic_data and vocab_size > config.vocab_size:
        raise UserError(f"the data's tokenizer has {vocab_size} tokens, the model's embedding {config.vocab_size}: "
                        "prepare the shards with the model's own tokenizer (model_clm/prepare_data.py --tokenizer)")
    stages, indices, counts = make_stages(model, args, rank, world, device)
    del model
    num_stages = world * args.stages_per_rank
    pipeline = [PipelineStage(stage, s, num_stages, device) for stage, s in zip(stages, indices)]
    schedule_class = SCHEDULES[args.schedule]
    schedule = schedule_class(pipeline if args.schedule == "interleaved1f1b" else pipeline[0], args.microbatches,
                              loss_fn=loss_fn)
    has_first, has_last = 0 in indices, num_stages - 1 in indices
    last_rank = (num_stages - 1) % world

    parameters = [p for stage in stages for p in stage.parameters()]
    decay = [p for p in parameters if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(0.9, 0.95), fused=device.type == "cuda")
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.warmup_steps, args.max_steps)
    batches = Batches(args, config.vocab_size)

    step = 0
    checkpoint = find_checkpoint(out, world, counts) if args.resume else None
    if checkpoint is not None:
        state = torch.load(checkpoint / f"rank{rank}.pt", map_location=device, weights_only=False)
        for s, stage in zip(indices, stages):
            stage.load_state_dict(state["stages"][s])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if rank == 0:
            print(f"resumed from {checkpoint} at step {step}", flush=True)
    if rank == 0:
        print(f"{world} processes x {args.stages_per_rank} stage(s), layers per stage {counts}, schedule {args.schedule}, {args.microbatches} microbatches of "
              f"{args.batch_size // args.microbatches}, device {device.type}", flush=True)

    history, timed_from, timed_steps, first_step = [], None, 0, step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < args.max_steps:
        if step - first_step == args.timing_warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            timed_from, timed_steps = time.perf_counter(), 0
        batch = batches.get(step).to(device)
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        schedule.step(*([inputs] if has_first else []), target=targets if has_last else None, losses=losses)
        loss = torch.stack(losses).detach().float().mean() if has_last else torch.zeros((), device=device)
        dist.broadcast(loss, src=last_rank)
        if args.dump_first_step and step == 0:
            Path(args.dump_first_step).mkdir(parents=True, exist_ok=True)
            names = {k: v for stage in stages for k, v in stage.hf_names().items()}
            grads = {names[n]: p.grad.detach().cpu() for stage in stages for n, p in stage.named_parameters()}
            torch.save({"loss": float(loss), "grads": grads, "batch": batch.cpu()},
                       Path(args.dump_first_step) / f"rank{rank}.pt")
        grad_norm = clip_gradients(parameters, args.max_grad_norm, device)
        optimizer.step()
        scheduler.step()
        step += 1
        timed_steps += 1
        if step % args.logging_steps == 0 or step == args.max_steps:
            history.append({"step": step, "loss": round(float(loss), 4), "grad_norm": round(grad_norm, 4),
                            "lr": scheduler.get_last_lr()[0]})
            if rank == 0:
                print(json.dumps(history[-1]), flush=True)
        if args.save_steps and step % args.save_steps == 0 and step < args.max_steps:
            save_checkpoint(out, step, stages, indices, optimizer, scheduler, rank, world, counts)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    seconds = time.perf_counter() - timed_from if timed_from is not None else None

    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if args.save_model:
        save_hf(stages, config, out, rank, tokenizer_dir)

    verify = valid_loss = None
    if args.save_model and args.verify_save:  # the saved checkpoint's logits against the pipeline's own, float32, no autocast
        for stage in stages:
            stage.autocast = False
            stage.eval()
        batch = batches.get(0, valid=True).to(device)  # the same held-out batch on every process
        batch = batch[:len(batch) - len(batch) % args.microbatches]
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        losses = []
        with torch.no_grad():
            logits = schedule.eval(*([inputs] if has_first else []), target=targets if has_last else None,
                                   losses=losses)
        result = torch.zeros(2, device=device)
        if has_last:
            reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
            with torch.no_grad():
                expected = reloaded(inputs).logits
            result[0] = (logits.float() - expected).abs().max()
            result[1] = torch.stack(losses).float().mean()
        dist.broadcast(result, src=last_rank)
        verify, valid_loss = float(result[0]), float(result[1])

    metrics = {
        "processes": world, "schedule": args.schedule, "stages_per_rank": args.stages_per_rank,
        "layers_per_stage": counts, "microbatches": args.microbatches, "batch_size": args.batch_size,
        "block_size": args.block_size, "steps": step, "history": history,
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
        "tokens_per_s": round(timed_steps * args.batch_size * args.block_size / seconds, 1)
        if seconds and timed_steps else None,
        "step_s": round(seconds / timed_steps, 4) if seconds and timed_steps else None,
        "peak_memory_gib": [round(p, 2) if p is not None else None for p in peaks],
        "bubble_fraction_ideal": round(bubble_fraction(args.schedule, world, args.microbatches, args.stages_per_rank), 4),
        "saved_logits_max_diff": verify, "valid_loss_one_batch": valid_loss, "runtime_s": round(time.time() - start, 1), "options": asdict(args),
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"saved {out} (from_pretrained loads it); metrics.json: tokens/s {metrics['tokens_per_s']}, "
              f"peak GiB per process {metrics['peak_memory_gib']}, saved-vs-pipeline logits max diff {verify}")
    dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
