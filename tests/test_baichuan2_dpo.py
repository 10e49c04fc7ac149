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


def read_splits(out) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (out / f"{s}.jsonl").open(encoding="utf-8")]
            for s in ("train", "valid", "test")}


def user_turns(path) -> set[str]:
    with path.open(encoding="utf-8") as f:
        return {m["content"] for row in map(json.loads, f) for m in row["messages"] if m["role"] == "user"}


def test_builtin_pairs_prefer_the_gold_answer_and_are_new_to_the_sft_model(tmp_path):
    out = tmp_path / "dpo"
    run_script("baichuan2_dpo/prepare_data.py", "--output_dir", out, "--sentiment_items", "600",
               "--segmentation_items", "200")
    splits = read_splits(out)
    assert len(splits["train"]) > 600 and splits["test"]
    for row in splits["train"] + splits["test"]:
        assert row["chosen"] != row["rejected"]
        if row["chosen"] in ("正面", "负面"):
            assert {row["chosen"], row["rejected"]} == {"正面", "负面"}
        else:  # a wrong segmentation of the same characters
            assert row["rejected"].replace("/", "") == row["chosen"].replace("/", "")
    assert all(row["task"] and row["answer"] == row["chosen"] for row in splits["test"])
    prompts = {s: {row["prompt"][0]["content"] for row in rows} for s, rows in splits.items()}
    assert not prompts["train"] & prompts["test"]
    # by default DPO draws past every item the SFT recipes' defaults draw: none of its pairs was seen in SFT
    sft = tmp_path / "sft"
    run_script("model_baichuan/prepare_data.py", "--output_dir", sft)
    sft_items = set().union(*(user_turns(sft / f"{s}.jsonl") for s in ("train", "valid", "test")))
    assert len(sft_items) > 7000 and not sft_items & set().union(*prompts.values())
    # drawn from the start instead, the items are split by the same hash as SFT splits them: DPO's test
    # items (10%) are SFT's test and validation items (5% + 5%), never its training items
    same = tmp_path / "same"
    run_script("baichuan2_dpo/prepare_data.py", "--output_dir", same, "--sentiment_items", "600",
               "--segmentation_items", "200", "--skip_sft_items", "false")
    run_script("model_baichuan/prepare_data.py", "--output_dir", sft, "--sentiment_items", "600",
               "--segmentation_items", "200")
    held_out = user_turns(sft / "test.jsonl") | user_turns(sft / "valid.jsonl")
    assert {row["prompt"][0]["content"] for row in read_splits(same)["test"]} == held_out


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
    from common.preference import tokenize_pairs
    from common.templates import encode_chat, get_template
    from common.tokenizer import load_tokenizer

    tokenizer, template = load_tokenizer(tiny_chat_model), get_template("baichuan2")
    prompt = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
              {"role": "user", "content": "判断情感：很好"}]
    rows = [{"prompt": prompt, "chosen": "正面", "rejected": "负面"},
            {"prompt": [{"role": "user", "content": "长" * 300}], "chosen": "甲", "rejected": "乙"}]
    dataset, report = tokenize_pairs(rows, tokenizer, template, max_length=64)
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

    from common.preference import preference_accuracy

    model = LlamaForCausalLM.from_pretrained(tiny_chat_model)
    vocab = model.config.vocab_size
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token has log-probability -log(vocab)
    dataset = Dataset.from_dict({"prompt_ids": [[5, 6, 7], [5]], "chosen_ids": [[8], [9, 10]],
                                 "rejected_ids": [[8, 9, 10], [11, 12, 13, 14]]})
    result = preference_accuracy(model, dataset)
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
    batched = preference_accuracy(model, dataset)
    assert math.isclose(batched["mean_logp_gap"], sum(alone) / 2, rel_tol=1e-4, abs_tol=1e-4)


def test_dpo_end_to_end_raises_the_chosen_reward(tiny_chat_model, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    run_script("baichuan2_dpo/prepare_data.py", "--output_dir", data, "--sentiment_items", "300",
               "--segmentation_items", "60")
    result = run_script("baichuan2_dpo/train.py", "baichuan2_dpo/configs/default.yaml", "--model_name_or_path",
                        tiny_chat_model, "--data_dir", data, "--output_dir", out, "--train_samples", "16",
                        "--max_steps", "16", "--learning_rate", "1e-2", "--eval_samples", "8",
                        "--eval_max_new_tokens", "6", "--logging_steps", "4", "--finetuning_type", "lora",
                        "--lora_rank", "8", "--loss_type", "sigmoid")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["template"] == "baichuan2" and metrics["loss_type"] == ["sigmoid"]
    assert (out / "loss.png").stat().st_size > 10_000  # the loss curves beside metrics.json
    assert metrics["train"]["steps"] == 16
    # 16 pairs seen 8 times: the policy learns to prefer their chosen replies (the DPO loss starts at log 2)
    first, last = metrics["train"]["first_logged_loss"], metrics["train"]["last_logged_loss"]
    assert abs(first - 0.693) < 0.03 and last < first - 0.05
    valid = metrics["valid"]
    assert valid["start"]["n"] == valid["tuned"]["n"] > 0
    # TRL's held-out reward margin (the reference: the adapter off, i.e. the start model) is beta times how far
    # the chosen-minus-rejected log-probability gap moved, which preference_accuracy measured before and after
    moved = valid["tuned"]["mean_logp_gap"] - valid["start"]["mean_logp_gap"]
    assert valid["dpo"]["rewards/margins"] == pytest.approx(metrics["beta"] * moved, rel=1e-3)
    assert 0 <= valid["dpo"]["rewards/accuracies"] <= 1
    test = metrics["test"]
    for task, change in test["change"].items():  # both models scored on the same items
        assert test["start"][task]["n"] == test["tuned"][task]["n"] == change["n"] >= change["better"] + change["worse"]
    assert sum(change["n"] for change in test["change"].values()) == 8  # --eval_samples
    assert (out / "adapter_config.json").is_file()  # a plain start: the adapter is the result
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_chat_model)
    assert "held-out pairs, chosen more likely" in result.stdout
    # evaluate.py, run apart, measures the same preference on the held-out pairs as train.py did
    run_script("baichuan2_dpo/evaluate.py", "--model", out, "--start_model", tiny_chat_model, "--data_dir", data,
               "--eval_samples", "4", "--out", tmp_path / "evaluation.json")
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    for name in ("start", "tuned"):
        assert evaluation[name]["pairs"]["n"] == valid[name]["n"]
        assert abs(evaluation[name]["pairs"]["mean_logp_gap"] - valid[name]["mean_logp_gap"]) < 1e-3


def constructed(row: dict) -> bool:
    """The rejected answer prepare_data builds itself: the other sentiment, or the same
    characters segmented wrongly."""
    if row["chosen"] in ("正面", "负面"):
        return {row["chosen"], row["rejected"]} == {"正面", "负面"}
    return row["rejected"].replace("/", "") == row["chosen"].replace("/", "")


def test_rejected_from_takes_the_models_own_wrong_replies(tiny_chat_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from common.instructions import generate_replies
    from common.templates import get_template
    from common.tokenizer import load_tokenizer

    out = tmp_path / "on_policy"
    run_script("baichuan2_dpo/prepare_data.py", "--output_dir", out, "--sentiment_items", "60",
               "--segmentation_items", "20", "--rejected_from", tiny_chat_model)
    splits, report = read_splits(out), json.loads((out / "report.json").read_text())
    own = [i for i, row in enumerate(splits["train"]) if not constructed(row)]
    # an untrained model is wrong nearly everywhere: most training pairs reject its own reply
    assert report["rejected_from"]["own_wrong_replies"] == len(own) > len(splits["train"]) // 2
    assert all(constructed(row) for row in splits["valid"])  # held-out pairs stay model-independent
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    replies = generate_replies(model, load_tokenizer(tiny_chat_model), get_template("baichuan2"),
                               [row["prompt"] for row in splits["train"]])  # the same prompts, the same batches
    assert [splits["train"][i]["rejected"] for i in own] == [replies[i] for i in own]


def test_best_worst_pair_ranks_samples_and_drops_ties(prepare):
    sentiment = {"task": "sentiment", "text": "质量很好", "answer": "正面"}
    assert prepare.best_worst_pair(sentiment, ["负面", "正面", "正面", "负面"]) == {
        "chosen": "正面", "rejected": "负面", "scores": [1.0, 0.0]}
    assert prepare.best_worst_pair(sentiment, ["正面", "正面"]) is None  # all equal: no preference
    assert prepare.best_worst_pair(sentiment, ["正面", "", ""]) is None  # empty replies do not count
    segment = {"task": "segmentation", "text": "我爱北京", "answer": "我/爱/北京"}
    pair = prepare.best_worst_pair(segment, ["我爱/北京", "我/爱/北京", "我/爱北/京"])
    assert (pair["chosen"], pair["rejected"]) == ("我/爱/北京", "我/爱北/京")
    assert pair["scores"][0] == 1.0 > pair["scores"][1]


def test_pairs_from_samples_are_the_models_own_best_and_worst(prepare, monkeypatch):
    """The wiring of --pairs_from_samples, with the model's samples stood in by known replies:
    every training item gets n samples, ranked pairs are kept, all-equal ones dropped and counted."""
    from common.instructions import item_score

    def samples(model_path, items, batch_size, temperature):
        assert (model_path, temperature) == ("sft", 1.0)
        # per item: the gold answer once for every second item, else always the same wrong reply
        replies = []
        for k in range(0, len(items), 3):
            item = items[k]
            wrong = {"正面": "负面", "负面": "正面"}.get(item["answer"], "x" + item["answer"].replace("/", ""))
            replies += [wrong, item["answer"] if (k // 3) % 2 == 0 else wrong, wrong]
        return replies

    monkeypatch.setattr(prepare, "own_replies", samples)
    args = prepare.PrepareArguments(sentiment_items=60, segmentation_items=20, pairs_from_samples="sft",
                                    samples_per_item=3)
    splits, report = prepare.builtin_pairs(args)
    counts = report["pairs_from_samples"]
    assert counts["pairs"] == len(splits["train"]) == (counts["items"] + 1) // 2
    assert counts["pairs"] + counts["dropped_all_samples_equal"] == counts["items"]
    assert counts["mean_chosen_score"] == 1.0 and counts["mean_rejected_score"] < 1.0
    for row in splits["train"]:
        assert row["chosen"] == row["answer"] and item_score(row, row["chosen"]) > item_score(row, row["rejected"])
    assert all(constructed(row) for row in splits["valid"])  # held-out pairs stay model-independent


def test_full_dpo_from_an_sft_adapter_trains_every_weight(tiny_chat_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.templates import save_template_name
    from common.tokenizer import load_tokenizer

    adapter, data, out = tmp_path / "sft_adapter", tmp_path / "data", tmp_path / "out"
    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model),
                         LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    sft.save_pretrained(adapter)
    load_tokenizer(tiny_chat_model).save_pretrained(adapter)
    save_template_name(adapter, "baichuan2")
    start = {k: v.clone() for k, v in sft.merge_and_unload().state_dict().items()}
    run_script("baichuan2_dpo/prepare_data.py", "--output_dir", data, "--sentiment_items", "100",
               "--segmentation_items", "20")
    run_script("baichuan2_dpo/train.py", "baichuan2_dpo/configs/default.yaml", "--model_name_or_path", adapter,
               "--finetuning_type", "full", "--data_dir", data, "--output_dir", out, "--train_samples", "16",
               "--max_steps", "3", "--learning_rate", "1e-3", "--eval_samples", "-1")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["total"] > 0
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()  # a plain model, the adapter merged in
    moved = [k for k in start if not torch.equal(start[k], tuned[k])]
    assert "model.embed_tokens.weight" in moved and any("mlp" in k for k in moved)
    # it started from the SFT model (base + adapter), not from the base: a weight the adapter changed is
    # much nearer its SFT value than its base value after three small steps
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (tuned[name] - start[name]).norm() < (tuned[name] - base[name]).norm() / 4


def test_paired_change_counts_items_and_gives_the_exact_sign_test():
    from common.instructions import paired_change

    items = [{"task": "sentiment", "answer": "正面"}] * 12 + \
        [{"task": "segmentation", "answer": "我们/爱/北京"}, {"task": "segmentation", "answer": "你好"}]
    before = ["负面"] * 8 + ["正面"] * 4 + ["我们/爱/北京", "你/好"]
    after = ["正面"] * 8 + ["负面"] * 2 + ["正面"] * 2 + ["我/们/爱/北京", "你/好"]
    change = paired_change(items, before, after)
    # 8 fixed, 2 broken, 2 unchanged: P(X <= 2 or X >= 8), X ~ Binomial(10, 1/2) = 2 * 56 / 1024
    assert change["sentiment"] == {"n": 12, "better": 8, "worse": 2, "sign_test_p": 2 * 56 / 1024}
    assert change["segmentation"] == {"n": 2, "better": 0, "worse": 1, "sign_test_p": 1.0}


# ------------------------------------------------------------------------------------ GRPO
def test_builtin_rewards_score_hand_built_replies():
    from common.rewards import format, task

    sentiment = "判断下面这条评论的情感是正面还是负面：\n质量很好"
    assert task(sentiment, "正面", "正面") == 1.0 and task(sentiment, "负面", "正面") == 0.0
    assert task(sentiment, "正面还是负面", "正面") == 0.0  # both labels: no answer
    segment = "请给下面的句子分词，词与词之间用“/”隔开：\n我爱北京"
    assert task(segment, "我/爱/北京", "我/爱/北京") == 1.0
    # predicted 我 / 爱北京 against gold 我 / 爱 / 北京: one word right of 2 predicted and 3 gold
    assert task(segment, "我/爱北京", "我/爱/北京") == pytest.approx(2 * 1 / (2 + 3))
    assert format(sentiment, "正面", "正面") == 1.0
    assert format(sentiment, "正面。", "正面") == 0.0  # not the label alone
    assert format(sentiment, "正面", "正面", stopped=False) == 0.0  # ran into the length limit
    assert format(segment, "我爱/北京", "我/爱/北京") == 1.0  # wrong words, right form
    assert format(segment, "我/爱/上海", "我/爱/北京") == 0.0  # changed characters
    assert format(segment, "我//爱北京", "我/爱/北京") == 0.0  # an empty word


def test_user_rewards_are_checked_and_wrapped_for_trl(tmp_path, monkeypatch):
    grpo = load_recipe_module("baichuan2_dpo", "train_grpo")
    (tmp_path / "my_rewards.py").write_text(
        "def exact(prompt, completion, gold):\n    return float(completion == gold)\n"
        "def two_args(prompt, completion):\n    return 0.0\n"
        "def stops(prompt, completion, gold, stopped=True):\n    return float(stopped)\n")
    monkeypatch.chdir(tmp_path)
    exact = grpo.load_reward("my_rewards:exact")
    with pytest.raises(UserError, match=r"must take \(prompt, completion, gold\)"):
        grpo.load_reward("my_rewards:two_args")
    with pytest.raises(UserError, match="not found"):
        grpo.load_reward("my_rewards:missing")
    with pytest.raises(UserError, match="module:function"):
        grpo.load_reward("accuracy")

    class Tokenizer:  # what display_cleaner needs: a tokenizer whose decode does not space characters
        backend_tokenizer = None

    prompts = [[{"role": "user", "content": "q"}]] * 2
    completions = [[{"role": "assistant", "content": "正面"}], [{"role": "assistant", "content": "负面"}]]
    wrapped = grpo.for_trl(exact, Tokenizer(), stop_ids=[2])
    assert wrapped.__name__ == "exact"
    assert wrapped(prompts, completions, [[5, 2], [6, 7]], answer=["正面", "正面"]) == [1.0, 0.0]
    stops = grpo.for_trl(grpo.load_reward("my_rewards:stops"), Tokenizer(), stop_ids=[2])
    assert stops(prompts, completions, [[5, 2], [6, 7]], answer=["正面", "正面"]) == [1.0, 0.0]


def test_scoring_only_the_replies_on_a_cpu_gives_the_same_log_probs(tiny_chat_model, monkeypatch):
    """train_grpo.py has TRL score only the reply positions on a CPU too (6x faster steps there): the
    log-probabilities of the reply tokens and their gradients equal those of scoring every position,
    and those of the model's own logits."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    grpo = load_recipe_module("baichuan2_dpo", "train_grpo")
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # restored after the test
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    torch.manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (3, 14))
    labels = ids.clone()
    labels[:, :10] = -100  # prompts of 10 tokens, replies of 4
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, 9:-1].log_softmax(-1).gather(-1, ids[:, 10:, None])[..., 0]
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))

    def reply_log_probs():
        model.zero_grad()
        log_probs = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs[:, -4:]
        log_probs.sum().backward()
        return log_probs.detach(), model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()

    every_position = reply_log_probs()
    grpo.score_only_replies_on_cpu()
    assert trl_utils._use_triton(torch.device("cpu"))
    replies_only = reply_log_probs()
    torch.testing.assert_close(every_position[0], expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(every_position, replies_only):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def first_token_probs(model_dir, prompts, tokenizer_dir):
    """Mean next-token distribution at a reply's first position over `prompts`, and the cleaned text
    of every token (prompts rendered by `tokenizer_dir`'s chat template, the Jinja of baichuan2)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.tokenizer import display_cleaner

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    probs = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            probs.append(model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1))
    clean = display_cleaner(tokenizer)
    return torch.stack(probs).mean(0), [clean(tokenizer.decode([i])) for i in range(len(tokenizer))]


def test_grpo_moves_the_policy_towards_the_reward(tiny_chat_model, tmp_path):
    """A toy task whose answer is known: reward 1 when the reply starts with one given character.
    Through the real command line (a user reward, module:function), that character's probability as
    the first reply token rises on held-out prompts; the KL to the start is logged, the curve plotted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.templates import get_template

    data, start, out = tmp_path / "data", tmp_path / "start", tmp_path / "out"
    run_script("baichuan2_dpo/prepare_data.py", "--output_dir", data, "--sentiment_items", "300",
               "--segmentation_items", "60")
    # a start model with a peaked first-token distribution, so that groups of 8 samples disagree
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.save_pretrained(start)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    tokenizer.chat_template = get_template("baichuan2").jinja()
    tokenizer.save_pretrained(start)
    held_out = [row["prompt"] for row in map(json.loads, (data / "test.jsonl").open(encoding="utf-8"))][:20]
    probs, pieces = first_token_probs(start, held_out, start)
    target = next(int(i) for i in probs.argsort(descending=True)[1:] if len(pieces[i]) == 1)
    before = float(probs[target])
    assert 0.05 < before < 0.6  # sampled often, not always
    (tmp_path / "toy_reward.py").write_text(
        f"def starts_right(prompt, completion, gold):\n    return float(completion.startswith({pieces[target]!r}))\n")
    run_script("baichuan2_dpo/train_grpo.py", "--model_name_or_path", start, "--data_dir", data,
               "--output_dir", out, "--rewards", "toy_reward:starts_right", "--max_steps", "12",
               "--per_device_train_batch_size", "32", "--max_completion_length", "4", "--learning_rate", "3e-3",
               "--beta", "0.04", "--eval_samples", "8", "--eval_max_new_tokens", "4", "--logging_steps", "4",
               "--train_tasks", "sentiment", cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rewards"] == ["toy_reward:starts_right"] and metrics["train"]["steps"] == 12
    rows = [json.loads(line) for line in (data / "train.jsonl").open(encoding="utf-8")]
    sentiment = sum(row["task"] == "sentiment" for row in rows)
    assert metrics["train_prompts"] == sentiment < len(rows)  # --train_tasks: the sentiment rows only
    curves = metrics["curves"]
    assert len(curves["reward"]) == 3 and curves["kl"][-1][1] > 0  # the policy left the start, measured
    after = float(first_token_probs(out, held_out, start)[0][target])
    assert after > before + 0.15, (before, after)
    assert (out / "rewards.png").stat().st_size > 10_000
    test = metrics["test"]  # held-out items scored before and after, the same 8 items (--eval_samples)
    assert sum(change["n"] for change in test["change"].values()) == 8
    for task, change in test["change"].items():
        assert test["start"][task]["n"] == test["tuned"][task]["n"] == change["n"] >= change["better"] + change["worse"]
