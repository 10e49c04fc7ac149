"""Images per second delivered to training: the original recipes' way against common/images.py.

    python benchmarks/image_pipeline.py                           # 1,024 JPEGs of 500 x 375, 2 workers
    python benchmarks/image_pipeline.py --images 256 --workers 1  # quicker
    python benchmarks/image_pipeline.py --tiny                    # CPU smoke test: 64 images of 64 x 64, seconds

Same images (JPEG files of 500 x 375, rendered shape scenes with noise, written first), same
batch size, same DataLoader workers, same output (float [B, 3, 224, 224], CLIP's mean / std):

  a. original   each batch's collate opens every image with PIL, converts it to RGB and runs
                ChineseCLIP's image processor (resize, centre crop, normalise), as the
                original chinese_clip and captioning recipes did
  b. cache      common/images.py: every image decoded and resized once into a uint8 memmap
                (its build time is printed apart: a one-off cost per dataset); a batch is a
                memory copy of uint8 rows, normalised by `normalize` (on the GPU in training;
                here on the CPU, in the main process, so the number includes it)
  b. uint8 only the same without normalisation: the memmap's raw rate

Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.images import CLIP_MEAN as MEAN  # noqa: E402
from common.images import CLIP_STD as STD  # noqa: E402
from common.images import ImageCache, build_image_cache, normalize, render_scene, to_rgb  # noqa: E402


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng, noise_rng = random.Random(seed), np.random.default_rng(seed)
    paths = []
    for i in range(count):
        scene, _, _ = render_scene(rng, 96)
        pixels = np.asarray(scene.resize((500, 375), Image.Resampling.BILINEAR)).astype(np.int16)
        pixels += noise_rng.integers(-12, 13, pixels.shape, dtype=np.int16)  # photo-like JPEG sizes
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


class Paths(Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.paths[i]


class ProcessorCollate:
    """The original way: decode and process a batch of image files."""

    def __init__(self, size: int = 224):
        from transformers import ChineseCLIPImageProcessorPil

        self.processor = ChineseCLIPImageProcessorPil(  # CLIP's mean / std
            size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def __call__(self, paths):
        images = []
        for path in paths:
            with Image.open(path) as image:
                image.load()
                images.append(to_rgb(image))
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


class CacheBatches(Dataset):
    """One item = one batch of consecutive cache rows: a single memory copy (normalised in
    the worker when `normalise_in_worker`)."""

    def __init__(self, cache_dir: Path, batch_size: int, normalise_in_worker: bool = False):
        self.cache_dir, self.batch_size = cache_dir, batch_size
        self.normalise_in_worker = normalise_in_worker
        self.cache = None
        self.count = len(ImageCache(cache_dir))

    def __len__(self):
        return (self.count + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i):
        if self.cache is None:  # opened in each worker
            self.cache = ImageCache(self.cache_dir)
        batch = torch.from_numpy(self.cache[i * self.batch_size:(i + 1) * self.batch_size])
        return normalize(batch, MEAN, STD) if self.normalise_in_worker else batch


def images_per_second(loader, transform=None) -> tuple[float, tuple]:
    start = time.perf_counter()
    count, shape = 0, None
    for batch in loader:
        if transform is not None:
            batch = transform(batch)
        count += len(batch)
        shape = tuple(batch.shape)
    return count / (time.perf_counter() - start), shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", default="outputs/benchmarks/image_pipeline.json")
    parser.add_argument("--tiny", action="store_true", help="Smoke test: 64 images, batch 16, one worker, 64 pixels.")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.batch_size, args.workers, args.size = 64, 16, 1, 64

    work = Path(tempfile.mkdtemp(prefix="image_pipeline_"))
    (work / "jpeg").mkdir()
    paths = write_jpegs(work / "jpeg", args.images)
    mean_kb = np.mean([p.stat().st_size for p in paths]) / 1024
    loader_args = dict(num_workers=args.workers, persistent_workers=False)

    original = DataLoader(Paths(paths), batch_size=args.batch_size, collate_fn=ProcessorCollate(args.size), **loader_args)
    rate_a, shape_a = images_per_second(original)

    start = time.perf_counter()
    build_image_cache(paths, work / "cache", size=args.size, workers=max(1, args.workers))
    build_s = time.perf_counter() - start
    batches = DataLoader(CacheBatches(work / "cache", args.batch_size), batch_size=None, **loader_args)
    rate_b, shape_b = images_per_second(batches, lambda x: normalize(x, MEAN, STD))
    in_workers = DataLoader(CacheBatches(work / "cache", args.batch_size, normalise_in_worker=True), batch_size=None,
                            **loader_args)
    rate_bw, shape_bw = images_per_second(in_workers)
    rate_raw, _ = images_per_second(batches)
    assert shape_a[1:] == shape_b[1:] == shape_bw[1:], (shape_a, shape_b, shape_bw)

    rows = [
        {"pipeline": "a. original (PIL + processor per batch)", "images_per_s": rate_a},
        {"pipeline": "b. cache, normalize in main process", "images_per_s": rate_b},
        {"pipeline": "b. cache, normalize in the workers", "images_per_s": rate_bw},
        {"pipeline": "b. cache, uint8 only (normalize on GPU)", "images_per_s": rate_raw},
    ]
    setup = (f"{args.images} JPEGs of 500 x 375 ({mean_kb:.0f} KB on average) -> float [{args.batch_size}, 3, "
             f"{args.size}, {args.size}], batch {args.batch_size}, {args.workers} workers, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads")
    print(setup)
    print(f"{'pipeline':42s} {'images/s':>9s} {'x original':>10s}")
    for row in rows:
        row["x_original"] = row["images_per_s"] / rate_a
        print(f"{row['pipeline']:42s} {row['images_per_s']:9.0f} {row['x_original']:9.1f}x")
    print(f"cache build (one-off, {max(1, args.workers)} processes): {build_s:.1f} s = {args.images / build_s:.0f} images/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": setup, "rows": rows, "cache_build_s": build_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
