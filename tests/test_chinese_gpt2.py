"""chinese_gpt2: cleaning into token shards, the bigram baseline, the GPU speed paths on the CPU,\ntraining and resuming end to end, generation."""

import json

import numpy as np
import pytest
import torch

from common.errors import UserError
from common.serving.loading import load_causal_lm
from common.shards import ShardOptions, TokenShards, read_index, split_of
from common.tokenizer import join_chinese, load_tokenizer

from conftest import load_recipe_module, run_script


# -------------------------------------------------------------- split and cleaning
def test_split_is_by_document_and_repeatable():
    texts = [f"第{i}篇文章的内容" for i in range(2000)]
    options = ShardOptions(valid_ratio=0.1, seed=7)
    first = [split_of(t, options) for t in texts]
    assert first == [split_of(t, options) for t in reversed(texts)][::-1]  # the text decides, not its place
    assert first != [split_of(t, ShardOptions(valid_ratio=0.1, seed=8)) for t in texts]
    assert 150 < first.count("valid") < 250


def test_prepare_data_on_user_csv_and_jsonl(tmp_path):
    (tmp_path / "csv").mkdir()
    # each text holds a character of its own, so what the tokenizer learnt from shows in its vocabulary
    rows = [f"\u3000这是第{i}条新闻{chr(0x5000 + i)}，内容各不相同。" for i in range(60)]
    (tmp_path / "csv" / "a.csv").write_text("id,content\n" + "\n".join(f"{i},{t}" for i, t in enumerate(rows[:40])) + "\n1,短\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in rows[40:] + rows[:5]) + "\n")
    out = tmp_path / "out"
    result = run_script("chinese_gpt2/prepare_data.py", "--input", tmp_path / "csv", tmp_path / "b.jsonl",
                        "--output_dir", out, "--vocab_size", "300", "--valid_ratio", "0.2", "--workers", "2")
    report = json.loads((out / "report.json").read_text())
    assert report["documents_read"] == 66 and report["dropped_too_short"] == 1 and report["dropped_duplicate"] == 5
    assert report["train_documents"] + report["valid_documents"] == 60 and report["valid_documents"] > 3
    assert "train_tokens" in result.stdout

    index = read_index(out)
    tokenizer = load_tokenizer(out / "tokenizer")
    assert index["eos_token_id"] == tokenizer.eos_token_id
    kept = [t.strip() for t in rows]  # full-width spaces cleaned away
    for split in ("train", "valid"):
        ids = TokenShards(out, split, block_size=1).tokens()
        assert len(ids) == report[f"{split}_tokens"] and ids[-1] == tokenizer.eos_token_id
        assert (ids == tokenizer.eos_token_id).sum() == report[f"{split}_documents"]  # one eos closes each text
        decoded = {d for d in tokenizer.decode(ids.tolist()).replace(" ", "").split(tokenizer.eos_token) if d}
        expected = {t for t in kept if split_of(t, ShardOptions(valid_ratio=0.2, seed=42)) == split}
        known = {t for t in expected if not {c for c in t if c not in tokenizer.get_vocab()}}
        if split == "train":
            assert decoded == expected == known  # every train character is in the vocabulary
        else:  # the tokenizer learnt from train texts only: the held-out texts' own characters are unknown
            assert not known and len(decoded) == report["valid_documents"]


def test_prepare_data_names_a_missing_column(tmp_path):
    (tmp_path / "x.csv").write_text("title,body\na,b\n")
    result = run_script("chinese_gpt2/prepare_data.py", "--input", tmp_path / "x.csv",
                        "--output_dir", tmp_path / "o", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "x.csv: missing column(s) content" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "正常的一行文本"}\n{broken\n')
    result = run_script("chinese_gpt2/prepare_data.py", "--input", bad, "--output_dir", tmp_path / "o", check=False)
    assert result.returncode == 2 and "bad.jsonl: line 2 (byte 34) is not valid JSON" in result.stderr


# ------------------------------------------------------------------ bigram baseline
def test_bigram_perplexity_matches_a_hand_computation():
    bigram_perplexity = load_recipe_module("chinese_gpt2", "train").bigram_perplexity
    train = np.array([0, 1, 0, 1, 2])  # pairs 0->1 (x2), 1->0, 1->2; contexts 0: 2, 1: 2
    valid = np.array([[0, 1, 2]])  # scored: p(1|0) = (2+1)/(2+3), p(2|1) = (1+1)/(2+3)
    expected = np.exp(-(np.log(3 / 5) + np.log(2 / 5)) / 2)
    assert bigram_perplexity(train, valid, vocab_size=3) == pytest.approx(expected)


# ---------------------------------------------------- GPU speed paths, checked on CPU
def tiny_gpt2(attn_implementation="sdpa", vocab_size=300):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_layer=2, n_head=2, n_embd=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel._from_config(config, attn_implementation=attn_implementation)
    model.loss_type = "ForCausalLM"
    return model.train()


@pytest.mark.parametrize("chunk", [7, 1000])  # several chunks with a ragged last one; one chunk
def test_chunked_loss_equals_the_model_loss_and_gradients(chunk):
    import copy

    train = load_recipe_module("chinese_gpt2", "train")
    reference = tiny_gpt2()
    chunked = copy.deepcopy(reference)
    train.use_chunked_loss(chunked, chunk)
    input_ids = torch.randint(0, 300, (3, 32))
    labels = input_ids.clone()
    labels[0, :5] = -100
    labels[2, 10:] = -100
    counted = (labels[:, 1:] != -100).sum()
    for kwargs in ({}, {"num_items_in_batch": counted * 4}):  # mean over tokens; the Trainer's divisor
        reference.zero_grad()
        chunked.zero_grad()
        expected = reference(input_ids=input_ids, labels=labels, **kwargs).loss
        expected.backward()
        output = chunked(input_ids=input_ids, labels=labels, **kwargs)
        output.loss.backward()
        assert output.logits is None  # the [tokens, vocabulary] logits were never returned
        assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
        for (name, p_ref), p_chunked in zip(reference.named_parameters(), chunked.parameters()):
            torch.testing.assert_close(p_chunked.grad, p_ref.grad, rtol=1e-5, atol=1e-7, msg=name)
    chunked.eval()  # evaluation keeps the model's own forward, logits included
    evaluated = chunked(input_ids=input_ids, labels=labels)
    assert evaluated.logits.shape == (3, 32, 300)
    assert evaluated.loss.item() == pytest.approx(reference.eval()(input_ids=input_ids, labels=labels).loss.item())


def test_sdpa_causal_reaches_sdpa_as_is_causal_without_a_mask_when_compiled():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("sdpa_causal", sdpa_attention_forward)  # as train.py does
    model = tiny_gpt2("sdpa_causal")
    input_ids = torch.randint(0, 300, (2, 32))
    calls = []

    def inspecting_backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if "scaled_dot_product_attention" in str(node.target):
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                calls.append((mask is None, node.kwargs.get("is_causal")))
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=inspecting_backend)(input_ids=input_ids, labels=input_ids).loss
    torch._dynamo.reset()
    assert calls == [(True, True)] * 2  # both layers: no mask tensor, SDPA's own causal kernel
    plain = tiny_gpt2("sdpa")(input_ids=input_ids, labels=input_ids).loss
    assert compiled.item() == pytest.approx(plain.item(), rel=1e-6)


# ------------------------------------------------------------------ end to end
TINY = """
block_size: 32
n_layer: 1
n_head: 2
n_embd: 32
max_steps: 40
per_device_train_batch_size: 8
per_device_eval_batch_size: 64
learning_rate: 5.0e-3
warmup_steps: 5
eval_steps: 20
save_steps: 20
logging_steps: 5
disable_tqdm: true
seed: 0
"""


def test_prepare_train_resume_on_builtin_data(tmp_path):
    data, out = tmp_path / "data", tmp_path / "model"
    run_script("chinese_gpt2/prepare_data.py", "--output_dir", data, "--vocab_size", "2000")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    first = run_script("chinese_gpt2/train.py", config, "--data_dir", data, "--output_dir", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "loss.png").stat().st_size > 10_000  # the loss curves beside metrics.json
    assert metrics["train"]["steps"] == 40
    assert metrics["train"]["last_logged_loss"] < metrics["train"]["first_logged_loss"] - 1.0
    assert metrics["valid_perplexity"] == pytest.approx(np.exp(metrics["valid_loss"]))
    assert 1 < metrics["bigram_baseline"]["valid_perplexity"] < 2000

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == read_index(data)["eos_token_id"]

    # resume from the last checkpoint (step 40) and go on to step 60
    resumed = run_script("chinese_gpt2/train.py", config, "--data_dir", data, "--output_dir", out,
                         "--resume_from_checkpoint", "last", "--max_steps", "60")
    assert "resuming from " + str(out / "checkpoint-40") in resumed.stderr
    # it trained steps 41-60 only: one loss logged every 5 steps (a fresh run would log 12)
    assert (first.stdout.count("'loss'"), resumed.stdout.count("'loss'")) == (40 // 5, 20 // 5)
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 60
    state = json.loads((out / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60


# -------------------------------------------------------------------- generation
generate_module = load_recipe_module("chinese_gpt2", "generate")


def test_decoded_spaces_between_chinese_characters_are_removed():
    join = join_chinese
    assert join("新 华 社 北 京 电 ， 记 者") == "新华社北京电，记者"
    assert join("价 格 3999 元") == "价格3999元"
    assert join("hello world 你 好") == "hello world你好"


@pytest.mark.parametrize("kwargs,message", [
    ({"strategy": "sample", "temperature": 0}, "temperature must be > 0"),
    ({"strategy": "sample", "top_p": 1.5}, "top_p must be in"),
    ({"strategy": "beam", "num_beams": 1}, "num_beams >= 2"),
    ({"strategy": "greedy", "max_new_tokens": 0}, "at least 1"),
    ({"strategy": "nucleus"}, "unknown strategy"),
])
def test_bad_generation_settings_are_refused(kwargs, message):
    kwargs = {"max_new_tokens": 8, **kwargs}
    with pytest.raises(UserError, match=message):
        generate_module.generation_settings(**kwargs)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.tokenizer import build_chinese_tokenizer

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = build_chinese_tokenizer(["新华社北京电，记者报道。人民日报社论。"] * 3, vocab_size=100, min_frequency=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_layer=1, n_head=2, n_embd=16,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_generation_strategies(tiny_lm):
    model, tokenizer = load_causal_lm(tiny_lm, device="cpu")
    settings = generate_module.generation_settings
    greedy = generate_module.generate(model, tokenizer, ["新华社", "记者"], settings("greedy", 6))
    assert greedy == generate_module.generate(model, tokenizer, ["新华社", "记者"], settings("greedy", 6))
    assert greedy[0].startswith("新华社") and " " not in greedy[0]
    torch.manual_seed(1)
    sampled = generate_module.generate(model, tokenizer, ["新华社"] * 4, settings("sample", 6, temperature=5.0))
    assert len(set(sampled)) > 1  # hot sampling varies between draws
    torch.manual_seed(1)
    assert sampled == generate_module.generate(model, tokenizer, ["新华社"] * 4, settings("sample", 6, temperature=5.0))
    beam = generate_module.generate(model, tokenizer, ["新华社"], settings("beam", 6, num_beams=3))
    assert beam[0].startswith("新华社")
    # the context is 16 tokens: a 14-token prompt may only get 2 new ones
    long_prompt = "新华社北京电记者报道人民日报社"
    [out] = generate_module.generate(model, tokenizer, [long_prompt], settings("greedy", 10))
    new_ids = tokenizer(out[len(long_prompt):], add_special_tokens=False)["input_ids"]
    assert len(new_ids) <= 16 - len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"])


def test_generate_cli_refuses_bad_input(tiny_lm, tmp_path):
    result = run_script("chinese_gpt2/generate.py", "新华社", "--model", tiny_lm, "--strategy", "sample",
                        "--temperature", "0", check=False)
    assert result.returncode == 2 and "temperature must be > 0" in result.stderr
    result = run_script("chinese_gpt2/generate.py", "--model", tiny_lm, check=False)
    assert result.returncode == 2 and "no prompt" in result.stderr
    ok = run_script("chinese_gpt2/generate.py", "新华社", "--model", tiny_lm, "--max_new_tokens", "4")
    model, tokenizer = load_causal_lm(tiny_lm, device="cpu")  # the command line's default: greedy
    expected = generate_module.generate(model, tokenizer, ["新华社"], generate_module.generation_settings("greedy", 4))
    assert ok.stdout.strip().splitlines()[-1] == expected[0] != "新华社"
