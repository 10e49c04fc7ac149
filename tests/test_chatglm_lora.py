"""chatglm_lora end to end on a tiny GLM: prepare -> LoRA SFT -> scores -> merge (verified)
-> generate -> the OpenAI-compatible server; resume and adapter continuation; full tuning."""

import json
import os
import shutil
import subprocess
import sys

import openai
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GlmConfig,
    GlmForCausalLM,
)

from common.corpora import load_peoples_daily, load_reviews
from common.errors import UserError
from common.serving.engine import Engine
from common.serving.sampling import SamplingParams
from common.sft_train import (
    SFTModelArguments,
    SFTTrainingArguments,
    check_sft_run,
    lora_target_modules,
)
from common.templates import encode_chat, get_template, registry_entry_of
from common.tokenizer import build_chinese_tokenizer

from conftest import REPO, free_port, run_script, wait_until_up

QUESTION = "判断下面这条评论的情感是正面还是负面：\n质量很好，物流也快"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random tiny GLM with a Chinese tokenizer, and small built-in instruction data."""
    root = tmp_path_factory.mktemp("chatglm_lora")
    texts = load_peoples_daily()[:1500] + [text for text, _ in load_reviews()[::20]]
    tokenizer = build_chinese_tokenizer(texts, vocab_size=3000)
    torch.manual_seed(0)
    GlmForCausalLM(GlmConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    run_script("chatglm_lora/prepare_data.py", "--output_dir", root / "data", "--sentiment_items", "400",
               "--segmentation_items", "400", "--valid_ratio", "0.1", "--test_ratio", "0.1")
    return root


def train(workdir, output: str, *extra: str) -> dict:
    run_script("chatglm_lora/train.py", "chatglm_lora/configs/default.yaml", "--model_name_or_path", workdir / "base",
               "--data_dir", workdir / "data", "--output_dir", workdir / output, "--max_length", "128",
               "--per_device_train_batch_size", "4", "--lora_rank", "8", "--lora_alpha", "16",
               "--eval_samples", "16", "--eval_max_new_tokens", "12", "--logging_steps", "5", *extra)
    return json.loads((workdir / output / "metrics.json").read_text())


def test_prepare_reports_and_splits_the_builtin_tasks(workdir):
    report = json.loads((workdir / "data" / "report.json").read_text())
    assert sum(report["items"].values()) == 800 and report["multi_turn_train_conversations"] > 0
    test_rows = [json.loads(line) for line in (workdir / "data" / "test.jsonl").open()]
    train_texts = {m["content"] for line in (workdir / "data" / "train.jsonl").open()
                   for m in json.loads(line)["messages"]}
    assert {row["task"] for row in test_rows} == {"sentiment", "segmentation"}
    assert not any(row["messages"][0]["content"] in train_texts for row in test_rows)  # held out


@pytest.fixture(scope="module")
def tuned(workdir):
    return train(workdir, "lora", "--max_steps", "40", "--learning_rate", "5e-3", "--eval_steps", "20")


def test_lora_sft_learns_and_reports(workdir, tuned):
    out = workdir / "lora"
    assert tuned["template"] == "glm4" and tuned["finetuning_type"] == "lora"
    assert tuned["valid"]["loss_after"] < tuned["valid"]["loss_before"] - 0.5
    assert 0 < tuned["parameters"]["trainable_share"] < 0.5
    # both models scored on the same 16 test items (--eval_samples), base without the adapter
    counts = {model: {task: scores["n"] for task, scores in tuned["test"][model].items()} for model in ("base", "tuned")}
    assert counts["base"] == counts["tuned"] and sum(counts["tuned"].values()) == 16, counts
    examples = tuned["examples"]
    assert len(examples) == 6 and any(e["base"] != e["tuned"] for e in examples) and all(e["tuned"] for e in examples)
    # the scored replies are what the saved adapter says when served greedily (same prompt, template, stops)
    engine = Engine.from_pretrained(out, device="cpu")
    try:
        for example in examples:
            ids, stop = engine.chat_ids([{"role": "user", "content": example["prompt"]}])
            served = "".join(engine.stream(ids, SamplingParams(max_new_tokens=12, temperature=0, stop=stop)))
            assert served.strip() == example["tuned"], example
    finally:
        engine.close()
    assert tuned["data"]["train"]["kept_whole"] > 0 and tuned["data"]["packing"] is True
    assert tuned["data"]["train_rows"] < tuned["data"]["train"]["kept_whole"]  # several conversations per row
    assert (out / "adapter_model.safetensors").is_file() and not (out / "sft_template.json").exists()
    assert (out / "loss.png").stat().st_size > 10_000  # train and valid loss per step
    assert registry_entry_of(AutoTokenizer.from_pretrained(out).chat_template) is get_template("glm4")
    # the GLM role markers were new to this tokenizer: added, and their embeddings trained with the adapter
    assert "<|user|>" in json.loads((out / "tokenizer.json").read_text())["added_tokens"].__repr__()
    assert any("trainable_tokens" in key for key in load_file(out / "adapter_model.safetensors"))


def test_merge_of_a_qlora_adapter_without_a_gpu_is_refused(workdir, tuned, tmp_path):
    """A QLoRA adapter is merged into the NF4 base it was trained over (GPU + bitsandbytes); on a
    machine without them merge.py says so and names the way out, instead of silently merging
    into the unquantised weights."""
    import shutil

    adapter = tmp_path / "qlora"
    shutil.copytree(workdir / "lora", adapter)
    metrics = json.loads((adapter / "metrics.json").read_text())
    (adapter / "metrics.json").write_text(json.dumps(metrics | {"finetuning_type": "qlora"}))
    result = run_script("chatglm_lora/merge.py", "--adapter", adapter, "--output_dir", tmp_path / "merged",
                        check=False)
    assert result.returncode == 2, result.stderr
    assert "QLoRA adapter" in result.stderr and "--base_precision saved" in result.stderr
    assert not (tmp_path / "merged").exists()


def test_merge_is_verified_and_serves_like_the_adapter(workdir, tuned):
    result = run_script("chatglm_lora/merge.py", "--adapter", workdir / "lora", "--output_dir", workdir / "merged")
    report = json.loads((workdir / "merged" / "merge_report.json").read_text())
    assert report["verified"] and report["max_abs_logit_difference"] <= 1e-3
    assert report["base_precision"] == "saved"  # a LoRA adapter: the base as saved
    assert report["adapter_effect_max_abs_logit_change"] > 0.1  # the adapter matters, so parity means something
    assert "verified" in result.stdout
    assert not (workdir / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(workdir / "merged")  # a plain checkpoint
    # ... with the logits of the adapter over its base as PEFT itself loads it (not through our loader)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(workdir / "base")
    lora_tokenizer = AutoTokenizer.from_pretrained(workdir / "lora")
    base.resize_token_embeddings(len(lora_tokenizer))
    ids = torch.tensor([encode_chat(lora_tokenizer, get_template("glm4"), [{"role": "user", "content": QUESTION}],
                                    add_generation_prompt=True).input_ids])
    with torch.no_grad():
        plain = base.eval()(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, workdir / "lora").eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-4, rtol=0)
    assert (adapted - plain).abs().max() > 0.1  # the adapter matters, so the equality means something
    # the merged model carries glm4 (whose role markers training added) as Jinja: any stack's ids are training's
    tokenizer = AutoTokenizer.from_pretrained(workdir / "merged")
    conversation = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": QUESTION},
                    {"role": "assistant", "content": "正面"}, {"role": "user", "content": "为什么？"}]
    for messages, generation in ((conversation, True), (conversation[:3], False)):
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True,
                                             return_dict=True)["input_ids"] == \
            encode_chat(tokenizer, get_template("glm4"), messages, add_generation_prompt=generation).input_ids
    assert tokenizer.convert_tokens_to_ids("<|user|>") in GenerationConfig.from_pretrained(workdir / "merged").eos_token_id
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    messages = [{"role": "user", "content": QUESTION}]
    replies = []
    for model in ("lora", "merged"):
        engine = Engine.from_pretrained(workdir / model, device="cpu")
        assert engine.template.name == "glm4"
        ids, stop = engine.chat_ids(messages)
        replies.append("".join(engine.stream(ids, SamplingParams(**{**greedy.__dict__, "stop": stop}))))
    assert replies[0] == replies[1]


def test_generate_and_the_server_give_the_same_greedy_reply(workdir, tuned):
    generated = run_script("chatglm_lora/generate.py", "--model", workdir / "lora", "--max_new_tokens", "12",
                           "--device", "cpu", QUESTION.replace("\n", "\\n")).stdout
    reply = generated.split("A: ", 1)[1].rstrip("\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "chatglm_lora/serve.py"), "--model", str(workdir / "lora"),
                                "--port", str(port), "--device", "cpu"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": QUESTION}]
        answer = client.chat.completions.create(model="lora", messages=messages, temperature=0, max_tokens=12)
        assert answer.choices[0].message.content == reply
        assert "<|" not in reply and "[gMASK]" not in reply  # template markers never reach the client
        stream = client.chat.completions.create(model="lora", messages=messages, temperature=0, max_tokens=12,
                                                stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == reply
        with pytest.raises(openai.BadRequestError, match="assistant"):  # two user turns in a row
            client.chat.completions.create(model="lora", messages=messages * 2, max_tokens=4)
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_resume_matches_an_uninterrupted_run_and_adapters_continue(workdir):
    common = ("--max_steps", "12", "--save_steps", "6", "--eval_steps", "6", "--eval_samples", "-1")
    whole = train(workdir, "whole", *common)
    # as if stopped after step 6: a folder holding only the whole run's first checkpoint
    shutil.copytree(workdir / "whole" / "checkpoint-6", workdir / "interrupted" / "checkpoint-6")
    resumed = train(workdir, "interrupted", *common, "--resume_from_checkpoint", "last")
    a = load_file(workdir / "whole" / "adapter_model.safetensors")
    b = load_file(workdir / "interrupted" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed["valid"]["loss_after"] == pytest.approx(whole["valid"]["loss_after"], abs=1e-5)
    # continuing a saved adapter starts where it ended (not from a fresh adapter)
    more = train(workdir, "continued", "--max_steps", "4", "--eval_samples", "-1",
                 "--adapter_path", workdir / "whole")
    assert more["valid"]["loss_before"] == pytest.approx(whole["valid"]["loss_after"], abs=1e-4)


def test_full_finetuning_saves_a_plain_model_and_errors_are_clear(workdir):
    full = train(workdir, "full", "--finetuning_type", "full", "--max_steps", "6", "--eval_samples", "-1")
    assert full["parameters"]["trainable_share"] == 1.0 and (workdir / "full" / "config.json").is_file()
    assert full["valid"]["loss_after"] < full["valid"]["loss_before"]
    tuned_weights, base_weights = (AutoModelForCausalLM.from_pretrained(workdir / name).state_dict()
                                   for name in ("full", "base"))
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert not torch.equal(tuned_weights[name], base_weights[name]), name  # every layer trained, not adapters
    engine = Engine.from_pretrained(workdir / "full", device="cpu")
    assert engine.template.name == "glm4"
    bad = run_script("chatglm_lora/train.py", "--model_name_or_path", workdir / "nothing", "--data_dir",
                     workdir / "data", check=False)
    assert bad.returncode == 2 and "no model in" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_script("chatglm_lora/train.py", "--model_name_or_path", workdir / "base", "--data_dir",
                     workdir / "data", check=False)  # --template auto, and this base has no chat template
    assert bad.returncode == 2 and "no Jinja chat_template to use: pick a registry entry" in bad.stderr
    bad = run_script("chatglm_lora/train.py", "--model_name_or_path", workdir / "base", "--data_dir",
                     workdir / "data", "--template", "glm4", "--finetuning_type", "qlora", check=False)
    assert bad.returncode == 2 and "qlora needs" in bad.stderr
    model = AutoModelForCausalLM.from_pretrained(workdir / "base")
    assert lora_target_modules(model, ["all-linear"]) == "all-linear"  # as the command line passes it
    with pytest.raises(UserError, match=r"--lora_target c_attn: no such module in this glm model; its linear "
                                        r"layers are .*gate_up_proj"):
        lora_target_modules(model, ["q_proj", "c_attn"])
    with pytest.raises(UserError, match="--random_init builds a plain model: not with qlora or --device_map"):
        check_sft_run(SFTModelArguments(model_name_or_path=str(workdir / "base"), random_init=True,
                                        device_map="balanced"), SFTTrainingArguments(output_dir=str(workdir / "x")), "")


def test_lora_under_zero3_on_two_cpu_processes_matches_one_process(workdir, tmp_path):
    """ZeRO-3 (parameters partitioned from loading on, deepspeed.zero.Init) through the same train.py,
    two processes on gloo, against one process with the same global batch: the same losses and
    parameter counts (counted whole, not as the partitions' placeholders), an adapter that reloads
    over the base to the same logits; launched as two nodes (torchrun --nnodes 2, c10d rendezvous
    on 127.0.0.1): the same run as on one node; resumed from a checkpoint: the same adapter as the
    whole run; and a shape without weights (--random_init) trains."""
    pytest.importorskip("deepspeed")
    from peft import PeftModel

    # the template's markers already in the vocabulary, so no new trainable tokens: PEFT gathers those
    # under ZeRO-3 with CUDA calls, which fail on a CPU
    base = tmp_path / "base"
    tokenizer = AutoTokenizer.from_pretrained(workdir / "base")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[gMASK]", "<sop>", "<|system|>", "<|user|>",
                                                                "<|assistant|>", "<|observation|>", "<|endoftext|>"]})
    model = AutoModelForCausalLM.from_pretrained(workdir / "base")
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    common = ["chatglm_lora/configs/default.yaml", "--model_name_or_path", base, "--data_dir", workdir / "data",
              "--max_length", "128", "--lora_rank", "8", "--lora_alpha", "16", "--eval_samples", "16",
              "--eval_max_new_tokens", "12", "--logging_steps", "1", "--max_steps", "6", "--save_steps", "100",
              "--eval_steps", "100"]
    run_script("chatglm_lora/train.py", *common, "--per_device_train_batch_size", "4", "--output_dir", tmp_path / "one")
    launch = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}

    def zero3_args(output: str, *extra) -> list[str]:  # train.py's arguments for a ZeRO-3 run of two processes
        return [str(REPO / "chatglm_lora" / "train.py"), *map(str, common), "--per_device_train_batch_size", "2",
                "--output_dir", str(tmp_path / output), "--use_cpu", "true",
                "--deepspeed", str(REPO / "model_clm" / "configs" / "ds_zero3.json"), *map(str, extra)]

    def two_processes(output: str, *extra) -> subprocess.CompletedProcess:
        result = subprocess.run([*launch, "--standalone", "--nproc_per_node", "2", *zero3_args(output, *extra)],
                                cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    two_processes("zero3", "--save_steps", "3")
    # resumed from its step-3 checkpoint (DeepSpeed's partitioned states), it ends where the whole run did
    shutil.copytree(tmp_path / "zero3" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    two_processes("resumed", "--save_steps", "3", "--resume_from_checkpoint", "last")
    whole, resumed = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("zero3", "resumed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    # the same as two "nodes" of one process each, launched as on two machines (rendezvous on this host)
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "sft",
                  "--rdzv_endpoint", f"127.0.0.1:{free_port()}"]
    nodes = [subprocess.Popen([*launch, *rendezvous, "--node_rank", str(rank), *zero3_args("two_nodes")], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for node in nodes:
        _, errors = node.communicate(timeout=600)
        assert node.returncode == 0, errors[-4000:]
    one, zero3, two_nodes = (json.loads((tmp_path / name / "metrics.json").read_text())
                             for name in ("one", "zero3", "two_nodes"))
    assert zero3["parameters"] == one["parameters"] and one["parameters"]["total"] > 10 * one["parameters"]["trainable"]
    for key in ("first_logged_loss", "last_logged_loss"):
        assert zero3["train"][key] == pytest.approx(one["train"][key], rel=1e-5)
        assert two_nodes["train"][key] == pytest.approx(zero3["train"][key], rel=1e-6)  # (ranks may swap nodes)
    for key in ("loss_before", "loss_after"):
        assert two_nodes["valid"][key] == pytest.approx(zero3["valid"][key], rel=1e-6)
    assert one["train"]["last_logged_loss"] != one["train"]["first_logged_loss"]  # it trained
    # a shape without weights (config and tokenizer only), built partitioned (--random_init under ZeRO-3);
    # the later --model_name_or_path wins
    shape = tmp_path / "shape"
    shape.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (shape / name).write_bytes((base / name).read_bytes())
    result = two_processes("random", "--model_name_or_path", shape, "--random_init", "true", "--max_steps", "2")
    assert "built from its config with random weights" in result.stderr
    built = json.loads((tmp_path / "random" / "metrics.json").read_text())
    assert built["base_model"] == str(shape)  # the folder without weights
    assert built["parameters"] == one["parameters"] and built["train"]["steps"] == 2

    ids = torch.tensor([tokenizer("新华社北京电，今年以来经济稳中向好")["input_ids"]])
    with torch.no_grad():
        logits = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / name)
                  .eval()(input_ids=ids).logits for name in ("one", "zero3")]
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
    assert (logits[0] - plain).abs().max() > 1e-3  # the adapter changes the model
    assert torch.allclose(logits[1], logits[0], atol=1e-4)
