"""model_baichuan/convert.py on tiny fake Baichuan checkpoints: the converted Llama gives the
logits of an independent Baichuan forward pass (NormHead included), the tokenizer gives
sentencepiece's ids, 13B (ALiBi) and broken checkpoints are refused with a clear message."""

import json
import math

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

from common.corpora import load_peoples_daily, load_reviews
from common.templates import (
    encode_chat,
    ensure_template_tokens,
    get_template,
    registry_entry_of,
    resolve_template,
    stop_criteria,
)

from conftest import load_recipe_module, run_script

HIDDEN, HEADS, LAYERS, INTERMEDIATE, MAX_POSITIONS = 64, 4, 2, 128, 128
EPS = 1e-6
CHAT_GENERATION = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "user_token_id": 195,
                   "assistant_token_id": 196, "max_new_tokens": 2048, "temperature": 0.3, "top_k": 5,
                   "top_p": 0.85, "repetition_penalty": 1.05, "do_sample": True, "transformers_version": "4.29.2"}
TOKENIZER_TEXTS = [
    "新华社北京一月一日电，今天天气很好。", "Hello world, 2024年1月1日 价格：￥199.00元",
    "  leading spaces,   inner   spaces and trailing  ", "第一行\n第二行\n\n\t缩进", "emoji 😀 和生僻字 龘𠀀",
    "你好<reserved_106>世界<reserved_107>回答", "12345678 abcdefg",
]


@pytest.fixture(scope="module")
def convert():
    return load_recipe_module("model_baichuan", "convert")


# ------------------------------------------------------------------ fake checkpoints
def train_sentencepiece(path, model_type="bpe", baichuan_like=True):
    """A small sentencepiece model of the built-in corpus. Baichuan's own was trained as
    BPE with byte fallback, identity normalisation, no dummy prefix, whitespace kept."""
    texts = load_peoples_daily()[:300] + [text for text, _ in load_reviews()[::400]]
    texts += ["The quick brown fox jumps over the lazy dog 1234567890"] * 20
    options = dict(add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
                   split_digits=True) if baichuan_like else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(path.with_suffix("")), model_type=model_type,
        vocab_size=3000, byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<reserved_106>", "<reserved_107>"], num_threads=1, minloglevel=2, **options)
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")


def baichuan_weights(vocab_size, seed, dtype=torch.float32):
    """Random Baichuan-7B-layout weights; norms around 1 and lm_head rows of very different
    lengths (Baichuan2 stores its NormHead unnormalised)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    def norm_weight():
        return 1 + randn(HIDDEN, scale=0.2)

    w = {"model.embed_tokens.weight": randn(vocab_size, HIDDEN, scale=1.0), "model.norm.weight": norm_weight()}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.W_pack.weight"] = randn(3 * HIDDEN, HIDDEN, scale=HIDDEN ** -0.5)
        w[p + "self_attn.o_proj.weight"] = randn(HIDDEN, HIDDEN, scale=HIDDEN ** -0.5)
        w[p + "mlp.gate_proj.weight"] = randn(INTERMEDIATE, HIDDEN, scale=HIDDEN ** -0.5)
        w[p + "mlp.up_proj.weight"] = randn(INTERMEDIATE, HIDDEN, scale=HIDDEN ** -0.5)
        w[p + "mlp.down_proj.weight"] = randn(HIDDEN, INTERMEDIATE, scale=INTERMEDIATE ** -0.5)
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "post_attention_layernorm.weight"] = norm_weight()
    row_lengths = 0.2 + 2.8 * torch.rand(vocab_size, 1, generator=g)
    head = randn(vocab_size, HIDDEN, scale=1.0)
    w["lm_head.weight"] = head / head.norm(dim=1, keepdim=True) * row_lengths
    return {name: t.to(dtype) for name, t in w.items()}


def write_baichuan(root, weights, *, fmt="safetensors", shards=3, norm_head_code=True, inv_freq=False,
                   config=None, tokenizer=None, generation=None):
    """A Baichuan checkpoint directory as published: config.json, remote-code stub, weights
    in `shards` files (round-robin, so a layer's W_pack and its MLP sit in different files)."""
    root.mkdir(parents=True, exist_ok=True)
    vocab_size = weights["model.embed_tokens.weight"].shape[0] if weights else 300
    (root / "config.json").write_text(json.dumps(config or {
        "architectures": ["BaichuanForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.X"},
        "model_type": "baichuan", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "rms_norm_eps": EPS, "vocab_size": vocab_size,
        "max_position_embeddings": MAX_POSITIONS, "model_max_length": MAX_POSITIONS, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False, "hidden_act": "silu",
        "initializer_range": 0.02, "torch_dtype": "bfloat16", "use_cache": True}))
    head = ("class NormHead(nn.Module):\n    def forward(self, x):\n"
            "        return F.linear(x, F.normalize(self.weight))\n") if norm_head_code else ""
    (root / "modeling_baichuan.py").write_text(
        "import torch.nn.functional as F\nfrom torch import nn\n\n\nclass RotaryEmbedding(nn.Module):\n"
        "    pass\n\n\n" + head)
    if tokenizer is not None:
        (root / "tokenizer.model").write_bytes(tokenizer.read_bytes())
        (root / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": False, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": True,
                          "rstrip": False, "single_word": False},
            "unk_token": "<unk>", "model_max_length": MAX_POSITIONS, "tokenizer_class": "BaichuanTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]}}))
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    tensors = dict(weights)
    if inv_freq:  # older .bin checkpoints carry the rotary buffers
        for i in range(LAYERS):
            tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(HIDDEN // HEADS // 2)
    names = sorted(tensors)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    files = {}
    for s in range(shards):
        file = f"{prefix}-{s + 1:05d}-of-{shards:05d}.{ext}" if shards > 1 else f"{prefix}.{ext}"
        files[file] = {name: tensors[name].contiguous() for name in names[s::shards]}
    for file, part in files.items():
        save_file(part, str(root / file)) if fmt == "safetensors" else torch.save(part, root / file)
    if shards > 1:
        weight_map = {name: file for file, part in files.items() for name in part}
        (root / f"{prefix}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


# ------------------------------------------------------------------ independent reference
def reference_logits(w, ids, norm_head):
    """Baichuan-7B's forward pass from its description, in float64: RMSNorm, W_pack rows
    q | k | v, rotate-half RoPE (base 10000), causal attention, SwiGLU MLP, NormHead."""
    w = {name: t.double() for name, t in w.items()}
    head_dim = HIDDEN // HEADS
    n = len(ids)

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight

    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(t):  # [heads, n, head_dim]
        half = head_dim // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * cos + rotated * sin

    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    causal = torch.triu(torch.full((n, n), float("-inf"), dtype=torch.float64), 1)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        qkv = h @ w[p + "self_attn.W_pack.weight"].T
        q, k, v = (t.reshape(n, HEADS, head_dim).transpose(0, 1) for t in qkv.split(HIDDEN, -1))
        q, k = rope(q), rope(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal
        attention = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, HIDDEN)
        x = x + attention @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    head = w["lm_head.weight"]
    if norm_head:
        head = head / head.norm(dim=1, keepdim=True)
    return x @ head.T


def sequences(vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=g).tolist() for length in (1, 7, 23, 40)]


def assert_matches_reference(model_dir, weights, norm_head):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab_size = weights["model.embed_tokens.weight"].shape[0]
    for ids in sequences(vocab_size):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        expected = reference_logits(weights, ids, norm_head)
        assert torch.allclose(logits, expected, atol=1e-4, rtol=0), (logits - expected).abs().max()
        # the test can fail: with the other head the logits are far off
        other = reference_logits(weights, ids, not norm_head)
        assert (logits - other).abs().max() > 0.5


# ------------------------------------------------------------------ Baichuan2-7B (NormHead, safetensors shards)
@pytest.fixture(scope="module")
def baichuan2(tmp_path_factory, sp_model):
    root = tmp_path_factory.mktemp("baichuan2")
    vocab_size = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    weights = baichuan_weights(vocab_size, seed=1)
    source = write_baichuan(root / "Baichuan2-7B-Chat", weights, shards=3, tokenizer=sp_model,
                            generation=CHAT_GENERATION)
    result = run_script("model_baichuan/convert.py", "--input", source, "--output", root / "llama", "--verify")
    return {"source": source, "output": root / "llama", "weights": weights, "stdout": result.stdout,
            "stderr": result.stderr}


def test_baichuan2_logits_match_reference_with_normhead_baked_in(baichuan2):
    assert "NormHead" in baichuan2["stderr"]  # the decision is logged
    assert_matches_reference(baichuan2["output"], baichuan2["weights"], norm_head=True)
    with safe_open(str(baichuan2["output"] / "model-00002-of-00003.safetensors"), "pt") as f:
        head = f.get_tensor("lm_head.weight") if "lm_head.weight" in f.keys() else None
    if head is None:  # lm_head may sit in any shard
        index = json.loads((baichuan2["output"] / "model.safetensors.index.json").read_text())
        with safe_open(str(baichuan2["output"] / index["weight_map"]["lm_head.weight"]), "pt") as f:
            head = f.get_tensor("lm_head.weight")
    assert torch.allclose(head.norm(dim=1), torch.ones(head.shape[0]), atol=1e-5)


def test_sharded_output_index_config_and_generation_config(baichuan2):
    out = baichuan2["output"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in out.glob("*.safetensors"))
    assert shard_files == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    stored, total = {}, 0
    for name in shard_files:
        with safe_open(str(out / name), "pt") as f:
            for key in f.keys():
                stored[key] = name
                tensor = f.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
                assert tensor.dtype == torch.float32  # auto: the source's dtype
    assert stored == index["weight_map"] and index["metadata"]["total_size"] == total
    expected = set(LlamaForCausalLM.from_pretrained(out).state_dict())
    assert set(stored) == expected and not any("W_pack" in k or "inv_freq" in k for k in stored)
    # each layer's q, k, v are the row blocks of W_pack
    with safe_open(str(out / stored["model.layers.1.self_attn.k_proj.weight"]), "pt") as f:
        k_proj = f.get_tensor("model.layers.1.self_attn.k_proj.weight")
    assert torch.equal(k_proj, baichuan2["weights"]["model.layers.1.self_attn.W_pack.weight"][HIDDEN:2 * HIDDEN])

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == HEADS
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["max_position_embeddings"] == MAX_POSITIONS and config["rms_norm_eps"] == EPS
    assert "auto_map" not in config
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.temperature, generation.top_k, generation.top_p, generation.repetition_penalty,
            generation.max_new_tokens, generation.do_sample) == (0.3, 5, 0.85, 1.05, 2048, True)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    assert "user_token_id" not in json.loads((out / "generation_config.json").read_text())
    # the converted tokenizer carries the baichuan2 entry as Jinja (no sft_template.json needed)
    assert registry_entry_of(AutoTokenizer.from_pretrained(out).chat_template) is get_template("baichuan2")
    assert not (out / "sft_template.json").exists()
    assert "load it without remote code" in baichuan2["stdout"] and "verify: loads cleanly" in baichuan2["stdout"]


def test_tokenizer_gives_sentencepiece_ids(baichuan2, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokenizer = AutoTokenizer.from_pretrained(baichuan2["output"], trust_remote_code=False)
    for text in TOKENIZER_TEXTS:
        ids = tokenizer(text)["input_ids"]  # Baichuan adds no <s>
        assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == sp.decode(ids) == text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode("😀"))  # byte fallback was exercised
    # unseen paragraphs and reviews: long enough that a wrong merge order would show
    unseen = load_peoples_daily()[1000:1200] + [text for text, _ in load_reviews()[5::50]]
    assert [tokenizer(t)["input_ids"] for t in unseen] == [sp.encode(t) for t in unseen]
    for marker in ("<reserved_106>", "<reserved_107>"):
        assert tokenizer(marker)["input_ids"] == [sp.piece_to_id(marker)]
        assert marker in tokenizer.all_special_tokens
    chat = tokenizer("<reserved_106>你好<reserved_107>")["input_ids"]
    assert tokenizer.decode(chat, skip_special_tokens=True) == "你好"
    # the recorded template works as is: its markers need no new embedding rows
    template = resolve_template("auto", tokenizer, baichuan2["output"])
    assert template is get_template("baichuan2")
    assert ensure_template_tokens(tokenizer, template) == []
    encoded = encode_chat(tokenizer, template, [{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert encoded.input_ids == [sp.piece_to_id("<reserved_106>"), *sp.encode("你好"), sp.piece_to_id("<reserved_107>")]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert len(tokenizer) == sp.get_piece_size()


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_with_dummy_prefix_and_nfkc(convert, tmp_path, model_type):
    """sentencepiece's defaults (dummy prefix, NFKC, extra whitespace removed), which other
    Baichuan-like models use, are followed too."""
    sp_path = train_sentencepiece(tmp_path / "tokenizer.model", model_type, baichuan_like=False)
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    source = tmp_path / "src"
    source.mkdir()
    (source / "tokenizer.model").write_bytes(sp_path.read_bytes())
    tokenizer = convert.convert_tokenizer(source, {"vocab_size": sp.get_piece_size(), "max_position_embeddings": 64})
    tokenizer.save_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    texts = [t for t in TOKENIZER_TEXTS if "<reserved" not in t] + ["全角　空格ＡＢＣ１２３", " 前导空格", "   "]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == sp.decode(ids)
    assert sp.id_to_piece(sp.encode("ab")[0]).startswith("▁")  # the model really adds a dummy prefix


# ------------------------------------------------------------------ Baichuan-7B (plain head, .bin shards)
def test_baichuan1_bin_shards_with_rotary_buffers(convert, tmp_path, capsys):
    weights = baichuan_weights(300, seed=2)
    source = write_baichuan(tmp_path / "Baichuan-7B", weights, fmt="bin", shards=2, norm_head_code=False,
                            inv_freq=True)
    out = tmp_path / "llama"
    result = convert.main(["--input", str(source), "--output", str(out), "--template", "none"])
    assert result["norm_head"] is False and result["tensors"] == 3 + LAYERS * 9
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model-0000{i}-of-00002.safetensors"
                                                                 for i in (1, 2)]
    assert_matches_reference(out, weights, norm_head=False)
    assert not (out / "sft_template.json").exists() and not (out / "tokenizer.json").exists()
    generation = json.loads((out / "generation_config.json").read_text())  # Baichuan2-Chat's defaults
    assert (generation["temperature"], generation["top_k"], generation["eos_token_id"]) == (0.3, 5, 2)
    assert "verify" in capsys.readouterr().out


def test_single_bfloat16_file_and_dtype_option(convert, tmp_path):
    weights = baichuan_weights(300, seed=3, dtype=torch.bfloat16)
    source = write_baichuan(tmp_path / "src", weights, shards=1)
    convert.main(["--input", str(source), "--output", str(tmp_path / "auto")])
    assert sorted(p.name for p in (tmp_path / "auto").iterdir() if "model" in p.name) == ["model.safetensors"]
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "auto" / "model.safetensors"), "pt") as f:
        head = f.get_tensor("lm_head.weight")
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    # normalised in float32, then rounded once
    expected = torch.nn.functional.normalize(weights["lm_head.weight"].float(), dim=1).to(torch.bfloat16)
    assert torch.equal(head, expected)
    convert.main(["--input", str(source), "--output", str(tmp_path / "fp32"), "--dtype", "float32",
                  "--norm_head", "false"])
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), weights["lm_head.weight"].float())
    with pytest.raises(SystemExit):  # an existing model is not overwritten by accident
        convert.main(["--input", str(source), "--output", str(tmp_path / "fp32")])
    convert.main(["--input", str(source), "--output", str(tmp_path / "fp32"), "--overwrite", "--verify"])
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f:  # the defaults' output replaced it
        assert torch.equal(f.get_tensor("lm_head.weight"), expected)


def test_one_big_file_is_split_by_max_shard_size(convert, tmp_path):
    weights = baichuan_weights(300, seed=6)
    source = write_baichuan(tmp_path / "src", weights, shards=1)
    result = convert.main(["--input", str(source), "--output", str(tmp_path / "out"), "--max_shard_size", "150KB"])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert result["files"] == len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((tmp_path / "out" / f).stat().st_size <= 150_000 + 10_000 for f in files)  # + header
    assert not list((tmp_path / "out").glob("partial-*"))
    assert_matches_reference(tmp_path / "out", weights, norm_head=True)
    assert [convert.parse_size(t) for t in ("5GB", "2GiB", "500 mb", "1024")] == [5 * 10**9, 2 * 2**30, 5 * 10**8,
                                                                                1024]


def test_greedy_generation_config_keeps_no_sampling_settings(convert, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "temperature": 0.3, "top_p": 0.85, "max_new_tokens": 64, "user_token_id": 195}))
    generation = convert.generation_config(tmp_path, {})
    generation.save_pretrained(tmp_path / "out")  # transformers refuses sampling flags without do_sample
    saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 64 and not {"temperature", "top_p", "user_token_id"} & set(saved)


def test_norm_head_auto_decision(convert, tmp_path):
    def decide(vocab_size, code, option="auto"):
        root = tmp_path / f"{vocab_size}-{code}-{option}"
        root.mkdir()
        if code is not None:
            (root / "modeling_baichuan.py").write_text(code)
        return convert.decide_norm_head(root, {"vocab_size": vocab_size}, option)

    assert decide(300, "class NormHead(nn.Module):\n    pass\n") is True
    assert decide(125696, "class BaichuanForCausalLM:\n    pass\n") is False  # the modeling file decides
    assert decide(125696, None) is True and decide(64000, None) is False
    assert decide(64000, None, "true") is True and decide(125696, None, "false") is False


# ------------------------------------------------------------------ refusals
def test_13b_is_refused_because_of_alibi(tmp_path):
    config = {"model_type": "baichuan", "hidden_size": 5120, "intermediate_size": 13696,
              "num_attention_heads": 40, "num_hidden_layers": 40, "vocab_size": 125696, "model_max_length": 4096}
    source = tmp_path / "Baichuan2-13B-Chat"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    result = run_script("model_baichuan/convert.py", "--input", source, "--output", tmp_path / "out", check=False)
    assert result.returncode == 2 and "ALiBi" in result.stderr and "7B" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def refusal(convert, source, tmp_path, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--input", str(source), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_alibi_modeling_file_is_refused(convert, tmp_path, capsys):
    source = write_baichuan(tmp_path / "src", baichuan_weights(300, seed=4), shards=1)
    (source / "modeling_baichuan.py").write_text("def _gen_alibi_mask(n_head, max_pos):\n    pass\n")
    assert "ALiBi" in refusal(convert, source, tmp_path, capsys)


@pytest.mark.parametrize("breakage, message", [
    ("model_type", "model_type is 'llama'"),
    ("no_weights", "holds no weights"),
    ("unexpected", "unexpected tensor name(s), e.g. model.layers.0.self_attn.q_proj.weight"),
    ("missing_layer", "layers 1 incomplete"),
    ("shape", "shapes do not match"),
])
def test_broken_checkpoints_are_refused(convert, tmp_path, capsys, breakage, message):
    weights = baichuan_weights(300, seed=5)
    if breakage == "unexpected":
        weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(HIDDEN, HIDDEN)
    elif breakage == "missing_layer":
        del weights["model.layers.1.mlp.up_proj.weight"]
    elif breakage == "shape":
        weights["model.layers.0.self_attn.W_pack.weight"] = torch.zeros(2 * HIDDEN, HIDDEN)
    source = write_baichuan(tmp_path / "src", weights, shards=2)
    if breakage == "model_type":
        (source / "config.json").write_text(json.dumps({**json.loads((source / "config.json").read_text()),
                                                        "model_type": "llama"}))
    elif breakage == "no_weights":
        for path in source.glob("model*"):
            path.unlink()
    err = refusal(convert, source, tmp_path, capsys)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass


# ------------------------------------------------------------------ convert -> SFT -> serve
@pytest.fixture(scope="module")
def tuned(baichuan2, tmp_path_factory):
    """The converted tiny Baichuan2, LoRA-tuned for a few steps through model_baichuan/train.py."""
    root = tmp_path_factory.mktemp("baichuan_sft")
    run_script("model_baichuan/prepare_data.py", "--output_dir", root / "data", "--sentiment_items", "240",
               "--segmentation_items", "60")
    result = run_script(
        "model_baichuan/train.py", "model_baichuan/configs/default.yaml",
        "--model_name_or_path", baichuan2["output"], "--data_dir", root / "data", "--output_dir", root / "adapter",
        "--max_length", "128", "--per_device_train_batch_size", "4", "--max_steps", "12", "--lora_rank", "8",
        "--eval_samples", "8", "--eval_max_new_tokens", "8", "--logging_steps", "4")
    return {"adapter": root / "adapter", "stdout": result.stdout,
            "metrics": json.loads((root / "adapter" / "metrics.json").read_text())}


def test_sft_on_the_converted_model_with_the_baichuan2_template(tuned, baichuan2):
    metrics = tuned["metrics"]
    assert metrics["template"] == "baichuan2" and metrics["finetuning_type"] == "lora"
    assert "added the template's markers" not in tuned["stdout"]  # the converted vocabulary has them
    assert metrics["valid"]["loss_after"] < metrics["valid"]["loss_before"] - 0.5
    counts = {model: {task: scores["n"] for task, scores in metrics["test"][model].items()} for model in ("base", "tuned")}
    assert counts["base"] == counts["tuned"] and sum(counts["tuned"].values()) == 8, counts  # --eval_samples
    assert all(e["tuned"] for e in metrics["examples"]) and any(e["base"] != e["tuned"] for e in metrics["examples"])
    assert (tuned["adapter"] / "loss.png").stat().st_size > 10_000
    # the adapter carries the template as Jinja that renders the training ids, and its end tokens as eos
    tokenizer = AutoTokenizer.from_pretrained(tuned["adapter"])
    template = get_template("baichuan2")
    assert registry_entry_of(tokenizer.chat_template) is template
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                    {"role": "user", "content": "再见"}]
    for messages, generation in ((conversation, True), (conversation[:2], False)):
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True,
                                             return_dict=True)["input_ids"] == \
            encode_chat(tokenizer, template, messages, add_generation_prompt=generation).input_ids
    eos = GenerationConfig.from_pretrained(tuned["adapter"]).eos_token_id
    assert eos == stop_criteria(tokenizer, template)[0] and tokenizer.convert_tokens_to_ids("<reserved_106>") in eos
    assert json.loads((tuned["adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(baichuan2["output"])


def test_served_chat_equals_generate_on_the_merged_model(tuned):
    from common.instructions import plain_generation
    from common.serving.engine import Engine
    from common.serving.sampling import SamplingParams

    engine = Engine.from_pretrained(tuned["adapter"], device="cpu")  # adapter merged at load; template from the file
    try:
        messages = [{"role": "user", "content": "判断下面这条评论的情感是正面还是负面：\n质量很好"}]
        prompt, stop = engine.chat_ids(messages)
        user, assistant = engine.tokenizer.convert_tokens_to_ids(["<reserved_106>", "<reserved_107>"])
        assert prompt[0] == user and prompt[-1] == assistant and stop == ()  # the marker stops by id
        assert user in engine.stop_token_ids
        ids = torch.tensor([prompt])
        with plain_generation(engine.model):  # greedy, not the converted model's repetition_penalty 1.05
            expected = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                             do_sample=False, eos_token_id=engine.stop_token_ids,
                                             pad_token_id=0)[0, len(prompt):].tolist()
        stream = engine.stream(prompt, SamplingParams(max_new_tokens=12, temperature=0))
        text = "".join(stream)
        assert stream.token_ids == expected and text == engine.clean(
            engine.tokenizer.decode(expected, skip_special_tokens=True))
        # the replies train.py scored (its examples) are what the saved adapter says when served greedily
        for example in tuned["metrics"]["examples"]:
            ids, stop = engine.chat_ids([{"role": "user", "content": example["prompt"]}])
            served = "".join(engine.stream(ids, SamplingParams(max_new_tokens=8, temperature=0, stop=stop)))
            assert served.strip() == example["tuned"], example
    finally:
        engine.close()


def test_server_applies_baichuan2_sampling_defaults(tuned):
    from fastapi.testclient import TestClient

    from common.serving.api import ServerSettings, create_app
    from common.serving.engine import Engine

    serve = load_recipe_module("model_baichuan", "serve")
    defaults = serve.BAICHUAN2_SAMPLING
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.repetition_penalty) == (0.3, 5, 0.85, 1.05)
    engine = Engine.from_pretrained(tuned["adapter"], device="cpu")
    try:
        client = TestClient(create_app(engine, ServerSettings(defaults=defaults)))
        body = {"prompt": "新华社北京电", "max_tokens": 16, "seed": 5, "ignore_eos": True}
        implicit = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        explicit = client.post("/v1/completions", json={
            **body, "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.05}).json()
        openai_default = client.post("/v1/completions", json={**body, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                                              "repetition_penalty": 1.0}).json()
        assert implicit == explicit["choices"][0]["text"]
        assert implicit != openai_default["choices"][0]["text"]  # the defaults matter: the test can fail
    finally:
        engine.close()


def test_train_refuses_a_remote_code_checkpoint(baichuan2):
    result = run_script("model_baichuan/train.py", "--model_name_or_path", baichuan2["source"], check=False)
    assert result.returncode != 0 and "convert.py" in result.stderr and "Traceback" not in result.stderr
