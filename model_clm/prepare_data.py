"""Tokenise a text corpus of any size into memory-mapped token shards, in parallel and resumably.

    python model_clm/prepare_data.py --dedup true         # built-in: People's Daily + product reviews, 2 sources
    python model_clm/prepare_data.py --input 'corpus/**/*.jsonl' --tokenizer /models/llama-2-7b \\
        --output_dir data/model_clm/general --dedup true
    python model_clm/prepare_data.py --input domain/ --tokenizer data/model_clm/general/tokenizer \\
        --output_dir data/model_clm/domain                # a second source for mixing: same tokenizer

Input: files, folders or globs of .txt (one document per line), .jsonl (field `text`) and
.csv (column `content`); `--text_column` names another field. Each input file is cut into
work units of `--unit_mb` MB (a CSV file is one unit); `--workers` processes each read,
clean, tokenise and write whole units, so memory stays flat whatever the input size.
Cleaning: full-width spaces become spaces, texts are stripped, empty texts and texts
shorter than `--min_chars` are dropped; `--dedup true` also drops exact duplicates (a first
pass hashes every document: 8 bytes of memory per document, e.g. 0.8 GB for 100M). A
seeded hash of each text sends `--valid_ratio` of the documents to the held-out split.
Interrupted? Run the same command again: finished units are kept, the rest is redone.

Writes `<output_dir>/index.json`, `train/*.bin`, `valid/*.bin` (uint16 ids when the
vocabulary fits, else uint32; every document followed by eos), `tokenizer/` and
`report.json`. Without `--tokenizer` a Chinese WordPiece tokenizer is built from (at most
`--tokenizer_documents` of) the input texts.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.config import parse_args
from common.corpora import load_peoples_daily, load_reviews
from common.data import TEXT_EXTENSIONS, make_units, resolve_files, unit_texts
from common.errors import UserError, cli_main
from common.shards import ShardOptions, source_file, write_token_shards
from common.tokenizer import build_chinese_tokenizer, load_tokenizer, reuse_or_build


@dataclass
class PrepareArguments:
    input: list[str] | None = field(
        default=None, metadata={"help": "Text files, folders or globs (.txt, .jsonl, .csv). Default: the built-in "
                                "corpora as two sources, news and reviews, under --output_dir."},
    )
    output_dir: str = field(default="data/model_clm", metadata={"help": "Where the shards go."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Local tokenizer directory (eos/pad added if missing). Default: build a "
                                "Chinese WordPiece tokenizer from the input."},
    )
    vocab_size: int = field(default=8000, metadata={"help": "Size of a built tokenizer."})
    tokenizer_documents: int = field(default=200_000, metadata={"help": "Documents a built tokenizer learns from."})
    text_column: str | None = field(default=None, metadata={"help": "Field / column of the text (default: text "
                                                            "for JSONL, content for CSV)."})
    min_chars: int = field(default=5, metadata={"help": "Drop texts shorter than this many characters."})
    dedup: bool = field(default=False, metadata={"help": "Drop exact duplicate documents (after cleaning)."})
    valid_ratio: float = field(default=0.01, metadata={"help": "Share of documents held out for evaluation."})
    seed: int = field(default=42, metadata={"help": "Seed of the held-out draw and of the hashes."})
    unit_mb: float = field(default=32, metadata={"help": "Size of a work unit (and about of a shard's input)."})
    workers: int = field(default=0, metadata={"help": "Tokenising processes (0 = all cores)."})

    def __post_init__(self):
        if not 0 < self.valid_ratio < 1:
            raise UserError("--valid_ratio must be in (0, 1)")
        if self.seed < 0:
            raise UserError("--seed must be >= 0")


def options_of(args: PrepareArguments) -> ShardOptions:
    return ShardOptions(min_chars=args.min_chars, valid_ratio=args.valid_ratio, seed=args.seed, dedup=args.dedup,
                        text_column=args.text_column, unit_bytes=int(args.unit_mb * (1 << 20)))


def sample_texts(inputs: list[str], args: PrepareArguments):
    """Up to --tokenizer_documents raw texts of the input, read as the workers read them."""
    units = make_units(resolve_files(inputs, extensions=TEXT_EXTENSIONS), options_of(args).unit_bytes)
    texts = (text for unit in units for text in unit_texts(unit, args.text_column))
    return itertools.islice(texts, args.tokenizer_documents)


def prepare_source(inputs: list[str], out: Path, tokenizer, args: PrepareArguments) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    report = write_token_shards(inputs, out, tokenizer, options_of(args), args.workers or os.cpu_count() or 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{out}: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    return report


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    out = Path(args.output_dir)
    if args.input:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else reuse_or_build(
            out / "tokenizer", lambda: build_chinese_tokenizer(sample_texts(args.input, args), vocab_size=args.vocab_size))
        return prepare_source(args.input, out, tokenizer, args)

    # Built-in: two sources with one tokenizer, so training can mix them.
    corpora = {"news": load_peoples_daily(), "reviews": [text for text, _ in load_reviews()]}
    sources = {name: source_file(out / "source" / f"{name}.txt", texts) for name, texts in corpora.items()}
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else reuse_or_build(
        out / "news" / "tokenizer",
        lambda: build_chinese_tokenizer(itertools.chain(*corpora.values()), vocab_size=args.vocab_size))
    return {name: prepare_source([str(path)], out / name, tokenizer, args) for name, path in sources.items()}


if __name__ == "__main__":
    main()
