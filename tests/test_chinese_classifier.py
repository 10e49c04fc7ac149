"""chinese_classifier: cleaning logic, clear errors on bad input, and the whole path
prepare -> train -> predict -> serve (real uvicorn) -> ONNX on a tiny configuration."""

import json
import subprocess
import sys

import httpx
import pandas as pd
import pytest

from common.errors import UserError

from conftest import REPO, free_port, load_recipe_module, run_script, wait_until_up

prepare_data = load_recipe_module("chinese_classifier", "prepare_data")
clean, encode_labels, split = prepare_data.clean, prepare_data.encode_labels, prepare_data.split


def frame(rows):
    return pd.DataFrame({"label": [r[0] for r in rows], "text": [r[1] for r in rows],
                         "source": [f"f.csv row {i + 1}" for i in range(len(rows))]})


# ------------------------------------------------------------------------ cleaning
def test_clean_drops_empty_duplicate_and_conflicting_rows():
    rows = [("1", " 很好 "), ("1", "很好"), ("0", "很差"), ("1", "很差"), ("0", "一般"),
            ("", "没有标签"), ("1", "   "), ("0", "太差了")]
    cleaned, names, report = clean(frame(rows), None)
    assert report["rows_read"] == 8
    assert report["dropped"] == {"empty text or label": 2, "exact duplicate": 1,
                                 "same text, conflicting labels": 2}
    assert sorted(cleaned["text"]) == ["一般", "太差了", "很好"]  # stripped, "很差" gone entirely
    assert names == ["0", "1"]
    assert cleaned.set_index("text")["label"].to_dict() == {"很好": 1, "一般": 0, "太差了": 0}


def test_declared_label_names_map_to_ids_and_unknown_labels_fail_with_the_row():
    ids, names = encode_labels(frame([("neg", "a"), ("pos", "b"), ("1", "c")]), ["neg", "pos"])
    assert ids.tolist() == [0, 1, 1] and names == ["neg", "pos"]
    with pytest.raises(UserError, match="f.csv row 2: label 'postive' is neither a declared name"):
        encode_labels(frame([("neg", "a"), ("postive", "b")]), ["neg", "pos"])
    with pytest.raises(UserError, match=r"f.csv row 1: label 'neg' is not an integer.*--labels neg pos"):
        encode_labels(frame([("neg", "a"), ("pos", "b")]), None)
    with pytest.raises(UserError, match="label '1.5' is not an integer"):
        encode_labels(frame([("0", "a"), ("1.5", "b")]), None)


def test_split_never_puts_a_text_in_two_splits_and_keeps_label_shares():
    # Inputs full of duplicates that differ only by whitespace: the original recipe's leak.
    rows = [(str(i % 2), f"评论{i}") for i in range(1000)] + [(str(i % 2), f" 评论{i} ") for i in range(500)]
    cleaned, _, report = clean(frame(rows), None)
    assert report["dropped"]["exact duplicate"] == 500
    splits = split(cleaned, 0.1, 0.1, seed=0)
    texts = [set(part["text"]) for part in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert [len(p) for p in splits.values()] == [800, 100, 100]
    for part in splits.values():
        assert part["label"].mean() == pytest.approx(0.5, abs=0.02)
    again = split(cleaned, 0.1, 0.1, seed=0)
    assert all(a.equals(b) for a, b in zip(splits.values(), again.values()))


# ---------------------------------------------------------------- CLI bad input
@pytest.mark.parametrize("name,content,message", [
    ("nolabel.csv", "text\n很好\n", "missing column(s) label"),
    ("empty.csv", "", "empty file"),
    ("gbk.csv", b"label,text\n1," + "很好".encode("gbk") + b"\n", "line 2 is not valid UTF-8"),
    ("badlabel.csv", "label,text\n1,很好\npositive,不错\n", "row 2: label 'positive' is not an integer"),
])
def test_bad_input_ends_with_one_clear_message(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run_script("chinese_classifier/prepare_data.py", "--input", path,
                        "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and name in result.stderr
    assert message in result.stderr


def test_train_without_prepared_data_says_what_to_run(tmp_path):
    result = run_script("chinese_classifier/train.py", "--data_dir", tmp_path, "--output_dir",
                        tmp_path / "o", check=False)
    assert result.returncode == 2 and "run chinese_classifier/prepare_data.py first" in result.stderr


def test_unknown_config_key_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hidden_sise: 32\n")
    result = run_script("chinese_classifier/train.py", cfg, check=False)
    assert result.returncode == 2 and "unknown key(s): hidden_sise" in result.stderr


# ------------------------------------------------------------------ end to end
TINY = """
architecture: modernbert
pretrain_epochs: 0.5
max_length: 64
max_train_samples: 3000
vocab_size: 3000
hidden_size: 32
num_hidden_layers: 1
num_attention_heads: 2
intermediate_size: 64
num_train_epochs: 2
per_device_train_batch_size: 32
per_device_eval_batch_size: 256
learning_rate: 3.0e-3
warmup_steps: 10
logging_steps: 10
disable_tqdm: true
seed: 0
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    data, out = root / "data", root / "model"
    prepared = run_script("chinese_classifier/prepare_data.py", "--output_dir", data)
    config = root / "tiny.yaml"
    config.write_text(TINY)
    run_script("chinese_classifier/train.py", config, "--data_dir", data, "--output_dir", out)
    return {"root": root, "data": data, "model": out, "prepare_stdout": prepared.stdout}


def test_prepare_reports_and_writes_disjoint_splits(trained):
    assert "dropped (exact duplicate)" in trained["prepare_stdout"]
    splits = {s: pd.read_csv(trained["data"] / f"{s}.csv") for s in ("train", "valid", "test")}
    report = json.loads((trained["data"] / "report.json").read_text())
    assert report["dropped"]["exact duplicate"] > 10000  # about half the reviews repeat
    total = sum(len(s) for s in splits.values())
    assert total == report["rows_read"] - sum(report["dropped"].values())
    assert abs(len(splits["test"]) / total - 0.1) < 0.01
    assert not set(splits["train"]["text"]) & (set(splits["valid"]["text"]) | set(splits["test"]["text"]))
    assert json.loads((trained["data"] / "labels.json").read_text())["names"] == ["negative", "positive"]


def test_training_learns_and_writes_metrics(trained):
    metrics = json.loads((trained["model"] / "metrics.json").read_text())
    assert (trained["model"] / "loss.png").stat().st_size > 10_000  # the loss curves beside metrics.json
    assert metrics["train"]["loss"] < metrics["train"]["first_logged_loss"] - 0.05
    mlm = metrics["mlm_pretraining"]
    assert mlm["epochs"] == pytest.approx(0.5, abs=0.01)
    assert mlm["loss"] < mlm["first_logged_loss"]  # the masked-LM step learnt something
    assert mlm["sequences"] >= 3000  # long reviews are chunked, not cut
    # 3,000 reviews, a 1-layer 32-wide model, ~200 steps: well above chance (0.52)
    assert metrics["model"]["test_accuracy"] > 0.65
    assert 0.6 < metrics["tfidf_logreg_baseline"]["test_accuracy"] <= 1.0
    matrix = metrics["confusion_matrix"]
    assert sum(map(sum, matrix)) == metrics["rows"]["test"]
    assert (matrix[0][0] + matrix[1][1]) / metrics["rows"]["test"] == pytest.approx(metrics["model"]["test_accuracy"])
    assert (trained["model"] / "confusion_matrix.png").stat().st_size > 1000
    assert (trained["model"] / "model.safetensors").is_file()


def test_predict_cli_gives_labels_and_probabilities(trained):
    texts = trained["root"] / "texts.csv"
    pd.DataFrame({"text": ["质量很好，非常满意", "太差了，不推荐"]}).to_csv(texts, index=False)
    out = trained["root"] / "predictions.csv"
    run_script("chinese_classifier/predict.py", "--model", trained["model"], "--file", texts, "--output", out)
    predictions = pd.read_csv(out)
    assert list(predictions["text"]) == ["质量很好，非常满意", "太差了，不推荐"]
    assert set(predictions["label"]) <= {"negative", "positive"}
    assert (predictions["p_negative"] + predictions["p_positive"]).round(5).eq(1).all()
    assert (predictions["probability"] >= 0.5).all()

    # on the test split predict.py is the model train.py evaluated: its accuracy is metrics.json's (a
    # label lost, swapped or a head left untrained would not be), its label the likelier class
    names = json.loads((trained["data"] / "labels.json").read_text())["names"]
    test = pd.read_csv(trained["data"] / "test.csv")
    run_script("chinese_classifier/predict.py", "--model", trained["model"], "--file", trained["data"] / "test.csv",
               "--output", out)
    predictions = pd.read_csv(out)
    assert (predictions["label"] == [names[p] for p in predictions[["p_negative", "p_positive"]].to_numpy().argmax(1)]).all()
    accuracy = (predictions["label"] == test["label"].map(names.__getitem__)).mean()
    metrics = json.loads((trained["model"] / "metrics.json").read_text())
    assert accuracy == pytest.approx(metrics["model"]["test_accuracy"], abs=1.5 / len(test))  # (one near-tie may flip)

    printed = run_script("chinese_classifier/predict.py", "--model", trained["model"], "很好")
    line = json.loads(printed.stdout.strip().splitlines()[-1])
    assert line["text"] == "很好" and line["label"] in {"negative", "positive"}


@pytest.fixture(scope="module")
def server(trained):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "chinese_classifier/serve.py"), "--model", str(trained["model"]),
         "--port", str(port), "--max_items", "4", "--max_chars", "50"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", process)
    yield url
    process.terminate()
    process.wait(timeout=10)


def test_server_answers_good_requests(server, trained):
    health = httpx.get(f"{server}/health").json()
    assert health == {"status": "ok", "labels": ["negative", "positive"]}
    one = httpx.post(f"{server}/predict", json={"text": "非常好用，推荐"})
    assert one.status_code == 200
    [prediction] = one.json()["predictions"]
    assert prediction["label"] in ("negative", "positive")
    assert sum(prediction["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    batch = httpx.post(f"{server}/predict", json={"texts": ["非常好用，推荐", "很差"]}).json()["predictions"]
    # Same text, same answer, alone or padded in a batch (up to float rounding).
    assert len(batch) == 2 and batch[0]["label"] == prediction["label"]
    assert batch[0]["probability"] == pytest.approx(prediction["probability"], abs=1e-5)
    # the server answers what predict.py says for the same texts
    printed = run_script("chinese_classifier/predict.py", "--model", trained["model"], "非常好用，推荐", "很差")
    for line, served in zip(printed.stdout.strip().splitlines()[-2:], batch, strict=True):
        offline = json.loads(line)
        assert served["label"] == offline["label"]
        assert served["probability"] == pytest.approx(offline["probability"], abs=1e-5)


@pytest.mark.parametrize("body,status", [
    ({"text": ""}, 422),
    ({"text": "   "}, 422),
    ({}, 422),
    ({"text": "好", "texts": ["好"]}, 422),
    ({"texts": []}, 422),
    ({"texts": ["好", 3]}, 422),
    ({"text": 5}, 422),
    ({"texts": ["好"] * 5}, 413),
    ({"text": "好" * 51}, 413),
])
def test_server_rejects_bad_requests_with_4xx(server, body, status):
    response = httpx.post(f"{server}/predict", json=body)
    assert response.status_code == status, response.text


def test_server_rejects_non_json_and_huge_bodies(server):
    assert httpx.post(f"{server}/predict", content=b"not json",
                      headers={"content-type": "application/json"}).status_code == 422
    assert httpx.post(f"{server}/predict", content=b"x" * 100_000,
                      headers={"content-type": "application/json"}).status_code == 413


def test_onnx_export_matches_pytorch(trained):
    result = run_script("chinese_classifier/export_onnx.py", "--model", trained["model"],
                        "--data_dir", trained["data"], "--latency_samples", "20")
    report = json.loads((trained["model"] / "onnx_report.json").read_text())
    assert report["texts_checked"] == len(pd.read_csv(trained["data"] / "test.csv"))
    assert report["max_abs_probability_diff"] < 1e-4
    assert report["same_predicted_label"] == 1.0
    assert report["latency_ms_batch1_median"]["onnxruntime"] > 0
    assert "parity on" in result.stdout


def test_fine_tunes_a_local_pretrained_model(trained, tmp_path):
    """--model_name_or_path takes a local directory (as a downloaded bert-base-chinese is)."""
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    from common.tokenizer import build_chinese_tokenizer

    pretrained = tmp_path / "local-bert"
    train_texts = pd.read_csv(trained["data"] / "train.csv")["text"].tolist()
    tokenizer = build_chinese_tokenizer(train_texts[:2000], vocab_size=2000)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)

    out = tmp_path / "finetuned"
    # learning_rate 0: the saved encoder must then be exactly the local one, not a fresh init.
    run_script("chinese_classifier/train.py", "--model_name_or_path", pretrained, "--data_dir", trained["data"],
               "--output_dir", out, "--max_train_samples", "200", "--num_train_epochs", "1",
               "--learning_rate", "0", "--run_baseline", "false", "--max_length", "32", "--disable_tqdm", "true")
    before, after = load_file(pretrained / "model.safetensors"), load_file(out / "model.safetensors")
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(before[key], after[key])
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert "tfidf_logreg_baseline" not in metrics and 0 <= metrics["model"]["test_accuracy"] <= 1
