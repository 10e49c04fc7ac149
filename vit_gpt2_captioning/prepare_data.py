"""Verify image-caption pairs, cache the images, build the tokenizer: everything captioning training reads.

    python vit_gpt2_captioning/prepare_data.py                         # built-in synthetic shapes set
    python vit_gpt2_captioning/prepare_data.py --train my/train.csv --valid my/valid.csv --test my/test.csv \\
        --tokenizer /models/gpt2-chinese --image_size 224

Input: CSV files with columns `text,image_path` (paths relative to the CSV, or absolute).
Every image is opened and fully decoded in `--workers` processes; rows with an empty text
or an unreadable, truncated, empty, non-image or too small image are dropped and counted;
palette / grey / CMYK / transparent images are converted to RGB. The kept images are
decoded and resized once into a memory-mapped uint8 cache per split (`cache/<split>/`), so
training reads memory, not JPEGs. Writes under `--output_dir`: `<split>.csv` (kept rows, the
attribute columns of the input kept), `cache/<split>/`, `tokenizer/` and `report.json`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.config import parse_args
from common.errors import UserError, cli_main
from common.images import (
    make_synthetic_image_text,
    prepare_image_text_splits,
    print_report,
    read_image_csv,
)
from common.tokenizer import build_chinese_tokenizer, load_tokenizer

logger = logging.getLogger("prepare_data")
SPLITS = ("train", "valid", "test")


@dataclass
class PrepareArguments:
    train: str | None = field(default=None, metadata={"help": "CSV text,image_path. Default: the built-in synthetic set."})
    valid: str | None = field(default=None, metadata={"help": "CSV for validation (needed with --train)."})
    test: str | None = field(default=None, metadata={"help": "CSV for the final test (needed with --train)."})
    output_dir: str = field(default="data/vit_gpt2_captioning", metadata={"help": "Where the prepared data goes."})
    image_size: int = field(default=64, metadata={"help": "Side of the cached square images (the model's input)."})
    min_size: int = field(default=16, metadata={"help": "Images with a side shorter than this are dropped."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Local tokenizer directory. Default: a character tokenizer built from the train captions."},
    )
    vocab_size: int = field(default=4000, metadata={"help": "Size of a built tokenizer."})
    synthetic_size: list[int] = field(
        default_factory=lambda: [3000, 500, 500], metadata={"help": "Train, valid, test sizes of the built-in set."},
    )
    workers: int = field(default=0, metadata={"help": "Processes for verification and caching (0 = all cores)."})
    seed: int = field(default=0, metadata={"help": "Seed of the built-in set."})


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or os.cpu_count() or 1
    if args.train:
        if not (args.valid and args.test):
            raise UserError("with --train give --valid and --test too")
        sources = {"train": Path(args.train), "valid": Path(args.valid), "test": Path(args.test)}
    else:
        if len(args.synthetic_size) != 3:
            raise UserError("--synthetic_size takes three numbers: train valid test")
        sources = make_synthetic_image_text(out / "source", dict(zip(SPLITS, args.synthetic_size)),
                                            size=args.image_size, seed=args.seed)

    report = {"workers": workers, "image_size": args.image_size,
              "splits": prepare_image_text_splits(sources, out, args.image_size, args.min_size, workers)}

    if args.tokenizer:  # load_tokenizer adds the [BOS] / [EOS] / [PAD] a decoder needs when missing
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        texts = [row.text for row in read_image_csv(out / "train.csv")]
        tokenizer = build_chinese_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=1)
    tokenizer.save_pretrained(out / "tokenizer")
    report["vocab_size"] = len(tokenizer)
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print_report(report["splits"])
    print(f"wrote {', '.join(f'{s}.csv' for s in sources)}, cache/, tokenizer/ and report.json to {out}")
    return report


if __name__ == "__main__":
    main()
