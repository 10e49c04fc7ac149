"""Loading a local causal LM (or a LoRA adapter over its base) for serving: never downloads."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import UserError
from common.serving.fusing import fuse_projections, fusion_refusal, llama_family_attention

logger = logging.getLogger(__name__)


def adapter_base(adapter_dir: str | Path, base_model: str | Path | None = None) -> Path | None:
    """The base model of a LoRA adapter directory (`base_model`, else the one the adapter
    names); None when `adapter_dir` holds no adapter."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        return None
    recorded = json.loads(config.read_text()).get("base_model_name_or_path")
    if base_model is None and not recorded:
        raise UserError(f"{adapter_dir} is a LoRA adapter that names no base model: give it with --base_model")
    base = Path(base_model or recorded)
    if not (base / "config.json").is_file():
        raise UserError(f"{adapter_dir} is a LoRA adapter of {base}, which is not a local model: "
                        "give its base with --base_model")
    return base


def adapter_finetuning_type(adapter_dir: str | Path) -> str | None:
    """finetuning_type (lora / qlora) of the run that wrote an adapter: its metrics.json, or that
    of the run a checkpoint-N folder belongs to; None when unknown."""
    for folder in (Path(adapter_dir), Path(adapter_dir).parent):
        if (folder / "metrics.json").is_file():
            return json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("finetuning_type")
    return None


def load_adapter(adapter_dir: str | Path, base: Path, tokenizer, dtype: torch.dtype, **load_kwargs):
    """A PeftModel: `base` (embeddings grown to the tokenizer when training added markers)
    with the adapter of `adapter_dir` over it, unmerged. `load_kwargs` go to the base's
    from_pretrained (merge.py: the NF4 quantisation a QLoRA adapter was trained over)."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=False, **load_kwargs)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter_dir)


def load_causal_lm(model_dir: str | Path, device: str | None = None, dtype: str = "auto",
                   base_model: str | Path | None = None):
    """A local causal LM and its tokenizer, in eval mode on `device` (default: cuda if
    present). dtype "auto" is bfloat16 on a GPU that supports it, float32 elsewhere.

    A LoRA adapter directory (adapter_config.json) is loaded over its base model (the one
    recorded in the adapter, or `base_model`) and merged into it: generation then costs
    what the base model's does."""
    model_dir = Path(model_dir)
    base = adapter_base(model_dir, base_model)
    if base is None and not (model_dir / "config.json").is_file():
        raise UserError(f"no model in {model_dir} (no config.json): train one first or give --model")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if base is not None:
        if adapter_finetuning_type(model_dir) == "qlora":
            logger.warning("%s is a QLoRA adapter, served here over the unquantised base (not the NF4 weights it "
                           "was trained over): merge it first (chatglm_lora/merge.py) to serve the trained model",
                           model_dir)
        model = load_adapter(model_dir, base, tokenizer, getattr(torch, dtype)).merge_and_unload()
        logger.info("loaded the adapter %s over %s and merged it", model_dir, base)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), trust_remote_code=False)
    model.config.use_cache = True  # a checkpoint saved by training may carry use_cache=False
    return model.to(device).eval(), tokenizer


def context_length(model) -> int | None:
    """Positions the model was built for; None when its config names none (ALiBi models such as
    BLOOM have no position table: the server's --max_cache_len then bounds a request)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# torchao weight-only / dynamic configs by name, 8-bit weights with a scale per output row
# that the compiled step turns back to bf16 inside the product ("_rowwise", RowScaledLinear), and
# gemlite's weight-only layers (Triton kernels with a matrix-vector product for one row; CUDA only):
# its 8-bit ones, 4-bit in groups of INT4_GROUP, and the model's own 16-bit weights through its
# kernels (not a quantisation). benchmarks/quantized_matvec.py measures them.
TORCHAO_QUANTIZATIONS = ("int8", "fp8", "fp8_dynamic", "int4")
ROWWISE = {"int8_rowwise": torch.int8, "fp8_rowwise": torch.float8_e4m3fn}
GEMLITE = ("bf16_gemlite", "int8_gemlite", "fp8_gemlite", "int4_gemlite")
INT4_GROUP = 64
QUANTIZATIONS = ("none", *TORCHAO_QUANTIZATIONS, *ROWWISE, *GEMLITE)


def row_scales(rows: torch.Tensor, largest: float) -> torch.Tensor:
    """[m, 1]: each row's scale that maps its largest magnitude to `largest` (the 8-bit format's)."""
    return rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / largest


def one_row_compiled(x: torch.Tensor) -> bool:
    """Whether `x` is one row of activations inside a compiled step (one client's decode step)."""
    return x.shape[:-1].numel() == 1 and torch.compiler.is_compiling()


class RowScaledLinear(torch.nn.Module):
    """A linear layer whose weight is kept in 8 bits (int8 or fp8 e4m3) with one scale per output
    row. For one row of activations (one client's decode step) under torch.compile, the product is one
    kernel that reads the 8-bit weight, converts each element once to float32 and scales the
    product's output (int8 1.24x, fp8 1.34x bf16's products on an H200; converting the weight to
    bf16 and scaling it first, 1.21x for int8, costs more conversions per byte read). Many rows go to
    the 8-bit tensor cores where they can (`tensor_core_products`): each row of activations is rounded
    to the weight's format with a scale of its own, the product reads the 8-bit weight itself, and
    both scales are applied to the sums (fp8: `torch._scaled_mm`, one H100, 7B shape, 64 rows: 7.85
    against bf16's 9.03 ms per step, benchmarks/RESULTS.md; int8: `torch._int_mm`, int32 sums, not
    yet measured on a GPU). Rounding the activations moves a trained model's predictions further: on
    two small models trained here, KL from bf16 about 1.6x that of the int8 weights alone and 2x that
    of the fp8 ones (benchmarks/RESULTS.md, quantized_quality.py). Otherwise (older GPUs, sizes the
    tensor cores do not take) the weight is turned back to the activations' dtype and scaled for
    cuBLAS, which writes a bf16 copy first (0.49x on an H200). (Scaling the output of a bf16
    product, torchao's int8 weight-only form `(x @ w.to(bf16)) * scale`, is rewritten by inductor
    into aten._weight_int8pack_mm, whose CUDA kernel took 58 ms for what bf16 does in 0.3 at 64
    rows: benchmarks/RESULTS.md.)"""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        largest = 127.0 if dtype == torch.int8 else torch.finfo(dtype).max
        scale = row_scales(weight, largest)
        stored = (weight / scale).round() if dtype == torch.int8 else weight / scale
        self.weight = torch.nn.Parameter(stored.to(dtype), requires_grad=False)
        self.scale = torch.nn.Parameter(scale.to(linear.weight.dtype), requires_grad=False)
        self.bias = linear.bias
        # decided on the device it is built on (the engine quantises a model where it runs)
        self.tensor_core_products = _tensor_core_products(self.weight, linear.weight.dtype)
        self.triton_matvec = False  # one row through matvec.py's kernel (prepare_weights' matvec="triton")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() == 1 and self.triton_matvec:
            return torch.ops.serving.matvec(x, self.weight, self.scale.view(-1), self.bias)
        if one_row_compiled(x):  # (eager, it would copy the weight in float32)
            out = torch.nn.functional.linear(x.float(), self.weight.float()) * self.scale.float().view(-1)
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        if self.tensor_core_products and x.dtype == self.scale.dtype:
            rows = x.reshape(-1, x.shape[-1]).float()
            times = _int8_rows_times if self.weight.dtype == torch.int8 else _fp8_rows_times
            out = times(rows, self.weight, self.scale.float().view(1, -1), x.dtype)
            out = out.reshape(*x.shape[:-1], out.shape[-1])
            return out if self.bias is None else out + self.bias
        return torch.nn.functional.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)


class MatvecLinear(torch.nn.Module):
    """A 16-bit linear layer (the same weight and bias) whose product with one row of activations
    is matvec.py's Triton kernel inside a compiled (CUDA-graphed) step; more rows, and eager calls
    (whose launch from Python costs more than cuBLAS's), go to cuBLAS as before."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_row_compiled(x):
            return torch.ops.serving.matvec(x, self.weight, None, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


class GluMatvecMLP(torch.nn.Module):
    """A merged SwiGLU MLP (transformers' Phi3MLP, as fusing.py makes it: gate and up one
    product) whose call for one row inside a compiled step is one kernel for gate/up that also
    takes SiLU(gate) x up from its float32 sums (matvec.py's `glu`: no kernel of its own for that),
    then down; anything else computes what Phi3MLP does."""

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.activation_fn = mlp.gate_up_proj, mlp.down_proj, mlp.activation_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if one_row_compiled(x):
            scale = getattr(gate_up, "scale", None)
            return self.down_proj(torch.ops.serving.matvec(x, gate_up.weight, None if scale is None else scale.view(-1),
                                                           gate_up.bias, True))
        gate, up = gate_up(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


def _tensor_core_products(weight: torch.Tensor, activations: torch.dtype) -> bool:
    """Whether this 8-bit weight's products with many rows can run on the 8-bit tensor cores where it
    is: an fp8 e4m3 one through torch._scaled_mm on the CPU and on CUDA GPUs of compute capability
    9.0 (Hopper) and later for bf16 activations, both sizes multiples of 16; an int8 one through
    torch._int_mm on the CPU and on CUDA GPUs of compute capability 8.0 and later, both sizes
    multiples of 8."""
    multiple = {torch.float8_e4m3fn: 16, torch.int8: 8}.get(weight.dtype)
    if multiple is None or weight.shape[0] % multiple or weight.shape[1] % multiple:
        return False
    if weight.device.type == "cpu":
        return True
    if weight.device.type != "cuda":
        return False
    if weight.dtype == torch.int8:
        return torch.cuda.get_device_capability(weight.device) >= (8, 0)
    return activations == torch.bfloat16 and torch.cuda.get_device_capability(weight.device) >= (9, 0)


def _fp8_rows_times(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows [m, K] (float32) times an e4m3 weight [N, K] with `scale` [1, N] per output row, in `dtype`,
    on the FP8 tensor cores: each row of activations rounded to e4m3 with a scale of its own."""
    row_scale = row_scales(rows, torch.finfo(torch.float8_e4m3fn).max)
    return torch._scaled_mm((rows / row_scale).to(torch.float8_e4m3fn), weight.t(), scale_a=row_scale, scale_b=scale,
                            out_dtype=dtype)


INT_MM_MIN_ROWS = 17  # cuBLAS's int8 product (torch._int_mm on CUDA) takes more than 16 rows


def _int8_rows_times(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same for an int8 weight on the int8 tensor cores (int32 sums): each row of activations
    rounded to int8 with a scale of its own. Fewer than INT_MM_MIN_ROWS rows are padded with zero
    rows (on every device, so that the CPU runs what a GPU runs)."""
    row_scale = row_scales(rows, 127)
    quantised = (rows / row_scale).round().to(torch.int8)  # |x| / row_scale <= 127
    count = quantised.shape[0]
    if count < INT_MM_MIN_ROWS:
        quantised = torch.nn.functional.pad(quantised, (0, 0, 0, INT_MM_MIN_ROWS - count))
    sums = torch._int_mm(quantised, weight.t())[:count]
    return (sums.float() * row_scale * scale).to(dtype)


def replace_linears(model, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> None:
    """Every nn.Linear of `model` (the output head included) replaced by `make(linear)`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, make(child))


def int4_groups(weight: torch.Tensor, group_size: int = INT4_GROUP):
    """Round-to-nearest asymmetric 4-bit quantisation of a [rows, columns] weight in groups of
    `group_size` columns: weight ~ (W_q - zeros) * scales, W_q in 0..15 (uint8, one per byte: gemlite
    packs them), scales and zeros [rows, columns / group_size] in the weight's dtype. Each group's
    16 levels span its minimum to its maximum, stretched to include 0 (so a zero point lies in
    0..15, which bf16 holds to 1/16, and a constant group is kept exactly)."""
    rows, columns = weight.shape
    if columns % group_size:
        raise UserError(f"4-bit groups of {group_size}: a layer's {columns} inputs are not a multiple of it")
    groups = weight.detach().float().reshape(rows, columns // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True).clamp(max=0), groups.amax(dim=-1, keepdim=True).clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-8)
    zeros = -low / scales
    w_q = (groups / scales + zeros).round().clamp(0, 15).to(torch.uint8).reshape(rows, columns)
    return w_q, scales.reshape(rows, -1).to(weight.dtype), zeros.reshape(rows, -1).to(weight.dtype)


def gemlite_quantize(model, kind: str) -> None:
    """Every nn.Linear of `model` (the output head included) replaced by gemlite's weight-only
    layer: "int8_gemlite" / "fp8_gemlite" 8-bit weights with a scale per output row (its A16W8
    processors), "int4_gemlite" 4-bit groups (`int4_groups`, loaded through its A16W4_HQQ_INT
    processor), "bf16_gemlite" the 16-bit weights as they are; activations in the model's dtype.
    gemlite picks its kernel by the number of rows (a split-K matrix-vector product for one or
    two) and autotunes each shape at its first call, which the engine's warm-up makes."""
    weight = next(model.parameters())
    if weight.device.type != "cuda":
        raise UserError(f"--quantize {kind} needs a CUDA GPU: gemlite's kernels are Triton's")
    try:
        from gemlite import DType, GemLiteLinearTriton, helper
    except ImportError:
        raise UserError(f"--quantize {kind} needs gemlite: pip install gemlite") from None
    device, dtype = weight.device, weight.dtype
    if kind in ("int8_gemlite", "fp8_gemlite"):
        processor = (helper.A16W8_INT8 if kind == "int8_gemlite" else helper.A16W8_FP8)(device=device, dtype=dtype)
        replace_linears(model, processor.from_linear)
    elif kind == "int4_gemlite":
        processor = helper.A16W4_HQQ_INT(device=device, dtype=dtype)
        replace_linears(model, lambda linear: processor.from_weights(*int4_groups(linear.weight), bias=linear.bias))
    else:  # bf16_gemlite: the weights as they are, no scales
        if dtype not in (torch.bfloat16, torch.float16):
            raise UserError(f"--quantize {kind} needs bf16 or fp16 weights, not {dtype}")
        sixteen = DType.BF16 if dtype == torch.bfloat16 else DType.FP16

        def sixteen_bit(linear: torch.nn.Linear) -> torch.nn.Module:
            layer = GemLiteLinearTriton(16, group_size=linear.in_features, in_features=linear.in_features,
                                        out_features=linear.out_features, input_dtype=sixteen, output_dtype=sixteen)
            layer.pack(linear.weight.detach(), None, None, bias=linear.bias)
            return layer

        replace_linears(model, sixteen_bit)


def quantize_weights(model, kind: str):
    """The model's linear layers' weights quantised in place with torchao (a LoRA adapter is
    merged before this, so an adapter's model is quantised as a whole): "int8" weight-only
    (per-channel scales), "fp8" weight-only (e4m3), "fp8_dynamic" (fp8 weights and per-row
    fp8 activations on FP8 tensor cores, H100 / H200), "int4" weight-only (groups of 128).
    The embedding stays as it is."""
    if kind == "none":
        return model
    if kind not in QUANTIZATIONS:
        raise UserError(f"unknown quantisation {kind!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if kind in ROWWISE:
        replace_linears(model, lambda linear: RowScaledLinear(linear, ROWWISE[kind]))
        return model
    if kind in GEMLITE:
        gemlite_quantize(model, kind)
        return model
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int4WeightOnlyConfig,
            Int8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError:
        raise UserError("quantised serving needs torchao: pip install torchao") from None
    # set_inductor_config=False: torchao would otherwise change inductor's process-wide settings
    # behind our back (coordinate descent in every direction among them: with it, the 7B's warm-up
    # compile with fp8 weights had not finished after 7 minutes on an H200, against 5.2 minutes
    # for bf16); serving's own settings are in runtime.py
    own = {"set_inductor_config": False}
    config = {"int8": lambda: Int8WeightOnlyConfig(**own), "fp8": lambda: Float8WeightOnlyConfig(**own),
              "fp8_dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **own),
              # the tinygemm layout: its kernel ships with torch itself (the default layout needs mslk)
              "int4": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                                   **own)}[kind]()
    quantize_(model, config)
    return model


MATVEC = ("auto", "inductor", "triton")
ATTENTION = ("auto", "sdpa", "triton")


def triton_refusal(model) -> str | None:
    """Why our Triton kernels (matvec.py, decode_attention.py) cannot run where this model is;
    None when they can."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return "it needs a CUDA GPU (its kernel is Triton's)"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):  # bf16 (tuned on Hopper)
        return f"it needs a GPU of compute capability (8, 0) or later, not {capability}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "it needs triton (installed with torch's CUDA builds)"
    return None


def triton_matvec_refusal(model, quantize: str) -> str | None:
    """Why matvec.py's kernel cannot multiply this model's one-row products; None when it can."""
    weight = next(model.parameters())
    refusal = triton_refusal(model)
    if refusal:
        return refusal
    if quantize == "none" and weight.dtype not in (torch.bfloat16, torch.float16):
        return f"it multiplies bf16 / fp16 weights, not {weight.dtype}"
    if quantize not in ("none", *ROWWISE):
        return f"it serves bf16 / fp16 weights or int8_rowwise / fp8_rowwise, not --quantize {quantize}"
    if quantize == "fp8_rowwise" and torch.cuda.get_device_capability(weight.device) < (8, 9):
        return "its fp8 conversions need a GPU of compute capability (8, 9) or later"
    return None


def attention_wanted(model, attention: str) -> bool:
    """Whether `prepare_weights` gives the decode step decode_attention.py's kernel: "sdpa" /
    "triton" as said (triton refused with the reason where it cannot run); "auto" on CUDA for
    Llama, Mistral and Qwen2 (the families fusing.py merges, asked before merging): on an H100,
    7B bf16, same run, 16 / 32 / 64 clients were served 1.04x / 1.12x / 1.07x faster than with
    SDPA, one client 0.99x (benchmarks/RESULTS.md, 2026-12-06). Other families keep SDPA unless
    told (not measured)."""
    if attention not in ATTENTION:
        raise UserError(f"unknown decode attention {attention!r}: choose one of {', '.join(ATTENTION)}")
    if attention == "sdpa":
        return False
    refusal = triton_refusal(model)
    if attention == "triton" and refusal:
        raise UserError(f"--decode_attention triton: {refusal}")
    return attention == "triton" or (refusal is None and llama_family_attention(model))


FUSE = ("auto", "on", "off")


def fuse_wanted(model, quantize: str, fuse: str) -> bool:
    """Whether `prepare_weights` merges q/k/v and gate/up (fusing.py): "on" / "off" as said;
    "auto" on CUDA for the families fusing.py merges, with bf16 / fp16 or int8_rowwise /
    fp8_rowwise weights (on an H200 one client went from 175.1 to 218.0 tokens/s, 64 clients gave
    8,465: benchmarks/RESULTS.md; the other quantisations' merged speeds are not measured, and the
    CPU keeps the model's own layers)."""
    if fuse not in FUSE:
        raise UserError(f"unknown fuse_projections {fuse!r}: choose one of {', '.join(FUSE)}")
    if fuse != "auto":
        return fuse == "on"
    return (next(model.parameters()).device.type == "cuda" and quantize in ("none", *ROWWISE)
            and fusion_refusal(model) is None)


GLU = ("auto", "on", "off")


def glu_refusal(model) -> str | None:
    """Why the gate/up kernel cannot take this model's SiLU(gate) x up (GluMatvecMLP); None when it
    can. Asked after prepare_weights has merged the products and chosen the kernel."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    if not layers or any(type(layer.mlp).__name__ != "Phi3MLP" or not kernel_takes(layer.mlp.gate_up_proj)
                         for layer in layers):
        return "it needs the Triton kernel and merged gate/up products"
    if any(type(layer.mlp.activation_fn).__name__ not in ("SiLUActivation", "SiLU") for layer in layers):
        return "it computes SiLU(gate) x up, and this model's MLP has another activation"
    return None


def kernel_takes(linear: torch.nn.Module) -> bool:
    """Whether one row's products of this layer go through matvec.py's Triton kernel."""
    return isinstance(linear, MatvecLinear) or getattr(linear, "triton_matvec", False)


def prepare_weights(model, quantize: str = "none", fuse: str = "auto", matvec: str = "auto", attention: str = "auto",
                    glu: str = "auto"):
    """`model` as served: q/k/v and gate/up merged first as `fuse` says (`fuse_wanted`), then
    its weights quantised (`quantize_weights`); in place. `matvec`: what computes the products of
    one row of activations (one client's decode step): "inductor" (torch.compile's generated
    reductions; cuBLAS uncompiled), "triton" (matvec.py's kernel: CUDA, bf16 / fp16 weights or
    int8_rowwise / fp8_rowwise; a merged 7B bf16 step on an H200 took 4.05 ms of GPU time against
    inductor's 4.22 in the same run: benchmarks/RESULTS.md), "auto" (triton where it can, else inductor).
    `attention`: the decode step's attention, "sdpa" (the model's own, PyTorch's kernels),
    "triton" (decode_attention.py's kernel; CUDA; skips the slots the mask hides) or "auto"
    (`attention_wanted`). `glu`: a SwiGLU MLP's
    SiLU(gate) x up taken in its gate/up kernel (GluMatvecMLP; "on", "off", or "auto": where the
    kernel takes merged gate/up products, `glu_refusal`): one kernel fewer per layer, a merged 7B
    bf16 step on an H200 3.93 ms of GPU time against 4.08 without it in the same run
    (benchmarks/RESULTS.md)."""
    if matvec not in MATVEC:
        raise UserError(f"unknown matvec {matvec!r}: choose one of {', '.join(MATVEC)}")
    if glu not in GLU:
        raise UserError(f"unknown glu {glu!r}: choose one of {', '.join(GLU)}")
    attend = attention_wanted(model, attention)  # (asked of the model's own attention layers, before merging)
    if fuse_wanted(model, quantize, fuse):
        logger.info("merged q/k/v and gate/up in %d layers", fuse_projections(model))
    quantize_weights(model, quantize)
    refusal = None if matvec == "inductor" else triton_matvec_refusal(model, quantize)
    if matvec == "triton" and refusal:
        raise UserError(f"--matvec triton: {refusal}")
    if matvec != "inductor" and not refusal:
        import common.serving.matvec  # noqa: F401  (registers torch.ops.serving.matvec)

        # (a layer with an odd number of outputs, such as an output head over 50,257 tokens, keeps inductor's)
        if quantize == "none":
            replace_linears(model, lambda linear: MatvecLinear(linear) if linear.out_features % 2 == 0 else linear)
        for module in model.modules():
            if isinstance(module, RowScaledLinear):
                module.triton_matvec = module.weight.shape[0] % 2 == 0
        logger.info("one client's products: the Triton kernel (common/serving/matvec.py)")
    elif matvec == "auto" and next(model.parameters()).device.type == "cuda":
        logger.info("one client's products: inductor's, not the Triton kernel: %s", refusal)
    refused = None if glu == "off" else glu_refusal(model)
    if glu == "on" and refused:
        raise UserError(f"glu: {refused}")
    if glu != "off" and not refused:
        for layer in model.model.layers:
            layer.mlp = GluMatvecMLP(layer.mlp)
        logger.info("one client's SiLU(gate) x up: in the gate/up kernel")
    if attend:
        from common.serving.decode_attention import NAME

        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:
            raise UserError(f"--decode_attention triton: {type(model).__name__} does not take transformers' "
                            "attention functions")
        logger.info("the decode step's attention: the Triton kernel (common/serving/decode_attention.py)")
    return model


def weights_variant(name: str) -> tuple[str, str, str, str, str]:
    """The benchmarks' names for what `prepare_weights` does: "fp8_rowwise+fused+triton+attn+glu"
    -> ("fp8_rowwise", "on", "triton", "triton", "on"), "none" -> ("none", "off", "inductor",
    "sdpa", "off") (the benchmarks name the merged products, the Triton kernels and the gate/up
    kernel's SiLU(gate) x up, which serve.py uses by default where it can); UserError when unknown."""
    quantize, *options = name.split("+")
    if quantize not in QUANTIZATIONS or any(option not in ("fused", "triton", "attn", "glu") for option in options):
        raise UserError(f"unknown weights {name!r}: one of {', '.join(QUANTIZATIONS)}, optionally with '+fused', "
                        "'+triton', '+attn' and / or '+glu'")
    return (quantize, "on" if "fused" in options else "off", "triton" if "triton" in options else "inductor",
            "triton" if "attn" in options else "sdpa", "on" if "glu" in options else "off")


def weight_bytes(model) -> int:
    """Bytes of the model's parameters as stored (a quantised tensor: its data and scales; gemlite's
    layers keep their packed weights, scales and zero points as parameters)."""
    total = 0
    for parameter in model.parameters():
        flatten = getattr(parameter, "__tensor_flatten__", None)
        tensors = [parameter] if flatten is None else [getattr(parameter, name) for name in flatten()[0]]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total

