"""common/templates.py, common/sft.py and common/instructions.py: every chat template,
label masking, truncation, packing isolation, data layouts and their errors, scoring."""

import copy
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GlmConfig,
    GlmForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from common.config import parse_args
from common.corpora import load_peoples_daily
from common.errors import UserError
from common.instructions import score, segmentation_items, segmentation_scores, sentiment_items
from common.sft import (
    Conversation,
    PackedCollator,
    PaddingCollator,
    ReplyLossTrainer,
    pack,
    pack_bins,
    read_conversations,
    tokenize_conversations,
)
from common.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    encode_chat,
    ensure_template_tokens,
    get_template,
    stop_criteria,
)

from conftest import REPO, load_recipe_module

CONVERSATION = [
    {"role": "system", "content": "你是一个助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？"},
    {"role": "user", "content": "今天几号？\n说一下"},
    {"role": "assistant", "content": "一月三日。"},
    {"role": "user", "content": "谢谢"},
    {"role": "assistant", "content": "不客气。"},
]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (exact decode, keeps newlines) with eos / pad / bos."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<eos>", "<pad>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(load_peoples_daily()[:300], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")


def with_markers(tokenizer, template):
    tokenizer = copy.deepcopy(tokenizer)
    ensure_template_tokens(tokenizer, template)
    return tokenizer


# ------------------------------------------------------------------ templates
EXPECTED_TEXT = {  # the official layouts, written out by hand: two user turns, one reply between
    "chatglm2": "[gMASK]sop[Round 1]\n\n问：你好\n\n答：好\n\n[Round 2]\n\n问：再见\n\n答：",
    "chatglm3": "[gMASK]sop<|user|>\n你好<|assistant|>\n好<|user|>\n再见<|assistant|>\n",
    "glm4": "[gMASK]<sop><|user|>\n你好<|assistant|>\n好<|user|>\n再见<|assistant|>\n",
    "baichuan2": "<reserved_106>你好<reserved_107>好<reserved_106>再见<reserved_107>",
    "llama2-chinese": "<s>Human: 你好\n</s><s>Assistant: 好\n</s><s>Human: 再见\n</s><s>Assistant: ",
    "alpaca": "<bos>下面是一条描述任务的指令。请写出恰当完成该指令的回答。\n\n### Instruction:\n你好\n\n"
              "### Response:\n好\n\n### Instruction:\n再见\n\n### Response:\n",
    "plain": "用户：你好\n助手：好\n用户：再见\n助手：",
}


def test_the_registry_holds_the_promised_templates():
    assert set(EXPECTED_TEXT) <= set(TEMPLATES)
    with pytest.raises(UserError, match="unknown chat template"):
        get_template("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_template_text_matches_the_official_layout(name):
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"},
                {"role": "user", "content": "再见"}]
    assert get_template(name).render(messages, bos="<bos>", eos="<eos>") == EXPECTED_TEXT[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_serving_prompt_equals_training_ids_up_to_every_reply(bpe, name):
    template = get_template(name)
    tokenizer = with_markers(bpe, template)
    for conversation in (CONVERSATION, CONVERSATION[1:3]):  # multi-turn with a system message; single turn
        full = encode_chat(tokenizer, template, conversation)
        reply_positions = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        assert len(full.reply_starts) == len(reply_positions)
        for start, at in zip(full.reply_starts, reply_positions):
            served = encode_chat(tokenizer, template, conversation[:at], add_generation_prompt=True).input_ids
            assert served == full.input_ids[:start]


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_only_replies_and_their_end_carry_loss(bpe, name):
    template = get_template(name)
    tokenizer = with_markers(bpe, template)
    encoded = encode_chat(tokenizer, template, CONVERSATION)
    assert len(encoded.labels) == len(encoded.input_ids)
    suffix = template.assistant_suffix.replace("{eos}", "<eos>")
    end = (template.end or "").replace("{eos}", "<eos>")
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    trained = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "".join(r + suffix + end for r in replies)
    # a label that differs from its input is the end token taught after an earlier reply
    changed = [i for i, (x, y) in enumerate(zip(encoded.input_ids, encoded.labels)) if y not in (IGNORE_INDEX, x)]
    assert len(changed) == (len(replies) - 1 if template.end else 0)
    assert all(encoded.labels[i] == tokenizer.eos_token_id for i in changed)
    assert encoded.labels[0] == IGNORE_INDEX


def test_stop_tokens_become_ids_when_they_are_single_tokens(bpe):
    glm4 = get_template("glm4")
    tokenizer = with_markers(bpe, glm4)
    ids, texts = stop_criteria(tokenizer, glm4)
    vocab = tokenizer.get_vocab()
    assert ids == [tokenizer.eos_token_id, vocab["<|user|>"], vocab["<|observation|>"]]
    assert texts == ("<|endoftext|>",)  # not a token of this vocabulary: matched as text
    ids, texts = stop_criteria(tokenizer, get_template("alpaca"))
    assert ids == [tokenizer.eos_token_id] and texts == ("### Instruction:",)


def test_conversations_out_of_order_are_refused():
    template = get_template("glm4")
    with pytest.raises(UserError, match="expected an assistant turn"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(UserError, match="end with an assistant turn"):
        template.render([{"role": "user", "content": "a"}], add_generation_prompt=False)


# ---------------------------------------------------------------- truncation
def test_truncation_drops_whole_turns_and_reports_them(bpe):
    template = get_template("chatglm3")
    tokenizer = with_markers(bpe, template)
    lengths = [len(encode_chat(tokenizer, template, CONVERSATION[:end]).input_ids) for end in (3, 5, 7)]
    long_first = [{"role": "user", "content": "长" * 400}, {"role": "assistant", "content": "好"}]
    conversations = [Conversation(CONVERSATION, "a:1"), Conversation(CONVERSATION[:3], "a:2"),
                     Conversation(long_first, "a:3")]
    rows, report = tokenize_conversations(tokenizer, template, conversations, max_length=lengths[1])
    assert report["kept_whole"] == 1 and report["truncated"] == 1 and report["turns_dropped"] == 2
    assert report["dropped_too_long"] == 1 and report["examples_too_long"] == ["a:3"]
    assert [len(ids) for ids in rows["input_ids"]] == [lengths[1], lengths[0]]
    # what was kept ends with a whole reply and its end token
    kept = rows[0]
    assert kept["labels"][-1] == tokenizer.eos_token_id and tokenizer.decode(kept["input_ids"]).endswith("一月三日。<eos>")


# ------------------------------------------------------------------- packing
def test_pack_bins_fill_rows_without_overflow():
    lengths = [5, 9, 3, 7, 1, 10, 2, 6]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # 43 tokens need at least 5 rows of 10
    with pytest.raises(ValueError):
        pack_bins([11], 10)


def test_packed_examples_do_not_see_each_other(bpe):
    template = get_template("glm4")
    tokenizer = with_markers(bpe, template)
    conversations = [Conversation(CONVERSATION, "a"), Conversation(CONVERSATION[1:3], "b"),
                     Conversation(CONVERSATION[3:5], "c")]
    rows, _ = tokenize_conversations(tokenizer, template, conversations, max_length=512)
    packed = pack(rows, max_length=512)
    assert len(packed) == 1
    torch.manual_seed(0)
    model = GlmForCausalLM(GlmConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     intermediate_size=64, pad_token_id=tokenizer.pad_token_id)).eval()
    batch = PackedCollator()([packed[0]])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(map(len, rows["input_ids"])))
    with torch.no_grad():
        together = model(**batch)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))  # pack puts longest first
        alone = [model(input_ids=torch.tensor([rows[i]["input_ids"]]), labels=torch.tensor([rows[i]["labels"]]))
                 for i in order]
        unisolated = model(input_ids=batch["input_ids"], use_cache=False).logits
    separate = torch.cat([out.logits for out in alone], dim=1)
    assert torch.allclose(together.logits, separate, atol=1e-5)
    assert not torch.allclose(unisolated, separate, atol=1e-3)  # the check can fail
    counts = [sum(label != IGNORE_INDEX for label in rows[i]["labels"][1:]) for i in order]
    mean = sum(out.loss * n for out, n in zip(alone, counts)) / sum(counts)
    assert torch.allclose(together.loss, mean, atol=1e-5)


def test_reply_logits_only_loss_equals_the_models_own_loss(bpe, tmp_path):
    template = get_template("glm4")
    tokenizer = with_markers(bpe, template)
    conversations = [Conversation(CONVERSATION, "a"), Conversation(CONVERSATION[3:5], "b")]
    rows, _ = tokenize_conversations(tokenizer, template, conversations, max_length=512)
    torch.manual_seed(0)
    model = GlmForCausalLM(GlmConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     intermediate_size=64, pad_token_id=tokenizer.pad_token_id))
    trainer = ReplyLossTrainer(model=model, args=TrainingArguments(tmp_path, use_cpu=True, report_to="none"))
    packed = PackedCollator()([pack(rows, 512)[0]])
    padded = PaddingCollator(tokenizer.pad_token_id)([rows[0], rows[1]])
    for batch, count in ((packed, None), (padded, None), (padded, 50)):
        extra = {"num_items_in_batch": count} if count else {}
        own = model(**batch, **extra).loss
        own.backward()
        own_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        model.zero_grad()
        ours = trainer.compute_loss(model, batch, num_items_in_batch=count)
        ours.backward()
        assert torch.allclose(ours, own, atol=1e-5)
        assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight.grad, own_grad, atol=1e-6)
        model.zero_grad()


def test_full_finetuning_keeps_updates_below_bf16_resolution(tmp_path):
    """A step far below bf16's resolution at 1.0 (2**-7) must still move the weights: fp32
    master weights under bf16 autocast do; bf16 weights (the old way) round it away."""
    from datasets import Dataset

    from common.sft_train import weights_dtype

    args = TrainingArguments(tmp_path, use_cpu=True, bf16=True, learning_rate=1e-5, max_steps=3, report_to="none",
                             lr_scheduler_type="constant", per_device_train_batch_size=2, save_strategy="no",
                             disable_tqdm=True)
    assert weights_dtype("full", args) == torch.float32 and weights_dtype("lora", args) == torch.bfloat16
    ids = [[1, 5, 9, 13, 17, 21, 2], [1, 6, 10, 14, 18, 22, 2]]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    changed = {}
    for name, dtype in (("fp32 master", weights_dtype("full", args)), ("bf16 weights", torch.bfloat16)):
        torch.manual_seed(0)
        model = GlmForCausalLM(GlmConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                         pad_token_id=0)).to(dtype)
        before = model.model.norm.weight.detach().float().clone()  # all 1.0
        Trainer(model=model, args=args, train_dataset=data).train()
        changed[name] = (model.model.norm.weight.detach().float() != before).float().mean().item()
    assert changed == {"fp32 master": 1.0, "bf16 weights": 0.0}


def test_one_process_with_several_gpus_is_refused_with_the_commands_that_work():
    from types import SimpleNamespace

    from common.sft_train import refuse_data_parallel

    with pytest.raises(UserError, match=r"sees 2 GPUs.*torchrun --nproc_per_node 2.*--device_map balanced"):
        refuse_data_parallel(SimpleNamespace(n_gpu=2))
    refuse_data_parallel(SimpleNamespace(n_gpu=2), device_map="balanced")  # chaining: the Trainer leaves it alone
    refuse_data_parallel(SimpleNamespace(n_gpu=1))


def test_padding_collator_pads_right_with_ignored_labels():
    batch = PaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                             {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1].tolist() == [8] + [-100] * 7 and batch["attention_mask"][0].sum() == 3


# ---------------------------------------------------------------- data layouts
def test_every_layout_reads_to_the_same_messages(tmp_path):
    user, reply = "判断情感：很好", "正面"
    expected = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "判断情感：", "input": "很好", "output": reply},
                                                      ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "sharegpt.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": user}, {"from": "gpt", "value": reply}]}], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "messages.jsonl").write_text(json.dumps({"messages": expected}, ensure_ascii=False) + "\n\n",
                                             encoding="utf-8")
    (tmp_path / "adgen.jsonl").write_text(json.dumps({"content": user, "summary": reply}, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    (tmp_path / "llama2.csv").write_text(f'text\n"<s>Human: {user}\n</s><s>Assistant: {reply}\n</s>"\n',
                                         encoding="utf-8")
    conversations = read_conversations(str(tmp_path))
    assert len(conversations) == 5
    for conversation in conversations:
        assert conversation.messages == [{"role": "user", "content": user.replace("：很好", "：\n很好")
                                          if "alpaca" in conversation.source else user},
                                         {"role": "assistant", "content": reply}]
    alpaca_history = {"instruction": "再见", "output": "再见！", "system": "你是助手", "history": [["你好", "你好！"]]}
    (tmp_path / "alpaca.jsonl").write_text(json.dumps(alpaca_history, ensure_ascii=False), encoding="utf-8")
    [conversation] = read_conversations(str(tmp_path / "alpaca.jsonl"))
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n',
     r"bad.jsonl:2: malformed JSON"),
    ("layout.jsonl", '{"question": "a", "answer": "b"}\n', r"layout.jsonl:1: unknown record layout .*question"),
    ("order.jsonl", '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}\n',
     r"order.jsonl:1: message 0: expected a user turn"),
    ("empty.jsonl", '{"instruction": "a", "output": ""}\n', r"empty.jsonl:1: message 1: an empty assistant reply"),
    ("types.jsonl", '{"instruction": "a", "output": 3}\n', r"types.jsonl:1: 'output' must be a string"),
    ("share.json", '[{"conversations": [{"from": "robot", "value": "a"}]}]', r"share.json item 0: .*'from' must be"),
    ("nocol.csv", "prompt\nx\n", r"nocol.csv: a CSV needs a 'text' column"),
    ("layout.csv", "text\nhello\n", r"layout.csv row 2: 'text' is not in the llama2-chinese layout"),
])
def test_bad_records_name_file_line_and_expectation(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_conversations(str(tmp_path / name))


# ------------------------------------------------------------------- scoring
def test_builtin_items_have_gold_answers_from_the_corpora():
    sentiment, segmentation = sentiment_items(), segmentation_items()
    assert len(sentiment) > 10_000 and len(segmentation) > 10_000
    assert {i["answer"] for i in sentiment} == {"正面", "负面"}
    assert all(i["answer"].replace("/", "") == i["text"] for i in segmentation)


def test_segmentation_f1_and_task_scores():
    assert segmentation_scores("中国/人民/银行", "中国/人民/银行") == (3, 3, 3)
    assert segmentation_scores("中国人民/银行", "中国/人民/银行") == (1, 2, 3)
    items = [{"task": "sentiment", "answer": "正面"}, {"task": "sentiment", "answer": "负面"},
             {"task": "sentiment", "answer": "负面"}, {"task": "segmentation", "text": "中国人民", "answer": "中国/人民"}]
    result = score(items, ["正面", "正面", "我不知道", "中国/人民"])
    assert result["sentiment"] == {"n": 3, "accuracy": 1 / 3, "unparsable": 1 / 3, "majority_class_accuracy": 2 / 3}
    assert result["segmentation"]["f1"] == 1.0 and result["segmentation"]["one_char_per_word_f1"] == 0.0


@pytest.mark.parametrize("recipe", ["chatglm_lora", "model_baichuan"])
def test_every_config_parses_with_its_recipes_arguments(recipe):
    """A typo or an option the recipe lacks in a GPU config fails here, not on the user's GPU."""
    train = load_recipe_module(recipe, "train")
    configs = sorted((REPO / recipe / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for config in configs:
        data_args, model_args, training_args = parse_args(
            [train.DataArguments, train.ModelArguments, train.SFTTrainingArguments], [str(config), "--use_cpu", "true"])
        assert model_args.finetuning_type in ("lora", "qlora", "full"), config
        assert Path(data_args.data_dir).name == recipe, config


def test_loss_plot_draws_both_curves(tmp_path):
    """plot_losses: the logged train loss and the eval loss, each where the log has it."""
    import matplotlib.image

    from common.plots import plot_losses

    history = [{"step": 0, "eval_loss": 5.0}, {"step": 10, "loss": 4.0}, {"step": 20, "loss": 3.0},
               {"step": 20, "eval_loss": 3.2}, {"step": 20, "train_runtime": 1.0}]
    plot_losses(history, tmp_path / "loss.png", "test")
    image = matplotlib.image.imread(tmp_path / "loss.png")[..., :3]
    colours = {tuple(pixel) for pixel in (image * 255).round().astype(int).reshape(-1, 3)[::7]}
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours

    def drawn(colour):
        return any(sum(abs(a - b) for a, b in zip(colour, pixel)) < 30 for pixel in colours)

    assert drawn(blue) and drawn(orange)
    plot_losses([{"step": 5, "loss": 1.0}], tmp_path / "train_only.png")  # no evaluation logged: still a plot
    assert (tmp_path / "train_only.png").stat().st_size > 5_000
