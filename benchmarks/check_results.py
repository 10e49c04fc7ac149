"""Do the recipes' README commands still give their README results? Runs each recipe's built-in
default (the commands its README shows, as `make demo-*` runs them), reads its metrics.json and
fails when a headline number leaves the band stated here, so that a drift (a library upgrade, a
change of data or defaults) is caught when it happens rather than by the next reader.

    python benchmarks/check_results.py                      # the recipes CI checks (`make check-results`)
    python benchmarks/check_results.py chinese_clip         # one recipe
    python benchmarks/check_results.py --all                # every recipe with a band (about 85 min)
    python benchmarks/check_results.py chinese_clip --skip_run   # only compare the metrics.json already there
    python benchmarks/check_results.py --list

Each recipe's output goes to outputs/check_results/<recipe>.log; a table of value, band and
verdict is printed and written to outputs/check_results/results.json; the exit status is 1 when a
value is missing or outside its band.

A band is not the README number alone: a fresh run differs from the measured one even with the
same code, because the built-in WordPiece tokenizer is not deterministic (the `tokenizers`
trainer numbers its continuing-subword pieces in hash-map order and breaks ties between merges by
those numbers: huggingface/tokenizers#1794) and because a change in thread count or tensor shapes
moves a small model's training onto another path. Each band says which runs it was set from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs" / "check_results"


@dataclass
class Check:
    commands: list[list[str]]  # run in order from the repository root, `python` = this interpreter
    metrics: str  # metrics.json, relative to the root
    bands: dict[str, tuple[float, float]]  # dotted key in metrics.json -> (low, high), inclusive
    minutes: float  # one run on 2 CPU cores, measured
    measured: str  # the runs the bands come from
    ci: bool = False  # checked by `make check-results` (CI); the others by --all


# the base model_baichuan tunes (and baichuan2_dpo / baichuan2_grpo after it) is model_clm's default
MODEL_CLM = [["model_clm/prepare_data.py", "--dedup", "true"], ["model_clm/train.py", "model_clm/configs/default.yaml"]]

RECIPES: dict[str, Check] = {
    "chinese_clip": Check(
        commands=[["chinese_clip/prepare_data.py"], ["chinese_clip/train.py", "chinese_clip/configs/default.yaml"]],
        metrics="outputs/chinese_clip/metrics.json",
        bands={"image_to_text_recall@1": (0.5, 0.9), "text_to_image_recall@1": (0.5, 0.9)},
        minutes=6,
        measured="the default (2 threads, seed 42): 0.578 / 0.616 on 2026-12-01 and 12-03; one thread, seeds "
                 "42 / 1 / 2, 2026-12-03: image -> text 0.604 / 0.782 / 0.674, text -> image 0.626 / 0.812 / 0.716 "
                 "(whether left / right position is learnt decides it); 0.750 / 0.824 on 2026-11-22",
        ci=True,
    ),
    "vit_gpt2_captioning": Check(
        commands=[["vit_gpt2_captioning/prepare_data.py"],
                  ["vit_gpt2_captioning/train.py", "vit_gpt2_captioning/configs/default.yaml"]],
        metrics="outputs/vit_gpt2_captioning/metrics.json",
        bands={"model.exact_match": (0.45, 0.7)},
        minutes=7,
        measured="0.560 in each run: 2026-11-22, a fresh clone 2026-12-01, 2026-12-03 (its character vocabulary "
                 "is built deterministically)",
        ci=True,
    ),
    "chinese_gpt2": Check(
        commands=[["chinese_gpt2/prepare_data.py"], ["chinese_gpt2/train.py", "chinese_gpt2/configs/default.yaml"]],
        metrics="outputs/chinese_gpt2/metrics.json",
        bands={"valid_perplexity": (125, 200)},  # the character bigram: 294.5
        minutes=8,
        measured="147.3 and 162.1 from two tokenizers built on 2026-12-03 (same code, 2 cores)",
        ci=True,
    ),
    "model_clm": Check(
        commands=MODEL_CLM,
        metrics="outputs/model_clm/metrics.json",
        bands={"valid.news.after.perplexity": (170, 260), "valid.reviews.after.perplexity": (90, 140)},
        minutes=5.5,
        measured="three fresh tokenizers, 2 cores: news 194.4 / 230.7 / 215.4, reviews 103.8 / 121.3 / 114.2 "
                 "(2026-11-22, 12-02, 12-03)",
    ),
    "chinese_classifier": Check(
        commands=[["chinese_classifier/prepare_data.py"],
                  ["chinese_classifier/train.py", "chinese_classifier/configs/default.yaml"]],
        metrics="outputs/chinese_classifier/metrics.json",
        bands={"model.test_accuracy": (0.80, 0.86)},
        minutes=8,
        measured="0.8296 and 0.829-0.830 in reruns (README, 2026-11-22), 0.8261 (2026-12-04); TF-IDF baseline 0.844",
    ),
    "chatglm_lora": Check(  # the tiny GLM base of model_clm's glm_tiny config, LoRA SFT (make demo-sft)
        commands=[["model_clm/prepare_data.py", "--dedup", "true"],
                  ["model_clm/train.py", "model_clm/configs/glm_tiny.yaml"], ["chatglm_lora/prepare_data.py"],
                  ["chatglm_lora/train.py", "chatglm_lora/configs/default.yaml"]],
        metrics="outputs/chatglm_lora/metrics.json",
        bands={"test.tuned.sentiment.accuracy": (0.6, 0.85), "test.tuned.segmentation.f1": (0.2, 0.38)},
        minutes=13,
        measured="sentiment 0.724 / 0.686, segmentation F1 0.287 / 0.291 (2026-11-22, 12-04: fresh tokenizers); "
                 "majority class 0.594, one character per word 0.385",
    ),
    "model_baichuan": Check(  # the SFT model that baichuan2_dpo and baichuan2_grpo start from
        commands=[*MODEL_CLM, ["model_baichuan/prepare_data.py"],
                  ["model_baichuan/train.py", "model_baichuan/configs/default.yaml"]],
        metrics="outputs/model_baichuan/metrics.json",
        bands={"test.tuned.sentiment.accuracy": (0.6, 0.8), "test.tuned.segmentation.f1": (0.25, 0.38)},
        minutes=10,
        measured="sentiment 0.716 / 0.678 / 0.659 / 0.659, segmentation F1 0.314 / 0.313 / 0.300 / 0.300 "
                 "(2026-11-22 to 12-04, each on a fresh tokenizer and base)",
    ),
    "baichuan2_dpo": Check(
        commands=[["baichuan2_dpo/prepare_data.py"], ["baichuan2_dpo/train.py", "baichuan2_dpo/configs/default.yaml"]],
        metrics="outputs/baichuan2_dpo/metrics.json",
        bands={"test.change.sentiment.sign_test_p": (0, 0.01), "test.tuned.segmentation.f1": (0.25, 0.4)},
        minutes=12,
        measured="sentiment 0.658 -> 0.757, p = 1.7e-5; segmentation 0.345 -> 0.353 (2026-12-02); on another "
                 "base: 0.684 -> 0.783, p = 2.0e-6; segmentation 0.340 -> 0.342 (2026-12-04)",
    ),
    "baichuan2_grpo": Check(
        commands=[["baichuan2_dpo/prepare_data.py"],
                  ["baichuan2_dpo/train_grpo.py", "baichuan2_dpo/configs/grpo_default.yaml"]],
        metrics="outputs/baichuan2_grpo/metrics.json",
        bands={"test.change.sentiment.sign_test_p": (0, 0.01), "test.tuned.segmentation.f1": (0.25, 0.4)},
        minutes=12.5,
        measured="sentiment 0.684 -> 0.751 / 0.751 / 0.786, p = 0.003 / 0.0005 / 1e-6; segmentation 0.340 -> "
                 "0.340 / 0.337 / 0.349 (2026-12-03, three runs)",
    ),
}


def lookup(metrics: dict, key: str):
    value = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def run(name: str, check: Check) -> str:
    """The recipe's commands, output to its log; "" or the failing command."""
    log = OUT / f"{name}.log"
    with open(log, "w") as f:
        for command in check.commands:
            start = time.time()
            f.write(f"===== python {' '.join(command)}\n")
            f.flush()
            process = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            f.write(f"===== exit {process.returncode} after {time.time() - start:.0f} s\n")
            if process.returncode:
                return f"`python {' '.join(command)}` exited {process.returncode} (see {log.relative_to(ROOT)})"
    return ""


def compare(name: str, check: Check, error: str = "") -> list[dict]:
    path = ROOT / check.metrics
    metrics = json.loads(path.read_text()) if path.exists() and not error else {}
    rows = []
    for key, (low, high) in check.bands.items():
        value = lookup(metrics, key)
        ok = isinstance(value, (int, float)) and low <= value <= high
        rows.append({"recipe": name, "metric": key, "value": value, "band": [low, high], "ok": ok,
                     "why": "" if ok else error or (f"no {key} in {check.metrics}" if value is None else "outside")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="Recipes to check (default: those CI checks).")
    parser.add_argument("--all", action="store_true", help="Every recipe with a band.")
    parser.add_argument("--skip_run", action="store_true", help="Compare the metrics.json already in outputs/.")
    parser.add_argument("--list", action="store_true", help="The recipes, their bands and minutes, then stop.")
    args = parser.parse_args(argv)
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(f"no band for {', '.join(unknown)}; recipes with one: {', '.join(RECIPES)}")
    names = args.recipes or [n for n, c in RECIPES.items() if args.all or c.ci]
    if args.list:
        for name in names:
            check = RECIPES[name]
            print(f"{name} ({check.minutes:g} min{', CI' if check.ci else ''}): "
                  + ", ".join(f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in check.bands.items())
                  + f"\n    set from: {check.measured}")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        check = RECIPES[name]
        if not args.skip_run:
            print(f"{name}: running its README commands (about {check.minutes:g} min on 2 CPU cores)", flush=True)
        start = time.time()
        error = "" if args.skip_run else run(name, check)
        for row in compare(name, check, error):
            row["minutes"] = round((time.time() - start) / 60, 1)
            rows.append(row)
            band = f"[{row['band'][0]:g}, {row['band'][1]:g}]"
            value = f"{row['value']:.4g}" if isinstance(row["value"], (int, float)) else "-"
            print(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['metric']} = {value}, band {band} {row['why']}", flush=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} results inside their bands"
          + (f"; outside: {', '.join(r['recipe'] + ' ' + r['metric'] for r in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
