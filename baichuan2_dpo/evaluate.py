"""Compare a preference-tuned model with the model it started from, on held-out data.

    python baichuan2_dpo/evaluate.py --model outputs/baichuan2_dpo --start_model outputs/model_baichuan

For each model (a plain checkpoint, or a LoRA adapter directory loaded over its base):
- on the held-out pairs (valid.jsonl), the share whose chosen reply is more likely than the
  rejected one, and the mean log-likelihood gap;
- the implicit DPO reward of the tuned model against the start (beta * log-ratio of the two
  models' likelihoods): its accuracy (chosen rewarded above rejected) and mean margin;
- on the test items with known answers (test.jsonl), greedy replies scored (sentiment
  accuracy, segmentation F1), and per task how many items got better / worse with the tuned
  model, with the sign test's p-value (is the difference more than noise?).
Prints a table and writes `--out` (JSON). train.py records the same in its metrics.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.errors import cli_main
from common.instructions import paired_change
from common.preference import preference_accuracy, tokenize_pairs
from common.sft_train import (
    ScoredDataArguments,
    evaluate_tasks,
    load_start_model,
    read_jsonl,
    scored_test_items,
)
from common.templates import get_template, resolve_template
from common.tokenizer import load_tokenizer

PREPARE = "python baichuan2_dpo/prepare_data.py"


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model_name_or_path", default="outputs/baichuan2_dpo", help="The preference-tuned model.")
    parser.add_argument("--start_model", default="outputs/model_baichuan", help="The model DPO started from.")
    parser.add_argument("--data_dir", default="data/baichuan2_dpo")
    parser.add_argument("--template", default=None, help="auto, official or a registry entry (common/templates.py). "
                        "Default: the template the tuned model carries, else baichuan2.")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta, for the implicit reward.")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--eval_samples", type=int, default=0, help="Test items scored (0 = all).")
    parser.add_argument("--out", default=None, help="JSON file (default: <model>/evaluation.json).")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # both models prompted as the tuned one was trained
    template = resolve_template(args.template, load_tokenizer(args.model, made_by="baichuan2_dpo/train.py"),
                                args.model) or get_template("baichuan2")
    data_dir = Path(args.data_dir)
    scoring = ScoredDataArguments(data_dir=str(data_dir), eval_samples=args.eval_samples)
    items = scored_test_items(scoring, PREPARE)

    results, logps, replies = {}, {}, {}
    for name, path in (("start", args.start_model), ("tuned", args.model)):
        model, tokenizer = load_start_model(path, dtype)
        model.to(device)
        pairs, _ = tokenize_pairs(read_jsonl(data_dir / "valid.jsonl", PREPARE), tokenizer, template,
                                        args.max_length)
        preference = preference_accuracy(model, pairs, with_gaps=True)
        logps[name] = preference.pop("gaps")
        scores, replies[name] = evaluate_tasks(model, tokenizer, template, items, scoring,
                                                     f"scoring the {name} model")
        results[name] = {"pairs": preference, "test": scores}
        del model
    margins = [args.beta * (tuned - start) for tuned, start in zip(logps["tuned"], logps["start"])]
    results["implicit_reward"] = {"beta": args.beta, "accuracy": sum(m > 0 for m in margins) / len(margins),
                                  "mean_margin": sum(margins) / len(margins)}
    if items:
        results["test_change"] = paired_change(items, replies["start"], replies["tuned"])
    out = Path(args.out or Path(args.model) / "evaluation.json")
    out.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, ensure_ascii=False, indent=2))
    return results


if __name__ == "__main__":
    main()
