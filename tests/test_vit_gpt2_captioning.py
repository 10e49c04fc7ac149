"""vit_gpt2_captioning: label masking, caption scoring, and the command line end to end."""

import json
import subprocess
import sys

import pytest
import torch

from common.tokenizer import build_chinese_tokenizer

from conftest import REPO, free_port, load_recipe_module, run_script, wait_until_up

train_module = load_recipe_module("vit_gpt2_captioning", "train")


def test_padding_labels_are_ignored_by_the_loss():
    tokenizer = build_chinese_tokenizer(["左上角有一个红色的圆形", "图中有两个蓝色的正方形"], vocab_size=100, min_frequency=1)
    model = train_module.build_model(train_module.ModelArguments(hidden_size=32, num_layers=1, num_heads=2), tokenizer, 32)
    items = [{"labels": [5, 9, 11, tokenizer.eos_token_id], "pixel_values": torch.zeros(32, 32, 3, dtype=torch.uint8)},
             {"labels": [7, tokenizer.eos_token_id], "pixel_values": torch.full((32, 32, 3), 200, dtype=torch.uint8)}]
    batch = train_module.collate(items)
    assert batch["labels"].tolist() == [[5, 9, 11, tokenizer.eos_token_id], [7, tokenizer.eos_token_id, -100, -100]]
    pixels = train_module.normalize(batch["pixel_values"], train_module.VIT_MEAN, train_module.VIT_STD)
    out = model(pixel_values=pixels, labels=batch["labels"])
    real = batch["labels"] != -100
    manual = torch.nn.functional.cross_entropy(out.logits[real], batch["labels"][real])
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)  # the mean over the 6 real tokens only
    # decoder inputs: [BOS] then the labels shifted right, padding as the pad id, not -100
    shifted = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    assert shifted[:, 0].tolist() == [tokenizer.bos_token_id] * 2 and (shifted >= 0).all()


def test_attribute_parsing_and_scores():
    parse = train_module.attribute_of
    assert parse("左上角有一个红色的圆形", "position") == "左上角" and parse("左上角有一个红色的圆形", "count") == "一"
    assert parse("红色的圆形在蓝色的三角形的左边", "shape") == "圆形"  # the first shape named is the subject
    assert parse("图中有三个蓝色的正方形", "count") == "三" and parse("图中有三个蓝色的正方形", "position") == ""
    records = [{"text": "左上角有一个红色的圆形", "shape": "圆形"}, {"text": "图中有两个蓝色的正方形", "shape": "正方形"}]
    scores = train_module.caption_scores(["左上角有一个红色的圆形", "图中有两个红色的菱形"], records)
    assert scores["exact_match"] == 0.5 and scores["colour_accuracy"] == 0.5 and scores["shape_accuracy"] == 0.5
    assert scores["position_accuracy"] == 1.0 and scores["count_accuracy"] == 1.0  # position scored on captions that have one


def test_prepare_train_predict_and_app_end_to_end(tmp_path):
    data, out = tmp_path / "data", tmp_path / "model"
    run_script("vit_gpt2_captioning/prepare_data.py", "--output_dir", data, "--image_size", "32",
               "--synthetic_size", "192", "32", "48", "--workers", "1")
    result = run_script("vit_gpt2_captioning/train.py", "--data_dir", data, "--output_dir", out, "--hidden_size", "32",
                        "--num_layers", "1", "--num_heads", "2", "--num_train_epochs", "4",
                        "--per_device_train_batch_size", "32", "--learning_rate", "3e-3", "--logging_steps", "6",
                        "--num_beams", "2", "--disable_tqdm", "true")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "loss.png").stat().st_size > 10_000  # the loss curves beside metrics.json
    assert metrics["train"]["last_logged_loss"] < metrics["train"]["first_logged_loss"]
    assert metrics["eval_images"] == 48 and 0 <= metrics["model"]["colour_accuracy"] <= 1
    assert "most-common-caption baseline" in result.stdout
    captions = [e["caption"] for e in metrics["examples"]]
    assert all(" " not in c for c in captions)  # no WordPiece spaces
    image = data / "source/images/test/00000.jpg"
    predicted = run_script("vit_gpt2_captioning/predict.py", image, "--model", out, "--num_beams", "2")
    assert predicted.stdout.strip().split("\t")[1] == metrics["examples"][0]["caption"]  # same model, same search
    bad = run_script("vit_gpt2_captioning/predict.py", tmp_path / "missing.jpg", "--model", out, check=False)
    assert bad.returncode == 2 and "missing" in bad.stderr

    # the gradio app captions the same image the same way over HTTP
    from gradio_client import Client, handle_file

    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "vit_gpt2_captioning/app.py"), "--model", str(out),
                                "--port", str(port), "--device", "cpu"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process)
        caption = Client(url, verbose=False).predict(handle_file(str(image)), 2, 16, api_name="/caption")
        assert caption == metrics["examples"][0]["caption"]
    finally:
        process.terminate()
        process.wait(timeout=20)
