"""Token-by-token decoding speed of common/serving/, with SDPA's cuDNN backend on and off.

    python benchmarks/gpt2_decode_speed.py                      # GPT-2 small, random weights, one GPU
    python benchmarks/gpt2_decode_speed.py --tiny               # CPU smoke test

Written for the first engine, where each generation of `Engine.stream` ran in a thread of its
own (since issue 7 one batcher thread decodes every request: `decode_throughput.py`). SDPA's cuDNN backend (which
PyTorch picks on an H100) builds an execution plan for every new key length and caches it per
thread, so decoding, where the key length grows by one each step, builds a plan per token in
every new thread. `load_causal_lm` therefore turns that backend off on CUDA; this script
measures both ways in one process, greedy, batch 1, `--tokens` new tokens (end of text ignored):

  generate, main thread    HF `model.generate` called directly (warm: second call)
  Engine.stream            what serve.py and chatbot.py run per request (a new thread each)
  server                   the same through the OpenAI-compatible HTTP server (serve.py), streamed

Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.serving.engine import Engine  # noqa: E402
from common.serving.sampling import SamplingParams  # noqa: E402
from common.tokenizer import build_chinese_tokenizer  # noqa: E402

TEXT = "新华社北京电，记者报道。人民日报社论：迈向充满希望的新世纪。今年以来，我国经济平稳发展。"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tokens_per_second(fn, tokens: int) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return tokens / (time.perf_counter() - start)


def server_stream(port: int, tokens: int) -> None:
    """One streamed completion of exactly `tokens` tokens. The server may put several tokens into
    one event when the reader falls behind, so the count comes from the final usage chunk."""
    body = {"prompt": "新华社北京电", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    generated = next(c["usage"]["completion_tokens"] for c in reversed(chunks) if c.get("usage"))
    assert generated == tokens, f"{generated} of {tokens} tokens streamed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="2 x 64 model, 20 tokens: a CPU smoke test.")
    parser.add_argument("--port", type=int, default=None, help="Port of the server run (default: a free one).")
    parser.add_argument("--out", default="outputs/benchmarks/gpt2_decode_speed.json")
    args = parser.parse_args()
    tokens = 20 if args.tiny else args.tokens
    sizes = dict(n_layer=2, n_head=2, n_embd=64) if args.tiny else dict(n_layer=12, n_head=12, n_embd=768)

    model_dir = Path(tempfile.mkdtemp(prefix="decode_speed_"))
    tokenizer = build_chinese_tokenizer([TEXT] * 4, vocab_size=500, min_frequency=1)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=1024, **sizes,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    engine = Engine.from_pretrained(model_dir, name="bench")  # turns cuDNN SDPA off on CUDA
    model = engine.model
    prompt = engine.encode("新华社北京电")
    ids = torch.tensor([prompt], device=model.device)
    params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)

    def generate():
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def stream():
        assert sum(1 for _ in engine.stream(prompt, params)) > 0

    rows = []
    for cudnn in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        generate()  # warm-up of this setting in the main thread
        rows.append({"path": "generate, main thread", "cudnn_sdpa": cudnn,
                     "tokens_per_s": tokens_per_second(generate, tokens)})
        for run in (1, 2):
            rows.append({"path": f"Engine.stream, request {run}", "cudnn_sdpa": cudnn,
                         "tokens_per_s": tokens_per_second(stream, tokens)})
    # the server as shipped (cuDNN SDPA off, set when its Engine starts: common/serving/runtime.py)
    if args.port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            args.port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(REPO / "chinese_gpt2/serve.py"), "--model", str(model_dir),
                               "--port", str(args.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            if server.poll() is not None:
                raise SystemExit(f"serve.py exited with code {server.returncode}")
            try:
                httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        for run in (1, 2):
            rows.append({"path": f"server (serve.py), request {run}", "cudnn_sdpa": False,
                         "tokens_per_s": tokens_per_second(lambda: server_stream(args.port, tokens), tokens)})
    finally:
        server.terminate()
        server.wait(timeout=30)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    header = (f"{device}, torch {torch.__version__}, GPT-2 {sizes['n_layer']} x {sizes['n_embd']}, "
              f"{model.dtype}, greedy, batch 1, {tokens} new tokens")
    print(header)
    print(f"{'path':34s} {'cuDNN SDPA':>10s} {'tokens/s':>9s}")
    for row in rows:
        print(f"{row['path']:34s} {'on' if row['cudnn_sdpa'] else 'off':>10s} {row['tokens_per_s']:9.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
