"""pipeline_parallel/train.py on CPU with gloo: two processes (GPipe, 1F1B, interleaved 1F1B) and
four (interleaved 1F1B, 8 stages) give the loss and gradients of one model on one batch; the saved
checkpoint loads and gives the pipeline's logits; a resumed run ends where an uninterrupted one does."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_recipe_module, run_script


@pytest.fixture(scope="module")
def pp():
    return load_recipe_module("pipeline_parallel", "train")


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(REPO / "pipeline_parallel" / "train.py"), *map(str, args)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def save_tiny_llama(path, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), 4)


def assert_whole_models_loss_and_gradients(dump, model_path, processes: int) -> None:
    """The first step's loss and gradients the processes dumped are one model's on that batch."""
    from transformers import LlamaForCausalLM

    ranks = [torch.load(dump / f"rank{r}.pt") for r in range(processes)]
    assert len({rank["loss"] for rank in ranks}) == 1  # broadcast from the last stage
    for i, a in enumerate(ranks):
        for b in ranks[i + 1:]:
            assert not a["grads"].keys() & b["grads"].keys()  # each process holds its own layers
    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    batch = ranks[0]["batch"]
    loss = torch.nn.functional.cross_entropy(model(input_ids=batch[:, :-1]).logits.flatten(0, 1),
                                             batch[:, 1:].flatten())  # every next token of the batch
    loss.backward()
    assert ranks[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    grads = {name: grad for rank in ranks for name, grad in rank["grads"].items()}
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_stage_split_balances_compute_and_bubble_formula(pp):
    assert pp.split_layers(32, 2) == [16, 16]
    assert pp.split_layers(32, 4, head_cost=0.65) == [8, 8, 8, 8]
    assert pp.split_layers(4, 2, head_cost=5.2) == [3, 1]  # a tiny model whose LM head outweighs its layers
    assert pp.split_layers(10, 3, head_cost=2.0) == [4, 4, 2]  # max stage cost 4: the best possible
    with pytest.raises(Exception, match="stages need at least"):
        pp.split_layers(2, 3)
    assert pp.bubble_fraction("1f1b", 4, 12) == pytest.approx(3 / 15)
    assert pp.bubble_fraction("interleaved1f1b", 4, 12, 2) == pytest.approx(3 / 27)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved1f1b"])
def test_two_processes_give_the_whole_models_loss_and_gradients(schedule, tiny_llama, tmp_path):
    torchrun("--model_name_or_path", tiny_llama, "--synthetic_data", "true", "--block_size", "32",
             "--batch_size", "8", "--microbatches", "4", "--schedule", schedule, "--stages_per_rank",
             "2" if schedule == "interleaved1f1b" else "1", "--max_steps", "1", "--dump_first_step", tmp_path / "dump",
             "--verify_save", "false", "--output_dir", tmp_path / "out")
    assert_whole_models_loss_and_gradients(tmp_path / "dump", tiny_llama, 2)


def test_four_processes_of_two_stages_each_and_their_saved_model(tmp_path):
    """The 4-GPU layout (issue 23) on 4 CPU processes: interleaved 1F1B over 8 stages gives one
    model's loss and gradients, and the checkpoint it gathers loads with from_pretrained and
    gives the pipeline's logits."""
    model = save_tiny_llama(tmp_path / "llama8", 8)
    torchrun("--model_name_or_path", model, "--synthetic_data", "true", "--block_size", "32", "--batch_size", "8",
             "--microbatches", "8", "--schedule", "interleaved1f1b", "--stages_per_rank", "2", "--max_steps", "1",
             "--dump_first_step", tmp_path / "dump", "--output_dir", tmp_path / "out", nproc=4)
    assert_whole_models_loss_and_gradients(tmp_path / "dump", model, 4)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["processes"] == 4 and metrics["layers_per_stage"] == [1] * 8
    assert metrics["saved_logits_max_diff"] < 1e-5  # the reloaded checkpoint against the pipeline's own logits


def test_saved_model_loads_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    run_script("model_clm/prepare_data.py", "--output_dir", data, "--vocab_size", "1000")
    common = ["--data_dir", data / "news", "--hidden_size", "32", "--num_hidden_layers", "4",
              "--num_attention_heads", "4", "--num_key_value_heads", "2", "--intermediate_size", "64",
              "--block_size", "32", "--batch_size", "8", "--microbatches", "2", "--max_steps", "4",
              "--warmup_steps", "1", "--logging_steps", "1", "--save_steps", "2"]
    torchrun(*common, "--output_dir", tmp_path / "straight")
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["layers_per_stage"] == [3, 1] and metrics["steps"] == 4
    assert metrics["last_loss"] < metrics["first_loss"]
    # the gathered checkpoint: from_pretrained loads it, its logits are the pipeline's (float32)
    assert metrics["saved_logits_max_diff"] < 1e-5
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    assert straight.config.num_hidden_layers == 4 and (tmp_path / "straight" / "tokenizer.json").is_file()
    # as if interrupted after step 2: the run left checkpoint-2; a rerun picks it up and ends the same way
    assert (tmp_path / "straight" / "checkpoint-2" / "meta.json").is_file()
    (tmp_path / "straight" / "model.safetensors").unlink()
    result = torchrun(*common, "--output_dir", tmp_path / "straight")
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    for (name, a), (_, b) in zip(straight.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
