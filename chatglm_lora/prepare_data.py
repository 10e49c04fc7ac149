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

from dataclasses import dataclass, field

from common.config import parse_args
from common.errors import cli_main
from common.sft_train import SFTPrepareArguments, prepare_sft_data


@dataclass
class PrepareArguments(SFTPrepareArguments):
    output_dir: str = field(default="data/chatglm_lora", metadata={"help": "Where the JSONL files go."})


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    return prepare_sft_data(args)


if __name__ == "__main__":
    main()
