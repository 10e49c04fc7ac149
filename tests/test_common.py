"""Unit tests of common/: config parsing, corpora, tokenizer, data loading."""

from dataclasses import dataclass, field

import pytest

from common.config import parse_args
from common.corpora import load_peoples_daily, load_reviews, load_segmentations
from common.data import load_files, resolve_files
from common.errors import UserError
from common.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    add_missing_special_tokens,
    build_chinese_tokenizer,
)


@dataclass
class ModelArgs:
    hidden_size: int = 64
    name: str = "bert"


@dataclass
class TrainArgs:
    learning_rate: float = 0.1
    epochs: int = 1
    tags: list[str] = field(default_factory=lambda: ["a"])
    required_path: str | None = None


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


# ------------------------------------------------------------------------ config
def test_yaml_sets_defaults_and_cli_overrides_them(tmp_path):
    cfg = write(tmp_path / "c.yaml", "hidden_size: 32\nlearning_rate: 1e-3\nepochs: 3\ntags: [x, y]\n")
    model, train = parse_args([ModelArgs, TrainArgs], [str(cfg), "--epochs", "5"])
    assert model.hidden_size == 32 and model.name == "bert"
    # YAML 1.1 reads `1e-3` as a string; it must still arrive as a float.
    assert train.learning_rate == pytest.approx(1e-3) and isinstance(train.learning_rate, float)
    assert train.epochs == 5
    assert train.tags == ["x", "y"]


def test_no_config_gives_dataclass_defaults():
    model, train = parse_args([ModelArgs, TrainArgs], ["--name", "gpt2"])
    assert (model.hidden_size, model.name, train.epochs) == (64, "gpt2", 1)


def test_unknown_yaml_keys_are_named(tmp_path):
    cfg = write(tmp_path / "c.yaml", "hidden_size: 32\nhiden_size: 16\nlr: 1\n")
    with pytest.raises(UserError, match=r"unknown key\(s\): hiden_size, lr"):
        parse_args([ModelArgs, TrainArgs], [str(cfg)])


def test_unknown_cli_flag_and_missing_config_are_errors(tmp_path):
    with pytest.raises(UserError, match="--nope"):
        parse_args([ModelArgs], ["--nope", "1"])
    with pytest.raises(UserError, match="not found"):
        parse_args([ModelArgs], [str(tmp_path / "missing.yaml")])


# ----------------------------------------------------------------------- corpora
def test_reviews_are_labelled_and_contain_duplicates():
    reviews = load_reviews()
    labels = {label for _, label in reviews}
    assert labels == {0, 1}
    assert len(reviews) > 30000
    assert len({text for text, _ in reviews}) < 0.6 * len(reviews)  # about half are duplicates
    assert all(text == text.strip() and text for text, _ in reviews[:1000])


def test_peoples_daily_is_plain_text_matching_the_segmentation():
    sentences, segmentations = load_peoples_daily(), load_segmentations()
    assert len(sentences) == len(segmentations) > 19000
    assert sentences[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert segmentations[0][:3] == ["迈向", "充满", "希望"]
    assert all("".join(words) == text for words, text in zip(segmentations, sentences))
    # no POS tags survive: a tag would leave "/n", "/v" ... behind
    assert not any("/n" in s or "/v" in s for s in sentences[:5000])


# --------------------------------------------------------------------- tokenizer
def test_tokenizer_splits_cjk_into_characters_and_has_special_tokens(tmp_path):
    texts = ["这本书写得很好", "质量很差，不推荐", "hello world 很好"] * 5
    tokenizer = build_chinese_tokenizer(texts, vocab_size=200, min_frequency=1)
    tokens = tokenizer.tokenize("这本书很好")
    assert tokens == ["这", "本", "书", "很", "好"]
    for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", BOS_TOKEN, EOS_TOKEN):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id or token == "[UNK]"
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.tokenize("猫") == ["[UNK]"]  # unseen character
    tokenizer.save_pretrained(tmp_path)
    from common.tokenizer import load_tokenizer

    reloaded = load_tokenizer(tmp_path)
    assert reloaded("质量很好")["input_ids"] == tokenizer("质量很好")["input_ids"]


def test_missing_special_tokens_are_added():
    tokenizer = build_chinese_tokenizer(["你好世界"] * 3, vocab_size=100, min_frequency=1)
    tokenizer.bos_token = None
    tokenizer.eos_token = None
    before = len(tokenizer)
    added = add_missing_special_tokens(tokenizer)
    # [BOS]/[EOS] are already in the vocabulary: they become special again, no new ids
    assert added == 0 and len(tokenizer) == before
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert add_missing_special_tokens(tokenizer) == 0


# -------------------------------------------------------------------------- data
def test_resolve_files_accepts_file_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    a = write(tmp_path / "a.csv", "label,text\n0,x\n")
    b = write(tmp_path / "sub" / "b.csv", "label,text\n1,y\n")
    write(tmp_path / "notes.md", "ignored")
    assert resolve_files(str(a)) == [a]
    assert resolve_files(str(tmp_path)) == [a, b]
    assert resolve_files(str(tmp_path / "**" / "*.csv")) == [a, b]
    with pytest.raises(UserError, match="no such file"):
        resolve_files(str(tmp_path / "nothing*.csv"))


def test_load_files_checks_columns_and_loads_splits(tmp_path):
    train = write(tmp_path / "train.csv", "label,text,extra\n0,很好,x\n1,很差,y\n")
    valid = write(tmp_path / "valid.jsonl", '{"label": 1, "text": "不错"}\n')
    data = load_files({"train": str(train)}, required_columns=["label", "text"], cache_dir=str(tmp_path / "c"))
    assert data["train"].column_names == ["label", "text"]
    assert data["train"]["text"] == ["很好", "很差"]
    assert load_files(str(valid), ["text"], cache_dir=str(tmp_path / "c"))["train"]["text"] == ["不错"]
    with pytest.raises(UserError, match="missing column.*label"):
        load_files(str(write(tmp_path / "bad.csv", "text\nabc\n")), ["label", "text"])


def test_bad_files_give_messages_naming_file_and_line(tmp_path):
    with pytest.raises(UserError, match="empty.csv: empty file"):
        load_files(str(write(tmp_path / "empty.csv", "")), ["text"])
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes(b"label,text\n0,fine\n1," + "很好".encode("gbk") + b"\n")
    with pytest.raises(UserError, match="gbk.csv: line 3 is not valid UTF-8"):
        load_files(str(gbk), ["text"])
    with pytest.raises(UserError, match="bad.jsonl: first record is not valid JSON"):
        load_files(str(write(tmp_path / "bad.jsonl", "{oops\n")), ["text"])


def test_raw_texts_of_a_csv_that_is_not_utf8_name_the_line(tmp_path):
    """The language-model corpora reader (model_clm, chinese_gpt2): a bad byte in the block read with the
    header, or far past it (pandas' chunks), is named by line, not a UnicodeDecodeError traceback."""
    from common.data import make_units, unit_texts

    for name, body, line in (("near.csv", b"content\n" + "很好".encode("gbk") + b"\n", 2),
                             ("far.csv", b"content\n" + ("好" * 30_000).encode() + b"\n\xff\n", 3)):
        path = tmp_path / name
        path.write_bytes(body)
        [unit] = make_units([path], 1 << 20)
        with pytest.raises(UserError, match=f"{name}: line {line} is not valid UTF-8"):
            list(unit_texts(unit, None))


def test_read_lines_skips_blank_lines_and_names_bad_files(tmp_path):
    from common.data import read_lines

    assert read_lines(write(tmp_path / "p.txt", " 第一行 \n\n第二行\n  \n")) == ["第一行", "第二行"]
    with pytest.raises(UserError, match="missing.txt: file not found"):
        read_lines(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好\n".encode() + "很好".encode("gbk"))
    with pytest.raises(UserError, match="bad.txt: line 2 is not valid UTF-8"):
        read_lines(bad)


def test_quick_cpu_sampling_draws_from_the_same_distribution_and_only_where_it_may():
    import torch

    from common.instructions import quick_cpu_sampling

    original = torch.multinomial
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3], [0.5, 0.0, 0.0, 0.0, 0.5]])
    generator = torch.Generator().manual_seed(0)
    with quick_cpu_sampling():
        assert torch.multinomial is not original
        draws = torch.cat([torch.multinomial(probs, 1, generator=generator) for _ in range(20000)], dim=1)
        one_row = torch.multinomial(probs[0] * 7, 1)  # unnormalised weights, one distribution
        with pytest.raises(RuntimeError):  # invalid weights go to torch's own checks
            torch.multinomial(torch.tensor([[0.5, -0.1]]), 1)
        several = torch.multinomial(probs, 2)  # not one draw per row: torch's own kernel
    assert torch.multinomial is original
    assert draws.shape == (2, 20000) and one_row.shape == (1,) and several.shape == (2, 2)
    for row, p in enumerate(probs):
        frequency = torch.bincount(draws[row], minlength=5).float() / draws.shape[1]
        assert frequency[p == 0].sum() == 0  # zero-weight tokens never come out
        assert torch.allclose(frequency, p, atol=0.015), (frequency, p)
    assert int(one_row) in (1, 3, 4)


# ------------------------------------------------------------------------ cli_main
SCRIPT_WITH_A_PROCESS_GROUP = """
import atexit, sys, torch
sys.path.insert(0, {repo!r})
from common.errors import cli_main

@cli_main
def main():
    torch.distributed.init_process_group("gloo", init_method="file://" + {store!r}, rank=0, world_size=1)
    print("done")  # (stdout is a pipe here: block-buffered until flushed)
    return "returned"

atexit.register(lambda: print("group at exit:", torch.distributed.is_initialized()))
if sys.argv[1:] == ["library"]:  # called by a caller's code rather than run as the script
    main.__wrapped__.__module__ = "some_library"
print(main())
"""


@pytest.mark.parametrize("how, expected", [("script", ["done"]),
                                           ("library", ["done", "returned", "group", "at", "exit:", "True"])])
def test_a_script_run_leaves_at_once_after_ending_its_group_a_library_call_keeps_it(tmp_path, how, expected):
    """After success, cli_main ends a distributed script's process group and exits at once with its
    output flushed, skipping the interpreter's teardown (where gloo groups that DeepSpeed still holds
    can abort the rank); a caller that runs main() inside its own program gets the result back and
    keeps its group."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(SCRIPT_WITH_A_PROCESS_GROUP.format(repo=str(Path(__file__).resolve().parents[1]),
                                                         store=str(tmp_path / "store")))
    result = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == expected


def test_a_missing_tokenizer_names_what_writes_it(tmp_path):
    from common.tokenizer import load_tokenizer

    with pytest.raises(UserError, match=r"none \(run chinese_clip/prepare_data.py first\)"):
        load_tokenizer(tmp_path / "none", made_by="chinese_clip/prepare_data.py")
    with pytest.raises(UserError, match=r"none \(recipes never download\)"):
        load_tokenizer(tmp_path / "none")
