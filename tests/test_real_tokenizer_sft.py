"""End to end with a real tokenizer and an official chat template: a tiny random-weight Qwen2
carrying Qwen2's tokenizer (validated against llama.cpp's ids) and Qwen2.5-7B-Instruct's own
Jinja template, as a user's downloaded checkpoint would. prepare_data -> train (LoRA on
all-linear, template chosen automatically) -> merge -> serve, answered through the official
openai client: replies stop at <|im_end|> and never show template markers."""

import json
import re
import subprocess
import sys

import openai
import pytest
import real_artefacts
import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from common.serving.engine import Engine
from common.serving.sampling import SamplingParams
from common.templates import IGNORE_INDEX, JinjaTemplate, encode_chat, resolve_template

from conftest import REPO, free_port, run_script, wait_until_up

QUESTION = "判断下面这条评论的情感是正面还是负面：\n质量很好，物流也快，推荐购买"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    if real_artefacts.tokenizer_dir("qwen2") is None:
        pytest.fail("the real Qwen2 tokenizer is missing: run `make real-artefacts`")
    root = tmp_path_factory.mktemp("qwen")
    tokenizer = AutoTokenizer.from_pretrained(real_artefacts.tokenizer_dir("qwen2"))
    tokenizer.chat_template = real_artefacts.official_template("Qwen-Qwen2.5-7B-Instruct")
    tokenizer.save_pretrained(root / "base")
    torch.manual_seed(0)
    # hidden size 32: the 151,936-row embedding is the cost of every step; a wide initialisation gives
    # the tied (frozen under LoRA) output layer logits large enough to become confident
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.4, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(root / "base")
    run_script("chatglm_lora/prepare_data.py", "--output_dir", root / "data", "--sentiment_items", "600",
               "--segmentation_items", "60", "--valid_ratio", "0.05", "--test_ratio", "0.05")
    result = run_script(
        "chatglm_lora/train.py", "--model_name_or_path", root / "base", "--data_dir", root / "data",
        "--output_dir", root / "lora", "--lora_target", "all-linear", "--lora_rank", "8", "--lora_alpha", "16",
        "--max_length", "160", "--per_device_train_batch_size", "8", "--max_steps", "100", "--learning_rate", "1e-2",
        "--warmup_steps", "10", "--eval_steps", "100", "--save_steps", "100", "--logging_steps", "20",
        "--eval_samples", "-1")
    run_script("chatglm_lora/merge.py", "--adapter", root / "lora", "--output_dir", root / "merged")
    return {"root": root, "stdout": result.stdout,
            "metrics": json.loads((root / "lora" / "metrics.json").read_text())}


def test_the_official_template_is_chosen_and_trained_on_the_real_ids(qwen):
    metrics = qwen["metrics"]
    assert metrics["template"] == "official" and "chat template: official" in qwen["stdout"]
    assert "added the template's markers" not in qwen["stdout"]  # Qwen's vocabulary has them
    assert metrics["valid"]["loss_after"] < metrics["valid"]["loss_before"] - 1.0
    tokenizer = AutoTokenizer.from_pretrained(qwen["root"] / "lora")
    template = resolve_template("auto", tokenizer, qwen["root"] / "lora")
    assert isinstance(template, JinjaTemplate)
    row = json.loads((qwen["root"] / "data" / "train.jsonl").open().readline())["messages"]
    encoded = encode_chat(tokenizer, template, row)
    im_start, im_end, newline = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "Ċ"])
    # the official rendering's ids (default system prompt included), loss on replies + <|im_end|>\n only
    assert encoded.input_ids == tokenizer.apply_chat_template(row, tokenize=True, return_dict=True)["input_ids"]
    trained = [t for t in encoded.labels if t != IGNORE_INDEX]
    replies = [m["content"] for m in row if m["role"] == "assistant"]
    assert trained == [t for r in replies for t in tokenizer(r)["input_ids"] + [im_end, newline]]
    assert im_start not in trained


def test_merged_model_carries_the_template_and_stops_at_im_end(qwen):
    merged = qwen["root"] / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == real_artefacts.official_template("Qwen-Qwen2.5-7B-Instruct")
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "chatglm_lora/serve.py"), "--model", str(merged),
                                "--port", str(port), "--device", "cpu"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model="merged", messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=32)
        choice = answer.choices[0]
        assert choice.finish_reason == "stop"  # ended by <|im_end|>, long before max_tokens
        assert answer.usage.completion_tokens < 32
        assert choice.message.content.strip() and "<|im" not in choice.message.content
        assert "assistant" not in choice.message.content
    finally:
        process.terminate()
        process.wait(timeout=20)
    engine = Engine.from_pretrained(merged, device="cpu")  # the same, in process: which token ended it
    try:
        prompt, stop = engine.chat_ids([{"role": "user", "content": QUESTION}])
        assert prompt == tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=True,
                                                       add_generation_prompt=True, return_dict=True)["input_ids"]
        stream = engine.stream(prompt, SamplingParams(max_new_tokens=32, temperature=0))
        assert "".join(stream) == choice.message.content
        assert stream.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and stop == ()
    finally:
        engine.close()


# (Qwen3's refusal, empty replies and roles out of order: tests/test_templates.py and test_sft.py)
@pytest.mark.parametrize("template,line,message", [
    # Gemma-2's official template raises on a system turn: the file and line of the conversation are named
    ("google-gemma-2-2b-it", '{"messages": [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}, '
     '{"role": "assistant", "content": "你好！"}]}', r"train\.jsonl:2: .*refuses this conversation: System role not "
     r"supported"),
    ("no generation prompt", None, r"has no generation prompt"),
])
def test_conversations_the_template_cannot_render_stop_train_with_one_message(qwen, tmp_path, template, line,
                                                                             message):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).symlink_to(qwen["root"] / "base" / name)
    tokenizer = AutoTokenizer.from_pretrained(qwen["root"] / "base")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = ("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}" if line is None
                               else real_artefacts.official_template(template))
    tokenizer.save_pretrained(model)
    data = tmp_path / "data"
    data.mkdir()
    good = '{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}'
    (data / "train.jsonl").write_text(good + "\n" + (line or good) + "\n", encoding="utf-8")
    (data / "valid.jsonl").write_text(good + "\n", encoding="utf-8")
    result = run_script("chatglm_lora/train.py", "--model_name_or_path", model, "--data_dir", data,
                        "--output_dir", tmp_path / "out", "--eval_samples", "-1", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()  # nothing written
