"""GGUF export (chatglm_lora/export_gguf.py) through llama.cpp's own converter, checked by readers no
one here wrote.

Tiny random models (2 layers x 64) of the three families the recipe tunes, each carrying a real
tokenizer and an official chat template as a user's merged checkpoint would:
- Qwen2: Qwen2's vocabulary (151,936 tokens), Qwen2.5-7B-Instruct's template, separate output layer;
- Llama: Llama-3's vocabulary (128,256 + 1), Llama-3.1-8B-Instruct's template, tied output layer;
- GLM (GlmForCausalLM, the recipe's default family): Qwen2's vocabulary plus GLM's markers, GLM-4.6's
  template (GLM-4's own vocabulary is not among the real artefacts).
Weights are float16 values stored as float32, so an f16 GGUF is lossless and must give the same logits.
Qwen2 and Llama are loaded back with transformers (`from_pretrained(dir, gguf_file=...)`, model and
tokenizer). Transformers has no loader for llama.cpp's `chatglm` architecture, so the GLM files are
read with gguf's reader: every tensor against the original, every setting against config.json.
llama.cpp itself (llama-cpp-python, which `make real-artefacts` builds from the same sdist) runs all three.
Reading a GGUF with a 150k-token vocabulary takes gguf's reader about 10 s (transformers reads a file
twice to load a model): most of this file's time, spread over both cores by running the three exports,
then the two read-backs, side by side.
"""

import json
import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import real_artefacts
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from common.tokenizer import build_chinese_tokenizer

from conftest import REPO, run_script

TEXT = "新华社北京一月一日电。今年以来，我国经济稳中向好，消费市场持续回暖。"
CONVERSATION = [{"role": "user", "content": "判断下面这条评论的情感是正面还是负面：\n质量很好，物流也快"},
                {"role": "assistant", "content": "正面"}, {"role": "user", "content": "为什么？"}]
GLM_MARKERS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=512)
FAMILIES = {  # name: (config class, model class, vocabulary, official template, extra config)
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, "qwen2", "Qwen-Qwen2.5-7B-Instruct", {"tie_word_embeddings": False}),
    "llama": (LlamaConfig, LlamaForCausalLM, "llama-bpe", "meta-llama-Llama-3.1-8B-Instruct",
              {"tie_word_embeddings": True}),
    # a RoPE base other than the converter's fixed 10000, GLM's own norm epsilon (1.5625e-07; the
    # converter would write 1e-5) and a context length other than the hidden size: export_gguf.py sets them
    "glm": (GlmConfig, GlmForCausalLM, "qwen2", "GLM-4.6",
            {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0,
                                                 "partial_rotary_factor": 0.5}}),
}


@torch.inference_mode()
def logits(model, ids: list[int]) -> torch.Tensor:
    return model.eval()(input_ids=torch.tensor([ids])).logits[0].float()


def build(name: str, out):
    config_class, model_class, vocab, template, extra = FAMILIES[name]
    folder = real_artefacts.TOKENIZERS / vocab
    if not folder.is_dir():
        pytest.fail(f"the real {vocab} tokenizer is missing: run `make real-artefacts`")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = real_artefacts.official_template(template)
    if name == "glm":
        tokenizer.add_special_tokens({"additional_special_tokens": GLM_MARKERS})
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=len(tokenizer), **SHAPE, **extra))
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() == 1:  # norms and biases away from 1 / 0, so that a swapped or dropped one shows
                param.normal_(1.0, 0.1) if "norm" in pname else param.normal_(0.0, 0.02)
            param.copy_(param.half().float())  # float16 values: the f16 export is lossless
    model.save_pretrained(out)
    return model.eval(), tokenizer


def export_command(model_dir, out_dir, *args):
    return [sys.executable, str(REPO / "chatglm_lora" / "export_gguf.py"), "--model", str(model_dir),
            "--output_dir", str(out_dir), "--name", "tiny", *map(str, args)]


def read_back(out_dir: str, text: str, conversation: list[dict]) -> dict:
    """In a worker process: the GGUFs as transformers loads them (tokenizer from the f16 file)."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir, gguf_file="tiny-F16.gguf")
    ids = tokenizer(text)["input_ids"]
    result = {"ids": ids, "chat_template": tokenizer.chat_template,
              "prompt": tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                      return_dict=True)["input_ids"]}
    for kind in ("F16", "Q8_0"):
        result[kind] = logits(AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=f"tiny-{kind}.gguf"), ids)
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if real_artefacts.converter_dir() is None:
        pytest.fail("llama.cpp's converter is missing: run `make real-artefacts`")
    root = tmp_path_factory.mktemp("gguf")
    built, processes = {}, {}
    for name in FAMILIES:  # each export starts as soon as its model is saved; the three run side by side
        built[name] = build(name, root / name)
        with open(root / f"{name}.log", "w") as log:  # a file, not a pipe: no export waits for a reader
            processes[name] = subprocess.Popen(export_command(root / name, root / f"{name}_gguf"), cwd=REPO,
                                               stdout=log, stderr=subprocess.STDOUT)
    result = {}
    for name, process in processes.items():
        process.wait(timeout=600)
        output = (root / f"{name}.log").read_text(encoding="utf-8")
        assert process.returncode == 0, f"{name}: export failed:\n{output[-5000:]}"
        report = json.loads((root / f"{name}_gguf" / "gguf_report.json").read_text())
        result[name] = {"model": built[name][0], "tokenizer": built[name][1], "dir": root / f"{name}_gguf",
                        "report": report, "output": output}
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name in ("qwen2", "llama"):  # read back while the GLM test reads its files here
            result[name]["read_back"] = pool.submit(read_back, str(result[name]["dir"]), TEXT, CONVERSATION)
        yield result


def test_glm_tensors_and_settings_read_back_with_gguf(exported):
    from gguf import GGMLQuantizationType, GGUFReader, dequantize

    case = exported["glm"]
    model, tokenizer, config = case["model"], case["tokenizer"], case["model"].config
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight",
                 **{f"self_attn.{p}_proj.{k}": f"attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")}}
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{gg}" for hf, gg in per_layer.items()})
    original = {names[k]: v.numpy() for k, v in model.state_dict().items()}

    readers = {t: GGUFReader(case["dir"] / f"tiny-{t}.gguf") for t in ("F16", "Q8_0")}
    worst = {}
    for kind, reader in readers.items():
        tensors = {t.name: t for t in reader.tensors}
        assert sorted(tensors) == sorted(original)  # nothing missing, nothing extra, no fused or split tensor
        errors = []
        for gname, weight in original.items():
            tensor = tensors[gname]
            values = dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
            if kind == "F16" or weight.ndim == 1:  # 1-D tensors stay float32 in both
                np.testing.assert_array_equal(values, weight, err_msg=gname)  # no permutation, no rounding
            else:
                assert tensor.tensor_type == GGMLQuantizationType.Q8_0, gname
                errors.append(np.abs(values - weight).max() / np.abs(weight).max())
        worst[kind] = max(errors, default=0.0)
    assert 0 < worst["Q8_0"] <= 1 / 200  # 8-bit blocks: half a step of max|block| / 127, plus its float16 scale

    def field(key):
        f = readers["F16"].fields[key]
        return bytes(f.parts[f.data[0]]).decode() if f.types[0].name == "STRING" else f.parts[f.data[0]][0].item()

    assert field("general.architecture") == "chatglm"
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert field("tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|user|>")
    assert field("chatglm.block_count") == config.num_hidden_layers
    assert field("chatglm.attention.head_count") == config.num_attention_heads
    assert field("chatglm.attention.head_count_kv") == config.num_key_value_heads
    assert field("chatglm.rope.dimension_count") == config.head_dim // 2  # partial rotary: half of each head
    # the three settings the converter reads from ChatGLM's keys, set to the model's by export_gguf.py
    assert field("chatglm.context_length") == config.max_position_embeddings
    assert field("chatglm.rope.freq_base") == 50000.0
    assert field("chatglm.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps, rel=1e-6)
    corrected = case["report"]["files"]["f16"]["corrected"]
    assert corrected == {"context_length": {"converter": 64, "model": 512},
                         "attention.layer_norm_rms_epsilon": {"converter": pytest.approx(1e-5), "model": 1.5625e-07},
                         "rope.freq_base": {"converter": 10000.0, "model": 50000.0}}
    assert case["report"]["files"]["q8_0"]["corrected"].keys() == corrected.keys()
    print(f"\nglm: f16 tensors equal to the original (all {len(original)}); q8_0 max error {worst['Q8_0']:.2%} of "
          "max |weight| per tensor; sizes " + ", ".join(f"{t} {f['bytes'] / 2**20:.1f} MiB"
                                                        for t, f in case["report"]["files"].items()))


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_transformers_reads_back_the_same_model_tokenizer_and_template(exported, name):
    case = exported[name]
    tokenizer = case["tokenizer"]
    files = case["report"]["files"]
    assert case["report"]["chat_template_included"] and "chat template: included, equal" in case["output"]

    gguf = case["read_back"].result(timeout=600)
    assert gguf["chat_template"] == tokenizer.chat_template  # tokenizer.chat_template in the GGUF
    ids = tokenizer(TEXT)["input_ids"]
    assert gguf["ids"] == ids and len(ids) >= 15
    assert gguf["prompt"] == tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                           return_dict=True)["input_ids"]

    reference, f16, q8 = logits(case["model"], ids), gguf["F16"], gguf["Q8_0"]
    scale = reference.abs().max().item()
    f16_diff, q8_diff = (f16 - reference).abs().max().item(), (q8 - reference).abs().max().item()
    q8_argmax = (q8.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"\n{name}: {len(ids)} tokens, max |logit| {scale:.3f}; max |logit difference| f16 {f16_diff:.3g}, "
          f"q8_0 {q8_diff:.3g} ({q8_diff / scale:.2%}), q8_0 argmax agreement {q8_argmax:.0%}; sizes "
          + ", ".join(f"{t} {f['bytes'] / 2**20:.1f} MiB" for t, f in files.items()))
    assert f16_diff <= 1e-5  # the same float16 values, computed in float32 both times: equal
    assert 0 < q8_diff <= 0.03 * scale  # quantised (not f16 in disguise), within 3% of the logit range
    assert q8_argmax >= 0.9
    assert files["q8_0"]["bytes"] < files["f16"]["bytes"]


def test_llama_cpp_runs_the_exported_files(exported, tmp_path):
    """llama.cpp itself: the GGUF's tokenizer gives our ids, its logits are the model's."""
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama.cpp's Python package is missing: run `make real-artefacts`")
    from gguf import GGUFReader

    def run(path, ids):
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
        try:
            assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids, path.name
            llm.eval(ids)
            return np.asarray(llm.scores[:len(ids)])
        finally:
            llm.close()

    for name, case in exported.items():
        ids = case["tokenizer"](TEXT)["input_ids"]
        reference = logits(case["model"], ids).numpy()
        scale = np.abs(reference).max()
        for kind, bound in (("F16", 0.01), ("Q8_0", 0.03)):
            got = run(case["dir"] / f"tiny-{kind}.gguf", ids)
            diff = np.abs(got - reference).max()
            agreement = (got.argmax(-1) == reference.argmax(-1)).mean()
            print(f"\nllama.cpp {name} {kind}: max |logit difference| {diff:.3g} ({diff / scale:.2%} of max |logit| "
                  f"{scale:.3f}), argmax agreement {agreement:.0%}")
            assert diff <= bound * scale and agreement >= 0.9, f"{name} {kind}"
            if name == "glm" and kind == "F16":
                corrected_diff = diff

    # the GLM file with the converter's own settings back (RoPE base 10000, norm epsilon 1e-5): another model
    case = exported["glm"]
    raw = tmp_path / "converter-only-F16.gguf"
    raw.write_bytes((case["dir"] / "tiny-F16.gguf").read_bytes())
    reader = GGUFReader(raw, "r+")
    for key, values in case["report"]["files"]["f16"]["corrected"].items():
        field = reader.fields[f"chatglm.{key}"]
        field.parts[field.data[0]][0] = values["converter"]
    reader.data.flush()
    del reader
    ids = case["tokenizer"](TEXT)["input_ids"]
    raw_diff = np.abs(run(raw, ids) - logits(case["model"], ids).numpy()).max()
    print(f"\nllama.cpp glm F16 with the converter's settings: max |logit difference| {raw_diff:.3g} "
          f"({raw_diff / corrected_diff:.0f}x the corrected file's)")
    assert raw_diff > 10 * corrected_diff


def test_refusals_name_the_fix(exported, tmp_path):
    # a LoRA adapter: merge first
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    for other in ("adapter_model.safetensors", "training_args.bin", "tokenizer.json"):  # as train.py leaves them
        (adapter / other).write_bytes(b"{}")
    result = run_script("chatglm_lora/export_gguf.py", "--model", adapter, check=False)
    assert result.returncode == 2 and "is a LoRA adapter" in result.stderr and "merge.py --adapter" in result.stderr
    # a folder that is no model
    result = run_script("chatglm_lora/export_gguf.py", "--model", tmp_path, check=False)
    assert result.returncode == 2 and "no config.json" in result.stderr
    # no converter where --llama_cpp points
    model = exported["qwen2"]["dir"].parent / "qwen2"
    result = run_script("chatglm_lora/export_gguf.py", "--model", model, "--llama_cpp", tmp_path, check=False)
    assert result.returncode == 2 and "make real-artefacts" in result.stderr
    assert "Traceback" not in result.stderr

    # a GLM whose head size is not hidden / heads: the GGUF would compute something else
    glm = tmp_path / "glm_wide_heads"
    tokenizer = exported["glm"]["tokenizer"]
    tokenizer.save_pretrained(glm)
    GlmForCausalLM(GlmConfig(vocab_size=len(tokenizer), **SHAPE)).save_pretrained(glm)  # head_dim 128 by default
    result = run_script("chatglm_lora/export_gguf.py", "--model", glm, "--output_dir", tmp_path / "g", check=False)
    assert result.returncode == 2 and "head_dim 128 x 4 heads != hidden_size 64" in result.stderr
    assert not (tmp_path / "g").exists()

    # the built-in demo's kind of vocabulary (WordPiece learnt here): llama.cpp cannot tokenise it
    demo = tmp_path / "demo"
    wordpiece = build_chinese_tokenizer([TEXT] * 3, vocab_size=200, min_frequency=1)
    wordpiece.save_pretrained(demo)
    GlmForCausalLM(GlmConfig(vocab_size=len(wordpiece), pad_token_id=wordpiece.pad_token_id,
                             **{**SHAPE, "head_dim": 16})).save_pretrained(demo)
    result = run_script("chatglm_lora/export_gguf.py", "--model", demo, "--output_dir", tmp_path / "d",
                        "--outtype", "q8_0", check=False)
    assert result.returncode == 2 and "llama.cpp does not know this tokenizer" in result.stderr
    assert "Traceback" not in result.stderr and not list((tmp_path / "d").glob("*.gguf"))
