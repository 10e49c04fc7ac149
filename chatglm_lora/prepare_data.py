"""Instruction data for SFT: validate, split, write as `messages` JSONL.

    python chatglm_lora/prepare_data.py                                 # built-in tasks (sentiment, segmentation)
    python chatglm_lora/prepare_data.py --input my_data/train.jsonl     # your data, any accepted layout
    python chatglm_lora/prepare_data.py --input 'adgen/*.json' --valid_ratio 0.02

Accepted layouts (JSON array or JSONL; see common/sft.py), one conversation per record:
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}          (ShareGPT)
  {"instruction": "...", "input": "...", "output": "...", "history": [[q, a], ...]}  (alpaca)
  {"content": "...", "summary": "..."}                                                 (ADGEN)
  CSV with a `text` column: "<s>Human: ...\\n</s><s>Assistant: ...\\n</s>"               (llama2-chinese)
A record that is none of these, has roles out of order or no assistant reply ends the run
with its file and line. Exact duplicate conversations are dropped (counted). Each kept
conversation goes to train, valid or test by a seeded hash of its text.

Built-in default: two tasks with known answers from the built-in corpora (judge a review's
sentiment; segment a People's Daily sentence into words separated by "/"); part of the
training conversations hold two tasks in two turns, so replies also appear in history.
The test split keeps `task` and `answer` so that train.py can score generated replies.

Writes `train.jsonl`, `valid.jsonl`, `test.jsonl` and `report.json` under --output_dir.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from common.config import parse_args
from common.errors import UserError, cli_main
from common.instructions import builtin_items, item_messages, split_of, to_conversations
from common.sft import read_conversations

logger = logging.getLogger("prepare_data")


@dataclass
class PrepareArguments:
    input: list[str] | None = field(
        default=None, metadata={"help": "Your JSON / JSONL / CSV files, folders or globs. Default: the built-in tasks."},
    )
    output_dir: str = field(default="data/chatglm_lora", metadata={"help": "Where the JSONL files go."})
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


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    if not (0 <= args.valid_ratio < 1 and 0 <= args.test_ratio < 1 and args.valid_ratio + args.test_ratio < 1):
        raise UserError("need 0 <= valid_ratio, test_ratio and valid_ratio + test_ratio < 1")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, ensure_ascii=False))
    print(f"wrote {', '.join(f'{n}.jsonl' for n in splits)} to {out}")
    return report


if __name__ == "__main__":
    main()
