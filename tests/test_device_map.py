"""common/device_map.py: device maps that chain a model's layers over several GPUs, computed
on the CPU for a Llama-2-7B-shaped model (meta device) with made-up GPU sizes; the CLI
strings; and the SFT recipes' --device_map refusals on a machine without GPUs."""

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from common.device_map import (
    GIB,
    build_device_map,
    device_bytes,
    input_device,
    meta_model,
    parse_device_map,
)
from common.errors import UserError
from common.sft_train import SFTModelArguments, check_device_map

from conftest import load_recipe_module

LAYERS = 32


@pytest.fixture(scope="module")
def llama7b():
    """Llama-2-7B's shapes (32 layers x 4096, vocab 32000) in bf16, no memory behind them."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=LAYERS, num_attention_heads=32,
                         vocab_size=32000)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def sizes(llama7b):
    layer = sum(p.numel() * 2 for p in llama7b.model.layers[0].parameters())
    head = llama7b.lm_head.weight.numel() * 2
    total = sum(p.numel() * 2 for p in llama7b.parameters()) + sum(b.numel() * b.element_size()
                                                                   for b in llama7b.buffers())
    return SimpleNamespace(layer=layer, head=head, total=total)


def devices_of(model, device_map) -> dict[str, int]:
    """Each parameter and buffer name -> its device, asserting that exactly one map entry covers it."""
    placed = {}
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()]
    for name in names:
        entries = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        assert len(entries) == 1, (name, entries)
        placed[name] = device_map[entries[0]]
    return placed


def check_chain(model, device_map, gpus: list[int]) -> dict[str, int]:
    placed = devices_of(model, device_map)
    assert set(device_map.values()) <= set(gpus)
    assert all(isinstance(d, int) for d in device_map.values())  # no "cpu" / "disk"
    layer_devices = []
    for i in range(LAYERS):
        on = {d for n, d in placed.items() if n.startswith(f"model.layers.{i}.")}
        assert len(on) == 1, f"layer {i} split over {on}"
        assert not any(k.startswith(f"model.layers.{i}.") for k in device_map)
        layer_devices.append(on.pop())
    assert layer_devices == sorted(layer_devices)
    assert placed["model.embed_tokens.weight"] == gpus[0] == layer_devices[0]
    assert placed["model.norm.weight"] == placed["lm_head.weight"] == gpus[-1] == layer_devices[-1]
    return placed


# ------------------------------------------------------------------------ --device_map
def test_parse_device_map():
    assert parse_device_map("balanced") == ("balanced", None)
    assert parse_device_map(" balanced_low_0 ") == ("balanced_low_0", None)
    assert parse_device_map("0:20GiB,1:30GiB") == ("memory", {0: 20 * GIB, 1: 30 * GIB})
    assert parse_device_map("0: 500MB, 2:1GB") == ("memory", {0: 500 * 10**6, 2: 10**9})
    for bad, message in (("auto", "expected balanced"), ("sequential", "expected balanced"),
                         ("0:20GiB,0:10GiB", "GPU 0 named twice"), ("x:1GiB", "not GPU:size"),
                         ("0:", "not GPU:size"), ("-1:1GiB", "not GPU:size"), ("0:lots", "not a size"),
                         ("0:0GB", "positive")):
        with pytest.raises(UserError, match=message):
            parse_device_map(bad)


# ------------------------------------------------------------------------------ the map
@pytest.mark.parametrize("n", [2, 4])
def test_balanced_spreads_the_bytes_evenly(llama7b, sizes, n):
    device_map = build_device_map(llama7b, strategy="balanced", max_memory={i: "80GiB" for i in range(n)})
    check_chain(llama7b, device_map, list(range(n)))
    used = device_bytes(llama7b, device_map)
    assert sum(used.values()) == sizes.total
    # the last GPU also keeps the LM head's size free for the logits: counted as its load
    load = {d: b + (sizes.head if d == n - 1 else 0) for d, b in used.items()}
    share = (sizes.total + sizes.head) / n
    # tolerance: whole layers, so each GPU within one layer of its share, all within one layer of each other
    assert all(abs(b - share) <= sizes.layer for b in load.values()), {d: b / sizes.layer for d, b in load.items()}
    assert max(load.values()) - min(load.values()) <= sizes.layer


def test_lm_head_reserve_leaves_room_on_the_last_gpu(llama7b, sizes):
    memory = {0: "80GiB", 1: "80GiB"}
    plain = device_bytes(llama7b, build_device_map(llama7b, max_memory=memory, lm_head_reserve=0))
    reserved = device_bytes(llama7b, build_device_map(llama7b, max_memory=memory, lm_head_reserve="3GiB"))
    assert abs(plain[0] - plain[1]) <= sizes.layer
    # 3 GiB kept free on GPU 1 moves half of it, in whole layers, to GPU 0
    assert abs((reserved[0] - reserved[1]) - 3 * GIB) <= sizes.layer
    with pytest.raises(UserError, match="kept free"):
        build_device_map(llama7b, max_memory={0: "80GiB", 1: "2GiB"}, lm_head_reserve="3GiB")


@pytest.mark.parametrize("n", [2, 4])
def test_balanced_low_0_puts_less_on_gpu_0(llama7b, sizes, n):
    device_map = build_device_map(llama7b, strategy="balanced_low_0", max_memory={i: "80GiB" for i in range(n)})
    check_chain(llama7b, device_map, list(range(n)))
    used = device_bytes(llama7b, device_map)
    assert used[0] <= 0.75 * min(used[d] for d in range(1, n))
    assert used[0] >= 2 * sizes.layer  # less, not nothing: GPU 0 still starts the chain


@pytest.mark.parametrize("memory", [{0: "4GiB", 1: "12GiB"}, {0: "1GiB", 1: "5GiB", 2: "8GiB"},
                                    {0: "7GiB", 1: "6.9GiB"}])
def test_explicit_memory_is_respected(llama7b, sizes, memory):
    strategy, max_memory = parse_device_map(",".join(f"{k}:{v}" for k, v in memory.items()))
    device_map = build_device_map(llama7b, strategy=strategy, max_memory=max_memory)
    gpus = sorted(memory)
    check_chain(llama7b, device_map, gpus)
    used = device_bytes(llama7b, device_map)
    for gpu in gpus:
        assert used[gpu] + (sizes.head if gpu == gpus[-1] else 0) <= max_memory[gpu]
    assert sum(used.values()) == sizes.total
    if max_memory[gpus[0]] < max_memory[gpus[-1]] / 2:  # shares follow the sizes given
        assert used[gpus[0]] < used[gpus[-1]] / 2


def test_a_model_that_does_not_fit_is_refused(llama7b):
    with pytest.raises(UserError, match="does not fit.*12.55 GiB of weights"):
        build_device_map(llama7b, strategy="memory", max_memory={0: "4GiB", 1: "4GiB"})
    # enough bytes in total, but not in whole layers (16 layers + embedding fill 6.27 GiB)
    with pytest.raises(UserError, match="does not fit in whole layers"):
        build_device_map(llama7b, max_memory={0: "6.5GiB", 1: "6.5GiB"})


def test_without_gpus_a_map_needs_max_memory(llama7b):
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    with pytest.raises(UserError, match="no CUDA GPU is visible: give max_memory"):
        build_device_map(llama7b)
    with pytest.raises(UserError, match='"memory" needs max_memory'):
        build_device_map(llama7b, strategy="memory", max_memory=None)
    with pytest.raises(UserError, match="GPU indices"):
        build_device_map(llama7b, max_memory={"cuda:0": "8GiB"})


@pytest.mark.parametrize("n", [2, 4])
def test_tied_embeddings_stay_together(n):
    """GPT-2: lm_head.weight IS transformer.wte.weight; both on GPU 0, the blocks chained after."""
    with init_empty_weights():  # which leaves the weights untied; build_device_map ties them
        model = AutoModelForCausalLM.from_config(GPT2Config(), dtype=torch.float32)
    device_map = build_device_map(model, max_memory={i: "10GiB" for i in range(n)})
    assert model.lm_head.weight is model.transformer.wte.weight
    placed = devices_of(model, device_map)
    assert placed["lm_head.weight"] == placed["transformer.wte.weight"] == 0
    blocks = [placed[f"transformer.h.{i}.attn.c_attn.weight"] for i in range(12)]
    assert blocks == sorted(blocks) and blocks[-1] == n - 1
    assert placed["transformer.ln_f.weight"] == n - 1
    assert not any(k.startswith(f"transformer.h.{i}.") for k in device_map for i in range(12))
    used = device_bytes(model, device_map)
    assert set(used) == set(range(n)) and sum(used.values()) == sum(p.numel() * 4 for p in model.parameters())


def test_meta_copy_of_a_checkpoint(tmp_path):
    """load_chained's first half: the map is computed on a meta copy built from the config."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=300)
    real = AutoModelForCausalLM.from_config(config)
    real.save_pretrained(tmp_path)
    meta = meta_model(str(tmp_path), torch.bfloat16)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in real.named_parameters()]
    device_map = build_device_map(meta, max_memory={0: "1MiB", 1: "1MiB"})
    placed = devices_of(real, device_map)  # the map fits the real model's names
    assert placed["model.embed_tokens.weight"] == 0 and placed["lm_head.weight"] == 1
    assert [placed[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == [0, 0, 1, 1]
    assert input_device(real) == torch.device("cpu")


# ----------------------------------------------------------------- SFT recipes' --device_map
def test_sft_recipes_take_device_map_and_refuse_it_without_gpus(tmp_path, capsys):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs to chain over")
    baichuan = load_recipe_module("model_baichuan", "train")
    assert baichuan.ModelArguments(device_map="balanced").device_map == "balanced"
    chatglm = load_recipe_module("chatglm_lora", "train")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:  # refused before any data or weights are read
        chatglm.main(["--model_name_or_path", str(tmp_path), "--device_map", "balanced", "--output_dir",
                      str(tmp_path / "out"), "--data_dir", str(tmp_path / "no_data")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: --device_map chains one model over several GPUs" in err
    assert f"but {torch.cuda.device_count()} CUDA GPUs are visible: drop --device_map" in err


def test_device_map_refusals(monkeypatch):
    single = SimpleNamespace(world_size=1, deepspeed=None, fsdp=[])
    check_device_map(SFTModelArguments(), single)  # no flag, nothing to check
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="one of 2 processes .torchrun"):
        check_device_map(SFTModelArguments(device_map="balanced"), single)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError, match="--device_map and --deepspeed exclude each other"):
        check_device_map(SFTModelArguments(device_map="balanced"),
                         SimpleNamespace(world_size=1, deepspeed="ds.json", fsdp=[]))
    with pytest.raises(UserError, match="--device_map and --fsdp exclude each other"):
        check_device_map(SFTModelArguments(device_map="balanced"),
                         SimpleNamespace(world_size=1, deepspeed=None, fsdp=["full_shard"]))
    with pytest.raises(UserError, match="does not work with --finetuning_type qlora"):
        check_device_map(SFTModelArguments(device_map="balanced", finetuning_type="qlora"), single)
    with pytest.raises(UserError, match="expected balanced"):
        check_device_map(SFTModelArguments(device_map="auto"), single)
    if torch.cuda.device_count() < 2:
        with pytest.raises(UserError, match="drop --device_map"):
            check_device_map(SFTModelArguments(device_map="0:20GiB,1:20GiB"), single)


def test_lora_wrappers_of_separately_placed_modules_get_their_device_hook():
    """The LM head sits on its own GPU with its own accelerate hook; PEFT's LoRA wrapper around it
    must move its inputs there too (else lora_A(x) meets x on the previous GPU)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.device_map import align_adapter_inputs

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    for module in (*model.model.layers, model.model.norm, model.lm_head):  # as dispatch_model hooks a 2-GPU map
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu"))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert align_adapter_inputs(model) == 1
    head = model.base_model.model.lm_head
    assert head._hf_hook.execution_device == head.base_layer._hf_hook.execution_device == "cpu"
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj  # inside a hooked layer: nothing to add
    assert not hasattr(q_proj, "_hf_hook")
