"""Images for the image-text recipes (chinese_clip, vit_gpt2_captioning): verification, a
memory-mapped preprocessing cache, and a built-in synthetic image-text set.

    rows, report = read_image_csv("data/train.csv")              # CSV text,image_path
    kept, report = verify_images(rows, min_size=16, workers=2)   # every image fully decoded
    build_image_cache([r.path for r in kept], "cache/train", size=64)
    cache = ImageCache("cache/train")                            # uint8 [N, 64, 64, 3], memory-mapped
    pixels = normalize(torch.from_numpy(cache[[0, 1, 2]]), mean, std)  # float [3, 3, 64, 64]

Why a cache: decoding a JPEG and running an image processor per sample costs milliseconds of
CPU and starves a GPU; each image is decoded, converted to RGB and resized once, and training
reads become memory copies. Normalisation is a cheap tensor op done per batch (on the GPU
where there is one). Why verify first: a truncated or mislabelled file must never reach
training, where it would crash a run hours in.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm.auto import tqdm

from common.data import check_file, resolve_files
from common.errors import UserError
from common.tokenizer import build_chinese_tokenizer, display_cleaner, load_tokenizer

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------- reading a CSV
@dataclass(frozen=True)
class ImageText:
    text: str
    path: Path


def read_image_csv(csv_path: str | Path, text_column: str = "text", image_column: str = "image_path") -> list[ImageText]:
    """Rows of a `text,image_path` CSV; relative image paths are relative to the CSV's folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: file not found")
    check_file(csv_path, [text_column, image_column])
    rows = []
    with csv_path.open(encoding="utf-8-sig", newline="") as f:
        for record in csv.DictReader(f):
            path = Path((record.get(image_column) or "").strip())
            rows.append(ImageText((record.get(text_column) or "").strip(), path if path.is_absolute() else csv_path.parent / path))
    return rows


# ------------------------------------------------------------------- verification
def to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the mode; transparent pixels become white (not black, as a plain
    convert would make them)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def check_image(path: Path, min_size: int = 16) -> str:
    """'ok', 'converted' (readable, not RGB) or why the image is unusable: missing,
    empty_file, not_an_image, unreadable (truncated or corrupt), too_small."""
    try:
        if path.stat().st_size == 0:
            return "empty_file"
    except OSError:
        return "missing"
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file fails here, not in training
            if min(image.size) < min_size:
                return "too_small"
            return "ok" if image.mode == "RGB" else "converted"
    except UnidentifiedImageError:
        return "not_an_image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "unreadable"


def _check(args: tuple[Path, int]) -> str:
    return check_image(*args)


def verify_images(rows: list[ImageText], min_size: int = 16, workers: int = 1,
                  desc: str = "verifying images") -> tuple[list[ImageText], Counter]:
    """Keep the rows whose text is non-empty and whose image decodes fully; count the rest
    by reason. Images are checked in `workers` processes."""
    report: Counter = Counter()
    candidates = []
    for row in rows:
        if row.text:
            candidates.append(row)
        else:
            report["empty_text"] += 1
    jobs = [(row.path, min_size) for row in candidates]
    if workers > 1 and len(jobs) > 1:
        with Pool(workers) as pool:
            statuses = list(tqdm(pool.imap(_check, jobs, chunksize=32), total=len(jobs), desc=desc))
    else:
        statuses = [_check(job) for job in tqdm(jobs, desc=desc)]
    kept = []
    for row, status in zip(candidates, statuses):
        report[status] += 1
        if status in ("ok", "converted"):
            kept.append(row)
    report["kept"] = len(kept)
    return kept, report


def prepare_image_text_splits(sources: dict[str, Path], out_dir: Path, image_size: int, min_size: int = 16,
                              workers: int = 1) -> dict[str, dict]:
    """For each split's `text,image_path` CSV: verify every pair, write the kept rows to
    `out_dir/<split>.csv` (every input column kept, image paths made absolute) and cache their
    images in `out_dir/cache/<split>/`. Returns per split the rows read, kept and dropped by reason."""
    report = {}
    for split, csv_path in sources.items():
        rows = read_image_csv(csv_path)
        kept, counts = verify_images(rows, min_size=min_size, workers=workers, desc=f"verifying {split}")
        if not kept:
            raise UserError(f"{csv_path}: no usable image-text pair ({dict(counts)})")
        kept_paths = {row.path for row in kept}
        written = []  # image paths in the order of the written rows: the cache's order
        with csv_path.open(encoding="utf-8-sig", newline="") as f_in, \
                (out_dir / f"{split}.csv").open("w", encoding="utf-8", newline="") as f_out:
            reader = csv.DictReader(f_in)
            writer = csv.DictWriter(f_out, fieldnames=reader.fieldnames)
            writer.writeheader()
            for record, row in zip(reader, rows):  # read_image_csv read the same rows in the same order
                if row.text and row.path in kept_paths:
                    writer.writerow({**record, "text": row.text, "image_path": str(row.path.resolve())})
                    written.append(row.path)
        build_image_cache(written, out_dir / "cache" / split, image_size, workers)
        report[split] = {"read": len(rows), "kept": len(written), **{k: v for k, v in counts.items() if k != "kept"}}
        logger.info("%s: %s", split, report[split])
    return report


def print_report(report: dict[str, dict]) -> None:
    for split, numbers in report.items():
        dropped = {k: v for k, v in numbers.items() if k not in ("read", "kept", "ok", "converted") and v}
        print(f"{split}: {numbers['read']} rows read, {numbers['kept']} kept "
              f"({numbers.get('converted', 0)} converted to RGB); dropped: {dropped or 'none'}")


# ------------------------------------------------------------ preprocessing cache
def load_square(path: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: RGB, shortest side resized to `size` (bicubic), centre crop,
    as CLIP's and ViT's processors do."""
    with Image.open(path) as image:
        image = to_rgb(image)
        width, height = image.size
        scale = size / min(width, height)
        resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                               Image.Resampling.BICUBIC)
        left = (resized.width - size) // 2
        top = (resized.height - size) // 2
        return np.array(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _load(args: tuple[Path, int]) -> np.ndarray:
    return load_square(*args)


def build_image_cache(paths: list[Path], out_dir: str | Path, size: int, workers: int = 1) -> Path:
    """Decode, convert and resize every image once into `out_dir/pixels.npy`, a uint8
    memmap [N, size, size, 3] in the order of `paths`, with `out_dir/index.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not paths:
        raise UserError(f"no images to cache in {out_dir}")
    pixels = np.lib.format.open_memmap(out_dir / "pixels.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(paths), size, size, 3))
    jobs = [(Path(p), size) for p in paths]
    desc = f"caching {len(paths)} images at {size}x{size}"
    if workers > 1 and len(jobs) > 1:
        with Pool(workers) as pool:
            for i, array in enumerate(tqdm(pool.imap(_load, jobs, chunksize=32), total=len(jobs), desc=desc)):
                pixels[i] = array
    else:
        for i, job in enumerate(tqdm(jobs, desc=desc)):
            pixels[i] = _load(job)
    pixels.flush()
    del pixels
    (out_dir / "index.json").write_text(json.dumps(
        {"count": len(paths), "size": size, "paths": [str(p) for p in paths]}, ensure_ascii=False, indent=1))
    return out_dir


class ImageCache:
    """The cache of `build_image_cache`, memory-mapped: `cache[i]` or `cache[[i, j]]` is
    uint8 [..., size, size, 3] read from the page cache, no decoding."""

    def __init__(self, cache_dir: str | Path):
        cache_dir = Path(cache_dir)
        if not (cache_dir / "index.json").is_file():
            raise UserError(f"{cache_dir}: no image cache (run the recipe's prepare_data.py)")
        self.index = json.loads((cache_dir / "index.json").read_text())
        self.pixels = np.load(cache_dir / "pixels.npy", mmap_mode="r")
        if len(self.pixels) != self.index["count"]:
            raise UserError(f"{cache_dir}: pixels.npy has {len(self.pixels)} images, index.json {self.index['count']}")
        self.size = self.index["size"]

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index):
        return np.array(self.pixels[index])  # a copy: writable, and free of the file


# CLIP's image statistics (OpenAI CLIP, Chinese-CLIP): the input normalisation of its towers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_prepared_split(data_dir: Path, split: str, prepare_script: str) -> tuple[list[dict], ImageCache]:
    """The rows of `<data_dir>/<split>.csv` written by `prepare_image_text_splits` and their
    image cache, checked to belong together."""
    csv_path = data_dir / f"{split}.csv"
    if not csv_path.is_file():
        raise UserError(f"{csv_path} not found: run {prepare_script} first")
    with csv_path.open(encoding="utf-8", newline="") as f:
        records = list(csv.DictReader(f))
    images = ImageCache(data_dir / "cache" / split)
    if len(images) != len(records):
        raise UserError(f"{data_dir}: {split}.csv and its image cache differ in length: run {prepare_script} again")
    return records, images


VIT_MEAN, VIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the captioning ViT's input normalisation


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] = (x / 255 - mean) / std per channel; run it
    after moving the uint8 batch to the GPU (4x fewer bytes to copy). One conversion and one
    in-place affine over the contiguous [B, H, W, 3] data, then a permuted view: the result is
    in channels_last memory format, which convolutions (patch embeddings) take as is."""
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device)
    return pixels.float().mul_(1 / (255 * std)).sub_(mean / std).permute(0, 3, 1, 2)


@torch.inference_mode()
def caption_images(model, tokenizer, pixels: torch.Tensor, num_beams: int = 4, max_new_tokens: int = 16,
                   batch_size: int = 64, **sampling) -> list[str]:
    """Captions of a vision-encoder-decoder model (vit_gpt2_captioning) for uint8 images
    [N, S, S, 3], normalised as its ViT encoder was trained, without WordPiece spaces."""
    model.eval()
    device = next(model.parameters()).device
    clean = display_cleaner(tokenizer)
    captions = []
    for start in range(0, len(pixels), batch_size):
        batch = normalize(pixels[start:start + batch_size].to(device), VIT_MEAN, VIT_STD)
        generated = model.generate(pixel_values=batch, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                   early_stopping=num_beams > 1, **sampling)
        captions += [clean(text) for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return captions


# -------------------------------------------------------------- synthetic data
# Scenes of coloured shapes with Chinese captions whose every word can be checked against
# how the scene was drawn: the built-in default for the image-text recipes.
SHAPES = ("圆形", "正方形", "三角形", "菱形")
COLOURS = {"红色": (215, 40, 40), "绿色": (40, 160, 70), "蓝色": (40, 80, 215), "黄色": (235, 195, 30),
           "紫色": (140, 60, 175), "黑色": (30, 30, 30)}
CORNERS = {"左上角": (0, 0), "右上角": (1, 0), "左下角": (0, 1), "右下角": (1, 1)}
COUNT_WORDS = {2: "两", 3: "三", 4: "四"}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "圆形":
        draw.ellipse(box, fill=colour)
    elif shape == "正方形":
        draw.rectangle(box, fill=colour)
    elif shape == "三角形":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def render_scene(rng: random.Random, size: int) -> tuple[Image.Image, str, dict]:
    """One scene, its caption and the attributes the caption states."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    half = size / 2
    kind = rng.choices(["single", "count", "relation"], weights=[2, 1, 1])[0]
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))

    def box_in(cell_x: float, cell_y: float, cell: float) -> tuple[float, float, float, float]:
        extent = rng.uniform(0.55, 0.8) * cell
        x0 = cell_x + rng.uniform(0.05 * cell, cell - extent - 0.05 * cell)
        y0 = cell_y + rng.uniform(0.05 * cell, cell - extent - 0.05 * cell)
        return (x0, y0, x0 + extent, y0 + extent)

    if kind == "single":
        corner = rng.choice(list(CORNERS))
        cx, cy = CORNERS[corner]
        _draw_shape(draw, shape, box_in(cx * half, cy * half, half), COLOURS[colour])
        caption = f"{corner}有一个{colour}的{shape}"
        attributes = {"kind": kind, "shape": shape, "colour": colour, "position": corner, "count": 1}
    elif kind == "count":
        count = rng.choice(list(COUNT_WORDS))
        for corner in rng.sample(list(CORNERS), count):
            cx, cy = CORNERS[corner]
            _draw_shape(draw, shape, box_in(cx * half, cy * half, half), COLOURS[colour])
        caption = f"图中有{COUNT_WORDS[count]}个{colour}的{shape}"
        attributes = {"kind": kind, "shape": shape, "colour": colour, "position": "", "count": count}
    else:
        other_shape = rng.choice([s for s in SHAPES if s != shape])
        other_colour = rng.choice([c for c in COLOURS if c != colour])
        row = rng.choice([0, 1])
        left_first = rng.random() < 0.5  # which of the two is drawn on the left
        left, right = ((shape, colour), (other_shape, other_colour)) if left_first else \
            ((other_shape, other_colour), (shape, colour))
        _draw_shape(draw, left[0], box_in(0, row * half, half), COLOURS[left[1]])
        _draw_shape(draw, right[0], box_in(half, row * half, half), COLOURS[right[1]])
        side = "左边" if left_first else "右边"
        caption = f"{colour}的{shape}在{other_colour}的{other_shape}的{side}"
        attributes = {"kind": kind, "shape": shape, "colour": colour, "position": side, "count": 2}
    return image, caption, attributes


def make_synthetic_image_text(out_dir: str | Path, splits: dict[str, int] | None = None, size: int = 64,
                              seed: int = 0, quality: int = 90) -> dict[str, Path]:
    """Write JPEG scenes and `<split>.csv` (text,image_path + the caption's attributes) per
    split; the same seed gives the same files. Returns the CSV path of each split."""
    splits = splits or {"train": 3000, "valid": 500, "test": 500}
    out_dir = Path(out_dir)
    written = {}
    for split_index, (split, count) in enumerate(splits.items()):
        rng = random.Random(seed * 1000 + split_index)  # each split its own stream: sizes do not shift others
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        csv_path = out_dir / f"{split}.csv"
        with csv_path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "image_path", "kind", "shape", "colour", "position", "count"])
            for i in range(count):
                image, caption, attributes = render_scene(rng, size)
                relative = Path("images") / split / f"{i:05d}.jpg"
                image.save(out_dir / relative, quality=quality)
                writer.writerow([caption, relative.as_posix(), *attributes.values()])
        written[split] = csv_path
    logger.info("synthetic image-text set in %s: %s", out_dir, {s: n for s, n in splits.items()})
    return written


# ----------------------------------------------------------- prepare_data.py of both recipes
SPLITS = ("train", "valid", "test")


@dataclass
class PrepareImageTextArguments:
    """What chinese_clip's and vit_gpt2_captioning's prepare_data.py take (each sets its own output_dir)."""
    input: list[str] | None = field(default=None, metadata={
        "help": "CSV text,image_path: files, folders or globs, split into train / valid / test by image "
                "(--valid_ratio, --test_ratio, --seed). Default: the built-in synthetic set."})
    train: str | None = field(default=None, metadata={"help": "Your own split instead of --input: the train CSV."})
    valid: str | None = field(default=None, metadata={"help": "CSV for validation (needed with --train)."})
    test: str | None = field(default=None, metadata={"help": "CSV for the final test (needed with --train)."})
    output_dir: str = field(default="data/images", metadata={"help": "Where the prepared data goes."})
    valid_ratio: float = field(default=0.05, metadata={"help": "Share of --input's images for validation."})
    test_ratio: float = field(default=0.05, metadata={"help": "Share of --input's images for the test split."})
    image_size: int = field(default=64, metadata={"help": "Side of the cached square images (the model's input)."})
    min_size: int = field(default=16, metadata={"help": "Images with a side shorter than this are dropped."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Local tokenizer directory. Default: a character tokenizer built from the "
                                "train captions."},
    )
    vocab_size: int = field(default=4000, metadata={"help": "Size of a built tokenizer."})
    synthetic_size: list[int] = field(
        default_factory=lambda: [3000, 500, 500], metadata={"help": "Train, valid, test sizes of the built-in set."},
    )
    workers: int = field(default=0, metadata={"help": "Processes for verification and caching (0 = all cores)."})
    seed: int = field(default=0, metadata={"help": "Seed of the built-in set and of --input's split."})


def split_image_text(specs: list[str], out_dir: str | Path, valid_ratio: float, test_ratio: float,
                     seed: int = 0) -> dict[str, Path]:
    """The rows of `specs` (CSV files, folders, globs) split into `out_dir/<split>.csv`, seeded and
    by image: every caption of one image lands in the same split, so no test image was trained on.
    Image paths are written absolute; the other columns are kept."""
    if not (0 < valid_ratio < 1 and 0 < test_ratio < 1 and valid_ratio + test_ratio < 1):
        raise UserError("--valid_ratio and --test_ratio must be in (0, 1) and sum to less than 1")
    records, columns = [], ["text", "image_path"]
    for csv_path in resolve_files(specs, extensions=(".csv",)):
        check_file(csv_path, ["text", "image_path"])
        with csv_path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
            for record in reader:
                path = Path((record.get("image_path") or "").strip())
                record["image_path"] = str(path if path.is_absolute() else (csv_path.parent / path).resolve())
                records.append(record)
    images = sorted({r["image_path"] for r in records})
    if len(images) < 3:
        raise UserError(f"{', '.join(specs)}: {len(images)} distinct images; a train / valid / test split needs 3 or more")
    random.Random(seed).shuffle(images)
    n_valid, n_test = (max(1, round(ratio * len(images))) for ratio in (valid_ratio, test_ratio))
    split_of = {image: "valid" if i < n_valid else "test" if i < n_valid + n_test else "train"
                for i, image in enumerate(images)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        written[split] = out_dir / f"{split}.csv"
        with written[split].open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r for r in records if split_of[r["image_path"]] == split)
    return written


def prepare_image_text(args: PrepareImageTextArguments) -> dict:
    """A prepare_data.py run: the splits (--input split here, --train/--valid/--test as given, or
    the built-in synthetic set) verified and cached, the tokenizer built or loaded, report.json."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or os.cpu_count() or 1
    if args.input and args.train:
        raise UserError("give --input (split here) or --train/--valid/--test (your own split), not both")
    if args.input:
        sources = split_image_text(args.input, out / "source", args.valid_ratio, args.test_ratio, args.seed)
    elif args.train:
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
