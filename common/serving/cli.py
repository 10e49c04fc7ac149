"""The command lines every generative recipe's `serve.py` and `chatbot.py` call."""

from __future__ import annotations

import argparse
import errno
import socket

from common.errors import UserError
from common.serving.api import ServerSettings, create_app
from common.serving.engine import DEFAULT_CACHE_LEN, Engine
from common.serving.loading import ATTENTION, FUSE, MATVEC, QUANTIZATIONS
from common.serving.sampling import SamplingParams
from common.serving.ui import build_chat_ui


def _model_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("--model", "--model_name_or_path", default=default_model, help="Local model directory (config.json, weights, tokenizer).")
    parser.add_argument("--template", default=None,
                        help="Chat template from common/templates.py; default: the one the model was tuned with, "
                             "else the tokenizer's own, else 'plain'.")
    parser.add_argument("--base_model", default=None,
                        help="Base model of a LoRA adapter given as --model (default: the one the adapter names).")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if present).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 = this machine only; 0.0.0.0 = everyone.")
    parser.add_argument("--max_cache_len", type=int, default=None,
                        help=f"Tokens (prompt + reply) one request may span; the KV cache holds this many per "
                             f"request decoded together. Default: the model's context, at most {DEFAULT_CACHE_LEN}.")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="CUDA graphs for the decode step (auto: on CUDA): compiled for every batch width (1, "
                             "--max_concurrent, and a quarter of it when that is 8 or more) and attention span "
                             "before the server opens its port (minutes the first time, cached on disk for later "
                             "starts); decoding then runs several times faster.")
    parser.add_argument("--compile_cache", default=None, metavar="FILE",
                        help="With --compile: a file of compiled kernels, loaded before the warm-up if it exists and "
                             "written after it. Copied to another machine with the same GPU, torch and triton, it "
                             "spares that machine's start the kernels' generation and tuning (torch.compile's "
                             "portable cache; on one machine its own cache on disk already does that).")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                        help="Quantise the weights after loading (a LoRA adapter is merged first): torchao's int8 / "
                             "fp8 weight-only, fp8_dynamic (FP8 tensor cores, H100 / H200), int4 weight-only; "
                             "int8_rowwise / fp8_rowwise (8-bit weights with a scale per row: one row's products "
                             "through --matvec, many rows' on the 8-bit tensor cores, fp8 on Hopper and later, int8 "
                             "on Ampere and later); "
                             "int8_gemlite / fp8_gemlite / int4_gemlite (gemlite's Triton kernels, 4-bit in groups of "
                             "64; bf16_gemlite: the 16-bit weights through its kernels; CUDA only, needs `pip install "
                             "gemlite`; int4_gemlite decodes one stream at 0.33x bf16 on an H200, the others' speed is "
                             "not measured). 8 bits: half the weight memory. 7B shape, the GPU defaults otherwise, same "
                             "run: fp8_rowwise serves one client 1.61x bf16 (306.4 vs 190.0 tokens/s) and 64 clients "
                             "1.07x (6,906 vs 6,468) on an H100; 1.40x at one client on an H200 (331.5 vs 237.2) "
                             "before SiLU(gate) x up moved into the kernel; int8_rowwise one client 1.54x bf16 "
                             "(297.5 vs 193.8) and 64 clients 1.13x on an H100 (two calls, one machine, 2026-12-06). "
                             "torchao's are slower than bf16 at one "
                             "stream. On two small trained models int8_rowwise predicts bf16's next token 98.3-98.5%% "
                             "of the time, fp8_rowwise 95.6-95.7%% (float32: 98.7-98.9%%). Speed and quality: "
                             "benchmarks/RESULTS.md (2026-12-05).")
    parser.add_argument("--fuse_projections", nargs="?", const="on", default="auto", choices=FUSE,
                        help="Merge each decoder layer's q/k/v products into one and gate/up into one after loading "
                             "(Llama, Mistral, Qwen2; transformers' Phi3 layers, which compute the same): fewer, "
                             "larger matrix products per token; before --quantize. Logits equal up to rounding. "
                             "H200, 7B shape, bf16: one client 1.25x (218 vs 175 tokens/s), 64 clients 8,465 "
                             "tokens/s (benchmarks/RESULTS.md, 2026-12-05). auto (the default): on CUDA for those "
                             "families with bf16 / fp16 or int8_rowwise / fp8_rowwise weights; the flag alone: on.")
    parser.add_argument("--matvec", default="auto", choices=MATVEC,
                        help="What multiplies one row of activations by each weight (the decode step of one client, "
                             "which reads every weight once): triton (a Triton kernel, common/serving/matvec.py; "
                             "CUDA, bf16 / fp16 weights or --quantize int8_rowwise / fp8_rowwise), inductor "
                             "(torch.compile's generated reductions), auto (triton where it can). H200, 7B shape, "
                             "merged products, one client: bf16 1.07x inductor's (237.2 vs 221.0 tokens/s), "
                             "fp8_rowwise 331.5 tokens/s (benchmarks/RESULTS.md, 2026-12-05).")
    parser.add_argument("--decode_attention", default="auto", choices=ATTENTION,
                        help="The decode step's attention (one new token per request over its cache): sdpa (the "
                             "model's own, PyTorch's kernels), triton (a Triton kernel, "
                             "common/serving/decode_attention.py; CUDA; it skips the slots the mask hides, which SDPA "
                             "reads), auto (the default: triton on CUDA for Llama, Mistral and Qwen2 models, else "
                             "sdpa). H100, 7B bf16, same run: 32 / 64 clients 1.12x / 1.07x sdpa's speed (3,858 "
                             "vs 3,460 and 7,125 vs 6,659 tokens/s), one client 0.99x (benchmarks/RESULTS.md, "
                             "2026-12-06).")
    parser.add_argument("--decoder", default="auto", choices=["auto", "batch", "sequential"],
                        help="auto: requests decoded together (continuous batching) where the model allows it, else "
                             "one at a time (BLOOM's ALiBi, models whose layers attend to different spans); "
                             "sequential: always one at a time (a model whose own KV cache the batcher cannot replace).")


def _engine_options(args: argparse.Namespace, max_batch: int) -> dict:
    return {"max_batch": max_batch, "max_cache_len": args.max_cache_len,
            "compile": None if args.compile == "auto" else args.compile == "true", "decoder": args.decoder}


def _check_address_free(host: str, port: int) -> None:
    """Fail now when another program listens on host:port, not after loading the model and
    compiling its decode step (minutes on a GPU). As the servers bind (SO_REUSEADDR), a port
    that a stopped server left in TIME_WAIT counts as free."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise UserError(f"--host {host}: {err.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            taken = " (another program listens there: pick another --port)" if err.errno == errno.EADDRINUSE else ""
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror}{taken}") from None


def _warm_up(engine: Engine, compile_cache: str | None) -> None:
    """Compiled decoding: every shape compiled before the port opens (health checks wait for it)."""
    if engine.compile:
        print("compiling the decode step for every batch width and attention span "
              "(minutes the first time, cached on disk for later starts) ...", flush=True)
        print(f"warm-up done in {engine.warm_up(compile_cache):.0f} s", flush=True)
    elif compile_cache:
        print("--compile_cache is not used: the decode step is not compiled here (--compile)", flush=True)


def _sampling_arguments(parser: argparse.ArgumentParser, defaults: SamplingParams, title: str) -> None:
    group = parser.add_argument_group(title)
    group.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    group.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy.")
    group.add_argument("--top_p", type=float, default=defaults.top_p)
    group.add_argument("--top_k", type=int, default=defaults.top_k, help="0 = off.")
    group.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)


def _sampling_defaults(args: argparse.Namespace) -> SamplingParams:
    defaults = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    defaults.check()
    return defaults


def run_server(argv: list[str] | None, default_model: str, description: str,
               defaults: SamplingParams | None = None) -> None:
    """The `serve.py` of a generative recipe. `defaults`: sampling settings for what a
    request leaves out (OpenAI's defaults, temperature 1, when None)."""
    import uvicorn

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(parser, default_model)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served_model_name", default=None, help="Name in /v1/models (default: the folder name).")
    limits = ServerSettings()
    parser.add_argument("--max_concurrent", type=int, default=limits.max_concurrent,
                        help="Generations decoded together in one batch.")
    parser.add_argument("--max_waiting", type=int, default=limits.max_waiting,
                        help="Requests queued beyond those; more are answered 429.")
    parser.add_argument("--queue_timeout", type=float, default=limits.queue_timeout,
                        help="Seconds a queued request waits for a slot before 503.")
    parser.add_argument("--max_request_bytes", type=int, default=limits.max_request_bytes)
    parser.add_argument("--default_max_tokens", type=int, default=limits.default_max_tokens,
                        help="max_tokens of a request that gives none.")
    parser.add_argument("--cors", nargs="*", default=[], help="Origins allowed to call from a browser.")
    _sampling_arguments(parser, defaults or SamplingParams(),
                        "sampling defaults (for what a request leaves out; --max_new_tokens is not used)")
    args = parser.parse_args(argv)
    if args.max_concurrent < 1 or args.max_waiting < 0 or args.queue_timeout <= 0:
        raise UserError("need --max_concurrent >= 1, --max_waiting >= 0 and --queue_timeout > 0")
    _check_address_free(args.host, args.port)
    engine = Engine.from_pretrained(args.model, args.served_model_name, args.template, args.device, args.dtype,
                                    args.base_model, args.quantize, args.fuse_projections, args.matvec,
                                    args.decode_attention, **_engine_options(args, args.max_concurrent))
    settings = ServerSettings(args.max_concurrent, args.max_waiting, args.queue_timeout, args.max_request_bytes,
                              args.default_max_tokens, args.cors, _sampling_defaults(args))
    _warm_up(engine, args.compile_cache)
    print(f"serving '{engine.name}' at http://{args.host}:{args.port}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="info")


def run_chatbot(argv: list[str] | None, default_model: str, description: str, title: str,
                defaults: SamplingParams | None = None, examples: list[str] | None = None) -> None:
    """The `chatbot.py` of a generative recipe."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(parser, default_model)
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--system_prompt", default="", help="Initial system prompt (editable in the UI).")
    parser.add_argument("--max_concurrent", type=int, default=4, help="Chats answered at once (decoded together).")
    _sampling_arguments(parser, defaults or SamplingParams(), "initial generation settings (the UI's sliders change them)")
    args = parser.parse_args(argv)
    _check_address_free(args.host, args.port)
    defaults = _sampling_defaults(args)
    engine = Engine.from_pretrained(args.model, None, args.template, args.device, args.dtype, args.base_model,
                                    args.quantize, args.fuse_projections, args.matvec, args.decode_attention,
                                    **_engine_options(args, args.max_concurrent))
    _warm_up(engine, args.compile_cache)
    url = f"http://{args.host}:{args.port}"
    # the docstring's first paragraph names the default address: the page shows the real one
    summary = description.split("\n\n")[0].replace("http://127.0.0.1:7860", url)
    demo = build_chat_ui(engine, title, summary, defaults, args.system_prompt, examples)
    print(f"chatbot for '{engine.name}' at {url}", flush=True)
    demo.queue(default_concurrency_limit=args.max_concurrent).launch(server_name=args.host, server_port=args.port,
                                                   share=False, show_error=True)
