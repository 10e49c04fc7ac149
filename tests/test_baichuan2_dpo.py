"""baichuan2_dpo/prepare_data.py: hh-rlhf conversion (every marker), validation, built-in pairs."""

import json

import pytest

from common.errors import UserError

from conftest import load_recipe_module, run_script


@pytest.fixture(scope="module")
def prepare():
    return load_recipe_module("baichuan2_dpo", "prepare_data")


HH_CHOSEN = ("\n\nHuman: 你好，今天天气怎么样？\n\nAssistant: 今天晴天。\n\nHuman: 适合爬山吗？"
             "\n\nAssistant: 适合，记得带水。")
HH_REJECTED = ("\n\nHuman: 你好，今天天气怎么样？\n\nAssistant: 今天晴天。\n\nHuman: 适合爬山吗？"
               "\n\nAssistant:不知道。")  # no space after the last marker, as in part of hh-rlhf


def test_hh_pair_converts_every_marker_and_splits_prompt_and_replies(prepare):
    pair = prepare.hh_pair(HH_CHOSEN, HH_REJECTED)
    assert pair["prompt"] == [{"role": "user", "content": "你好，今天天气怎么样？"},
                              {"role": "assistant", "content": "今天晴天。"},
                              {"role": "user", "content": "适合爬山吗？"}]
    assert (pair["chosen"], pair["rejected"]) == ("适合，记得带水。", "不知道。")
    text = json.dumps(pair, ensure_ascii=False)
    assert "Human:" not in text and "Assistant:" not in text
    # the dialogue's final marker without a trailing space, and nothing after it: an empty reply
    ending = prepare.hh_pair("\n\nHuman: 问题\n\nAssistant: 回答", "\n\nHuman: 问题\n\nAssistant:")
    assert ending == {"prompt": [{"role": "user", "content": "问题"}], "chosen": "回答", "rejected": ""}
    assert prepare.problem(ending) == "empty_reply"


def test_unusable_hh_pairs_are_refused(prepare):
    with pytest.raises(ValueError, match="part before"):  # the dialogues differ in an earlier turn
        prepare.hh_pair("\n\nHuman: 甲\n\nAssistant: 一\n\nHuman: 乙\n\nAssistant: 二",
                        "\n\nHuman: 丙\n\nAssistant: 一\n\nHuman: 乙\n\nAssistant: 三")
    with pytest.raises(ValueError, match="markers"):
        prepare.parse_hh("no markers at all")
    same = prepare.hh_pair(HH_CHOSEN, HH_CHOSEN)
    assert prepare.problem(same) == "chosen_equals_rejected"


def test_reading_counts_drops_and_names_bad_lines(prepare, tmp_path):
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN},                              # identical
        {"prompt": "写一句诗", "chosen": "床前明月光", "rejected": ""},                 # empty reply
        {"prompt": [{"role": "user", "content": "你好"}], "chosen": [{"role": "assistant", "content": "你好！"}],
         "rejected": "滚"},
        {"prompt": "  ", "chosen": "a", "rejected": "b"},                          # empty prompt
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    pairs, report = prepare.read_pairs([str(path)])
    assert len(pairs) == 2 and report["read"] == 5
    assert report["dropped"] == {"chosen_equals_rejected": 1, "empty_reply": 1, "empty_prompt": 1}
    assert pairs[1] == {"prompt": [{"role": "user", "content": "你好"}], "chosen": "你好！", "rejected": "滚"}
    path.write_text(path.read_text(encoding="utf-8") + '{"prompt": "x", "chosen": "y"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"pairs.jsonl:6: expected prompt / chosen / rejected"):
        prepare.read_pairs([str(path)])


def test_builtin_pairs_prefer_the_gold_answer_and_hold_out_the_sft_test_items(tmp_path):
    out = tmp_path / "dpo"
    run_script("baichuan2_dpo/prepare_data.py", "--output_dir", out, "--sentiment_items", "600",
               "--segmentation_items", "200")
    splits = {s: [json.loads(line) for line in (out / f"{s}.jsonl").open(encoding="utf-8")]
              for s in ("train", "valid", "test")}
    assert len(splits["train"]) > 600 and splits["test"]
    for row in splits["train"] + splits["test"]:
        assert row["chosen"] != row["rejected"]
        if row["chosen"] in ("正面", "负面"):
            assert {row["chosen"], row["rejected"]} == {"正面", "负面"}
        else:  # a wrong segmentation of the same characters
            assert row["rejected"].replace("/", "") == row["chosen"].replace("/", "")
    assert all(row["task"] and row["answer"] == row["chosen"] for row in splits["test"])
    train_prompts = {row["prompt"][0]["content"] for row in splits["train"]}
    assert not train_prompts & {row["prompt"][0]["content"] for row in splits["test"]}
    # the SFT recipes split the same items the same way: DPO's test items were held out from SFT too
    sft = tmp_path / "sft"
    run_script("model_baichuan/prepare_data.py", "--output_dir", sft, "--sentiment_items", "600",
               "--segmentation_items", "200")
    sft_test = {json.loads(line)["messages"][0]["content"] for line in (sft / "test.jsonl").open(encoding="utf-8")}
    assert sft_test == {row["prompt"][0]["content"] for row in splits["test"]}
