"""What 8-bit weights do to a trained model's predictions (issue 21: greedy agreement with bf16 and
perplexity on held-out text). decode_throughput.py reports both on random 7B weights, whose next-token
distributions are nearly flat: any rounding flips bf16's own near-ties there, so its agreement numbers
say little. This script measures a model that has learnt something, on held-out text it never saw.

    make demo-clm                                  # a tiny Llama pretrained here: outputs/model_clm, data/model_clm
    python benchmarks/quantized_quality.py         # bf16 (the reference), float32, int8_rowwise, fp8_rowwise, CPU
    python benchmarks/quantized_quality.py --model /models/qwen2-7b --held_out my_held_out.txt \\
        --device cuda --quantize none,fp8_rowwise  # a model of yours, on text it did not train on
    python benchmarks/quantized_quality.py --tiny  # smoke test: model_clm prepared and trained for 40 steps first

Each kind is the model as `serve.py --quantize KIND` serves it on --device (the same loading and
loading.prepare_weights defaults), in --dtype (bfloat16: what a GPU serves). The first kind is the
reference (default "none": the bf16 weights as they are); "float32" is the same checkpoint unrounded,
a yardstick for how far bf16's own rounding moves the model. Per kind:

  weight_MB           the weights' bytes as stored (share of the reference's)
  perplexity          over --blocks held-out blocks of --block_size tokens, one forward each (the path of
                      many rows: a prompt's prefill, scoring, many clients decoding together); the blocks
                      come from the valid split of the --held_out token shards (common/shards.py: documents
                      that training held out) or from --held_out text files
  kl_from_reference   mean KL(reference || kind) of the next-token distributions at those positions (nats)
  top1_agreement      share of those positions where the kind's most likely token is the reference's
  greedy_prefix       --prompts streams of --new_tokens greedy tokens through the serving Engine, one
                      client at a time, its decode step compiled as on a GPU (one row's 8-bit product in
                      float32, scaled after), each from the first --prompt_tokens of a held-out block:
                      tokens before the first difference from the reference's stream, mean
  greedy_identical    share of those streams equal to the reference's

Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.data import file_texts
from common.errors import UserError, cli_main
from common.serving.engine import Engine
from common.serving.loading import QUANTIZATIONS, context_length, weight_bytes
from common.serving.sampling import SamplingParams
from common.shards import TokenShards, read_index, vocabulary_hash

REPO = Path(__file__).resolve().parents[1]
KINDS = (*QUANTIZATIONS, "float32")


def text_blocks(path: Path, tokenizer, block_size: int) -> list[list[int]]:
    """A text file's documents (txt lines, JSONL `text`, CSV `content`) in the model's tokens, each
    followed by its end-of-text token, back to back, cut into blocks (a short tail is left out)."""
    ids: list[int] = []
    for text in file_texts(path):
        if text.strip():
            ids += tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
            ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [ids[start:start + block_size] for start in range(0, len(ids) - block_size + 1, block_size)]


def held_out_blocks(sources: list[str], tokenizer, block_size: int, count: int) -> list[list[int]]:
    """`count` blocks of `block_size` tokens, spread evenly over `sources`: the valid split of a
    token-shard source (a prepare_data.py output, in the model's vocabulary), or a text file (all of
    it held-out text)."""
    blocks: list[list[int]] = []
    for i, source in enumerate(sources):
        if Path(source).is_file():
            available = text_blocks(Path(source), tokenizer, block_size)
            size, block = len(available), available.__getitem__
        else:
            if read_index(source).get("vocab_sha256") != vocabulary_hash(tokenizer):
                raise UserError(f"{source}: its token ids are not the model's (prepared with another tokenizer: "
                                "model_clm/prepare_data.py --tokenizer MODEL_DIR writes shards in the model's)")
            split = TokenShards(source, "valid", block_size)
            size, block = len(split), lambda b, split=split: split[b]["input_ids"].tolist()
        wanted = count // len(sources) + (i < count % len(sources))
        if wanted > size:
            raise UserError(f"{source}: {size} held-out blocks of {block_size} tokens, {wanted} wanted "
                            "(fewer --blocks, a smaller --block_size, or more held-out text)")
        blocks += [block(int(b)) for b in np.linspace(0, size - 1, wanted).round()]
    return blocks


@torch.inference_mode()
def against_reference(model, reference, blocks: list[list[int]]) -> dict:
    """Perplexity of `model` on the blocks, and how far its next-token distributions are from the reference's."""
    nll = kl = agreeing = positions = 0.0
    for block in blocks:
        ids = torch.tensor([block], device=model.device)
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        ref = logp if reference is model else torch.log_softmax(reference(ids).logits[0, :-1].float(), dim=-1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        agreeing += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
        positions += len(block) - 1
    return {"perplexity": round(math.exp(nll / positions), 3), "kl_from_reference": float(f"{kl / positions:.4g}"),
            "top1_agreement": round(agreeing / positions, 4)}


def greedy_streams(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation through the engine, one request at a time."""
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    streams = []
    for prompt in prompts:
        stream = engine.stream(prompt, greedy)
        for _ in stream:
            pass
        streams.append(stream.token_ids)
    return streams


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tiny_model(work: Path) -> tuple[Path, list[Path]]:
    """model_clm's recipe on its built-in data, shrunk: a 1 x 32 Llama trained for 40 steps (about a minute)."""
    data, out = work / "data", work / "model"
    for command in (["model_clm/prepare_data.py", "--output_dir", data, "--vocab_size", "1000", "--dedup", "true"],
                    ["model_clm/train.py", "model_clm/configs/default.yaml", "--data_dir", data / "news",
                     data / "reviews", "--output_dir", out, "--max_steps", "40", "--eval_steps", "40",
                     "--save_steps", "40", "--block_size", "32", "--hidden_size", "32", "--num_hidden_layers", "1",
                     "--num_attention_heads", "2", "--intermediate_size", "64", "--per_device_train_batch_size",
                     "16", "--max_eval_blocks", "8", "--warmup_steps", "2"]):
        run = subprocess.run([sys.executable, str(REPO / command[0]), *map(str, command[1:])], cwd=REPO,
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"{command[0]} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return out, [data / "news", data / "reviews"]


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/model_clm", help="A trained causal LM (local directory).")
    parser.add_argument("--held_out", default="data/model_clm/news,data/model_clm/reviews",
                        help="Held-out text, comma-separated: token-shard sources (their valid split) or text "
                             "files (.txt: a document per line; .jsonl: `text`; .csv: `content`).")
    parser.add_argument("--quantize", default="none,float32,int8_rowwise,fp8_rowwise",
                        help=f"Kinds, the first the reference: {', '.join(KINDS)}.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=None, help="Default: the model's context, at most 512.")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="Train a tiny model_clm first and measure it briefly.")
    parser.add_argument("--out", default="outputs/benchmarks/quantized_quality.json")
    args = parser.parse_args()
    kinds = args.quantize.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kind(s) {', '.join(unknown)}: choose from {', '.join(KINDS)}")
    work = tempfile.TemporaryDirectory() if args.tiny else None
    if work is not None:
        model_dir, sources = tiny_model(Path(work.name))
        args.blocks, args.prompts, args.prompt_tokens, args.new_tokens = 8, 4, 8, 16
    else:
        model_dir, sources = Path(args.model), args.held_out.split(",")
        if not (model_dir / "config.json").is_file():
            raise UserError(f"no model in {model_dir}: run `make demo-clm` (the default) or give --model")

    def load(kind: str) -> Engine:
        dtype = "float32" if kind == "float32" else args.dtype
        quantize = "none" if kind == "float32" else kind
        return Engine.from_pretrained(model_dir, name=kind, device=args.device, dtype=dtype, quantize=quantize,
                                      max_batch=1, max_cache_len=args.prompt_tokens + args.new_tokens, compile=True)

    start = time.perf_counter()
    reference = load(kinds[0])
    context = context_length(reference.model) or 512
    block_size = args.block_size or min(context, 512)
    if block_size > context or args.prompt_tokens + args.new_tokens > context:
        parser.error(f"the model's context is {context} tokens: --block_size and --prompt_tokens + --new_tokens "
                     "must fit in it")
    blocks = held_out_blocks(sources, reference.tokenizer, block_size, max(args.blocks, args.prompts))
    prompts = [block[:args.prompt_tokens] for block in blocks[:args.prompts]]
    blocks = blocks[:args.blocks]
    reference_streams = greedy_streams(reference, prompts, args.new_tokens)
    reference.close()
    reference_bytes = weight_bytes(reference.model)
    rows = []
    for kind in kinds:  # (the reference's time: its loading and streams above, and its pass over the blocks)
        start = start if kind == kinds[0] else time.perf_counter()
        engine = reference if kind == kinds[0] else load(kind)
        streams = reference_streams if engine is reference else greedy_streams(engine, prompts, args.new_tokens)
        engine.close()
        prefixes = [common_prefix(a, b) for a, b in zip(streams, reference_streams)]
        rows.append({"kind": kind, "weight_MB": round(weight_bytes(engine.model) / 1e6, 3),
                     "weight_share": round(weight_bytes(engine.model) / reference_bytes, 3),
                     **against_reference(engine.model, reference.model, blocks),
                     "greedy_prefix": round(sum(prefixes) / len(prefixes), 2),
                     "greedy_identical": round(sum(p == args.new_tokens for p in prefixes) / len(prefixes), 3),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
        del engine

    setup = {"model": str(model_dir) if not args.tiny else "tiny model_clm (1 x 32, 40 steps)",
             "held_out": [str(s) for s in sources] if not args.tiny else "its data's valid split",
             "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
             "dtype": args.dtype, "torch": torch.__version__, "blocks": len(blocks), "block_size": block_size,
             "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
             "date": time.strftime("%Y-%m-%d")}
    print(f"\n{setup['model']}, {setup['device']}, {args.dtype}; {len(blocks)} held-out blocks of {block_size} tokens, "
          f"{len(prompts)} greedy streams of {args.new_tokens} tokens after {args.prompt_tokens}\n")
    print(f"| kind | weights (share) | perplexity | KL from {kinds[0]} (nats) | top-1 agreement "
          f"| greedy prefix (of {args.new_tokens}) | streams identical |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['kind']} | {r['weight_MB']:.2f} MB ({r['weight_share']:.2f}) | {r['perplexity']:.2f} "
              f"| {r['kl_from_reference']:.3g} | {r['top1_agreement']:.2%} | {r['greedy_prefix']:.1f} "
              f"| {r['greedy_identical']:.0%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    if work is not None:
        work.cleanup()


if __name__ == "__main__":
    main()
