import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from common.data import make_units, unit_texts
from common.errors import UserError
from common.shards import MixedTokens, ShardOptions, TokenShards, write_token_shards
from common.tokenizer import build_chinese_tokenizer

from conftest import REPO, run_script

LINES = ["今天天气很好，我们去公园散步。", "人民日报发表评论文章。", "短", "", "这本书写得很好，推荐大家阅读。",
         "今天天气很好，我们去公园散步。", "物流很快，包装也不错，下次还来。", "经济形势总体平稳，稳中有进。"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_chinese_tokenizer(LINES * 3, vocab_size=500, min_frequency=1)


def write_source(path, tokenizer, inputs, **options):
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path / "tokenizer")
    return write_token_shards(inputs, path, tokenizer, ShardOptions(**options), workers=2)


def all_tokens(source, split):
    index = json.loads((source / "index.json").read_text())
    ids = [np.fromfile(source / split / f"{int(i):05d}.bin", dtype=index["dtype"]) for i in sorted(index["done"], key=int)]
    return np.concatenate(ids).tolist()


def expected_tokens(tokenizer, texts):
    return [t for text in texts for t in (*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)]


def test_units_own_every_line_exactly_once(tmp_path):
    lines = [f"第{i}行" + "字" * (i * 7 % 40) for i in range(60)] + ["很长" * 200, "最后一行"]
    path = tmp_path / "a.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    units = make_units([path], unit_bytes=50)
    assert len(units) > 20 and units[-1]["end"] == path.stat().st_size
    read = [text.rstrip("\n") for unit in units for text in unit_texts(unit, None)]
    assert read == lines


def test_shards_round_trip_txt_jsonl_csv_and_clean(tmp_path, tokenizer):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(LINES[:4]) + "\n", encoding="utf-8")
    with (tmp_path / "in" / "b.jsonl").open("w", encoding="utf-8") as f:
        for text in LINES[4:6]:
            f.write(json.dumps({"text": "\u3000" + text, "other": 1}, ensure_ascii=False) + "\n")
    (tmp_path / "in" / "c.csv").write_text("id,content\n1,\"" + LINES[6] + "\"\n2," + LINES[7] + "\n", encoding="utf-8")
    report = write_source(tmp_path / "out", tokenizer, [tmp_path / "in"], valid_ratio=0.01, min_chars=2)
    assert report["documents_read"] == 8 and report["dropped_empty"] == 1 and report["dropped_too_short"] == 1
    kept = [t for t in LINES if len(t) >= 2]
    assert report["train_documents"] + report["valid_documents"] == len(kept) == 6
    # every kept document exactly once, each followed by eos, in input order within a split
    train, valid = all_tokens(tmp_path / "out", "train"), all_tokens(tmp_path / "out", "valid")
    assert sorted(train + valid) == sorted(expected_tokens(tokenizer, kept))
    assert report["train_tokens"] == len(train) and json.loads((tmp_path / "out" / "index.json").read_text())["dtype"] == "uint16"
    blocks = TokenShards(tmp_path / "out", "train", block_size=4)
    assert len(blocks) == len(train) // 4  # one unit per file here: tails are per shard
    assert blocks[0]["input_ids"].dtype == torch.int64


def test_large_vocabulary_is_stored_as_uint32(tmp_path, tokenizer):
    big = build_chinese_tokenizer(LINES, vocab_size=500, min_frequency=1)
    big.add_tokens([f"<extra_{i}>" for i in range(65_600)])
    (tmp_path / "a.txt").write_text("<extra_65550>" + LINES[0] + "\n", encoding="utf-8")
    write_source(tmp_path / "out", big, [tmp_path / "a.txt"], valid_ratio=0.01, min_chars=1)
    assert json.loads((tmp_path / "out" / "index.json").read_text())["dtype"] == "uint32"
    assert all_tokens(tmp_path / "out", "train") == expected_tokens(big, ["<extra_65550>" + LINES[0]])
    assert max(all_tokens(tmp_path / "out", "train")) > 65_535


def test_interrupted_prepare_resumes_only_the_unfinished_unit(tmp_path, tokenizer):
    text = "\n".join(f"{LINES[i % 8]}{i}" for i in range(400)) + "\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    options = dict(unit_bytes=2000, valid_ratio=0.1, min_chars=2)
    first = write_source(tmp_path / "out", tokenizer, [tmp_path / "a.txt"], **options)
    assert first["units"] >= 4
    original = {p.name: p.read_bytes() for p in (tmp_path / "out" / "train").iterdir()}
    # an interruption during unit 2: its shards half written under the temporary name, not in the index
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    del index["done"]["2"]
    index["complete"] = False
    (tmp_path / "out" / "index.json").write_text(json.dumps(index))
    train2 = tmp_path / "out" / "train" / "00002.bin"
    train2.rename(train2.with_suffix(".tmp"))
    with pytest.raises(UserError, match="did not finish"):
        TokenShards(tmp_path / "out", "train", 8)
    again = write_source(tmp_path / "out", tokenizer, [tmp_path / "a.txt"], **options)
    assert again["units_this_run"] == 1 and again["train_tokens"] == first["train_tokens"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "train").iterdir()} == original
    # other inputs into the same folder are refused, not mixed in
    (tmp_path / "a.txt").write_text(text + "新的一行文字\n", encoding="utf-8")
    with pytest.raises(UserError, match="other inputs"):
        write_source(tmp_path / "out", tokenizer, [tmp_path / "a.txt"], **options)


def test_dedup_keeps_the_first_copy_across_units(tmp_path, tokenizer):
    lines = [f"第{i}条不同的文字内容" for i in range(100)]
    (tmp_path / "a.txt").write_text("\n".join(lines + lines[:30]) + "\n", encoding="utf-8")
    report = write_source(tmp_path / "out", tokenizer, [tmp_path / "a.txt"], unit_bytes=600, dedup=True,
                          valid_ratio=0.01, min_chars=2)
    assert report["units"] > 3 and report["dropped_duplicate"] == 30
    assert report["train_documents"] + report["valid_documents"] == 100


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, tokenizer):
    """Source a holds only 甲乙 text, b only 丙丁: a block's source shows in its tokens."""
    root = tmp_path_factory.mktemp("mix")
    tok = build_chinese_tokenizer(["甲乙丙丁"] * 5, vocab_size=100, min_frequency=1)
    rng = np.random.default_rng(0)
    for name, chars in (("a", "甲乙"), ("b", "丙丁")):
        lines = ("".join(rng.choice(list(chars), size=6 + i % 9)) for i in range(300))
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_source(root / name, tok, [root / f"{name}.txt"], valid_ratio=0.1, min_chars=1)
    return root, tok


def test_mixing_follows_the_schedule_through_two_loader_workers(two_sources):
    root, tok = two_sources
    sources = [TokenShards(root / name, "train", 8) for name in ("a", "b")]
    mixed = MixedTokens(sources, ["a", "b"], [2, 1], [1, 4], total_steps=40, global_batch=64, seed=3)
    loader = torch.utils.data.DataLoader(mixed, batch_size=64, num_workers=2)
    a_ids = set(tok("甲乙", add_special_tokens=False)["input_ids"])
    share_a = [float(np.mean([bool(a_ids & set(block.tolist())) for block in batch["input_ids"]])) for batch in loader]
    assert len(share_a) == 40
    # realised = planned within sampling noise (8 steps x 64 samples: sd about 0.02)
    assert np.mean(share_a[:8]) == pytest.approx(mixed.planned(0, 8)["a"], abs=0.06)
    assert np.mean(share_a[-8:]) == pytest.approx(mixed.planned(32, 40)["a"], abs=0.06)
    assert np.mean(share_a[:8]) > 0.55 and np.mean(share_a[-8:]) < 0.3
    # what is logged is exactly what the loader delivered
    assert mixed.proportions(0, 8)["a"] == pytest.approx(np.mean(share_a[:8]))
    # deterministic: the same seed gives the same sequence, another seed another one
    again = MixedTokens(sources, ["a", "b"], [2, 1], [1, 4], total_steps=40, global_batch=64, seed=3)
    other = MixedTokens(sources, ["a", "b"], [2, 1], [1, 4], total_steps=40, global_batch=64, seed=4)
    assert all(torch.equal(mixed[i]["input_ids"], again[i]["input_ids"]) for i in range(0, 2560, 97))
    assert not all(torch.equal(mixed[i]["input_ids"], other[i]["input_ids"]) for i in range(0, 2560, 97))
    with pytest.raises(UserError, match="weights"):
        MixedTokens(sources, ["a", "b"], [1], None, total_steps=4, global_batch=8, seed=0)


TINY = ["--block_size", "32", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
        "--intermediate_size", "64", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--learning_rate", "3e-3", "--warmup_steps", "2", "--max_eval_blocks", "20", "--logging_steps", "1",
        "--dataloader_num_workers", "2"]


def test_resume_gives_the_same_next_batches_and_losses(two_sources, tmp_path):
    root, _ = two_sources
    common = ["--data_dir", root / "a", root / "b", "--mix_weights", "2", "1", "--mix_weights_end", "1", "4",
              "--max_steps", "6", "--save_steps", "3", "--eval_steps", "100", *TINY]
    run_script("model_clm/train.py", *common, "--output_dir", tmp_path / "straight")
    # as if the run had stopped after its step-3 checkpoint
    run_script("model_clm/train.py", *common, "--output_dir", tmp_path / "resumed",
               "--resume_from_checkpoint", tmp_path / "straight" / "checkpoint-3")

    def losses(out):
        history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: (h["loss"], h["mix_a"]) for h in history if "loss" in h}

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert set(resumed) >= {4, 5, 6}
    for step in (4, 5, 6):
        assert resumed[step][0] == pytest.approx(straight[step][0], rel=1e-4)
        assert resumed[step][1] == straight[step][1]


def test_prepare_and_train_on_builtin_data(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    result = run_script("model_clm/prepare_data.py", "--output_dir", data, "--vocab_size", "2000", "--dedup", "true")
    assert "dropped_duplicate" in result.stdout
    reviews = json.loads((data / "reviews" / "report.json").read_text())
    assert reviews["dropped_duplicate"] > 10_000  # the review corpus repeats about half of itself
    # the same command again (make demo-clm, then make demo-sft): the shards are found complete,
    # with the tokenizer the first run built (building anew is not deterministic)
    again = run_script("model_clm/prepare_data.py", "--output_dir", data, "--vocab_size", "2000", "--dedup", "true")
    assert "reusing the tokenizer" in again.stderr
    assert json.loads((data / "reviews" / "report.json").read_text())["train_tokens"] == reviews["train_tokens"]
    run_script("model_clm/train.py", "model_clm/configs/default.yaml", "--data_dir", data / "news", data / "reviews",
               "--output_dir", out, "--max_steps", "40", "--eval_steps", "40", "--save_steps", "40", *TINY)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "loss.png").stat().st_size > 10_000  # the loss curves beside metrics.json
    for name in ("news", "reviews"):
        assert metrics["valid"][name]["after"]["perplexity"] < 0.5 * metrics["valid"][name]["before"]["perplexity"]
    assert metrics["model_type"] == "llama" and metrics["train"]["steps"] == 40
    for window in ("first_10pct", "last_10pct"):
        assert metrics["mix"][window]["realised"]["news"] == pytest.approx(metrics["mix"][window]["planned"]["news"],
                                                                           abs=0.2)  # 4 steps x 8 samples
    assert metrics["mix"]["first_10pct"]["planned"]["news"] > 0.6 > 0.25 > metrics["mix"]["last_10pct"]["planned"]["news"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2


def test_clear_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "好的文本内容"}\n{"text": \n', encoding="utf-8")
    result = run_script("model_clm/prepare_data.py", "--input", tmp_path / "bad.jsonl", "--output_dir", tmp_path / "o",
                        check=False)
    assert result.returncode != 0 and "bad.jsonl: line 2 (byte 31) is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    # two sources whose tokenizers differ cannot be mixed
    for name, texts in (("x", LINES[:3]), ("y", LINES[4:])):
        (tmp_path / f"{name}.txt").write_text("\n".join(texts * 30) + "\n", encoding="utf-8")
        tok = build_chinese_tokenizer(texts, vocab_size=300, min_frequency=1)
        write_source(tmp_path / name, tok, [tmp_path / f"{name}.txt"], valid_ratio=0.3, min_chars=1)
    result = run_script("model_clm/train.py", "--data_dir", tmp_path / "x", tmp_path / "y", "--block_size", "8",
                        "--max_steps", "2", "--output_dir", tmp_path / "o", check=False)
    assert result.returncode != 0 and "different tokenizers" in result.stderr
    result = run_script("model_clm/train.py", "--data_dir", tmp_path / "nothing", check=False)
    assert result.returncode != 0 and "no index.json" in result.stderr and "Traceback" not in result.stderr


def test_deepspeed_zero2_on_two_cpu_processes_matches_one_process(two_sources, tmp_path):
    pytest.importorskip("deepspeed")
    root, _ = two_sources
    common = ["--data_dir", root / "a", "--max_steps", "4", "--eval_steps", "100", "--save_steps", "100",
              "--warmup_steps", "0", *TINY, "--dataloader_num_workers", "0"]
    run_script("model_clm/train.py", *common, "--per_device_train_batch_size", "8", "--output_dir", tmp_path / "one")
    # two processes with 4 sequences each: the same global batch, parameters sharded by ZeRO-2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "model_clm" / "train.py"), *map(str, common), "--per_device_train_batch_size", "4",
               "--output_dir", str(tmp_path / "zero2"), "--use_cpu", "true",
               "--deepspeed", str(REPO / "model_clm" / "configs" / "ds_zero2.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    zero2 = json.loads((tmp_path / "zero2" / "metrics.json").read_text())
    assert zero2["distributed"] == {"world_size": 2, "engine": "DeepSpeedEngine", "zero_stage": 2}
    # equal up to summation order (Adam turns that noise, in near-zero gradients, into small steps)
    for key in ("first_logged_loss", "last_logged_loss"):
        assert zero2["train"][key] == pytest.approx(one["train"][key], rel=2e-4)
    assert one["valid"]["a"]["after"]["loss"] < one["valid"]["a"]["before"]["loss"] - 0.01, one["valid"]  # weights moved
    # (after 4 Adam steps on a 100-token vocabulary the order noise reaches 4e-4 of the held-out loss)
    assert zero2["valid"]["a"]["after"]["loss"] == pytest.approx(one["valid"]["a"]["after"]["loss"], rel=1e-3)


# (family, key/value heads asked, MLP width asked, MLP width built): each family's config names
# the sizes its own way (train.family_sizes); BLOOM's MLP is 4 x hidden_size, Falcon's heads 1 or all
FAMILIES = [("llama", 2, 64, 64), ("qwen2", 2, 64, 64), ("mistral", 2, 64, 64), ("glm", 2, 64, 64),
            ("gpt_neox", None, 64, 64), ("gpt2", None, 64, 64), ("falcon", 1, 64, 64), ("falcon", None, 64, 64),
            ("bloom", None, None, 128)]


def built_sizes(model) -> tuple[int, int]:
    """(key/value heads, MLP width) read from layer 0's weights: the query/key/value projections'
    outputs (separate or fused) are (heads + 2 x kv heads) x head size; the MLP's last product reads
    the MLP width (GPT-2's Conv1D stores its weight transposed)."""
    query_key_value, width = 0, None
    for name, weight in model.named_parameters():
        if ".0." not in name or weight.dim() != 2:
            continue
        outputs = weight.shape[1] if type(model).__name__.startswith("GPT2") else weight.shape[0]
        if any(part in name for part in ("q_proj", "k_proj", "v_proj", "query_key_value", "c_attn")):
            query_key_value += outputs
        if any(part in name for part in ("down_proj", "dense_4h_to_h", "mlp.c_proj")):
            width = weight.shape[0] if type(model).__name__.startswith("GPT2") else weight.shape[1]
    return (query_key_value // 8 - 4) // 2, width


@pytest.mark.parametrize(("model_type", "kv_heads", "asked_width", "width"), FAMILIES)
def test_new_models_of_each_family_are_built_to_the_asked_sizes(model_type, kv_heads, asked_width, width, tokenizer):
    from conftest import load_recipe_module

    train = load_recipe_module("model_clm", "train")
    args = train.ModelArguments(model_type=model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=kv_heads, intermediate_size=asked_width)
    model = train.build_model(args, tokenizer, block_size=16)  # BLOOM has no SDPA: falls back to eager
    assert model.config.model_type == model_type
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 32)
    assert built_sizes(model) == (kv_heads or 4, width)  # head size 8: GLM's config fixes 128 unless told
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss.item() - np.log(model.config.vocab_size)) < 1.0  # near uniform at init


@pytest.mark.parametrize(("model_type", "kv_heads", "asked_width", "message"), [
    ("gpt2", 2, None, "no grouped-query attention"), ("bloom", None, 64, "4 x hidden_size (128)"),
    ("falcon", 2, None, "1 (multi-query attention) or unset")])
def test_sizes_a_family_cannot_take_are_refused(model_type, kv_heads, asked_width, message, tokenizer):
    from conftest import load_recipe_module

    train = load_recipe_module("model_clm", "train")
    args = train.ModelArguments(model_type=model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=kv_heads, intermediate_size=asked_width)
    with pytest.raises(UserError, match=re.escape(message)):
        train.build_model(args, tokenizer, block_size=16)


def test_continued_pretraining_from_a_local_checkpoint_with_gradient_checkpointing(two_sources, tmp_path):
    root, _ = two_sources
    common = ["--data_dir", root / "a", "--max_steps", "5", "--eval_steps", "100", "--save_steps", "100", *TINY]
    run_script("model_clm/train.py", *common, "--model_type", "qwen2", "--output_dir", tmp_path / "first")
    run_script("model_clm/train.py", *common, "--model_name_or_path", tmp_path / "first",
               "--gradient_checkpointing", "true", "--output_dir", tmp_path / "second")
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    second = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert second["model_type"] == "qwen2"
    # the checkpoint loaded exactly: the second run starts where the first ended, then improves
    assert second["valid"]["a"]["before"]["loss"] == pytest.approx(first["valid"]["a"]["after"]["loss"], rel=1e-5)
    assert second["valid"]["a"]["after"]["loss"] < second["valid"]["a"]["before"]["loss"]
