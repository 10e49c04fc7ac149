"""Instruction data for Baichuan SFT: validate, split, write as `messages` JSONL.

    python model_baichuan/prepare_data.py                                # built-in tasks (sentiment, segmentation)
    python model_baichuan/prepare_data.py --input my_data/train.jsonl    # your data, any accepted layout

Accepted layouts (JSON array or JSONL; see common/sft.py), one conversation per record:
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}          (ShareGPT)
  {"instruction": "...", "input": "...", "output": "...", "history": [[q, a], ...]}  (alpaca)
  {"content": "...", "summary": "..."}                                                 (ADGEN)
A record that is none of these, has roles out of order or no assistant reply ends the run
with its file and line. Exact duplicates are dropped (counted); the rest go to train / valid /
test by a seeded hash of their text. The built-in default: judge a review's sentiment and
segment a People's Daily sentence, with gold answers kept in test.jsonl for scoring.

Writes `train.jsonl`, `valid.jsonl`, `test.jsonl` and `report.json` under --output_dir.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import parse_args
from common.errors import cli_main
from common.sft_train import SFTPrepareArguments, prepare_sft_data


@dataclass
class PrepareArguments(SFTPrepareArguments):
    output_dir: str = field(default="data/model_baichuan", metadata={"help": "Where the JSONL files go."})


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    return prepare_sft_data(args)


if __name__ == "__main__":
    main()
