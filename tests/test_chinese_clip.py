"""chinese_clip: retrieval metrics and their chance levels, and the command line end to end."""

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.tokenizer import build_chinese_tokenizer

from conftest import REPO, free_port, load_recipe_module, run_script, wait_until_up

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


def test_gpu_config_names_only_known_keys_and_describes_vit_b16():
    # bf16 / tf32 are refused on a machine without a GPU: switch them off to parse here
    config = REPO / "chinese_clip" / "configs" / "clip_vit_b16_gpu.yaml"
    data_args, model_args, training_args = train_module.parse([str(config), "--bf16", "false", "--tf32", "false"])
    assert (model_args.hidden_size, model_args.num_layers, model_args.patch_size) == (768, 12, 16)
    assert training_args.per_device_train_batch_size == 256 and training_args.dataloader_num_workers == 6


def test_collator_pads_text_to_a_multiple_of_8_and_keeps_images_uint8():
    tokenizer = build_chinese_tokenizer(["红色的圆形在左上角"], vocab_size=50, min_frequency=1)
    items = [{"input_ids": tokenizer(text)["input_ids"], "pixel_values": torch.full((4, 4, 3), i, dtype=torch.uint8)}
             for i, text in enumerate(["红色", "红色的圆形在左上角红色的圆形"])]
    batch = train_module.Collator(tokenizer)(items)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"][0].sum() == len(items[0]["input_ids"])
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"][:, 0, 0, 0].tolist() == [0, 1]


def test_padding_to_a_multiple_of_8_changes_no_text_feature():
    """The padding the collator adds (for compiled GPU kernels) is masked out: a caption's features
    are the same padded to its own length or further (README: why the CPU default's result moved)."""
    torch.manual_seed(0)
    model = train_module.build_model(train_module.ModelArguments(hidden_size=32, num_heads=4), vocab_size=40,
                                     image_size=16, pad_token_id=0).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    features = []
    for pad in (0, 3, 11):
        padded = torch.cat([ids, torch.zeros(1, pad, dtype=torch.long)], dim=1)
        with torch.no_grad():
            out = model.get_text_features(input_ids=padded, attention_mask=(padded != 0).long())
        features.append(getattr(out, "pooler_output", out))
    assert all(torch.allclose(features[0], f, atol=1e-5) for f in features[1:])
    unmasked = model.get_text_features(input_ids=torch.cat([ids, torch.zeros(1, 11, dtype=torch.long)], dim=1))
    assert not torch.allclose(features[0], getattr(unmasked, "pooler_output", unmasked), atol=1e-3)  # mask matters


def test_prepare_drops_a_broken_image_from_a_user_csv(tmp_path):
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



def test_prepare_splits_one_input_by_image(tmp_path):
    """--input: one folder of CSVs split here; every caption of an image in one split, seeded."""
    user = tmp_path / "user"
    (user / "img").mkdir(parents=True)
    rows = []
    for i in range(40):
        Image.new("RGB", (40, 30), (6 * i, 100, 240 - 6 * i)).save(user / "img" / f"{i}.jpg")
        rows += [(f"第{i}张图", f"img/{i}.jpg"), (f"又一张：{i}", f"img/{i}.jpg")]  # two captions per image
    for part in (0, 1):
        with (user / f"part{part}.csv").open("w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([("text", "image_path"), *rows[part::2]])

    def prepare(out):
        run_script("chinese_clip/prepare_data.py", "--input", user, "--output_dir", out, "--image_size", "32",
                   "--workers", "1", "--valid_ratio", "0.1", "--test_ratio", "0.1")
        return {split: list(csv.DictReader((out / f"{split}.csv").open(encoding="utf-8")))
                for split in ("train", "valid", "test")}

    splits = prepare(tmp_path / "a")
    images = {split: {r["image_path"] for r in got} for split, got in splits.items()}
    assert [len(images[s]) for s in ("train", "valid", "test")] == [32, 4, 4]
    assert sum(len(got) for got in splits.values()) == 80  # every row, each image with both captions
    assert not (images["train"] & images["valid"]) and not (images["train"] & images["test"])
    assert all(len(got) == 2 * len(images[split]) for split, got in splits.items())
    assert prepare(tmp_path / "b") == splits  # the same seed, the same split
    refused = run_script("chinese_clip/prepare_data.py", "--input", user, "--train", user / "part0.csv",
                         "--output_dir", tmp_path / "c", check=False)
    assert refused.returncode == 2 and "not both" in refused.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The built-in synthetic set, tiny, and a tiny CLIP trained on it."""
    root = tmp_path_factory.mktemp("clip")
    run_script("chinese_clip/prepare_data.py", "--output_dir", root / "data", "--image_size", "32",
               "--synthetic_size", "256", "64", "64", "--workers", "1")
    run_script("chinese_clip/train.py", "--data_dir", root / "data", "--output_dir", root / "model", "--hidden_size", "32",
               "--num_layers", "1", "--num_heads", "2", "--patch_size", "8", "--projection_dim", "32",
               "--num_train_epochs", "6", "--per_device_train_batch_size", "32", "--learning_rate", "2e-3",
               "--logging_steps", "8", "--disable_tqdm", "true")
    return root


def test_training_lowers_the_loss_and_writes_metrics(trained):
    out = trained / "model"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "loss.png").stat().st_size > 10_000  # the loss curves beside metrics.json
    assert metrics["train"]["last_logged_loss"] < metrics["train"]["first_logged_loss"]
    assert metrics["eval_pairs"] == 64
    for name in ("image_to_text_recall@1", "text_to_image_recall@5"):
        assert 0 <= metrics[name] <= 1 and 0 < metrics[name + "_chance"] < 1
    assert 0 <= metrics["zero_shot_colour_accuracy"] <= 1 and metrics["zero_shot_colour_chance"] == pytest.approx(1 / 6)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_predict_ranks_texts_and_searches_a_folder_with_a_reused_index(trained, tmp_path):
    predict = load_recipe_module("chinese_clip", "predict")
    searcher = predict.CLIPSearcher(trained / "model", device="cpu")
    image = trained / "data/source/images/test/00000.jpg"
    ranked = searcher.rank_texts(image, ["左上角有一个红色的圆形", "图中有两个蓝色的正方形"])
    assert sum(p for _, p in ranked) == pytest.approx(1.0) and ranked[0][1] >= ranked[1][1]
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes((trained / f"data/source/images/test/{i:05d}.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"nope")
    index = tmp_path / "index.npz"
    first = searcher.search("左上角有一个红色的圆形", folder, top_k=3, index_path=index)
    assert len(first) == 3 and all(p.name != "broken.jpg" for p, _ in first)
    assert [s for _, s in first] == sorted([s for _, s in first], reverse=True)
    paths, embeddings = searcher.index_folder(folder, index)
    assert len(paths) == 5 and np.load(index)["embeddings"].shape == tuple(embeddings.shape)
    # the cached embedding of an image equals a fresh one
    fresh = searcher.embed_images(searcher.load(paths[0])[None])[0]
    assert torch.allclose(embeddings[0], fresh, atol=1e-5)
    # the search's answer is the three images whose fresh embeddings are closest to the text's
    fresh = searcher.embed_images(np.stack([searcher.load(folder / f"{i}.jpg") for i in range(5)]))
    scores = (fresh @ searcher.embed_texts(["左上角有一个红色的圆形"])[0]).tolist()
    best = sorted(range(5), key=lambda i: -scores[i])[:3]
    assert [p.name for p, _ in first] == [f"{i}.jpg" for i in best]
    assert [s for _, s in first] == pytest.approx([scores[i] for i in best], abs=1e-5)
    result = run_script("chinese_clip/predict.py", "--model", trained / "model", check=False)
    assert result.returncode == 2 and "either --image" in result.stderr


def test_app_answers_over_http(trained):
    from gradio_client import Client, handle_file

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "chinese_clip/app.py"), "--model", str(trained / "model"), "--port", str(port),
         "--image_dir", str(trained / "data/source/images/test"), "--device", "cpu"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process)
        client = Client(url, verbose=False)
        label = client.predict(handle_file(str(trained / "data/source/images/test/00001.jpg")),
                               "左下角有一个紫色的菱形\n图中有两个蓝色的正方形", api_name="/rank")
        confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
        assert set(confidences) == {"左下角有一个紫色的菱形", "图中有两个蓝色的正方形"}
        assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-3)
        gallery = client.predict("左上角有一个红色的圆形", 4, api_name="/search")
        predict = load_recipe_module("chinese_clip", "predict")
        expected = predict.CLIPSearcher(trained / "model", device="cpu").search(
            "左上角有一个红色的圆形", trained / "data/source/images/test", top_k=4, index_path=trained / "index.npz")
        assert [item["caption"] for item in gallery] == [f"{score:.3f}" for _, score in expected]
        assert [Path(item["image"]).name for item in gallery] == [path.name for path, _ in expected]
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_local_towers_load_exactly_and_a_mismatched_tower_is_refused(tmp_path):
    from transformers import (
        BertConfig,
        BertModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        ViTConfig,
        ViTModel,
    )

    from common.errors import UserError

    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(BertConfig(vocab_size=50, **sizes)).save_pretrained(tmp_path / "bert")
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **sizes)).save_pretrained(tmp_path / "clip_vision")
    ViTModel(ViTConfig(image_size=32, patch_size=8, **sizes)).save_pretrained(tmp_path / "vit")
    args = train_module.ModelArguments(text_model=str(tmp_path / "bert"), vision_model=str(tmp_path / "clip_vision"),
                                       projection_dim=16)
    model = train_module.build_model(args, vocab_size=50, image_size=32, pad_token_id=0)
    bert = BertModel.from_pretrained(tmp_path / "bert")
    vision = CLIPVisionModel.from_pretrained(tmp_path / "clip_vision")
    vision = getattr(vision, "vision_model", vision)  # nested in older transformers
    assert torch.equal(model.text_model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert torch.equal(model.vision_model.embeddings.patch_embedding.weight, vision.embeddings.patch_embedding.weight)
    args.vision_model = str(tmp_path / "vit")
    with pytest.raises(UserError, match="CLIP / Chinese-CLIP vision tower"):
        train_module.build_model(args, vocab_size=50, image_size=32, pad_token_id=0)
