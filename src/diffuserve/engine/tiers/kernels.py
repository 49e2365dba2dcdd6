"""Exact rewrites that only change kernels: fused QKV projections."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _fused_away(module: nn.Module) -> list[str]:
    """The projections a fused layer replaced; cross-attention fuses only K and V and still uses to_q."""
    names = []
    if hasattr(module, "to_qkv"):
        names += ["to_q", "to_k", "to_v"]
    elif hasattr(module, "to_kv"):
        names += ["to_k", "to_v"]
    if hasattr(module, "to_added_qkv"):
        names += ["add_q_proj", "add_k_proj", "add_v_proj"]
    return names


def fuse_qkv(model: nn.Module, notes: list[str]) -> bool:
    """One matmul for Q, K and V (and the text stream's): the same sums, fewer and larger kernels."""
    fuse = getattr(model, "fuse_qkv_projections", None)
    if fuse is None:
        notes.append(f"fused QKV: skipped, {type(model).__name__} has no fuse_qkv_projections")
        return False
    try:
        fuse()
    except (ValueError, AttributeError, NotImplementedError) as exc:
        notes.append(f"fused QKV: skipped ({exc})")
        return False
    freed = 0
    for module in model.modules():
        if not getattr(module, "fused_projections", False):
            continue
        # diffusers keeps the unfused copies; empty them to return their memory (empty, not meta, so a later
        # `pipeline.to(...)` still works; a call into one would fail loudly on the shape).
        for name in _fused_away(module):
            child = getattr(module, name, None)
            if not isinstance(child, nn.Linear) or child.weight.numel() == 0:
                continue
            freed += child.weight.numel() + (child.bias.numel() if child.bias is not None else 0)
            empty = torch.empty(0, device=child.weight.device, dtype=child.weight.dtype)
            child.weight = nn.Parameter(empty, requires_grad=False)
            if child.bias is not None:
                child.bias = nn.Parameter(empty.clone(), requires_grad=False)
    notes.append(f"fused QKV projections ({freed / 1e6:.1f} M unfused parameters released)")
    return True
