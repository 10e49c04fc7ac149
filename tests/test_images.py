"""common/images.py: verification of bad images, the memory-mapped cache, the synthetic set."""

import csv
import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from common.images import (
    COLOURS,
    ImageCache,
    ImageText,
    build_image_cache,
    load_square,
    make_synthetic_image_text,
    normalize,
    read_image_csv,
    to_rgb,
    verify_images,
)


@pytest.fixture
def image_folder(tmp_path):
    """One good image of each kind users have, and one of each way a file can be broken."""
    good = Image.new("RGB", (50, 40), (10, 200, 30))
    good.save(tmp_path / "good.jpg")
    Image.new("L", (40, 40), 128).save(tmp_path / "grey.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1  # index 1 (red) is fully transparent
    palette.save(tmp_path / "palette.png", transparency=1)
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 0))
    rgba.save(tmp_path / "alpha.png")
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(buffer, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    return tmp_path


def test_verification_drops_broken_images_and_counts_reasons(image_folder):
    names = ["good.jpg", "grey.png", "cmyk.jpg", "palette.png", "alpha.png", "truncated.jpg", "empty.jpg",
             "text.jpg", "tiny.png", "missing.jpg"]
    rows = [ImageText(f"图{i}", image_folder / name) for i, name in enumerate(names)]
    rows.append(ImageText("", image_folder / "good.jpg"))
    for workers in (1, 2):
        kept, report = verify_images(rows, min_size=16, workers=workers)
        assert [row.path.name for row in kept] == ["good.jpg", "grey.png", "cmyk.jpg", "palette.png", "alpha.png"]
        assert report == {"ok": 1, "converted": 4, "unreadable": 1, "empty_file": 1, "not_an_image": 1,
                          "too_small": 1, "missing": 1, "empty_text": 1, "kept": 5}


def test_conversion_to_rgb(image_folder):
    cmyk = to_rgb(Image.open(image_folder / "cmyk.jpg"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((5, 5))[0] > 200 and cmyk.getpixel((5, 5))[1] < 60
    assert to_rgb(Image.open(image_folder / "palette.png")).getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    assert to_rgb(Image.open(image_folder / "alpha.png")).getpixel((5, 5)) == (255, 255, 255)
    assert to_rgb(Image.open(image_folder / "grey.png")).getpixel((5, 5)) == (128, 128, 128)


def test_cache_round_trip_equals_direct_decoding(image_folder, tmp_path):
    paths = [image_folder / n for n in ("good.jpg", "grey.png", "cmyk.jpg", "palette.png")]
    build_image_cache(paths, tmp_path / "cache", size=24, workers=2)
    cache = ImageCache(tmp_path / "cache")
    assert len(cache) == 4 and cache.size == 24
    for i, path in enumerate(paths):
        assert np.array_equal(cache[i], load_square(path, 24))
    assert cache[[0, 2]].shape == (2, 24, 24, 3) and cache[[0, 2]].dtype == np.uint8
    # shortest side to 24 then a centre crop: a 50 x 40 green image stays green everywhere
    assert np.abs(cache[0].astype(int) - [10, 200, 30]).max() <= 3
    with pytest.raises(UserError, match="no image cache"):
        ImageCache(tmp_path / "nothing")


def test_normalize_matches_the_formula():
    pixels = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = normalize(pixels, mean, std)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    expected = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_read_image_csv_resolves_relative_paths_and_names_missing_columns(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "data.csv").write_text("text,image_path\n红色的圆形,sub/a.jpg\n,/abs/b.jpg\n", encoding="utf-8")
    rows = read_image_csv(tmp_path / "data.csv")
    assert rows == [ImageText("红色的圆形", tmp_path / "sub/a.jpg"), ImageText("", Path("/abs/b.jpg"))]
    (tmp_path / "bad.csv").write_text("caption,file\nx,y\n", encoding="utf-8")
    with pytest.raises(UserError, match="missing column"):
        read_image_csv(tmp_path / "bad.csv")


def test_synthetic_set_is_deterministic_fast_and_captions_match_the_pixels(tmp_path):
    start = time.time()
    first = make_synthetic_image_text(tmp_path / "a", {"train": 200, "test": 50}, size=64, seed=3)
    elapsed = time.time() - start
    second = make_synthetic_image_text(tmp_path / "b", {"train": 200, "test": 50}, size=64, seed=3)
    assert elapsed < 10
    assert first["train"].read_text() == second["train"].read_text()
    assert (tmp_path / "a/images/train/00007.jpg").read_bytes() == (tmp_path / "b/images/train/00007.jpg").read_bytes()
    with first["train"].open(encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 200 and {r["kind"] for r in records} == {"single", "count", "relation"}
    kept, report = verify_images(read_image_csv(first["train"]))
    assert report["kept"] == 200
    # a single shape drawn in a corner: that quadrant holds its colour, the opposite one none of it
    quadrant = {"左上角": (slice(0, 32), slice(0, 32)), "右上角": (slice(0, 32), slice(32, 64)),
                "左下角": (slice(32, 64), slice(0, 32)), "右下角": (slice(32, 64), slice(32, 64))}
    opposite = {"左上角": "右下角", "右上角": "左下角", "左下角": "右上角", "右下角": "左上角"}
    singles = [r for r in records if r["kind"] == "single"][:20]
    for r in singles:
        assert r["text"] == f"{r['position']}有一个{r['colour']}的{r['shape']}"
        pixels = np.asarray(Image.open(tmp_path / "a" / r["image_path"])).astype(int)
        close = np.abs(pixels - np.array(COLOURS[r["colour"]])).sum(-1) < 90
        assert close[quadrant[r["position"]]].mean() > 0.1
        assert close[quadrant[opposite[r["position"]]]].mean() < 0.01
