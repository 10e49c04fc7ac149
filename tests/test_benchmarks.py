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
              "quantized_matvec", "quantized_quality", "reply_loss_speed", "sft_memory", "tokenize_throughput"]
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
    # more client processes than twice the most clients: each process's first request must still be let in
    "decode_throughput": ("--clients", "1,2", "--client_processes", "5", "--quantize", "none,int8_rowwise+fused"),
    "quantized_quality": ("--quantize", "none,int8_rowwise,fp8_rowwise")}


def records(node):
    """Every dict in a JSON tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from records(value)
    elif isinstance(node, list):
        for value in node:
            yield from records(value)


def strings(node, where="result"):
    """(where, value) for every string in a JSON tree."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from strings(value, f"{where}[{i}]")


# ----------------------------------------------------------------- what each benchmark must measure
# Each MEASURED[name](result) -> the problems found in that benchmark's --tiny JSON (empty: fine):
# every row the test asks for is there, its measurements are finite positive numbers, and where one
# run computes the same quantity two ways, the two agree as closely as the benchmark says they do.
def on_gpu() -> bool:
    """Whether the benchmarks' children see a GPU (the tiny runs then train in bf16 and record memory;
    decode_throughput, profile_decode_step and quantized_matvec stay on the CPU with --tiny)."""
    import torch

    return torch.cuda.is_available()


def label(row: dict) -> str:
    return str(next((row[k] for k in ("variant", "path", "pipeline", "quantize", "method", "kind") if k in row), row))


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive(row: dict, *keys: str) -> list[str]:
    """Each key a finite number > 0: a rate, a time, a count or a loss that was really measured."""
    return [f"{label(row)}: {key} = {row.get(key)!r}, not a positive number" for key in keys
            if not (is_number(row.get(key)) and row[key] > 0)]


def gpu_memory(row: dict, *keys: str) -> list[str]:
    """Peak memory is recorded on a GPU (None on the CPU); rounded to 0.01 GiB, a tiny model's can be 0."""
    if not on_gpu():
        return []
    return [f"{label(row)}: {key} = {row.get(key)!r} on a GPU" for key in keys
            if not (is_number(row.get(key)) and row[key] >= 0)]


def close(row: dict, a: str, b: str, *, rel: float = 0.0, abs_: float = 0.0) -> list[str]:
    """row[a] and row[b], two numbers of one run that must agree."""
    x, y = row.get(a), row.get(b)
    if is_number(x) and is_number(y) and math.isclose(x, y, rel_tol=rel, abs_tol=abs_):
        return []
    return [f"{label(row)}: {a} = {x!r} and {b} = {y!r} differ by more than rel {rel:g} / abs {abs_:g}"]


def option(name: str, flag: str) -> list[str]:
    """The comma-separated values of `flag` in the test's OPTIONS for `name`."""
    args = OPTIONS[name]
    return args[args.index(flag) + 1].split(",")


def rows_named(rows: list[dict], names: list[str], key: str = "variant") -> list[str]:
    """The rows are the ones asked for, in order (a variant that silently fell out is a problem)."""
    found = [row.get(key) for row in rows]
    return [] if found == names else [f"rows {found}, expected {names}"]


def clip_data_wait(result: dict) -> list[str]:
    rows = result["rows"]
    problems = rows_named(rows, VARIANTS["clip_data_wait"].split(","))
    for row in rows:
        problems += positive(row, "synced_step_ms", "free_images_per_s") + gpu_memory(row, "peak_gib")
        if row["variant"].startswith("resident"):  # no loading at all: the floor, 1.00x of itself
            if row.get("data_ms") != 0 or row.get("x_resident") != 1:
                problems.append(f"{label(row)}: data_ms {row.get('data_ms')!r}, x_resident {row.get('x_resident')!r}")
        else:  # the synced phase times the fetches, an epoch end (iterator restart) among them
            problems += positive(row, "data_ms", "data_share", "max_data_ms")
            if not row.get("data_share", 2) <= 1 or not row.get("epoch_start_data_ms"):
                problems.append(f"{label(row)}: data_share {row.get('data_share')!r}, epoch starts "
                                f"{row.get('epoch_start_data_ms')!r}")
        if any(r["variant"].startswith("resident") and r["compile"] == row["compile"] for r in rows):
            problems += positive(row, "x_resident")
    return problems


def clm_train_throughput(result: dict) -> list[str]:
    rows = result["rows"]
    problems = rows_named(rows, VARIANTS["clm_train_throughput"].split(","))
    for row in rows:  # (scaling: the recipe's tokens/s against its one-GPU run; none for the baseline)
        problems += positive(row, "measured_steps", "seconds", "tokens_per_s", "mfu",
                             *(["scaling_efficiency"] if row["variant"] != "baseline" else []))
        if row["variant"] == "baseline" and "scaling_efficiency" in row:
            problems.append(f"baseline: scaling_efficiency {row['scaling_efficiency']}")
        problems += gpu_memory(row, "peak_memory_gib")
    return problems


def decode_throughput(result: dict) -> list[str]:
    """Every path timed for each weights kind; the streams' correctness fields. --tiny runs in float32
    on the CPU, where a row decoded in a batch is exactly what it decodes alone (tests/test_serving.py
    checks that equality), so every checked stream is identical to its prompt decoded alone and every
    streamed token is the argmax of a plain forward over prompt + stream (a batching bug, a row reading
    another's cache, gives large gaps; bf16 on a GPU flips near-ties by hundredths, fp32 none)."""
    rows = {row["path"]: row for row in result["rows"]}
    problems = ["partial results (written before the run ended)"] if result.get("partial") else []
    clients = [int(n) for n in option("decode_throughput", "--clients")]
    new_tokens = rows.get("generate", {}).get("tokens") or 0
    problems += positive(rows.get("generate", {"path": "generate"}), "tokens", "seconds", "tokens_per_s")
    for kind in option("decode_throughput", "--quantize"):
        name = kind.replace("none", "bf16")
        warm_up = rows.get(f"{name}: engine warm-up (compile every width x span)", {"path": f"{name}: warm-up"})
        if not (is_number(warm_up.get("seconds")) and warm_up["seconds"] >= 0):
            problems.append(f"{label(warm_up)}: seconds {warm_up.get('seconds')!r}")
        engine = [f"{name}: engine, batch 1"] + [f"{name}: engine, {n} streams (no HTTP)" for n in clients[1:]]
        for path in engine:
            problems += positive(rows.get(path, {"path": path}), "seconds", "tokens_per_s")
        problems += positive(rows.get(engine[0], {"path": engine[0]}), "first_token_p50_s")
        for n in clients:
            server = [row for path, row in rows.items() if path.startswith(f"{name}: server, {n} client")]
            if not server:
                problems.append(f"no {name}: server, {n} client(s) row")
            for row in server:
                problems += positive(row, "seconds", "tokens_per_s", "per_client_tokens_per_s", "x_one_client",
                                     "first_token_p50_s", "first_token_p95_s")
                checked = min(n, 8)  # the first 8 clients' streams are compared with their prompts alone
                if not (row.get("every_client_got_its_tokens") is True and row.get("tokens") == n * new_tokens
                        and row.get("identical_to_alone") == f"{checked}/{checked}"
                        and row.get("tokens_not_argmax_of_a_plain_forward") == 0
                        and row.get("their_max_logit_gap") == 0):
                    fields = ("tokens", "every_client_got_its_tokens", "identical_to_alone",
                              "tokens_not_argmax_of_a_plain_forward", "their_max_logit_gap")
                    problems.append(f"{label(row)}: not what decoding alone gives ({n * new_tokens} tokens): "
                                    f"{ {k: row.get(k) for k in fields} }")
        quality = result["summary"]["quality"].get(name, {"path": f"{name} quality"})
        problems += positive(quality, "held_out_perplexity")
        prefix = quality.get("greedy_common_prefix_with_bf16")
        if not (is_number(prefix) and 0 <= prefix <= new_tokens) or len(quality.get("greedy_streams_sha1", "")) != 16:
            problems.append(f"{name}: quality {quality}")
    return problems


def dpo_memory_speed(result: dict) -> list[str]:
    """The policy starts as the reference (LoRA's B = 0; full: the same weights), where the sigmoid DPO
    loss is exactly log 2, and lr 1e-5 for three steps barely moves it (the 7B runs of RESULTS.md: 0.690
    to 0.6954 after 11 steps): a reference that is not the start model, or stale precomputed reference
    log-probs, moves the loss away from log 2."""
    rows = result["rows"]
    problems = rows_named(rows, VARIANTS["dpo_memory_speed"].split(","))
    for row in rows:
        problems += positive(row, "parameters", "trainable_parameters", "pairs_per_s", "step_s", "train_loss")
        problems += gpu_memory(row, "weights_gib", "peak_gib")
        if row.get("oom") is not False:
            problems.append(f"{label(row)}: oom {row.get('oom')!r}")
        if row.get("reference") == "precomputed":
            problems += positive(row, "precompute_s", "precompute_pairs_per_s")
        trains_all = row.get("trainable_parameters") == row.get("parameters")
        if trains_all != (row.get("finetuning") == "full"):
            problems.append(f"{label(row)}: {row.get('trainable_parameters')} of {row.get('parameters')} trainable")
        if is_number(row.get("train_loss")) and abs(row["train_loss"] - math.log(2)) > 0.01:
            problems.append(f"{label(row)}: train_loss {row['train_loss']}, not about log 2 at the start")
    return problems


def gpt2_decode_speed(result: dict) -> list[str]:
    rows = result["rows"]
    expected = [(path, cudnn) for cudnn in (True, False)
                for path in ("generate, main thread", "Engine.stream, request 1", "Engine.stream, request 2")]
    expected += [("server (serve.py), request 1", False), ("server (serve.py), request 2", False)]
    found = [(row["path"], row["cudnn_sdpa"]) for row in rows]
    problems = [] if found == expected else [f"rows {found}, expected {expected}"]
    for row in rows:
        problems += positive(row, "tokens_per_s")
    return problems


def gpt2_train_throughput(result: dict) -> list[str]:
    rows = result["results"]
    problems = rows_named(rows, VARIANTS["gpt2_train_throughput"].split(","))
    for row in rows:
        problems += positive(row, "measured_steps", "measured_tokens", "measured_seconds", "tokens_per_s")
        problems += gpu_memory(row, "peak_memory_gib", "peak_reserved_gib")
        if on_gpu():
            problems += positive(row, "mfu")
    return problems


def grpo_step_time(result: dict) -> list[str]:
    """generate inside generate-and-score inside the step: each part of the step takes time."""
    rows = result["rows"]
    problems = rows_named(rows, VARIANTS["grpo_step_time"].split(","))
    for row in rows:
        problems += positive(row, "step_s", "generate_s", "score_s", "train_s", "generate_share",
                             "mean_reply_tokens", "reply_tokens_per_s")
        problems += gpu_memory(row, "peak_reserved_gib")
        if row.get("oom") is not False or not row.get("generate_share", 1) < 1 \
                or not row.get("mean_reply_tokens", 0) <= row["max_completion_length"]:
            problems.append(f"{label(row)}: {row}")
    return problems


def image_pipeline(result: dict) -> list[str]:
    rows = result["rows"]
    problems = rows_named(rows, ["a. original (PIL + processor per batch)", "b. cache, normalize in main process",
                                 "b. cache, normalize in the workers", "b. cache, uint8 only (normalize on GPU)"],
                          key="pipeline")
    for row in rows:
        problems += positive(row, "images_per_s", "x_original")
    if rows and rows[0].get("x_original") != 1:
        problems.append(f"the original's x_original is {rows[0].get('x_original')}")
    return problems + positive({"path": "cache build", **result}, "cache_build_s")


def lora_sft_throughput(result: dict) -> list[str]:
    """`check`: the loss of one packed row (SDPA, flex) equals its examples' losses run one by one, no
    attention across examples: to 1e-6 in the --tiny float32 run on the CPU (5e-7 here; allowed 5e-6, a few
    float32 steps of a loss near 7, as summation order may differ on another CPU), within bf16 rounding
    (2^-8 relative) on a GPU (benchmarks/RESULTS.md, the check's paragraph)."""
    rows = result["rows"]
    problems = rows_named(rows, VARIANTS["lora_sft_throughput"].split(","))
    tolerance = {"rel": 2**-8} if on_gpu() else {"abs_": 5e-6}
    for row in rows:
        if row["variant"] == "check":
            problems += positive(row, "row_tokens", "examples_in_row", "loss_one_by_one")
            problems += close(row, "loss_packed_sdpa", "loss_one_by_one", **tolerance)
            problems += close(row, "loss_packed_flex", "loss_one_by_one", **tolerance)
            if row.get("examples_in_row", 0) < 2:
                problems.append(f"check: {row.get('examples_in_row')} examples in the packed row")
            if "liger_grad_cosine" in row:  # on a GPU with Liger: its loss against the plain one
                problems += close(row, "loss_packed_sdpa_liger_train", "loss_packed_sdpa_plain_train", rel=2**-8)
                problems += positive(row, "liger_grad_cosine", "liger_grad_rel_diff")
            continue
        problems += positive(row, "measured_steps", "seconds", "step_s", "real_tokens", "processed_tokens",
                             "label_tokens", "real_tokens_per_s", "processed_tokens_per_s", "padding_efficiency")
        problems += gpu_memory(row, "peak_memory_gib", "peak_memory_window_gib")
        real, processed = row.get("real_tokens", 0), row.get("processed_tokens", 0)
        if not (0 < row.get("label_tokens", 0) < real <= processed) or (row["settings"]["packed"] and real != processed):
            problems.append(f"{label(row)}: {row.get('label_tokens')} label / {real} real / {processed} processed tokens")
    summary = result.get("summary") or {"path": "summary"}
    return problems + positive(summary, "real_tokens_per_s_ratio")


def profile_decode_step(result: dict) -> list[str]:
    """A row per weights kind x width x span, each step timed; the first kind's rows also time the
    attention call alone per SDPA backend (and, on CUDA, the Triton kernel): math runs everywhere,
    a backend this device lacks says "unavailable"."""
    rows = result["rows"]
    kinds = option("profile_decode_step", "--quantize")
    expected = [(kind, int(w), int(s)) for kind in kinds for w in option("profile_decode_step", "--widths")
                for s in option("profile_decode_step", "--spans")]
    found = [(row["quantize"], row["width"], row["span"]) for row in rows]
    problems = [] if found == expected else [f"rows {found}, expected {expected}"]
    for row in rows:
        where = f"{row['quantize']} width {row['width']} span {row['span']}"
        problems += positive(row | {"path": where}, "step_ms")
        if row["quantize"] == kinds[0]:
            attention = row.get("attention_all_layers_ms", {})
            problems += positive(attention | {"path": f"{where} attention"}, "math")
            problems += [f"{where}: attention {backend} = {ms!r}" for backend, ms in attention.items()
                         if not (is_number(ms) and ms > 0 or isinstance(ms, str) and ms.startswith("unavailable"))]
    return problems


def quantized_matvec(result: dict) -> list[str]:
    """--tiny runs float32 on the CPU, eagerly (the inductor settings then change nothing):
    - bf16 rows ("none") have no error: the same weights, only summation order differs (1e-7), below
      the 4 decimals recorded;
    - quantised rows have an error (the weights were rounded), bounded by 2^-3: e4m3 keeps 3 mantissa
      bits, so a weight moves by at most 2^-4 of itself (int8 by 1/254 of its row's largest); a wrong
      scale or a lost weight gives errors of order 1;
    - rows of one quantisation differing only in inductor settings give the same error;
    - int8_pack and int8_rowwise store the same int8 weights and scales (round(w / (row amax / 127))),
      and int8_rowwise's products (eager, any number of rows: the int8 tensor cores' form) also round
      each row of activations to int8, so its error is int8_pack's or more (1e-4: the decimals recorded)."""
    rows = result["rows"]
    problems = rows_named(rows, option("quantized_matvec", "--variants"), key="quantize")
    batches = (1, 64)  # the benchmark's default --batches
    by_kind: dict = {}
    for row in rows:
        kind, *suffixes = row["quantize"].split("+")
        problems += positive(row, *(f"{key}_b{b}" for b in batches for key in ("ms", "speedup")))
        for b in batches:
            error = row.get(f"rel_error_b{b}")
            if not is_number(error) or (error != 0 if kind == "none" else not 0 < error < 2**-3):
                problems.append(f"{label(row)}: rel_error_b{b} = {error!r}")
        by_kind.setdefault((kind, "fused" in suffixes), []).append(row)
    for same in by_kind.values():
        for row in same[1:]:
            for b in batches:
                pair = {"path": f"{same[0]['quantize']} vs {row['quantize']}",
                        "a": same[0].get(f"rel_error_b{b}"), "b": row.get(f"rel_error_b{b}")}
                problems += close(pair, "a", "b", abs_=1e-4 + 1e-9)
    packed = [row for (kind, _), same in by_kind.items() if kind == "int8_pack" for row in same]
    rowwise = [row for (kind, _), same in by_kind.items() if kind == "int8_rowwise" for row in same]
    for row in rowwise:
        for b in batches:
            key = f"rel_error_b{b}"
            if packed and is_number(row.get(key)) and is_number(packed[0].get(key)) \
                    and not row[key] >= packed[0][key] - 1e-4:
                problems.append(f"{label(row)}: {key} {row[key]} below int8_pack's {packed[0][key]}")
    return problems


def reply_loss_speed(result: dict) -> list[str]:
    """Both trainers start from the same adapter on the same batches and compute the same token-summed
    loss: "the loss of both (equal up to float noise)", the same to the 4 printed decimals
    (benchmarks/RESULTS.md)."""
    problems = []
    for name in ("Trainer", "ReplyLossTrainer"):
        runs = result["steps_per_s"].get(name, [])
        if len(runs) != result["rounds"] or not all(is_number(x) and x > 0 for x in runs):
            problems.append(f"{name}: steps/s {runs} over {result['rounds']} rounds")
        problems += positive({"path": name, **result["train_loss"]}, name)
    problems += positive({"path": "reply_loss_speed", **result}, "ratio")
    return problems + close({"path": "train_loss", **result["train_loss"]}, "Trainer", "ReplyLossTrainer", abs_=5e-5)


def sft_memory(result: dict) -> list[str]:
    rows = result["rows"]
    problems = rows_named(rows, option("sft_memory", "--methods"), key="method")
    for row in rows:
        problems += positive(row, "step_s", "real_tokens_per_s") + gpu_memory(row, "peak_reserved_gib",
                                                                                 "peak_allocated_gib")
        if not row.get("fits_under") or row.get("seq") != int(option("sft_memory", "--seqs")[0]):
            problems.append(f"{label(row)}: seq {row.get('seq')}, fits under {row.get('fits_under')!r}")
        parameters = row.get("parameters", {})
        if (parameters.get("trainable") == parameters.get("total")) != (row.get("finetuning_type") == "full"):
            problems.append(f"{label(row)}: parameters {parameters}")
    return problems


def quantized_quality(result: dict) -> list[str]:
    """Every kind scored on the held-out blocks and greedy streams. The reference against itself is
    exact (KL 0, its own top-1 everywhere, every stream its own); an 8-bit kind stores its linear
    layers in half the bytes, moves the distributions (KL > 0: the weights really changed) and keeps
    the trained model's perplexity within 10%."""
    rows = result["rows"]
    problems = rows_named(rows, option("quantized_quality", "--quantize"), key="kind")
    new_tokens = result["setup"]["new_tokens"]
    for row in rows:
        problems += positive(row, "weight_MB", "weight_share", "perplexity", "seconds")
        if not (is_number(row.get("kl_from_reference")) and row["kl_from_reference"] >= 0
                and 0 < row.get("top1_agreement", -1) <= 1 and 0 <= row.get("greedy_prefix", -1) <= new_tokens
                and 0 <= row.get("greedy_identical", -1) <= 1):
            problems.append(f"{label(row)}: agreement fields out of range: {row}")
    if rows and (rows[0].get("kl_from_reference"), rows[0].get("top1_agreement"), rows[0].get("greedy_prefix"),
                 rows[0].get("greedy_identical"), rows[0].get("weight_share")) != (0, 1, new_tokens, 1, 1):
        problems.append(f"the reference against itself is not exact: {rows[0]}")
    for row in rows[1:]:
        if not (row.get("weight_share", 1) < 0.8 and row.get("kl_from_reference", 0) > 0
                and abs(row.get("perplexity", 0) / rows[0]["perplexity"] - 1) < 0.1):
            problems.append(f"{label(row)}: not an 8-bit copy of the reference (weight share, KL, perplexity): {row}")
    return problems


def tokenize_throughput(result: dict) -> list[str]:
    """Both pipelines tokenise every document of the same corpus: the same document count."""
    rows = result["rows"]
    problems = rows_named(rows, ["datasets", "shards"], key="pipeline")
    for row in rows:
        problems += positive(row, "seconds", "mb_per_s", "peak_pss_gb", "documents", "x_datasets")
    if len(rows) == 2:
        problems += positive(rows[1], "tokens")
        problems += close({"path": "documents", "datasets": rows[0].get("documents"),
                           "shards": rows[1].get("documents")}, "datasets", "shards")
    return problems


MEASURED = {check.__name__: check for check in (
    clip_data_wait, clm_train_throughput, decode_throughput, dpo_memory_speed, gpt2_decode_speed, gpt2_train_throughput,
    grpo_step_time, image_pipeline, lora_sft_throughput, profile_decode_step, quantized_matvec, quantized_quality,
    reply_loss_speed, sft_memory, tokenize_throughput)}


def problems_in(name: str, result: dict) -> list[str]:
    """Everything wrong with a benchmark's --tiny JSON: an error row, a variant recorded as failed
    ("loss_packed_flex": "failed: ..." is not an error key), and what MEASURED[name] finds."""
    problems = [f"{label(r)}: error {r['error']!r}" for r in records(result) if r.get("error")]
    problems += [f"{where} = {value!r}" for where, value in strings(result) if value.lower().startswith("failed")]
    return problems + MEASURED[name](result)


def test_every_benchmark_has_its_measurements_checked():
    assert sorted(MEASURED) == sorted(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_tiny_mode_runs_and_measures(name, tmp_path):
    out = tmp_path / f"{name}.json"
    run_script(f"benchmarks/{name}.py", "--tiny", "--out", out, *OPTIONS.get(name, ()), timeout=900)
    problems = problems_in(name, json.loads(out.read_text()))
    assert not problems, "\n".join(problems)


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


def test_quality_benchmark_cuts_a_text_file_into_blocks_of_the_models_tokens(tmp_path):
    """quantized_quality.py --held_out FILE: the file's documents in the model's tokens, each followed by
    its end-of-text token, back to back, cut into whole blocks and spread evenly over the file; asking for
    more blocks than the file holds is an error that says so."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from quantized_quality import held_out_blocks

    from common.corpora import load_peoples_daily
    from common.errors import UserError
    from common.tokenizer import build_chinese_tokenizer

    texts = load_peoples_daily()[:40]
    tokenizer = build_chinese_tokenizer(texts, vocab_size=800)
    path = tmp_path / "held_out.txt"
    path.write_text("\n".join(texts) + "\n\n", encoding="utf-8")  # (an empty line is no document)
    stream = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    whole = len(stream) // 16
    blocks = held_out_blocks([str(path)], tokenizer, 16, whole)
    assert blocks == [stream[16 * b:16 * b + 16] for b in range(whole)]  # all of them, in order
    spread = held_out_blocks([str(path)], tokenizer, 16, 3)
    assert spread == [blocks[0], blocks[round((whole - 1) / 2)], blocks[-1]]
    assert blocks[0][:4] == tokenizer(texts[0], add_special_tokens=False)["input_ids"][:4]
    with pytest.raises(UserError, match=f"{whole} held-out blocks of 16 tokens, {whole + 1} wanted"):
        held_out_blocks([str(path)], tokenizer, 16, whole + 1)


def test_decode_throughput_client_errors_come_back_from_the_pool_as_errors():
    """A stream the server refuses (429 here) fails its client process with an error that pickles, so
    the benchmark stops with the server's answer: httpx's HTTPStatusError does not unpickle, and the
    pool's result thread died on it while the benchmark waited for the row until its timeout."""
    import pickle
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from decode_throughput import concurrent_clients

    class Busy(BaseHTTPRequestHandler):
        def do_POST(self):
            body = b'{"error": {"message": "too many requests waiting"}}'
            self.send_response(429)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError) as caught:
            concurrent_clients(server.server_address[1], ["a b", "c d"], 2, time.time())
    finally:
        server.shutdown()
    again = pickle.loads(pickle.dumps(caught.value))
    assert "2 of 2 streams failed" in str(again) and "answered 429" in str(again)
    assert "too many requests waiting" in str(again)
