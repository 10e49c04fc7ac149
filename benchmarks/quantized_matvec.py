"""Which weight quantisation makes decoding faster: the linear layers of a 7B Llama's decoder
layers (q, k, v, o, gate, up, down: 4096 / 11008 wide), at batch 1 and 64, bf16 against
torchao's configs, each compiled as the server compiles its decode step (CUDA graphs +
coordinate-descent tuning), in one run. Decoding one token reads every weight once, so at
batch 1 time follows the bytes read: the question is which library path turns fewer bytes
into less time.

    python benchmarks/quantized_matvec.py              # one GPU
    python benchmarks/quantized_matvec.py --tiny       # CPU smoke test (2 small layers)

Each row: milliseconds per pass over `--layers` layers (median of 5 x 20 CUDA-graph replays),
weight bytes, the bandwidth that implies, the speed-up over bf16 and the output's relative
error against bf16. A config that fails (a kernel this GPU or wheel lacks) is reported as
such. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.serving.fusing import concat_linears  # noqa: E402
from common.serving.loading import QUANTIZATIONS, RowScaledLinear, prepare_weights, weight_bytes  # noqa: E402

# Inductor settings a row can add to its quantisation's name, one or several ("none+freezing+cd-all"):
# "+autotune" autotunes inductor's Triton matmul templates (max_autotune_gemm), which can fuse the
# int8 / fp8 -> bf16 conversion into the product's loads (prologue fusion) instead of writing a bf16
# copy of the weight first; "+max-autotune" (max_autotune) also tries more launch configurations for
# the generated reductions, which is what a product with one row becomes under coordinate-descent
# tuning (inductor's mm decomposition); "+cd-all": coordinate-descent tuning of the generated kernels
# tries every direction (torchao's recommended setting); "+autotune-cd" also turns coordinate-descent
# tuning off, so products with one row stay products for the templates / cuBLAS. (inductor's
# decompose_mem_bound_mm does not apply: on CUDA it only rewrites products whose first dimension
# is at least 10,240.) "+freezing": the weights become constants of the compiled graph, and
# inductor's freezing patterns merge products that share their input (q / k / v, gate / up) into one
# product over the concatenated weights: fewer, larger matrix-vector products (the concatenated
# copies are extra memory: 9 GB for a 7B shape's q, k, v, gate and up). "+fused" is not an inductor
# setting: q / k / v and gate / up merged in the module before quantising, as serve.py
# --fuse_projections does (common/serving/fusing.py; no extra memory).
SETTINGS = {"cd-all": {"coordinate_descent_check_all_directions": True},
            "autotune": {"max_autotune_gemm": True},
            "max-autotune": {"max_autotune": True},
            "autotune-cd": {"max_autotune_gemm": True, "coordinate_descent_tuning": False},
            "freezing": {"freezing": True}}
# `int8_pack`: PyTorch's own int8 weight-only product (aten._weight_int8pack_mm: bf16 activations,
# int8 weights with a scale per output row), which inductor also substitutes for torchao's int8
# weight-only form.
KINDS = (*QUANTIZATIONS, "int8_pack")


def parse_variant(name: str) -> tuple[str, dict, bool, bool]:
    """"int8_rowwise+fused+cd-all" -> ("int8_rowwise", inductor settings, fused, triton); ValueError when
    unknown. "+triton": one row's products through common/serving/matvec.py's kernel (serve.py --matvec)."""
    kind, *suffixes = name.split("+")
    fused, triton = "fused" in suffixes, "triton" in suffixes
    suffixes = [s for s in suffixes if s not in ("fused", "triton")]
    if kind not in KINDS or any(s not in SETTINGS for s in suffixes) or (triton and kind == "int8_pack"):
        raise ValueError(name)
    settings: dict = {}
    for suffix in suffixes:
        settings |= SETTINGS[suffix]
    return kind, settings, fused, triton


DEFAULT = ("none", "none+autotune", "none+autotune-cd", "int8", "int8_pack", "fp8", "fp8_dynamic", "int4",
           "int8_rowwise+autotune", "int8_rowwise+autotune-cd", "fp8_rowwise+autotune-cd", "none+fused",
           "none+fused+triton", "fp8_rowwise+fused+triton", "bf16_gemlite", "int8_gemlite", "fp8_gemlite",
           "int4_gemlite")


class DecoderLinears(nn.Module):
    """The seven linear layers of each decoder layer, chained as attention and the MLP use them
    (no attention itself: only the matrix products whose weights dominate a decode step)."""

    def __init__(self, layers: int, hidden: int, intermediate: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({
            "q": nn.Linear(hidden, hidden, bias=False), "k": nn.Linear(hidden, hidden, bias=False),
            "v": nn.Linear(hidden, hidden, bias=False), "o": nn.Linear(hidden, hidden, bias=False),
            "gate": nn.Linear(hidden, intermediate, bias=False), "up": nn.Linear(hidden, intermediate, bias=False),
            "down": nn.Linear(intermediate, hidden, bias=False)}) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            q, k, v = layer["qkv"](x).chunk(3, dim=-1) if "qkv" in layer else (layer["q"](x), layer["k"](x), layer["v"](x))
            x = layer["o"](q + k + v)
            gate, up = layer["gate_up"](x).chunk(2, dim=-1) if "gate_up" in layer else (layer["gate"](x), layer["up"](x))
            x = x + layer["down"](torch.nn.functional.silu(gate) * up)
        return x

    def fuse(self) -> None:
        """q / k / v and gate / up merged into one product each (fusing.concat_linears)."""
        for layer in self.layers:
            layer["qkv"] = concat_linears([layer.pop("q"), layer.pop("k"), layer.pop("v")])
            layer["gate_up"] = concat_linears([layer.pop("gate"), layer.pop("up")])


class Int8PackLinear(nn.Module):
    """A linear layer through aten._weight_int8pack_mm, its weight rounded to int8 per output row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = nn.Parameter(torch.round(weight.float() / scale[:, None]).to(torch.int8), requires_grad=False)
        self.scale = nn.Parameter(scale.to(weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def int8_pack(model: DecoderLinears) -> None:
    for layer in model.layers:
        for name, linear in list(layer.items()):
            layer[name] = Int8PackLinear(linear)


def time_pass(fn, x: torch.Tensor, device: torch.device) -> float:
    """Median seconds of one call, over 5 rounds of 20."""
    for _ in range(3):
        fn(x)
    rounds = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / 20)
    return statistics.median(rounds)


# --sweep_matvec: the shapes of a 7B Llama's merged products (and its output head), [out, in]
MERGED_SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
                 "head": (32000, 4096)}


def graph_seconds(calls: list, replays: int = 20) -> float:
    """Median seconds per call of `calls` (closures) captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / replays / len(calls))
    return statistics.median(times)


def sweep_matvec(out: Path) -> None:
    """matvec.py's kernel over launch parameters for each merged shape, bf16 and fp8 weights with a
    scale per row, against inductor's one-row product (max-autotune, coordinate descent, as the
    engine compiles it), each product reading a different copy of its weight in turn (600 MB of
    copies: L2 holds none of them, as in a decode step); then the 32 layers' products in one
    CUDA graph, the kernel with the parameters `launch_parameters` picks, against inductor's."""
    import torch.nn.functional as F

    from benchmarks.decode_throughput import copy_bandwidth
    from common.serving.matvec import launch, launch_parameters

    device = torch.device("cuda")
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "copy_GB_per_s": round(copy_bandwidth(device) / 1e9)}
    print(f"copy bandwidth {result['copy_GB_per_s']} GB/s", flush=True)
    xs = {k: torch.randn(k, device=device, dtype=torch.bfloat16) for k in (4096, 11008)}

    def weights(shape, kind, copies):
        """`copies` random (weight, scale per row or None) pairs: bf16, or fp8 as fp8_rowwise stores them."""
        made = []
        for _ in range(copies):
            linear = nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=torch.bfloat16)
            if kind == "bf16":
                made.append((linear.weight.detach(), None))
            else:
                scaled = RowScaledLinear(linear, torch.float8_e4m3fn)
                made.append((scaled.weight.detach(), scaled.scale.detach().view(-1)))
        return made

    def inductor(kind):
        if kind == "bf16":
            return torch.compile(lambda x, w, s: F.linear(x, w), mode="max-autotune-no-cudagraphs", dynamic=False)
        return torch.compile(lambda x, w, s: (F.linear(x.float(), w.float()) * s.float()).to(x.dtype),
                             mode="max-autotune-no-cudagraphs", dynamic=False)

    for kind in ("bf16", "fp8"):
        compiled = inductor(kind)
        for name, (n, k) in MERGED_SHAPES.items():
            size = n * k * (2 if kind == "bf16" else 1)
            made = weights((n, k), kind, max(2, -(-600_000_000 // size)))
            outs = [torch.empty(n, device=device, dtype=torch.bfloat16) for _ in made]
            x = xs[k]
            rows = []
            for block_n, block_k, warps, stages in itertools.product((2, 4, 8, 16), (512, 1024, 2048, 4096),
                                                                       (4, 8), (1, 3)):
                if block_n * block_k > 32768:
                    continue
                seconds = graph_seconds([partial(launch, x, w, o, s, None, block_n, block_k, warps, stages)
                                         for (w, s), o in zip(made, outs)])
                rows.append([round(seconds * 1e6, 2), block_n, block_k, warps, stages])
            rows.sort()
            chosen = list(launch_parameters(n, k, made[0][0].element_size()))
            chosen_us = next(row[0] for row in rows if row[1:] == chosen)
            inductor_us = graph_seconds([partial(compiled, x[None], w, s) for w, s in made]) * 1e6
            result[f"{kind} {name}"] = {
                "shape": [n, k], "MB": round(size / 1e6, 1), "inductor_us": round(inductor_us, 2),
                "chosen": chosen, "chosen_us": chosen_us, "best": rows[0][1:], "best_us": rows[0][0],
                "chosen_GB_per_s": round(size / chosen_us / 1e3), "inductor_GB_per_s": round(size / inductor_us / 1e3),
                "all_us": rows}
            print(f"{kind} {name} {n} x {k}: inductor {inductor_us:.1f} us, kernel {chosen_us:.1f} us with {chosen} "
                  f"(best {rows[0][0]:.1f} us with {rows[0][1:]})", flush=True)
            del made, outs
        layers = [{name: weights(MERGED_SHAPES[name], kind, 1)[0] for name in ("qkv", "o", "gate_up", "down")}
                  for _ in range(32)]
        size = sum(w.numel() * w.element_size() for layer in layers for w, _ in layer.values())
        outs = {name: torch.empty(MERGED_SHAPES[name][0], device=device, dtype=torch.bfloat16) for name in layers[0]}
        kernel = [partial(launch, xs[w.shape[1]], w, outs[name], s, None, *launch_parameters(*w.shape, w.element_size()))
                  for layer in layers for name, (w, s) in layer.items()]
        generated = [partial(compiled, xs[w.shape[1]][None], w, s) for layer in layers for w, s in layer.values()]
        for label, calls in (("kernel", kernel), ("inductor", generated)):
            ms = graph_seconds(calls, replays=10) * len(calls) * 1e3
            result[f"{kind} 32 layers, {label}"] = {"ms": round(ms, 3), "GB_per_s": round(size / ms / 1e6),
                                                    "share_of_copy": round(size / ms / 1e6 / result["copy_GB_per_s"], 3)}
            print(f"{kind}: 32 layers' products, {label}: {ms:.3f} ms "
                  f"({result[f'{kind} 32 layers, {label}']['share_of_copy']:.1%} of the copy bandwidth)", flush=True)
        del layers
        torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--variants", default=",".join(DEFAULT),
                        help="Rows to run, comma-separated: a quantisation (" + ", ".join(KINDS)
                        + "), optionally followed by settings, each after a '+': fused, triton, " + ", ".join(SETTINGS)
                        + f". Default: {','.join(DEFAULT)}.")
    parser.add_argument("--tiny", action="store_true", help="2 layers 64 / 128 wide on the CPU, no compile.")
    parser.add_argument("--sweep_matvec", action="store_true",
                        help="Instead: common/serving/matvec.py's Triton kernel over its launch parameters for each "
                             "merged product of a 7B shape (bf16 and fp8 weights), against inductor's, then 32 layers' "
                             "products in one CUDA graph (one GPU; a few minutes).")
    parser.add_argument("--out", default="outputs/benchmarks/quantized_matvec.json")
    args = parser.parse_args()
    if args.sweep_matvec:
        if not torch.cuda.is_available():
            parser.error("--sweep_matvec needs a CUDA GPU")
        sweep_matvec(Path(args.out))
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    layers, hidden, intermediate = (2, 64, 128) if args.tiny else (args.layers, 4096, 11008)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        from torch._inductor import config as inductor_config

        inductor_config.coordinate_descent_tuning = True  # as the server's decode step
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    reference = DecoderLinears(layers, hidden, intermediate).to(device, dtype).eval()
    inputs = {b: torch.randn(b, hidden, device=device, dtype=dtype) * 0.05 for b in batches}
    rows = []
    chosen = args.variants.split(",")
    variants = {}
    for name in chosen:
        try:
            variants[name] = parse_variant(name)
        except ValueError:
            parser.error(f"unknown variant {name!r}")
    for name, (kind, inductor_settings, fused, triton) in variants.items():
        model = DecoderLinears(layers, hidden, intermediate).to(device, dtype).eval()
        model.load_state_dict(reference.state_dict())
        if fused:
            model.fuse()
        row = {"quantize": name}
        with torch._inductor.config.patch(**inductor_settings):
            try:
                if kind == "int8_pack":
                    int8_pack(model)
                else:
                    prepare_weights(model, kind, "off", "triton" if triton else "inductor")  # (merged above: model.fuse)
                row["weight_GB"] = round(weight_bytes(model) / 1e9, 3)
                with torch.inference_mode():
                    for batch, x in inputs.items():
                        start = time.perf_counter()
                        fn = torch.compile(model, mode="reduce-overhead") if device.type == "cuda" else model
                        out = fn(x).clone()
                        row[f"compile_s_b{batch}"] = round(time.perf_counter() - start, 1)
                        seconds = time_pass(fn, x, device)
                        expected = reference(x)
                        row[f"ms_b{batch}"] = round(seconds * 1e3, 3)
                        row[f"GB_per_s_b{batch}"] = round(weight_bytes(model) / seconds / 1e9)
                        row[f"rel_error_b{batch}"] = round(((out.float() - expected.float()).norm()
                                                            / expected.float().norm()).item(), 4)
            except Exception as err:  # a config whose kernels this GPU / wheel lacks: reported, not fatal
                row["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        torch._dynamo.reset()
    base = rows[0]
    for row in rows:
        for batch in batches:
            if f"ms_b{batch}" in row and f"ms_b{batch}" in base:
                # three significant digits: a row 300x slower than bf16 (torchao's fp8 on a CPU) is not 0.0
                row[f"speedup_b{batch}"] = float(f"{base[f'ms_b{batch}'] / row[f'ms_b{batch}']:.3g}")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    import torchao

    header = (f"{device_name}, torch {torch.__version__}, torchao {torchao.__version__}, {layers} decoder layers' "
              f"linears ({hidden} / {intermediate}), {dtype}, "
              f"{'compiled reduce-overhead' if device.type == 'cuda' else 'eager'}")
    print("\n" + header)
    print(f"{'quantize':34s} {'GB':>6s}" + "".join(f" {'ms b' + str(b):>9s} {'x bf16':>7s} {'GB/s':>6s}"
                                                  for b in batches) + "  rel.err")
    for row in rows:
        if "error" in row:
            print(f"{row['quantize']:34s} failed: {row['error']}")
            continue
        print(f"{row['quantize']:34s} {row['weight_GB']:6.2f}" + "".join(
            f" {row[f'ms_b{b}']:9.3f} {row[f'speedup_b{b}']:7.3g} {row[f'GB_per_s_b{b}']:6d}" for b in batches)
            + f"  {row[f'rel_error_b{batches[0]}']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
