"""Decoding throughput of a 7B-class model: HF `generate`, the serving engine and its HTTP
server at 1 / 16 / 32 / 64 concurrent streaming clients, bf16 and quantised weights, and
transformers' own continuous batching (`generate_batch`) beside them, in one run.

    python benchmarks/decode_throughput.py                          # Llama-2-7B shape, one GPU, serve.py's
        # defaults in bf16 and fp8_rowwise (q/k/v and gate/up merged, one row's products by the Triton kernel,
        # SiLU(gate) x up in the gate/up kernel)
    python benchmarks/decode_throughput.py --quantize none,int8     # the model's own layers, + torchao int8
    python benchmarks/decode_throughput.py --quantize none,none+fused   # + q/k/v and gate/up merged
    python benchmarks/decode_throughput.py --quantize none+fused,none+fused+triton   # + the one-row kernel
    python benchmarks/decode_throughput.py --clients 1 --quantize none+fused+triton,none+fused+triton+attn,none+fused+triton+glu
        # + the decode attention kernel; + SiLU(gate) x up in the gate/up kernel
    python benchmarks/decode_throughput.py --tiny                   # CPU smoke test (2 x 64 model)
    python benchmarks/decode_throughput.py --transformers_cb_site /tmp/site-cb   # CB rows with a newer
        # transformers (`make gpu-wheels CB=1`, then pip install --target /tmp/site-cb .whl-cb/*.whl)

Random weights (only speed is measured); a word-level tokenizer with one token per id so that
every generated id decodes. Every row: greedy, end of text ignored, `--tokens` new tokens
after a `--prompt_tokens` prompt; different prompts per client.

  generate                  `model.generate`, dynamic cache (what a user writes first)
  generate, static cache    `generate(cache_implementation="static")` (compiles the forward)
  engine, batch 1           `Engine.stream`: the server's generation path, one request (and its
                            first token's latency without HTTP: the prompt's prefill)
  engine, N streams         N requests decoded together, read in one event loop as the server
                            reads them, without HTTP (server minus this = HTTP and SSE)
  server, N clients         N streaming clients at once over HTTP (spread over
                            --client_processes processes of their own): aggregate and per-client
                            tokens/s, first-token latency p50 / p95 (from the moment all N were sent);
                            each server first gets one short unmeasured request from each process;
                            one client: the median of 3 requests; the garbage collector's full
                            passes in this process during the row (server_full_gc)
  transformers CB, N        `model.generate_batch` of N prompts (paged KV cache), after its warm-up

Each engine is warmed up first (`Engine.warm_up`, what serve.py does before it opens its port:
every batch width x attention span compiled). The memory-bandwidth bound is the weights' bytes
read once per token at the copy bandwidth measured here. Quantised rows add their weight
bytes, greedy agreement with bf16 (the first bf16 kind; common prefix of the first 8 clients' streams, decoded
alone) and the perplexity of one held-out random token sequence under each (random weights:
that number only says how far quantisation moves the distribution; quantized_quality.py measures
both on a trained model and held-out text). Correctness of the
concurrent streams: each streamed token is checked against one plain forward over prompt +
stream (`their_max_logit_gap`: bf16 rounding flips only near-ties), and the first 8 clients'
streams against the same prompt decoded alone. On a GPU every engine row also times its
decode steps in one more run (`step_timing`: GPU time per step against wall time per step,
i.e. whether the GPU waits for the host; the step's width follows from `batcher.batch_widths`).
Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import hashlib
import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch._inductor import config as inductor_config
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.errors import UserError  # noqa: E402
from common.serving.api import ServerSettings, create_app  # noqa: E402
from common.serving.engine import Engine  # noqa: E402
from common.serving.loading import QUANTIZATIONS, prepare_weights, weight_bytes, weights_variant  # noqa: E402
from common.serving.sampling import SamplingParams  # noqa: E402

# serve.py's defaults on an H100 / H200 (--fuse_projections auto, --matvec auto, --decode_attention auto,
# the gate/up kernel's SiLU(gate) x up where it takes them), bf16 and 8-bit weights
GPU_DEFAULT = "none+fused+triton+attn+glu,fp8_rowwise+fused+triton+attn+glu"
SHAPES = {  # hidden, intermediate, layers, heads, vocab
    "llama2-7b": (4096, 11008, 32, 32, 32000),
    "baichuan2-7b": (4096, 11008, 32, 32, 125696),
    "tiny": (64, 128, 2, 4, 1000),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def word(i: int) -> str:
    return f"w{i}"


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One word per id and no special tokens: every generated id shows in the streamed text,
    so the text gives back the ids."""
    backend = Tokenizer(models.WordLevel({word(i): i for i in range(vocab_size)}, unk_token=word(0)))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def build_model(shape: str, device: torch.device) -> LlamaForCausalLM:
    hidden, intermediate, layers, heads, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a large device-to-device copy (read + write), the best of 5 rounds of 10
    (one round has read 10% low in a run)."""
    if device.type != "cuda":
        return None
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        sync()
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 10 / best


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def serve_in_thread(engine: Engine, port: int, clients: int, processes: int):
    """The server on `port`, decoding up to `clients` requests together; as many more may queue, and
    at least `processes` (each client process's first request arrives at once, whatever --clients)."""
    import uvicorn

    settings = ServerSettings(max_concurrent=clients, max_waiting=max(clients, processes), queue_timeout=600)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return server, thread
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def stream_completion(client: httpx.Client, port: int, prompt: str, tokens: int, out: dict) -> None:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage = "", None
    first = None
    with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
        if response.is_error:  # (not raise_for_status: its HTTPStatusError cannot be unpickled from a pool process)
            raise RuntimeError(f"the server answered {response.status_code}: {response.read().decode()[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    first = first or time.time()  # (wall clock: shared by the client processes)
                    text += choice["text"]
    out.update(text=text, tokens=usage["completion_tokens"] if usage else None, first_token_at=first)


def concurrent_clients(port: int, prompts: list[str], tokens: int, start_at: float) -> tuple[float, float, list[dict]]:
    """Stream `prompts` at once, a thread each, from the wall-clock time `start_at` (when the other
    client processes start theirs): seconds from then to the last one's end, how late this
    process started, and each stream's text, token count and first-token latency."""
    results = [{} for _ in prompts]
    # one client, made before the clock starts: each httpx.Client builds an SSL context (about 18 ms of
    # CPU), which 64 threads each making their own would add to the first-token latencies measured
    client = httpx.Client(timeout=900, limits=httpx.Limits(max_connections=len(prompts) + 4))

    def stream(prompt: str, result: dict) -> None:
        try:
            stream_completion(client, port, prompt, tokens, result)
        except Exception as err:  # raised below, from this process
            result["error"] = f"{type(err).__name__}: {err}"

    threads = [threading.Thread(target=stream, args=(p, r)) for p, r in zip(prompts, results)]
    time.sleep(max(0.0, start_at - time.time()))
    late = time.time() - start_at
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} streams failed; the first: {errors[0]}")
    for result in results:
        result["first_token_s"] = result.pop("first_token_at") - start_at
    return time.time() - start_at, late, results


_first_request = None  # a barrier of the pool's size, in each client process (client_process)


def client_process(ready, first_request) -> None:
    """A client process's start: it has imported this module when `ready` lets every one go."""
    global _first_request
    _first_request = first_request
    ready.wait()


def first_request(port: int) -> None:
    """One short unmeasured request from this client process, held until every process of the pool
    has taken one (so each does): a process's first request over HTTP, and the server's, pay
    one-time costs (imports, the connection pool, thread pools) that were 17 and 35 ms of the first
    one-client row of two runs on an H200 (RESULTS.md), not what a running server's clients see."""
    _first_request.wait(timeout=120)
    with httpx.Client(timeout=120) as client:
        stream_completion(client, port, word(3), 2, {})


def spread_clients(pool, processes: int, port: int, prompts: list[str], tokens: int) -> tuple[float, list[dict]]:
    """`prompts` streamed at once by the pool's processes, in contiguous shares (one process
    parsing 64 streams' events under one GIL limits what it can read, as 64 users' machines
    would not): seconds until the last stream ended and every stream's result, in order."""
    share = math.ceil(len(prompts) / processes)
    start_at = time.time() + 0.5  # every process has its share by then
    runs = [pool.apply_async(concurrent_clients, (port, prompts[i:i + share], tokens, start_at))
            for i in range(0, len(prompts), share)]
    done = [run.get() for run in runs]
    late = max(late for _, late, _ in done)
    if late > 0.05:
        raise RuntimeError(f"a client process started {late:.2f} s after the others: the measurement is not fair")
    return max(seconds for seconds, _, _ in done), [r for _, _, results in done for r in results]


class FullCollections:
    """The garbage collector's full passes (generation 2) in this process while the block runs:
    each holds the GIL, stopping the batcher and the server (Engine.warm_up freezes what compiling
    left so that they stay short)."""

    def __enter__(self):
        self.count, self.seconds, self.began = 0, 0.0, 0.0
        gc.callbacks.append(self.note)
        return self

    def note(self, phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                self.began = time.perf_counter()
            else:
                self.count, self.seconds = self.count + 1, self.seconds + time.perf_counter() - self.began

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self.note)


def step_timing(engine: Engine, run) -> dict:
    """Where the time of `run` (a generation on `engine`) goes, step by step: the GPU time
    between CUDA events recorded around each decode step, against the wall time from the first
    step's start to the last one's end (a busy share under 1: the GPU waited for the host), and
    the host's time inside each step call (Python and the CUDA-graph replay; enqueueing only).
    A step whose GPU is idle when it starts counts its enqueueing as GPU time. Empty on the CPU."""
    if not torch.cuda.is_available() or engine.model.device.type != "cuda":
        run()
        return {}
    decoder = engine.decoder
    steps = dict(decoder.decode)
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    host: list[float] = []

    def timed_step(*args, step):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        began = time.perf_counter()
        out = step(*args)
        host.append(time.perf_counter() - began)
        end.record()
        events.append((start, end))
        return out

    decoder.decode = {width: partial(timed_step, step=step) for width, step in steps.items()}
    try:
        run()
    finally:
        decoder.decode = steps
    sync()
    gpu = sum(start.elapsed_time(end) for start, end in events)
    wall = events[0][0].elapsed_time(events[-1][1])
    return {"steps": len(events), "step_gpu_ms": round(gpu / len(events), 3),
            "step_wall_ms": round(wall / len(events), 3), "gpu_busy_share": round(gpu / wall, 3),
            "step_host_call_ms": round(1e3 * sum(host) / len(host), 3)}


def engine_streams(engine: Engine, prompt_ids: list[list[int]], params: SamplingParams) -> float:
    """Seconds to decode every prompt at once, read as the server reads (one event loop, text
    deltas), without HTTP: the server's rows minus this is what HTTP and SSE cost."""
    async def read_all():
        loop = asyncio.get_running_loop()

        async def read(stream):
            async for _ in stream.deltas():
                pass

        with engine.decoder.condition:  # they join together, as clients arriving at once would
            streams = [engine.stream(ids, params, loop) for ids in prompt_ids]
        await asyncio.gather(*(read(stream) for stream in streams))

    start = time.perf_counter()
    asyncio.run(read_all())
    return time.perf_counter() - start


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def teacher_forced_gaps(model, prompt_ids: list[int], text: str) -> list[float]:
    """For each streamed token that is not the argmax of one plain forward over prompt +
    stream: how far its logit is below that argmax. A batching bug (a row reading another
    row's cache, a wrong position) gives large gaps; bf16 rounding differences between a
    batched and a single step only flip near-ties (gaps of a few hundredths)."""
    streamed = [int(w[1:]) for w in text.split()]
    ids = torch.tensor([prompt_ids + streamed], device=model.device)
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(streamed, device=model.device)[:, None])[:, 0]
    gaps = logits.max(dim=1).values - chosen
    return gaps[gaps > 0].tolist()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def perplexity(model, ids: list[int]) -> float:
    with torch.inference_mode():
        tokens = torch.tensor([ids], device=model.device)
        logits = model(tokens).logits[0, :-1].float()
        return math.exp(torch.nn.functional.cross_entropy(logits, tokens[0, 1:]).item())


def transformers_continuous_batching(model, prompt_ids: list[list[int]], tokens: int) -> float:
    """Seconds of one `generate_batch` over the prompts (after a warm-up call of the same shape)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    with torch.inference_mode():
        model.generate_batch(inputs=prompt_ids, generation_config=config)  # warm-up (and CUDA graphs)
        return timed(lambda: model.generate_batch(inputs=prompt_ids, generation_config=config))


def transformers_cb_in_child(args, device: torch.device) -> list[dict]:
    """The CB rows from this script run again with `--transformers_cb_site` first on the import path
    (the same prompts: they come from a fixed seed), the other transformers named in each row."""
    out = Path(args.out).with_suffix(".cb.json")  # the child's rows, kept (partial) if the run is cut short
    command = [sys.executable, __file__, "--only_transformers_cb", "--shape", args.shape,
               "--prompt_tokens", str(args.prompt_tokens), "--clients", args.clients, "--out", str(out),
               *(["--tokens", str(args.tokens)] if args.tokens else []), *(["--tiny"] if args.tiny else [])]
    path = os.pathsep.join(filter(None, [args.transformers_cb_site, os.environ.get("PYTHONPATH")]))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the child builds its own copy of the model
    # its progress lines go to our stdout; its errors are kept for the row
    result = subprocess.run(command, env={**os.environ, "PYTHONPATH": path}, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        return [{"path": "transformers CB", "error": (result.stderr.strip().splitlines() or ["?"])[-1][:300]}]
    child = json.loads(out.read_text())
    version = child["setup"].split("transformers ")[1].split(",")[0]
    return [{**row, "path": f"{row['path']} (transformers {version})"} for row in child["rows"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--tokens", type=int, default=None, help="New tokens per request (default: 224; 16 with --tiny).")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,16,32,64", help="Concurrent streaming clients, comma-separated.")
    parser.add_argument("--quantize", default=None, help="Weights to serve: " + ", ".join(QUANTIZATIONS)
                        + " (none: bf16; see common/serving/loading.py), each optionally followed by '+fused' (q/k/v "
                        "and gate/up merged first), '+triton' (one row's products through common/serving/matvec.py's "
                        "kernel; without it inductor's), '+attn' (the decode step's attention through "
                        "common/serving/decode_attention.py's kernel, serve.py --decode_attention triton) and '+glu' "
                        "(with +fused+triton: SiLU(gate) x up taken in the gate/up kernel, as serve.py does where it "
                        "can); comma-separated for several, e.g. none+fused,none+fused+triton. "
                        f"Default: what serve.py does by default on a GPU, in bf16 and 8 bits ({GPU_DEFAULT}); none "
                        "with --tiny or without a GPU.")
    parser.add_argument("--max_cache_len", type=int, default=None,
                        help="Engine cache slots (default: max(512, twice prompt + new tokens)). Warm-up compiles "
                             "one graph per 256-slot bucket up to it, so prompt + new tokens rounded up to 256 "
                             "measures the same steps with fewer compiles.")
    parser.add_argument("--compile_cache", default=None, metavar="FILE",
                        help="Compiled kernels: loaded before each engine's warm-up if the file exists, written "
                             "after it (serve.py --compile_cache). A run that would take longer than one sitting "
                             "allows can compile in one process and measure in the next; the warm-up rows then "
                             "show the cached start.")
    parser.add_argument("--warm_up_only", action="store_true",
                        help="Only build and warm up each engine (with --compile_cache: fill the file), measuring "
                             "nothing else: the first of two calls when compiling and measuring together would "
                             "take longer than one allows.")
    parser.add_argument("--skip_static_generate", action="store_true")
    parser.add_argument("--skip_transformers_cb", action="store_true")
    parser.add_argument("--only_transformers_cb", action="store_true",
                        help="Only the transformers CB rows (run with a newer transformers than the rest, say).")
    parser.add_argument("--transformers_cb_site", default=None,
                        help="A folder holding another transformers (`make gpu-wheels CB=1`, installed with pip "
                             "--target): the CB rows then run in a child process that imports it first, in this run.")
    parser.add_argument("--tiny", action="store_true", help="2 x 64 model on the CPU (16 tokens unless --tokens): a smoke "
                        "test, or the server's own cost per token with a model that costs next to nothing.")
    parser.add_argument("--client_processes", default=str(min(4, os.cpu_count() or 1)),
                        help="Processes the streaming clients are spread over (default: 4, or the CPUs if fewer); "
                             "comma-separated, a server row for each (e.g. 1,4).")
    parser.add_argument("--port", type=int, default=None, help="Port of the in-process server (default: a free one).")
    parser.add_argument("--out", default="outputs/benchmarks/decode_throughput.json")
    args = parser.parse_args()
    shape = "tiny" if args.tiny else args.shape
    tokens = args.tokens or (16 if args.tiny else 224)
    clients_list = [int(c) for c in args.clients.split(",")]
    on_gpu = torch.cuda.is_available() and not args.tiny
    kinds = (args.quantize or (GPU_DEFAULT if on_gpu else "none")).split(",")
    try:
        variants = {name: weights_variant(name) for name in kinds}
    except UserError as err:
        parser.error(str(err))
    device = torch.device("cuda" if on_gpu else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the Engine does (common/serving/runtime.py)

    model = build_model(shape, device)
    vocab = model.config.vocab_size
    tokenizer = word_tokenizer(vocab)
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(1)
    most = max(clients_list)
    prompt_ids = [torch.randint(3, vocab, (args.prompt_tokens,), generator=generator).tolist() for _ in range(most)]
    prompts = [" ".join(map(word, ids)) for ids in prompt_ids]
    held_out = torch.randint(3, vocab, (512,), generator=generator).tolist()
    checked = min(8, most)  # clients whose streams are compared with the same prompt decoded alone
    rows: list[dict] = []

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def add(path: str, batch: int, seconds: float, generated: int, **extra) -> dict:
        row = {"path": path, "batch": batch, "tokens": generated, "seconds": round(seconds, 3),
               "tokens_per_s": round(generated / seconds, 1), **extra}
        rows.append(row)
        print(f"  {path}: {generated / seconds:.1f} tokens/s", json.dumps(extra), flush=True)
        Path(args.out).write_text(json.dumps({"partial": True, "rows": rows}, indent=2) + "\n")  # kept if cut short
        return row

    # ------------------------------------------------------------ HF generate
    ids = torch.tensor([prompt_ids[0]], device=device)

    def generate(**kwargs):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, pad_token_id=0, **kwargs)

    if args.warm_up_only:
        args.skip_static_generate = args.skip_transformers_cb = True
    if not args.only_transformers_cb and not args.warm_up_only:
        generate()  # warm-up
        add("generate", 1, timed(generate), tokens)
    if not args.skip_static_generate and not args.only_transformers_cb and device.type == "cuda":
        generate(cache_implementation="static")  # compiles
        add("generate, static cache", 1, timed(lambda: generate(cache_implementation="static")), tokens)

    if args.port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            args.port = probe.getsockname()[1]
    # the clients run in a process of their own, as they would in use: not sharing the server's GIL
    spawn = multiprocessing.get_context("spawn")
    process_counts = [int(p) for p in args.client_processes.split(",")]
    ready = spawn.Barrier(max(process_counts) + 1)
    clients = spawn.Pool(max(process_counts), initializer=client_process,
                         initargs=(ready, spawn.Barrier(max(process_counts))))
    ready.wait()  # each has imported this module: the first load's processes start together
    greedy = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
    quality: dict[str, dict] = {}
    alone_bf16: list[list[int]] = []
    try:
        # The kinds' engines share one recompile limit in this process (runtime.RECOMPILE_LIMIT): past it dynamo would
        # run a decode width eagerly with only a warning, and its rows would be an eager engine's. Stop instead.
        # (Only for the engines: HF generate's and transformers' CB's compiled forwards keep dynamo's defaults.)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for kind in kinds if not args.only_transformers_cb else ():
                served = model if kind == "none" else prepare_weights(copy.deepcopy(model), *variants[kind])
                label = kind.replace("none", "bf16")
                weights = weight_bytes(served)
                # the cache spans what a request needs, in the 256-slot buckets attention reads
                engine = Engine(served, tokenizer, "bench", max_batch=most,
                                max_cache_len=args.max_cache_len or max(512, 2 * (args.prompt_tokens + tokens)))
                rows.append({"path": f"{label}: engine warm-up (compile every width x span)",
                             "seconds": round(engine.warm_up(args.compile_cache), 1)})
                print(f"  {rows[-1]['path']}: {rows[-1]['seconds']} s", flush=True)
                if args.warm_up_only:
                    engine.close()
                    del served, engine
                    continue

                first_tokens: list[float] = []  # seconds from the request to its first token, without HTTP

                def engine_one(i: int = 0, engine=engine, first_tokens=first_tokens) -> list[int]:
                    start = time.perf_counter()
                    stream = engine.stream(prompt_ids[i], greedy)
                    for _ in stream:
                        if len(first_tokens) < 3 and len(stream.token_ids) == 1:
                            first_tokens.append(time.perf_counter() - start)
                    return stream.token_ids

                # median of 3 (their first tokens too); then one more run, its steps timed
                seconds = sorted(timed(engine_one) for _ in range(3))[1]
                decoder, eager = engine.decoder, {}
                compiled = getattr(decoder, "prefill_one", None)  # (a Batcher's; the eager one without compiling)
                if compiled is not None and compiled is not decoder.prefill_eager:
                    # the first token with the prompt prefilled eagerly, as before it was compiled: 3 more requests
                    decoder.prefill_one = decoder.prefill_eager
                    try:
                        eager_first: list[float] = []
                        for _ in range(3):
                            engine_one(first_tokens=eager_first)
                    finally:
                        decoder.prefill_one = compiled
                    eager = {"first_token_eager_prefill_p50_s": round(percentile(eager_first, 0.5), 4)}
                add(f"{label}: engine, batch 1", 1, seconds, tokens, first_token_p50_s=round(percentile(first_tokens, 0.5), 4),
                    **eager, **step_timing(engine, engine_one))
                for n in clients_list[1:]:
                    add(f"{label}: engine, {n} streams (no HTTP)", n, engine_streams(engine, prompt_ids[:n], greedy), n * tokens,
                        **step_timing(engine, partial(engine_streams, engine, prompt_ids[:n], greedy)))
                alone = [engine_one(i) for i in range(checked)]
                if variants[kind][0] == "none" and not alone_bf16:  # the first bf16 kind: the reference
                    alone_bf16 = alone
                quality[label] = {"weight_GB": round(weights / 1e9, 2),
                                  "held_out_perplexity": round(perplexity(served, held_out), 2),
                                  "greedy_common_prefix_with_bf16": round(sum(
                                      common_prefix(a, b) for a, b in zip(alone, alone_bf16)) / checked, 1)
                                  if alone_bf16 else None,
                                  # equal digests = the same tokens (unequal ones need not mean a bug: max-autotune
                                  # picks kernels by timing in each process, which can flip near-ties)
                                  "greedy_streams_sha1": hashlib.sha1(json.dumps(alone).encode()).hexdigest()[:16]}
                server, thread = serve_in_thread(engine, args.port, most, max(process_counts))
                try:
                    for done in [clients.apply_async(first_request, (args.port,)) for _ in range(max(process_counts))]:
                        done.get()
                    for n, processes in [(n, p) for n in clients_list for p in sorted({min(p, n) for p in process_counts})]:
                        with FullCollections() as collections:
                            runs = [spread_clients(clients, processes, args.port, prompts[:n], tokens)
                                    for _ in range(3 if n == 1 else 1)]
                        seconds, results = sorted(runs, key=lambda run: run[0])[len(runs) // 2]  # one client: median of 3
                        first = [r["first_token_s"] for r in results]
                        words = [list(map(word, a)) for a in alone]
                        prefixes = [common_prefix(r["text"].split(), w) for r, w in zip(results, words)]
                        gaps = [g for r, p in zip(results, prompt_ids) for g in teacher_forced_gaps(served, p, r["text"])]
                        add(f"{label}: server, {n} client{'s' if n > 1 else ''}"
                            f"{f' in {processes} process' + 'es' * (processes > 1) if len(process_counts) > 1 else ''}", n, seconds,
                            sum(r["tokens"] for r in results), per_client_tokens_per_s=round(tokens / seconds, 1),
                            client_processes=processes,
                            first_token_p50_s=round(percentile(first, 0.5), 3),
                            first_token_p95_s=round(percentile(first, 0.95), 3),
                            every_client_got_its_tokens=all(r["tokens"] == tokens for r in results),
                            server_full_gc=collections.count, server_full_gc_s=round(collections.seconds, 3),
                            identical_to_alone=f"{sum(p == len(w) for p, w in zip(prefixes, words))}/{len(prefixes)}",
                            tokens_not_argmax_of_a_plain_forward=len(gaps),
                            their_max_logit_gap=round(max(gaps, default=0), 4), weight_bytes=weights)
                finally:
                    server.should_exit = True
                    thread.join(timeout=30)
                    engine.close()
                if served is not model:
                    del served
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        clients.close()

    if not args.skip_transformers_cb and device.type == "cuda":
        if args.transformers_cb_site:  # another transformers than this process imported: in a child process
            rows += transformers_cb_in_child(args, device)
        else:
            for n in clients_list:
                try:
                    add(f"transformers CB, {n} request{'s' if n > 1 else ''}", n,
                        transformers_continuous_batching(model, prompt_ids[:n], tokens), n * tokens)
                except Exception as err:  # an older transformers without generate_batch, say
                    rows.append({"path": f"transformers CB, {n}", "error": f"{type(err).__name__}: {err}"[:300]})
                    break

    bandwidth = copy_bandwidth(device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    header = (f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}, {shape} "
              f"({bf16_bytes / 1e9:.2f} GB of bf16 weights), greedy, {args.prompt_tokens}-token prompts, "
              f"{tokens} new tokens, inductor PDL {getattr(inductor_config.triton, 'enable_pdl', 'absent')}, "
              f"compile cache {args.compile_cache or 'none'}")
    one = {}
    for row in rows:
        if "weight_bytes" in row and row["batch"] == 1:
            one[row["path"].split(":")[0]] = row
    for row in rows:
        if "weight_bytes" in row:
            label = row["path"].split(":")[0]
            base = one.get(label)
            row["x_one_client"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2) if base else None
            if bandwidth and row["batch"] == 1:
                row["share_of_bound"] = round(row["tokens_per_s"] / (bandwidth / row.pop("weight_bytes")), 3)
            else:
                row.pop("weight_bytes")
    print("\n" + header)
    print(f"{'path':44s} {'batch':>5s} {'tokens/s':>9s} {'/client':>8s} {'x 1':>6s} {'ttft p50':>8s} {'p95':>7s}")
    for row in rows:
        if "error" in row:
            print(f"{row['path']:44s} failed: {row['error']}")
        elif "tokens_per_s" in row:
            print(f"{row['path']:44s} {row['batch']:5d} {row['tokens_per_s']:9.1f} "
                  f"{row.get('per_client_tokens_per_s', row['tokens_per_s'] / row['batch']):8.1f} "
                  f"{row.get('x_one_client') or 0:6.2f} {row.get('first_token_p50_s', 0):8.3f} "
                  f"{row.get('first_token_p95_s', 0):7.3f}")
        else:
            print(f"{row['path']:44s} {'':5s} {row['seconds']:8.1f}s")
    summary = {"copy_bandwidth_GB_per_s": round(bandwidth / 1e9) if bandwidth else None,
               "bf16_bandwidth_bound_tokens_per_s": round(bandwidth / bf16_bytes, 1) if bandwidth else None,
               "quality": quality}
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": header, "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
