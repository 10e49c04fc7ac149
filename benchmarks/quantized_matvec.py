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
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.serving.fusing import concat_linears  # noqa: E402
from common.serving.loading import QUANTIZATIONS, quantize_weights, weight_bytes  # noqa: E402

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


def parse_variant(name: str) -> tuple[str, dict, bool]:
    """"int8_rowwise+fused+cd-all" -> ("int8_rowwise", inductor settings, fused); ValueError when unknown."""
    kind, *suffixes = name.split("+")
    fused = "fused" in suffixes
    suffixes = [s for s in suffixes if s != "fused"]
    if kind not in KINDS or any(s not in SETTINGS for s in suffixes):
        raise ValueError(name)
    settings: dict = {}
    for suffix in suffixes:
        settings |= SETTINGS[suffix]
    return kind, settings, fused


DEFAULT = ("none", "none+autotune", "none+autotune-cd", "int8", "int8_pack", "fp8", "fp8_dynamic", "int4",
           "int8_rowwise+autotune", "int8_rowwise+autotune-cd", "fp8_rowwise+autotune-cd", "none+fused",
           "bf16_gemlite", "int8_gemlite", "fp8_gemlite", "int4_gemlite")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--variants", default=",".join(DEFAULT),
                        help="Rows to run, comma-separated: a quantisation (" + ", ".join(KINDS)
                        + "), optionally followed by settings, each after a '+': fused, " + ", ".join(SETTINGS)
                        + f". Default: {','.join(DEFAULT)}.")
    parser.add_argument("--tiny", action="store_true", help="2 layers 64 / 128 wide on the CPU, no compile.")
    parser.add_argument("--out", default="outputs/benchmarks/quantized_matvec.json")
    args = parser.parse_args()
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
    for name, (kind, inductor_settings, fused) in variants.items():
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
                    quantize_weights(model, kind)
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
                row[f"speedup_b{batch}"] = round(base[f"ms_b{batch}"] / row[f"ms_b{batch}"], 2)
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
            f" {row[f'ms_b{b}']:9.3f} {row[f'speedup_b{b}']:7.2f} {row[f'GB_per_s_b{b}']:6d}" for b in batches)
            + f"  {row[f'rel_error_b{batches[0]}']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
