"""Every benchmark's --tiny mode: the same code path as the measured run on tiny shapes, so an
import or API break in benchmarks/ fails `make test` instead of the next GPU session. Each
writes its JSON to a temporary --out (the committed results stay as they are), and the rows
must hold real measurements, no errors."""

import json
import math
import sys

import pytest

from conftest import REPO, run_script

BENCHMARKS = ["clip_data_wait", "clm_train_throughput", "decode_throughput", "dpo_memory_speed", "gpt2_decode_speed",
              "gpt2_train_throughput", "grpo_step_time", "image_pipeline", "lora_sft_throughput", "profile_decode_step",
              "quantized_matvec", "reply_loss_speed", "sft_memory", "tokenize_throughput"]
# Variants run one child process each (about 10 s of imports apiece): where a benchmark has many,
# the test runs one per code path (baseline, the recipe's way, torch.compile, DPO's references).
VARIANTS = {"clip_data_wait": "loader,resident_compile", "gpt2_train_throughput": "baseline,recipe",
            "clm_train_throughput": "baseline,recipe", "lora_sft_throughput": "check,baseline,recipe_sdpa",
            "dpo_memory_speed": "lora_adapter_off,full_precomputed", "grpo_step_time": "g8_p4"}
OPTIONS = {name: ("--variants", variants) for name, variants in VARIANTS.items()} | {
    # sft_memory: a process per attempt, so one length and one checkpointing setting (QLoRA and 8-bit
    # states need a GPU)
    "sft_memory": ("--shapes", "glm4-9b", "--methods", "lora,full", "--seqs", "64", "--checkpointing", "on"),
    # the CPU has no FP8 and no int4 kernel: those rows are GPU-only
    "quantized_matvec": ("--variants", "none,int8,fp8,int8+autotune,int8_pack,int8_rowwise+fused,fp8_rowwise+cd-all+max-autotune,none+freezing"),
    "profile_decode_step": ("--widths", "1,4", "--spans", "256", "--compiled", "--quantize", "none,int8_rowwise"),
    "decode_throughput": ("--clients", "1,4", "--quantize", "none,int8_rowwise+fused")}


def records(node):
    """Every dict in a JSON tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from records(value)
    elif isinstance(node, list):
        for value in node:
            yield from records(value)


def numbers(node):
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from numbers(value)
    elif isinstance(node, list):
        for value in node:
            yield from numbers(value)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_tiny_mode_runs_and_measures(name, tmp_path):
    out = tmp_path / f"{name}.json"
    run_script(f"benchmarks/{name}.py", "--tiny", "--out", out, *OPTIONS.get(name, ()), timeout=900)
    result = json.loads(out.read_text())
    errors = [r["error"] for r in records(result) if r.get("error")]
    assert not errors, errors
    measured = [x for x in numbers(result) if math.isfinite(x) and x > 0]
    assert len(measured) >= 2  # rates / times / memory, not an empty table


def test_child_row_reads_the_last_row_or_names_the_error(tmp_path):
    """A variant's row comes back from its child process; a failing child gives an error row
    whose message is the child's last stderr line, and every child's output lands in the log."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from children import child_row

    script = tmp_path / "bench.py"
    child = """import sys
sys.path.insert(0, BENCHMARKS)
from children import print_row
name = sys.argv[sys.argv.index('--child') + 1]
if name == 'bad':
    print_row({'variant': name, 'half': 1})
    sys.exit('out of memory')
print('noise')
print_row({'variant': name, 'step_s': 0.5})
print_row({'variant': name, 'step_s': 0.25})
"""
    script.write_text(child.replace("BENCHMARKS", repr(str(REPO / "benchmarks"))))
    log = tmp_path / "log.txt"
    assert child_row(str(script), "good", ["--x", "1"], log=log) == {"variant": "good", "step_s": 0.25}
    assert child_row(str(script), "bad", [], log=log) == {"variant": "bad", "error": "out of memory"}
    assert log.read_text().count("=====") == 2 and "noise" in log.read_text()


def test_sft_memory_cap_search_finds_what_trying_every_cap_finds():
    """sft_memory.py tries a setting's caps from the largest one a dominated setting (shorter, or the
    same with checkpointing) needed: the smallest fitting cap is the one trying every cap finds."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sft_memory import sweep

    caps = [16, 24, 48, 140]
    need = {(1024, True): 10, (2048, True): 14, (4096, True): 20, (1024, False): 15, (2048, False): 30,
            (4096, False): 70, (8192, False): 500}  # GiB a setting needs: monotone, the last fits nothing
    needed, attempts = sweep(list(need), len(caps), lambda setting, i: need[setting] <= caps[i])
    assert needed == {s: next((i for i, c in enumerate(caps) if n <= c), len(caps)) for s, n in need.items()}
    assert [i for *s, i in attempts if tuple(s) == (4096, False)] == [2, 3]  # bounded by (2048, off) and (4096, on)
    assert [i for *s, i in attempts if tuple(s) == (8192, False)] == [3]
    assert len(attempts) == 11  # against 28 for every cap of every setting
    # the time limit: a setting not run is unknown, not "does not fit", and nothing runs after it
    needed, attempts = sweep(list(need), len(caps), lambda s, i: None if s == (2048, False) else need[s] <= caps[i])
    assert needed[2048, False] is needed[4096, False] is needed[8192, False] is None
    assert needed[1024, False] == 0 and needed[4096, True] == 1 and len(attempts) == 6


def test_sft_memory_runs_each_attempt_in_a_fresh_process():
    """A child makes one attempt and exits; the next one replays what was tried: no run shares a
    process with another, no attempt is run twice, and the search finds what one process trying
    everything finds."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sft_memory import FreshProcessNeeded, attempt, sweep, until_done

    caps = [16, 24, 48, 140]
    need = {(1024, True): 20, (2048, True): 30, (1024, False): 40, (2048, False): 100}
    runs, processes = [], []

    def child(known):
        processes.append(len(processes))
        new = {}

        def fits(setting, i):
            def run():
                runs.append((setting, i, processes[-1]))
                ok = need[setting] <= caps[i]
                return {"ok": ok, "record": "yes" if ok else "no", "measured": {"process": processes[-1]}}
            return attempt(known | new, f"{setting}:{i}", run, report=new.__setitem__)["ok"]

        try:
            needed, _ = sweep(list(need), len(caps), fits)
        except FreshProcessNeeded:
            return [], "", new, True
        return [needed], "", new, False

    rows, error = until_done(child)
    in_one_process, attempts = sweep(list(need), len(caps), lambda s, i: need[s] <= caps[i])
    assert not error and rows == [in_one_process]
    assert sorted(p for *_, p in runs) == list(range(len(runs))) and len(processes) == len(runs) + 1
    assert len(runs) == len({(s, i) for s, i, _ in runs}) == len(attempts) == 8  # nothing run twice


def test_pipeline_vs_chaining_tiny_every_schedule(tmp_path):
    """Chaining and the three schedules at one microbatch count (on 2 GPUs where there are, else on
    the CPU with gloo): every row measured, each schedule's ideal bubble (p - 1) / (v m + p - 1)."""
    out = tmp_path / "pipeline_vs_chaining.json"
    run_script("benchmarks/pipeline_vs_chaining.py", "--gpus", "2", "--tiny", "--schedules", "gpipe,1f1b,interleaved1f1b",
               "--microbatches", "4", "--batch_size", "8", "--block_size", "64", "--warmup_steps", "1", "--steps", "2",
               "--out", out, timeout=900)
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if r.get("error")]
    assert [r["mode"] for r in rows] == ["chaining", "gpipe", "1f1b", "interleaved1f1b"]
    assert all(r["tokens_per_s"] > 0 and r["microbatches"] == 4 for r in rows)
    for row in rows[1:]:
        v = 2 if row["mode"] == "interleaved1f1b" else 1
        assert row["stages_per_gpu"] == v and len(row["layers_per_stage"]) == 2 * v
        assert row["bubble_ideal"] == pytest.approx(1 / (v * 4 + 1), abs=1e-4)
        assert row["speedup_vs_chaining"] == pytest.approx(row["tokens_per_s"] / rows[0]["tokens_per_s"], rel=1e-2)


def test_check_results_runs_the_commands_and_fails_outside_a_band(tmp_path, monkeypatch):
    """benchmarks/check_results.py on a stand-in recipe (a script that writes metrics.json): inside
    the band passes; a value outside it, a missing key or a failing command each fail, by name."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import check_results

    (tmp_path / "recipe.py").write_text(
        "import json, sys, pathlib\n"
        "if sys.argv[1] == 'fail': sys.exit(3)\n"
        "pathlib.Path('out').mkdir(exist_ok=True)\n"
        "pathlib.Path('out/metrics.json').write_text(json.dumps({'test': {'accuracy': float(sys.argv[1])}}))\n")
    monkeypatch.setattr(check_results, "ROOT", tmp_path)
    monkeypatch.setattr(check_results, "OUT", tmp_path / "checks")

    def check(*argv, bands=(("test.accuracy", (0.7, 0.8)),), skip_run=False):
        recipe = check_results.Check(commands=[["recipe.py", *argv]], metrics="out/metrics.json",
                                     bands=dict(bands), minutes=0, measured="here")
        monkeypatch.setattr(check_results, "RECIPES", {"stand_in": recipe})
        status = check_results.main(["stand_in", *(["--skip_run"] if skip_run else [])])
        rows = json.loads((tmp_path / "checks" / "results.json").read_text())
        return status, {row["metric"]: row for row in rows}

    status, rows = check("0.75")
    assert status == 0 and rows["test.accuracy"]["ok"] and rows["test.accuracy"]["value"] == 0.75
    status, rows = check(bands=(("test.accuracy", (0.7, 0.8)), ("test.missing", (0, 1))), skip_run=True)
    assert status == 1 and rows["test.accuracy"]["ok"]  # the metrics.json of the last run, not rerun
    assert not rows["test.missing"]["ok"] and "no test.missing" in rows["test.missing"]["why"]
    status, rows = check("0.9")
    assert status == 1 and rows["test.accuracy"]["why"] == "outside"
    status, rows = check("fail")
    assert status == 1 and "exited 3" in rows["test.accuracy"]["why"]
    assert "exit 3" in (tmp_path / "checks" / "stand_in.log").read_text()
