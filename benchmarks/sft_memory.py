"""What fits where: peak GPU memory and real tokens/s of LoRA, QLoRA and full fine-tuning of a
7B and a 9B shape at 1024 / 2048 / 4096 tokens, with and without gradient checkpointing, each
run under per-process memory caps of 16, 24 and 48 GiB (and the whole GPU), so that "fits on a
24 GB card" is a run that did not run out of memory, not an estimate.

    python benchmarks/sft_memory.py                                   # one H200: both shapes, all methods
    python benchmarks/sft_memory.py --shapes glm4-9b --methods lora,qlora --seqs 2048
    python benchmarks/sft_memory.py --tiny                            # CPU smoke test: tiny shapes, no caps

Shapes (benchmarks/shapes.py), random bf16 weights saved once under --workdir and then loaded
the recipes' way:
  llama2-7b  LlamaForCausalLM, 32 x 4096, MLP 11008, vocabulary 32,000 (6.74B parameters)
  glm4-9b    GlmForCausalLM, 40 x 4096, 2 key/value heads, MLP 13696, vocabulary 151,552 (9.4B)

Methods, each through common/sft_train.py's `load_model` / `add_adapter` (what chatglm_lora and
model_baichuan's train.py run) and the recipes' ReplyLossTrainer: packed rows of exactly
`seq` tokens (4 conversations each, positions restarting), batch 1, bf16, SDPA, Liger's fused
RMSNorm / SwiGLU / linear + cross-entropy on the GPU (`use_liger_kernel`, as the GPU configs):
  lora       LoRA r=16 on every linear layer of the family over the bf16 base, AdamW
  qlora      the same over an NF4 base (double quantisation, bf16 compute)
  full       every weight: fp32 master weights under bf16 autocast, AdamW (the recipes' default)
  full_8bit  the same with bitsandbytes' 8-bit AdamW states (`--optim adamw_bnb_8bit`)
  full_bf16  the old way, for the cost of fp32 masters: bf16 weights and AdamW states (an update
             below 1/256 of a weight is lost); not something the recipes do any more
Not measured: paged optimizers (their states live in CUDA unified memory outside PyTorch's
allocator, so a per-process cap neither limits nor counts them: the cap cannot tell whether
they fit) and ZeRO offload (DeepSpeed is not on the GPU image).

Caps: `torch.cuda.set_per_process_memory_fraction` limits what PyTorch's allocator reserves
(weights included). A real card also holds the CUDA context (about 0.5 GiB) and the display or
other processes: leave that headroom. For each setting the caps are tried from the smallest
one that could fit upwards (a setting needs at least what one with shorter sequences, or the
same with checkpointing, needed; weights alone above a cap rule it out without a run); the
first cap it runs under is its fit, larger caps fit by the same monotonicity (marked
"inferred"). Every run has a process of its own (a child replays the earlier children's
attempts, makes one new one and exits): a second run in one process was 2.5-3x slower with fp32
master weights (see `attempt`). A run: --warmup_steps steps, then --measure_steps timed between
`torch.cuda.synchronize()` calls; peak = `max_memory_reserved()` over the run (allocated too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from children import print_row, run_child  # benchmarks/ is on sys.path when a benchmark runs
from shapes import GLM4_9B, LLAMA2_7B

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1000, max_position_embeddings=1024)
TINY_GLM = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, attention_bias=True,
                max_position_embeddings=1024)
SHAPES = {"llama2-7b": ("LlamaConfig", LLAMA2_7B, TINY_LLAMA), "glm4-9b": ("GlmConfig", GLM4_9B, TINY_GLM)}
METHODS = {  # name -> (finetuning_type of the recipes, optimizer, weights as loaded)
    "lora": ("lora", "adamw_torch", "recipe"),
    "qlora": ("qlora", "adamw_torch", "recipe"),
    "full": ("full", "adamw_torch", "recipe"),
    "full_8bit": ("full", "adamw_bnb_8bit", "recipe"),
    "full_bf16": ("full", "adamw_torch", "bf16"),
}
NEEDS_BNB = {"qlora", "full_8bit"}


# ------------------------------------------------------------------------ the cap search
def sweep(settings: list[tuple[int, bool]], n_caps: int, fits) -> tuple[dict, list]:
    """The smallest cap index each (seq, checkpointing) setting fits under: n_caps if none, None
    if not run (the time limit came first: then no later setting runs either).

    `fits(setting, cap_index) -> bool | None` runs one attempt (None: not run). A setting starts
    at the largest index any setting it dominates needed: shorter sequences with the same
    checkpointing, or the same length with checkpointing when it has none (both need no more
    memory). Settings are visited shortest first, checkpointing first, so those bounds are
    known when needed."""
    needed: dict[tuple[int, bool], int | None] = {}
    attempts = []
    for seq, checkpointing in sorted(settings, key=lambda s: (not s[1], s[0])):
        if None in needed.values():
            needed[seq, checkpointing] = None
            continue
        lower = max([i for (s, c), i in needed.items()
                     if (c == checkpointing and s < seq) or (s == seq and c and not checkpointing)], default=0)
        needed[seq, checkpointing] = n_caps
        for index in range(lower, n_caps):
            attempts.append((seq, checkpointing, index))
            result = fits((seq, checkpointing), index)
            if result is None or result:
                needed[seq, checkpointing] = None if result is None else index
                break
    return needed, attempts


RESTART = 75  # a child's exit code: it made its one attempt, a fresh process goes on


class FreshProcessNeeded(Exception):
    pass


def attempt(known: dict, key: str, run, report=None) -> dict:
    """One attempt of the cap search: an earlier child's outcome when `known` has it, else
    `run()` -> {"ok": bool, "record": str, "measured": {...}}, reported to the parent (an
    "ATTEMPT" line), and this process ends (FreshProcessNeeded): each run has a process of its own.

    Measured on an H200 (2026-12-02, llama2-7b, fp32 master weights): the first run in a process
    gave 2,489 tokens/s at 1024 tokens with checkpointing, every later one in the same process
    (a new Trainer on the same model) 771-1,016 at any length, 2.5-3x slower, whether or not a run
    had gone out of memory before it (2,944 fresh against 973 after one); runs with bf16 weights
    showed no such drop. The cause was not found; a fresh process per run rules it out."""
    if key in known:
        return known[key]
    result = run()
    (report or (lambda k, r: print("ATTEMPT " + json.dumps({"key": k} | r), flush=True)))(key, result)
    raise FreshProcessNeeded(key)


def until_done(run_once) -> tuple[list[dict], str]:
    """A method's children, one after another until one finishes: `run_once(known)` -> (rows,
    error, its new attempts, whether it stopped for a fresh process)."""
    known: dict = {}
    while True:
        rows, error, new, restart = run_once(known)
        if restart and not new:  # cannot happen unless a child broke its contract: never loop forever
            return [], "a child asked for a fresh process without reporting an attempt"
        known |= new
        if not restart:
            return rows, error


# ------------------------------------------------------------------------------ children
def base_dir(opts, shape: str) -> Path:
    return Path(opts.workdir) / (f"{shape}-tiny" if opts.tiny else shape)


def make_base(opts, shape: str) -> dict:
    """Random bf16 weights in the shape, built on the GPU (no fp32 copy on the CPU), saved."""
    import torch
    import transformers

    out = base_dir(opts, shape)
    if (out / "config.json").is_file():
        return {"base": str(out), "reused": True}
    config_class, full_shape, tiny_shape = SHAPES[shape]
    config = getattr(transformers, config_class)(**(tiny_shape if opts.tiny else full_shape), bos_token_id=1,
                                                 eos_token_id=2, pad_token_id=0)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return {"base": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - start, 1)}


def packed_rows(seq: int, rows: int, vocab_size: int):
    """`rows` packed rows of exactly `seq` tokens: 4 conversations each, loss on the last 60%."""
    import numpy as np
    from datasets import Dataset

    from common.sft import pack

    n = seq // 4
    ids = np.random.default_rng(seq).integers(3, vocab_size, size=(4 * rows, n)).tolist()
    prompt = int(0.4 * n)
    examples = Dataset.from_dict({"input_ids": ids, "labels": [[-100] * prompt + row[prompt:] for row in ids]})
    return pack(examples, seq)


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_method(opts, shape: str, method: str, known: dict) -> list[dict]:
    """One child: the model loaded once, then every (seq, checkpointing) setting under the caps;
    the attempts in `known` (made by earlier children) are replayed, not run."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from common.sft import PackedCollator, ReplyLossTrainer, register_liger_glm
    from common.sft_train import (
        SFTModelArguments,
        SFTTrainingArguments,
        add_adapter,
        count_parameters,
        load_model,
        weights_dtype,
    )

    cuda = torch.cuda.is_available()
    finetuning, optim, weights = METHODS[method]
    liger = cuda and not opts.no_liger and register_liger_glm()  # Liger covers Llama; GLM-4-9B registered
    path = base_dir(opts, shape)
    workdir = tempfile.TemporaryDirectory(prefix=f"sft_memory_{method}_")

    def training_args(seq: int, checkpointing: bool) -> SFTTrainingArguments:
        return SFTTrainingArguments(
            output_dir=workdir.name, max_steps=opts.warmup_steps + opts.measure_steps, per_device_train_batch_size=1,
            gradient_checkpointing=checkpointing, bf16=cuda, use_cpu=not cuda, optim=optim, learning_rate=1e-5,
            lr_scheduler_type="constant", eval_strategy="no", save_strategy="no", logging_steps=10**6,
            disable_tqdm=True, report_to="none", use_liger_kernel=liger, seed=0)

    start = time.perf_counter()
    model_args = SFTModelArguments(model_name_or_path=str(path), finetuning_type=finetuning)
    load_args = training_args(opts.seqs[0], True)
    if weights == "bf16":  # what load_model did before fp32 master weights
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
        model.config.use_cache = False
    else:
        model = load_model(model_args, load_args, 0)
    if finetuning != "qlora":
        model.to(load_args.device)
    if finetuning != "full":
        model = add_adapter(model, model_args, load_args, [])
    parameters = count_parameters(model)
    vocab_size = model.config.vocab_size
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    weights_bytes = torch.cuda.memory_allocated() if cuda else 0
    caps = [c * 2**30 for c in opts.caps if c * 2**30 < total] + [total] if cuda else [None]
    common = {"shape": shape, "method": method, "finetuning_type": finetuning, "optimizer": optim,
              "weights_dtype": str(torch.bfloat16 if weights == "bf16" else weights_dtype(finetuning, load_args)),
              "liger": liger, "parameters": parameters, "load_s": round(time.perf_counter() - start, 1),
              "weights_gib": round(weights_bytes / 2**30, 2) if cuda else None}
    measured: dict[tuple[int, bool], dict] = {}
    outcomes: dict[tuple[int, bool], dict] = {}

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = {}

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks[state.global_step] = time.perf_counter()

    def fits(setting: tuple[int, bool], index: int) -> bool | None:
        cap = caps[index]
        label = cap_label(cap, total)
        record = outcomes.setdefault(setting, {})
        if cap is not None and weights_bytes >= cap:
            record[label] = "no: the weights alone"
            return False
        key = f"{setting[0]}:{int(setting[1])}:{index}"
        if key not in known and time.time() > opts.deadline:
            return None
        result = attempt(known, key, lambda: train_under(setting, cap))
        record[label] = result["record"]
        if result["ok"]:
            measured[setting] = result["measured"]
        return result["ok"]

    def train_under(setting: tuple[int, bool], cap) -> dict:
        seq, checkpointing = setting  # the process's only run: the model as loaded, the allocator unused
        if cuda:
            torch.cuda.set_per_process_memory_fraction(cap / total)
            torch.cuda.reset_peak_memory_stats()
        clock = Clock()
        trainer = ReplyLossTrainer(model=model, args=training_args(seq, checkpointing),
                                   train_dataset=packed_rows(seq, opts.warmup_steps + opts.measure_steps, vocab_size),
                                   data_collator=PackedCollator(), callbacks=[clock])
        try:
            trainer.train()
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            return {"ok": False, "record": f"no: out of memory after {len(clock.marks)} steps"}
        steps = sorted(clock.marks)
        seconds = clock.marks[steps[-1]] - clock.marks[opts.warmup_steps]
        return {"ok": True, "record": "yes", "measured": {
            "cap": cap_label(cap, total), "step_s": round(seconds / opts.measure_steps, 3),
            "real_tokens_per_s": round(seq * opts.measure_steps / seconds, 1),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}}

    settings = [(seq, checkpointing) for seq in opts.seqs for checkpointing in opts.checkpointing]
    needed, attempts = sweep(settings, len(caps), fits)
    rows = []
    for setting in settings:
        record = outcomes.get(setting, {})
        for index, cap in enumerate(caps):  # what the search did not run, it inferred
            record.setdefault(cap_label(cap, total), "not run (time limit)" if needed[setting] is None else
                              "yes (inferred)" if index > needed[setting] else "no (inferred)")
        fit = needed[setting] is not None and needed[setting] < len(caps)
        rows.append(common | {"seq": setting[0], "gradient_checkpointing": setting[1],
                              "fits_under": cap_label(caps[needed[setting]], total) if fit else
                              "not run (time limit)" if needed[setting] is None else None,
                              "by_cap": {label: record[label] for label in map(lambda c: cap_label(c, total), caps)},
                              "attempts": sum(1 for a in attempts if a[:2] == setting)}
                    | measured.get(setting, {}))
    return rows


def cap_label(cap, total: int) -> str:
    if cap is None:
        return "cpu (no cap)"
    return f"{cap / 2**30:.0f} GiB" + (" (whole GPU)" if cap == total else "")


# --------------------------------------------------------------------------------- parent
def markdown(rows: list[dict]) -> str:
    """One table per shape: a row per method and length, checkpointing on | off side by side."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        lines += [f"\n{shape}\n", "| method | tokens | checkpointing | smallest cap it ran under | peak reserved GiB "
                  "| real tokens/s |", "| --- | ---: | --- | --- | ---: | ---: |"]
        for r in (r for r in rows if r["shape"] == shape):
            if "seq" not in r:
                lines.append(f"| {r['method']} | | | {r.get('skipped') or r.get('error')} | | |")
                continue
            lines.append(f"| {r['method']} | {r['seq']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                         f"{r['fits_under'] or 'none'} | {r.get('peak_reserved_gib', '')} | "
                         f"{r.get('real_tokens_per_s', '')} |")
    return "\n".join(lines)


def child_rows(opts, child: str, known: dict | None = None) -> tuple[list[dict], str, dict, bool]:
    """One child process: (its rows, its error, its new attempts, whether it stopped for a fresh one)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as known_file:
        json.dump(known or {}, known_file)
        known_file.flush()
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", child, "--deadline", str(opts.deadline),
                "--known", known_file.name]
        result, rows, error = run_child(argv, log=opts.log, label=child)
    lines = result.stdout.splitlines()
    new = {a.pop("key"): a for a in (json.loads(line[8:]) for line in lines if line.startswith("ATTEMPT "))}
    if result.returncode == RESTART:
        return [], "", new, True
    return ([], error, new, False) if error else (rows, "", new, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"Comma-separated, from {list(SHAPES)}.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, from {list(METHODS)}.")
    parser.add_argument("--seqs", help="Packed row lengths in tokens (default 1024,2048,4096; --tiny: 64,128).")
    parser.add_argument("--checkpointing", default="on,off", help="Gradient checkpointing: on, off or on,off.")
    parser.add_argument("--caps", default="16,24,48", help="Memory caps in GiB (the whole GPU is always last).")
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--measure_steps", type=int, default=3)
    parser.add_argument("--no_liger", action="store_true", help="Plain transformers kernels on the GPU too.")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sft_memory"),
                        help="Where the random base models are saved (reused when there).")
    parser.add_argument("--time_limit", type=float, default=0, help="Start no run after this many seconds (0: none).")
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes, 64 / 128 tokens, CPU.")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "sft_memory.json")
    parser.add_argument("--log", type=Path, help="Append every child's stdout and stderr here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    parser.add_argument("--known", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    opts.seqs = opts.seqs or ("64,128" if opts.tiny else "1024,2048,4096")
    if opts.tiny:
        opts.warmup_steps, opts.measure_steps = 1, 2
    opts.seqs = [int(s) for s in opts.seqs.split(",")]
    opts.caps = [float(c) for c in opts.caps.split(",") if c]
    opts.checkpointing = [{"on": True, "off": False}[c] for c in opts.checkpointing.split(",")]
    if opts.child:
        kind, shape = opts.child.split(":", 1)
        known = json.loads(Path(opts.known).read_text()) if opts.known else {}
        try:
            rows = [make_base(opts, shape)] if kind == "base" else run_method(opts, shape, kind, known)
        except FreshProcessNeeded:
            sys.exit(RESTART)
        for row in rows:
            print_row(row)
        return

    import importlib.util

    import torch
    import transformers

    if opts.time_limit:
        opts.deadline = time.time() + opts.time_limit
    header = f"torch {torch.__version__}, transformers {transformers.__version__}, {time.strftime('%Y-%m-%d')}"
    print(header, flush=True)
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()
    rows, bases = [], {}
    for shape in opts.shapes.split(","):
        made, error, _, _ = child_rows(opts, f"base:{shape}")
        bases[shape] = made[0] if made else {"error": error}
        print(f"base {shape}: {json.dumps(bases[shape])}", flush=True)
        for method in opts.methods.split(","):
            if method in NEEDS_BNB and not have_bnb:
                new = [{"shape": shape, "method": method, "skipped": "needs a CUDA GPU and bitsandbytes"}]
            elif error:
                new = [{"shape": shape, "method": method, "error": f"no base model: {error}"}]
            else:
                t0 = time.time()
                new, child_error = until_done(partial(child_rows, opts, f"{method}:{shape}"))
                new = new or [{"shape": shape, "method": method, "error": child_error}]
                print(f"{shape} {method}: {time.time() - t0:.0f} s", flush=True)
            rows += new
            print("\n".join(map(json.dumps, new)), flush=True)
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(json.dumps({"environment": header, "bases": bases, "rows": rows}, indent=2) + "\n")
    # CUDA is initialised in this process only now: it would hold GPU memory while the children ran
    header = f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, {header}"
    table = markdown(rows)
    opts.out.write_text(json.dumps({"environment": header, "bases": bases, "rows": rows, "table": table},
                                   indent=2) + "\n")
    print(header + table)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
