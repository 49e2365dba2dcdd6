"""A GroupNorm in Triton that spreads each group's statistics over many programs, for gpu_vae.py to measure
against torch's kernel and inductor's.

torch's CUDA GroupNorm reduces each (image, group) in one thread block: a VAE decode at batch 1 has 32
groups, so 32 blocks reduce tens of MB each while most of the GPU's SMs wait. Inductor splits such
reductions, which is a guess at why compiling the GroupNorms alone cut FLUX.1's 1024² decode from 91 to 54 ms
(docs/design/serving.md). This kernel splits them without a compile: each group's span (its channels are
adjacent in NCHW, so the span is contiguous) is cut into chunks; each chunk's count, mean and sum of squared
deviations are merged with Chan's formula (exact in float32, no E[x²] - E[x]² cancellation); a second kernel
normalises, scales and shifts. Triton builds each kernel per dtype and per divisibility of its integer
arguments, not per shape; the benchmark's first call per shape shows what the builds cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Programs the statistics aim for, about four per SM of an H100 (132 SMs).
TARGET_PROGRAMS = 512
BLOCK = 4096


@triton.jit
def _chunk_moments(x_ptr, out_ptr, span, chunk, chunks, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """Program (row, c): count, mean and M2 of elements [c·chunk, (c+1)·chunk) of row `row`'s span."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    start = part * chunk
    end = tl.minimum(start + chunk, span)
    base = x_ptr + row.to(tl.int64) * span
    # Typed scalars: a loop-carried value keeps the type it starts with.
    count = tl.full((), 0.0, tl.float32)
    mean = tl.full((), 0.0, tl.float32)
    m2 = tl.full((), 0.0, tl.float32)
    for offset in range(start, end, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        valid = index < end
        values = tl.load(base + index, mask=valid, other=0.0).to(tl.float32)
        n_block = tl.sum(valid.to(tl.float32), axis=0)
        mean_block = tl.sum(values, axis=0) / n_block
        deviation = tl.where(valid, values - mean_block, 0.0)
        m2_block = tl.sum(deviation * deviation, axis=0)
        total = count + n_block
        delta = mean_block - mean
        mean = mean + delta * n_block / total
        m2 = m2 + m2_block + delta * delta * count * n_block / total
        count = total
    slot = (row * chunks + part) * 3
    tl.store(out_ptr + slot, count)
    tl.store(out_ptr + slot + 1, mean)
    tl.store(out_ptr + slot + 2, m2)


@triton.jit
def _normalise(  # type: ignore[no-untyped-def]
    x_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    bias_ptr,
    size,
    channels,
    per_group,
    groups,
    SILU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (n·C + c, b): block b of channel c of image n, normalised with its group's statistics (and
    through SiLU where asked: the activation after most of a VAE's GroupNorms, without a second pass)."""
    plane = tl.program_id(0)
    block = tl.program_id(1)
    channel = plane % channels
    row = (plane // channels) * groups + channel // per_group
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    scale = tl.load(weight_ptr + channel).to(tl.float32) * rstd
    shift = tl.load(bias_ptr + channel).to(tl.float32) - mean * scale
    index = block * BLOCK + tl.arange(0, BLOCK)
    valid = index < size
    base = plane.to(tl.int64) * size
    values = tl.load(x_ptr + base + index, mask=valid, other=0.0).to(tl.float32)
    out = values * scale + shift
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(y_ptr + base + index, out.to(y_ptr.dtype.element_ty), mask=valid)


def group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool = False
) -> torch.Tensor:
    """`torch.nn.functional.group_norm` for a contiguous N×C×… tensor with an affine weight and bias (then
    `torch.nn.functional.silu` where `silu`)."""
    n, channels = x.shape[0], x.shape[1]
    size = x[0, 0].numel()
    span = channels // groups * size
    rows = n * groups
    chunks = max(1, min(triton.cdiv(TARGET_PROGRAMS, rows), triton.cdiv(span, BLOCK)))
    chunk = triton.cdiv(triton.cdiv(span, chunks), BLOCK) * BLOCK
    chunks = triton.cdiv(span, chunk)
    moments = torch.empty(rows, chunks, 3, device=x.device, dtype=torch.float32)
    _chunk_moments[(rows, chunks)](x, moments, span, chunk, chunks, BLOCK=BLOCK)
    count, means, m2 = moments.unbind(-1)
    mean = (means * count).sum(1) / span
    variance = (m2.sum(1) + (count * (means - mean[:, None]) ** 2).sum(1)) / span
    rstd = torch.rsqrt(variance + eps)
    y = torch.empty_like(x)
    grid = (n * channels, triton.cdiv(size, BLOCK))
    _normalise[grid](
        x, y, mean, rstd, weight, bias, size, channels, channels // groups, groups, SILU=silu, BLOCK=BLOCK
    )
    return y


def group_norm_forward(module: torch.nn.GroupNorm, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """A GroupNorm module's forward (then SiLU where `silu`) through the kernel where it applies (a contiguous
    CUDA tensor with an affine weight), through torch's otherwise."""
    if x.is_cuda and x.is_contiguous() and module.affine and x.dim() >= 3:
        return group_norm(x, module.num_groups, module.weight, module.bias, module.eps, silu)
    y = torch.nn.functional.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)
    return torch.nn.functional.silu(y) if silu else y
