"""Counting a model's parameters, also while DeepSpeed ZeRO-3 holds them partitioned."""

from __future__ import annotations

from torch import nn


def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Elements of the model's parameters (of the trainable ones only, if asked). Under ZeRO-3
    (`deepspeed.zero.Init`, which transformers uses to build or load a model when a ZeRO-3 config
    is active) each process holds an empty placeholder per parameter, its real size in `ds_numel`:
    `numel()` / `model.num_parameters()` would count almost nothing."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters()
               if p.requires_grad or not trainable_only)
