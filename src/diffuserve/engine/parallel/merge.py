"""Ring attention's partial attentions merged by their log-sum-exp into the [B, S, H, D] layout the next layer
reads: a group of two on CUDA in one Triton kernel, any other group by diffusers' ring formula."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

# Decided once at import, so that the check in traced code reads a constant (Triton comes with CUDA builds).
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def mergeable(head_dim: int) -> bool:
    """Whether `merge_pair` takes CUDA partial outputs of this head dimension: with Triton, and a power of two
    (the kernel reads a head's row as one block)."""
    return HAVE_TRITON and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def merge(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The attention over every rank's K and V from the partial ones, `parts` = [out, lse, out, lse, ...]
    (outputs [B, H, S, D] contiguous, log-sum-exps [B, H, S] float32). Returns [B, S, H, D]."""
    if len(parts) == 4 and parts[0].is_cuda and mergeable(parts[0].shape[-1]):
        return merge_pair(*parts)
    return ring_formula(parts)


def ring_formula(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """`merge` by diffusers' ring formula, in float32, one part after the other."""
    out, lse = parts[0].float(), parts[1].unsqueeze(-1)
    for index in range(2, len(parts), 2):
        part_out, part_lse = parts[index].float(), parts[index + 1].unsqueeze(-1)
        out = out - torch.sigmoid(part_lse - lse) * (out - part_out)
        lse = lse - torch.nn.functional.logsigmoid(lse - part_lse)
    return out.to(parts[0].dtype).transpose(1, 2)


def merge_pair(
    out0: torch.Tensor, lse0: torch.Tensor, out1: torch.Tensor, lse1: torch.Tensor
) -> torch.Tensor:
    """The attention over both parts' keys from two partial ones: `out0`, `out1` [B, H, S, D] (contiguous) and
    their log-sum-exps `lse0`, `lse1` [B, H, S] (float32, contiguous). Returns [B, S, H, D] in `out0`'s dtype,
    `out0 - sigmoid(lse1 - lse0) * (out0 - out1)` in float32 as diffusers' ring merges, one pass."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("merge_pair needs Triton")
    batch, heads, seq, head_dim = out0.shape
    merged = out0.new_empty((batch, seq, heads, head_dim))
    rows = batch * heads * seq
    block_rows = 16
    grid = ((rows + block_rows - 1) // block_rows,)
    kernel[grid](out0, lse0, out1, lse1, merged, rows, seq, heads, HEAD_DIM=head_dim, ROWS=block_rows)
    return merged


@cache
def _kernel() -> Any:
    """The Triton kernel, built on first use (None where Triton is missing: CPU installs)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit  # type: ignore[misc]
    def merge_pair_kernel(
        out0, lse0, out1, lse1, merged, rows, seq, heads, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr
    ):
        # Rows in the inputs' order (batch, head, position): each reads HEAD_DIM contiguous values per input.
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        inside = row < rows
        col = tl.arange(0, HEAD_DIM)
        weight = tl.sigmoid(tl.load(lse1 + row, mask=inside) - tl.load(lse0 + row, mask=inside))
        offsets = row[:, None] * HEAD_DIM + col[None, :]
        first = tl.load(out0 + offsets, mask=inside[:, None]).to(tl.float32)
        second = tl.load(out1 + offsets, mask=inside[:, None]).to(tl.float32)
        value = first - weight[:, None] * (first - second)
        # The same row of the output, [B, S, H, D]: (batch, position, head).
        position = row % seq
        batch_head = row // seq
        target = (batch_head // heads * seq + position) * heads + batch_head % heads
        tl.store(
            merged + target[:, None] * HEAD_DIM + col[None, :],
            value.to(merged.dtype.element_ty),
            mask=inside[:, None],
        )

    return merge_pair_kernel
