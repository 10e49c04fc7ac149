"""Merging the matrix products that read the same input: q, k and v into one, gate and up into one.

Decoding one token for one client reads every weight once, in a few hundred matrix-vector
products per step (seven per decoder layer in a Llama), and the products read at 3.2-3.7 TB/s of an
H200's ~4.2 (benchmarks/RESULTS.md): small products lose bandwidth at their start and end, so
four larger ones per layer read closer to it (one H200, 7B shape, bf16, one client: 218.0 against
175.1 tokens/s unmerged in the same run, `decode_throughput.py --quantize none,none+fused`,
benchmarks/RESULTS.md, 2026-12-05). The merged
layers are transformers' own: Phi3's attention (`qkv_proj`) and MLP (`gate_up_proj`) compute
what Llama's do, with those products merged, so this only concatenates weights and swaps modules,
in place, one layer at a time (no second copy of the model). `serve.py --fuse_projections`.

Families: Llama (Baichuan converted to it), Mistral and Qwen2 (its q / k / v biases are
concatenated too). Others (GLM's interleaved rotary, Qwen3's per-head norms, ...) are refused;
GLM's MLP already merges gate and up.
A fused model serves and scores as before (its logits equal up to rounding); its state dict has
the merged names, so it is not for saving.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError

ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")


def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the outputs of `linears` (same input size) side by side."""
    if any(linear.bias is not None for linear in linears) and any(linear.bias is None for linear in linears):
        raise UserError("cannot merge linear layers of which only some have a bias")
    first = linears[0].weight
    merged = nn.Linear(first.shape[1], sum(linear.out_features for linear in linears),
                       bias=linears[0].bias is not None, device="meta")
    merged.weight = nn.Parameter(torch.cat([linear.weight.detach() for linear in linears]), requires_grad=False)
    if merged.bias is not None:
        merged.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
    return merged


def _layers(model) -> list:
    return getattr(getattr(model, "model", None), "layers", None) or [None]


def llama_family_attention(model) -> bool:
    """Whether every decoder layer's attention is Llama's, Mistral's or Qwen2's (unmerged)."""
    return all(type(getattr(layer, "self_attn", None)).__name__ in ATTENTIONS for layer in _layers(model))


def fusion_refusal(model) -> str | None:
    """Why `fuse_projections` cannot merge this model's products; None when it can."""
    layers = _layers(model)
    if not llama_family_attention(model) or any(type(getattr(layer, "mlp", None)).__name__ not in MLPS
                                                for layer in layers):
        return (f"{type(model).__name__}: merging q/k/v and gate/up is implemented for "
                f"{', '.join(a.removesuffix('Attention') for a in ATTENTIONS)} models only")
    window = getattr(model.config, "sliding_window", None)
    if any(getattr(layer.self_attn, "sliding_window", window) != window for layer in layers):  # Qwen2's per-layer windows
        return f"{type(model).__name__} has layers with and without a sliding window: not merged"
    return None


def fuse_projections(model) -> int:
    """Merge each decoder layer's q / k / v products into one and its gate / up products into
    one, in place (see the module's text). Returns the number of layers changed; UserError for
    a model of another family."""
    from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3MLP

    refusal = fusion_refusal(model)
    if refusal:
        raise UserError(refusal)
    for index, layer in enumerate(model.model.layers):
        old, mlp = layer.self_attn, layer.mlp
        with torch.device("meta"):  # its layers are replaced below: no memory for them here
            attention, merged_mlp = Phi3Attention(model.config, old.layer_idx), Phi3MLP(model.config)
        if (attention.head_dim, attention.scaling, attention.num_key_value_groups) != \
                (old.head_dim, old.scaling, old.num_key_value_groups):
            raise UserError(f"layer {index}'s attention is not the one Phi3's computes: not merged")
        attention.qkv_proj = concat_linears([old.q_proj, old.k_proj, old.v_proj])
        attention.o_proj = old.o_proj
        attention.train(old.training)
        layer.self_attn = attention
        merged_mlp.gate_up_proj = concat_linears([mlp.gate_proj, mlp.up_proj])
        merged_mlp.down_proj = mlp.down_proj
        merged_mlp.activation_fn = mlp.act_fn
        merged_mlp.train(mlp.training)
        layer.mlp = merged_mlp
    return len(model.model.layers)
