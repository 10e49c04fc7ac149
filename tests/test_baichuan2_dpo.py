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


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama whose tokenizer has the baichuan2 markers (as a tuned model's would)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.corpora import load_peoples_daily
    from common.templates import ensure_template_tokens, get_template, save_template_name
    from common.tokenizer import build_chinese_tokenizer

    path = tmp_path_factory.mktemp("chat_model")
    tokenizer = build_chinese_tokenizer(load_peoples_daily()[:3000], vocab_size=2000)
    ensure_template_tokens(tokenizer, get_template("baichuan2"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_template_name(path, "baichuan2")
    return path


def test_pairs_are_tokenised_with_the_template_as_sft_does(tiny_chat_model):
    from common.templates import encode_chat, get_template
    from common.tokenizer import load_tokenizer

    train = load_recipe_module("baichuan2_dpo", "train")
    tokenizer, template = load_tokenizer(tiny_chat_model), get_template("baichuan2")
    prompt = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
              {"role": "user", "content": "判断情感：很好"}]
    rows = [{"prompt": prompt, "chosen": "正面", "rejected": "负面"},
            {"prompt": [{"role": "user", "content": "长" * 300}], "chosen": "甲", "rejected": "乙"}]
    dataset, report = train.tokenize_pairs(rows, tokenizer, template, max_length=64)
    assert report == {"pairs": 1, "dropped_prompt_too_long": 1}
    row = dataset[0]
    sft = encode_chat(tokenizer, template, [*prompt, {"role": "assistant", "content": "正面"}])
    assert row["prompt_ids"] + row["chosen_ids"] == sft.input_ids  # the SFT layout, token for token
    serving = encode_chat(tokenizer, template, prompt, add_generation_prompt=True).input_ids
    assert row["prompt_ids"] == serving  # and the prompt the server builds
    assert tokenizer.convert_ids_to_tokens(row["prompt_ids"][-1]) == "<reserved_107>"
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizer.eos_token_id


def test_preference_accuracy_on_a_case_with_a_known_answer(tiny_chat_model):
    import math

    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    train = load_recipe_module("baichuan2_dpo", "train")
    model = LlamaForCausalLM.from_pretrained(tiny_chat_model)
    vocab = model.config.vocab_size
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token has log-probability -log(vocab)
    dataset = Dataset.from_dict({"prompt_ids": [[5, 6, 7], [5]], "chosen_ids": [[8], [9, 10]],
                                 "rejected_ids": [[8, 9, 10], [11, 12, 13, 14]]})
    result = train.preference_accuracy(model, dataset)
    assert result["chosen_more_likely"] == 1.0  # shorter replies are likelier under a uniform model
    assert math.isclose(result["mean_logp_gap"], (2 + 2) / 2 * math.log(vocab), rel_tol=1e-5)
    # a random model: the batched, padded computation equals one sequence at a time
    model = LlamaForCausalLM.from_pretrained(tiny_chat_model)
    alone = []
    for row in dataset:
        logps = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([row["prompt_ids"] + row[key]])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            logps.append(logp[len(row["prompt_ids"]) - 1:].sum().item())
        alone.append(logps[0] - logps[1])
    batched = train.preference_accuracy(model, dataset)
    assert math.isclose(batched["mean_logp_gap"], sum(alone) / 2, rel_tol=1e-4, abs_tol=1e-4)


def test_dpo_end_to_end_raises_the_chosen_reward(tiny_chat_model, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    run_script("baichuan2_dpo/prepare_data.py", "--output_dir", data, "--sentiment_items", "300",
               "--segmentation_items", "60")
    result = run_script("baichuan2_dpo/train.py", "baichuan2_dpo/configs/default.yaml", "--model_name_or_path",
                        tiny_chat_model, "--data_dir", data, "--output_dir", out, "--train_samples", "16",
                        "--max_steps", "12", "--learning_rate", "1e-2", "--eval_samples", "8",
                        "--eval_max_new_tokens", "6", "--logging_steps", "4", "--lora_rank", "8")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["template"] == "baichuan2" and metrics["loss_type"] == ["sigmoid"]
    assert metrics["train"]["steps"] == 12
    # 16 pairs seen 6 times: the policy learns to prefer their chosen replies (the DPO loss starts at log 2)
    first, last = metrics["train"]["first_logged_loss"], metrics["train"]["last_logged_loss"]
    assert abs(first - 0.693) < 0.03 and last < first - 0.05
    valid = metrics["valid"]
    assert {"rewards/accuracies", "rewards/margins"} <= valid["dpo"].keys()
    assert valid["start"]["n"] == valid["tuned"]["n"] > 0
    assert metrics["test"]["start"] is not None and metrics["test"]["tuned"] is not None
    assert (out / "adapter_config.json").is_file()  # a plain start: the adapter is the result
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_chat_model)
    assert "held-out pairs, chosen more likely" in result.stdout
