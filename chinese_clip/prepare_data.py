"""Verify image-text pairs, cache the images, build the tokenizer: everything CLIP training reads.

    python chinese_clip/prepare_data.py                         # built-in synthetic shapes set
    python chinese_clip/prepare_data.py --input 'my/*.csv' --tokenizer /models/chinese-clip-vit-base-patch16 --image_size 224
    python chinese_clip/prepare_data.py --train my/train.csv --valid my/valid.csv --test my/test.csv  # your split

Input: CSV files with columns `text,image_path` (paths relative to the CSV, or absolute):
`--input` files, folders or globs, split here into train / valid / test by image (every caption
of an image in one split; `--valid_ratio`, `--test_ratio`, `--seed`), or your own split.
Every image is opened and fully decoded in `--workers` processes; rows with an empty text
or an unreadable, truncated, empty, non-image or too small image are dropped and counted;
palette / grey / CMYK / transparent images are converted to RGB. The kept images are
decoded and resized once into a memory-mapped uint8 cache per split (`cache/<split>/`), so
training reads memory, not JPEGs. Writes under `--output_dir`: `<split>.csv` (kept rows, the
attribute columns of the input kept), `cache/<split>/`, `tokenizer/` and `report.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import parse_args
from common.errors import cli_main
from common.images import PrepareImageTextArguments, prepare_image_text


@dataclass
class PrepareArguments(PrepareImageTextArguments):
    output_dir: str = field(default="data/chinese_clip", metadata={"help": "Where the prepared data goes."})


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    return prepare_image_text(args)


if __name__ == "__main__":
    main()
