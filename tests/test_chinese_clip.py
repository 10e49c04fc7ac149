"""chinese_clip: retrieval metrics and their chance levels, and the command line end to end."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_recipe_module, run_script

train_module = load_recipe_module("chinese_clip", "train")


def test_chance_recall_matches_enumeration():
    # 5 candidates, a query with 2 equal ones, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10
    assert train_module.chance_recall(np.array([2]), 5, 2) == pytest.approx(0.7)
    hits = [any(c in (0, 1) for c in pick) for pick in itertools.combinations(range(6), 3)]
    assert train_module.chance_recall(np.array([2]), 6, 3) == pytest.approx(np.mean(hits))
    assert train_module.chance_recall(np.array([1, 3]), 6, 1) == pytest.approx((1 / 6 + 3 / 6) / 2)


def test_retrieval_counts_any_item_with_the_same_caption_as_a_hit():
    texts = ["红色的圆形", "蓝色的方形", "红色的圆形", "绿色的菱形"]
    similarity = torch.eye(4)
    similarity[0, 0], similarity[0, 2] = 0.5, 0.9  # image 0 prefers text 2: the same caption
    metrics = train_module.retrieval_metrics(similarity, texts, ks=(1,))
    assert metrics["image_to_text_recall@1"] == 1.0
    similarity[1] = torch.tensor([0.9, 0.1, 0.0, 0.0])  # image 1 prefers a different caption
    assert train_module.retrieval_metrics(similarity, texts, ks=(1,))["image_to_text_recall@1"] == 0.75


def test_prepare_and_train_end_to_end(tmp_path):
    # the user's CSV layout, with a broken image among good ones
    user = tmp_path / "user"
    (user / "img").mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.new("RGB", (40, 30), (20 * i, 100, 200 - 10 * i)).save(user / "img" / f"{i}.jpg")
        rows.append((f"第{i}张图", f"img/{i}.jpg"))
    (user / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append(("坏图", "img/broken.jpg"))
    for split in ("train", "valid", "test"):
        with (user / f"{split}.csv").open("w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([("text", "image_path"), *rows])
    data = tmp_path / "data"
    result = run_script("chinese_clip/prepare_data.py", "--train", user / "train.csv", "--valid", user / "valid.csv",
                        "--test", user / "test.csv", "--output_dir", data, "--image_size", "32", "--workers", "2")
    report = json.loads((data / "report.json").read_text())
    assert report["splits"]["train"] == {"read": 13, "kept": 12, "ok": 12, "unreadable": 1}
    assert "dropped: {'unreadable': 1}" in result.stdout

    # the built-in synthetic set, tiny, then training: the loss falls, metrics are written
    synthetic = tmp_path / "synthetic"
    run_script("chinese_clip/prepare_data.py", "--output_dir", synthetic, "--image_size", "32",
               "--synthetic_size", "256", "64", "64", "--workers", "1")
    out = tmp_path / "model"
    run_script("chinese_clip/train.py", "--data_dir", synthetic, "--output_dir", out, "--hidden_size", "32",
               "--num_layers", "1", "--num_heads", "2", "--patch_size", "8", "--projection_dim", "32",
               "--num_train_epochs", "6", "--per_device_train_batch_size", "32", "--learning_rate", "2e-3",
               "--logging_steps", "8", "--disable_tqdm", "true")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["last_logged_loss"] < metrics["train"]["first_logged_loss"]
    assert metrics["eval_pairs"] == 64
    for key in ("image_to_text_recall@1", "text_to_image_recall@5", "zero_shot_colour_accuracy"):
        assert 0 <= metrics[key] <= 1 and 0 < metrics[key.replace("accuracy", "chance") if "zero" in key else key + "_chance"] < 1
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
