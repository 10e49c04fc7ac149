"""Decoding throughput of a 7B-class model: HF `generate` vs the serving engine, batch 1 and
16 concurrent streaming clients, in one run.

    python benchmarks/decode_throughput.py                     # Llama-2-7B shape, bf16, one GPU
    python benchmarks/decode_throughput.py --shape baichuan2-7b
    python benchmarks/decode_throughput.py --tiny              # CPU smoke test (2 x 64 model)

Random weights (only speed is measured); a word-level tokenizer with one token per id so that
every generated id decodes. Every row: greedy, end of text ignored, `--tokens` new tokens
after a `--prompt_tokens` prompt.

  generate                  `model.generate`, dynamic cache (what a user writes first)
  generate, static cache    `generate(cache_implementation="static")` (compiles the forward)
  engine, batch 1           `Engine.stream`: the server's generation path, one request
  server, 1 client          the OpenAI-compatible server (in this process), streamed over HTTP to a
                            client in another process
  server, N clients         N streaming clients at once, different prompts: aggregate tokens/s

Each engine/server row is measured after a warm-up of the same shape (the CUDA graphs are
compiled then). The memory-bandwidth bound is the weights' bytes read once per token at the
copy bandwidth measured here. Correctness of the concurrent streams: each client's tokens are
compared with the same prompt decoded alone (bf16 batched and unbatched matmuls round
differently, so a near-tie may flip and the streams part; the CPU tests check exact equality
in float32), and checked against one plain forward over prompt + stream: every streamed token
should be that forward's argmax or within rounding of it (`their_max_logit_gap`).
Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.serving.api import ServerSettings, create_app  # noqa: E402
from common.serving.engine import Engine  # noqa: E402
from common.serving.sampling import SamplingParams  # noqa: E402

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
    """Bytes/s of a large device-to-device copy (read + write)."""
    if device.type != "cuda":
        return None
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def serve_in_thread(engine: Engine, port: int, clients: int):
    import uvicorn

    settings = ServerSettings(max_concurrent=clients, max_waiting=clients, queue_timeout=600)
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


def stream_completion(port: int, prompt: str, tokens: int, out: dict) -> None:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage = "", None
    first = None
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    first = first or time.perf_counter()
                    text += choice["text"]
    out.update(text=text, tokens=usage["completion_tokens"] if usage else None, first_token_at=first)


def concurrent_clients(port: int, prompts: list[str], tokens: int) -> tuple[float, list[dict]]:
    results = [{} for _ in prompts]
    threads = [threading.Thread(target=stream_completion, args=(port, p, tokens, r)) for p, r in zip(prompts, results)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        result["first_token_s"] = result.pop("first_token_at") - start
    return time.perf_counter() - start, results


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--skip_static_generate", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="2 x 64 model on the CPU, 16 tokens: a smoke test.")
    parser.add_argument("--port", type=int, default=None, help="Port of the in-process server (default: a free one).")
    parser.add_argument("--out", default="outputs/benchmarks/decode_throughput.json")
    args = parser.parse_args()
    shape = "tiny" if args.tiny else args.shape
    tokens = 16 if args.tiny else args.tokens
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as load_causal_lm does

    model = build_model(shape, device)
    vocab = model.config.vocab_size
    tokenizer = word_tokenizer(vocab)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(1)
    prompt_ids = [torch.randint(3, vocab, (args.prompt_tokens,), generator=generator).tolist()
                  for _ in range(args.clients)]
    prompts = [" ".join(map(word, ids)) for ids in prompt_ids]
    rows: list[dict] = []

    def add(path: str, batch: int, seconds: float, generated: int, **extra) -> None:
        rows.append({"path": path, "batch": batch, "tokens": generated, "seconds": round(seconds, 3),
                     "tokens_per_s": round(generated / seconds, 1), **extra})
        print(f"  {path}: {generated / seconds:.1f} tokens/s", flush=True)

    # ------------------------------------------------------------ HF generate
    ids = torch.tensor([prompt_ids[0]], device=device)

    def generate(**kwargs):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, pad_token_id=0, **kwargs)

    generate()  # warm-up
    add("generate", 1, timed(generate), tokens)
    if not args.skip_static_generate and device.type == "cuda":
        generate(cache_implementation="static")  # compiles
        add("generate, static cache", 1, timed(lambda: generate(cache_implementation="static")), tokens)

    # ----------------------------------------------------------- the engine
    engine = Engine(model, tokenizer, "bench", max_batch=args.clients)
    greedy = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)

    def engine_one(i: int = 0) -> list[int]:
        stream = engine.stream(prompt_ids[i], greedy)
        for _ in stream:
            pass
        return stream.token_ids

    start = time.perf_counter()
    engine_one()  # compiles the 1-row decode step
    rows.append({"path": "engine warm-up (compile), batch 1", "seconds": round(time.perf_counter() - start, 1)})
    add("engine, batch 1", 1, timed(engine_one), tokens)
    alone = [engine_one(i) for i in range(args.clients)]  # references for the concurrent streams

    if args.port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            args.port = probe.getsockname()[1]
    server, thread = serve_in_thread(engine, args.port, args.clients)
    # the clients run in a process of their own, as they would in use: not sharing the server's GIL
    clients = multiprocessing.get_context("spawn").Pool(1)
    try:
        seconds, results = clients.apply(concurrent_clients, (args.port, prompts[:1], tokens))
        add("server, 1 client", 1, seconds, results[0]["tokens"])
        start = time.perf_counter()
        clients.apply(concurrent_clients, (args.port, prompts, tokens))  # compiles the N-row decode step
        rows.append({"path": f"server warm-up (compile), {args.clients} clients",
                     "seconds": round(time.perf_counter() - start, 1)})
        seconds, results = clients.apply(concurrent_clients, (args.port, prompts, tokens))
        generated = sum(r["tokens"] for r in results)
        words = [list(map(word, ids)) for ids in alone]
        prefixes = [common_prefix(r["text"].split(), w) for r, w in zip(results, words)]
        gaps = [g for r, ids in zip(results, prompt_ids) for g in teacher_forced_gaps(model, ids, r["text"])]
        add(f"server, {args.clients} clients", args.clients, seconds, generated,
            per_client_tokens_per_s=round(tokens / seconds, 1),
            first_token_s_max=round(max(r["first_token_s"] for r in results), 3),
            identical_to_alone=sum(p == len(w) for p, w in zip(prefixes, words)),
            mean_common_prefix=round(sum(prefixes) / len(prefixes), 1),
            tokens_not_argmax_of_a_plain_forward=len(gaps), their_max_logit_gap=round(max(gaps, default=0), 4),
            every_client_got_its_tokens=all(r["tokens"] == tokens for r in results))
    finally:
        clients.close()
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()

    bandwidth = copy_bandwidth(device)
    bound = bandwidth / weights if bandwidth else None
    batch1 = next(r for r in rows if r["path"] == "server, 1 client")["tokens_per_s"]
    many = rows[-1]["tokens_per_s"]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    header = (f"{device_name}, torch {torch.__version__}, {shape} ({weights / 1e9:.2f} GB of weights, "
              f"{next(model.parameters()).dtype}), greedy, {args.prompt_tokens}-token prompts, {tokens} new tokens")
    print("\n" + header)
    print(f"{'path':40s} {'batch':>5s} {'tokens/s':>9s}")
    for row in rows:
        if "tokens_per_s" in row:
            print(f"{row['path']:40s} {row['batch']:5d} {row['tokens_per_s']:9.1f}")
        else:
            print(f"{row['path']:40s} {'':5s} {row['seconds']:8.1f}s")
    summary = {"batch1_server_tokens_per_s": batch1, "concurrent_aggregate_tokens_per_s": many,
               "concurrent_over_batch1": round(many / batch1, 2),
               "copy_bandwidth_GB_per_s": round(bandwidth / 1e9) if bandwidth else None,
               "bandwidth_bound_tokens_per_s": round(bound, 1) if bound else None,
               "batch1_fraction_of_bound": round(batch1 / bound, 3) if bound else None}
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": header, "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
