"""Calibrated fp8 rounding (GPTQ) for tier L: each weight row rounded to e4m3 so that the layer's outputs on
calibration inputs move least, instead of each weight to its nearest value; the result is cached on disk.

Rounding each weight to its nearest e4m3 value is what moves a tier L image most: on the trained digits model,
weights alone move images 1.6-1.9 % from bf16 eager, activations alone 0.6-1.0 % (`benchmarks/cpu_fp8_error.py`).
GPTQ (Frantar et al., 2022) rounds the columns of a weight one after another and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse of the inputs' second moments H = Σ xᵀx, so
errors the inputs cancel are preferred.

The rounded weights are written back into the model in its own dtype, so that torchao's row-wise quantization,
which runs next unchanged, finds exactly these e4m3 codes: each row's largest weight is pinned to ±448 times
the row's scale, the scale torchao derives from that row again, and every other weight is a code times that
scale, which bf16 holds to 2⁻⁹ while neighbouring codes lie 2⁻³ apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffuserve.engine.grouping import grouped_by_size
from diffuserve.engine.tiers.cache_files import write_atomically

log = logging.getLogger(__name__)

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
# GPTQ's damping (a share of H's mean diagonal added to it), and that of layers seen on fewer input rows than
# features. Measured on the trained digits model (benchmarks/cpu_fp8_error.py, tier L, 4/28 steps): 0.01
# everywhere 1.09/0.71 %, nearest rounding for the few-row layers 1.23/1.03 %, 1.0 for them 1.06/0.75 %.
DAMP, FEW_ROWS_DAMP = 0.01, 1.0
BLOCK = 128  # columns per lazy update
# The float32 statistics held at once. Fixed, not sized to free memory: the groups decide which inputs each
# layer is calibrated on, so every worker must form the same ones to hold the same codes (where they do not
# fit, the calibration fails and the nearest rounding serves).
BUDGET_BYTES = 8 * 2**30
# Everything the codes depend on besides the weights and the calibration calls: part of the cache key, so a
# change to any of it is never served an older rounding's codes.
METHOD = f"gptq-e4m3-rowwise damp {DAMP} few-rows damp {FEW_ROWS_DAMP} block {BLOCK}"
# A temporary file older than this was left by a process stopped mid-write: removed at the next save.
STALE_PARTIAL_S = 3600.0


@dataclass(frozen=True)
class Calibration:
    """The calibration calls (`run`, its outputs unused) and what they are (`context`, part of the cache key)."""

    run: Callable[[], None]
    context: str


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Each row's scale as torchao's row-wise fp8 derives it: the row's largest magnitude over e4m3's."""
    return weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX


def e4m3_codes(values: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value of each element (float32, clamped to e4m3's range)."""
    return values.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, *, damp: float = DAMP, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """GPTQ's e4m3 codes (float32) and row scales for `weight` (out × in), given the inputs' second moments
    `hessian` (in × in, float32; its zero diagonal entries are set to 1 in place). Columns are taken in order of falling input energy (GPTQ's
    act-order); `damp` times the mean diagonal is added to H (ten times more, twice, where H is not positive
    definite); `block` columns share one lazy update of the rest. None where H is not finite or stays
    singular: the caller keeps the nearest rounding."""
    if not torch.isfinite(hessian).all() or not torch.isfinite(weight).all():
        return None
    w = weight.float().clone()
    rows, columns = w.shape
    scale = row_scales(w)
    # Each row's largest weight becomes ±448 exactly, so the scale derived again from the rounded row is this one.
    pinned = w.abs().argmax(dim=1)
    pinned_value = torch.sign(w[torch.arange(rows, device=w.device), pinned]) * E4M3_MAX
    diagonal = torch.diagonal(hessian)
    diagonal[diagonal == 0] = 1.0  # inputs that were always zero: nothing to weigh their columns by
    order = torch.argsort(diagonal, descending=True, stable=True)
    w, h = w[:, order], hessian[order][:, order]
    position = torch.argsort(order)[pinned]  # each row's pinned column in the new order
    inverse = _upper_inverse_cholesky(h, damp)
    del h
    if inverse is None:
        return None
    codes = torch.zeros_like(w)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part, errors = w[:, start:end].clone(), torch.zeros(rows, end - start, device=w.device)
        for i in range(end - start):
            column = part[:, i]
            code = e4m3_codes(column / scale[:, 0])
            code = torch.where(position == start + i, pinned_value, code)
            error = (column - code * scale[:, 0]) / inverse[start + i, start + i]
            part[:, i:] -= error[:, None] * inverse[start + i, start + i : end][None, :]
            codes[:, start + i], errors[:, i] = code, error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes[:, torch.argsort(order)], scale


def _upper_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """GPTQ's upper Cholesky factor of H⁻¹ (H damped in place), or None where H stays singular."""
    diagonal = torch.diagonal(h)
    mean = float(diagonal.mean())
    added = 0.0
    for factor in (1.0, 10.0, 100.0):
        diagonal += damp * factor * mean - added
        added = damp * factor * mean
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(inverse).all():
                return inverse
    return None


def rounded_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float()).to(dtype)


def hessian_groups(layers: dict[str, nn.Linear], budget_bytes: int) -> Iterator[list[str]]:
    """The layers in their order, in groups whose float32 second-moment matrices fit `budget_bytes` (a layer
    over the budget alone)."""
    return grouped_by_size(layers, lambda name: 4 * layers[name].in_features ** 2, budget_bytes)


def collect_hessians(
    layers: dict[str, nn.Linear], names: list[str], run: Callable[[], None]
) -> dict[str, tuple[torch.Tensor, int]]:
    """Σ xᵀx of each named layer's inputs over one `run()` of the calibration calls (float32, on its device),
    and the count of input rows it sums."""
    sums: dict[str, tuple[torch.Tensor, int]] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def add(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            total, count = sums.get(name, (None, 0))
            sums[name] = (x.T @ x if total is None else total.addmm_(x.T, x), count + x.shape[0])

        return add

    handles = [layers[name].register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return sums


def fingerprint(layers: dict[str, nn.Linear], context: str, budget_bytes: int = BUDGET_BYTES) -> str:
    """A key for the calibrated codes of these weights: names, shapes, dtype and a strided sample of 65,536 of
    each weight's values (cheap on any device: a fine-tune that changes none of the sampled values would get
    the base weights' codes), the method, `context` (the calibration calls) and the statistics' budget (which
    groups the layers)."""
    digest = hashlib.sha256(f"{METHOD}\n{context}\ngroups of {budget_bytes} bytes\n".encode())
    for name, layer in layers.items():
        weight = layer.weight.detach()
        sample = weight.flatten()[:: max(1, weight.numel() // 65536)].float().cpu()
        digest.update(f"{name} {tuple(weight.shape)} {weight.dtype}\n".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


def calibrate_fp8(
    layers: dict[str, nn.Linear],
    run: Callable[[], None],
    *,
    cache_dir: str,
    context: str,
    notes: list[str],
    budget_bytes: int = BUDGET_BYTES,
) -> None:
    """Round `layers`' weights in place by GPTQ, from the cache where these weights were calibrated before,
    else from `run()` (the calibration calls: once per group of layers whose statistics fit `budget_bytes`),
    then cached. Groups are rounded in turn, so later groups' inputs come through the earlier groups' rounded
    weights (GPTQ's sequential order). A layer whose inputs had fewer rows than features (FLUX's AdaLN products
    see one row per image and step) is damped a hundred times more, so that in the directions its samples
    never took, its rounding stays near the nearest one. Only bfloat16 weights: float16 cannot hold a small
    row's codes times its scale exactly, so torchao would not find the same codes again."""
    if not layers:
        return
    dtypes = {layer.weight.dtype for layer in layers.values()}
    if dtypes != {torch.bfloat16}:
        found = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))
        notes.append(f"fp8 rounding: nearest (calibrated rounding needs bfloat16 weights, these are {found})")
        return
    key = fingerprint(layers, context, budget_bytes)
    path = Path(cache_dir).expanduser() / "fp8-rounding" / f"{key}.safetensors"
    started = time.perf_counter()
    loaded = _load(path, layers)
    if loaded is not None:
        notes.append(
            f"fp8 rounding: calibrated (GPTQ) codes of {loaded} of {len(layers)} layers read from {path}"
        )
        return
    codes: dict[str, torch.Tensor] = {}
    runs = 0
    for names in hessian_groups(layers, budget_bytes):
        hessians = collect_hessians(layers, names, run)
        runs += 1
        for name in names:
            hessian, rows = hessians.pop(name, (None, 0))
            weight = layers[name].weight
            if hessian is None:
                continue  # unreached by the calibration calls: nearest rounding
            few = rows < weight.shape[1]
            rounded = gptq_round(weight.detach(), hessian, damp=FEW_ROWS_DAMP if few else DAMP)
            del hessian
            if rounded is None:
                log.warning(
                    "fp8 rounding: %s keeps its nearest rounding (its input statistics are singular)", name
                )
                continue
            with torch.no_grad():
                weight.copy_(rounded_weight(*rounded, weight.dtype))
            codes[f"{name}.codes"] = rounded[0].to(torch.float8_e4m3fn).cpu()
            codes[f"{name}.scale"] = rounded[1].cpu()
    saved = _save(path, codes, {"method": METHOD, "context": context})
    notes.append(
        f"fp8 rounding: calibrated (GPTQ), {len(codes) // 2} of {len(layers)} layers (any other nearest) from "
        f"{runs} calibration run(s) in {time.perf_counter() - started:.1f} s, "
        + (f"cached in {path}" if saved else "not cached")
    )


def _load(path: Path, layers: dict[str, nn.Linear]) -> int | None:
    """Writes the cached codes into the layers; returns how many layers had codes, or None where the file is
    missing, unreadable or does not fit these layers (then nothing was written)."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        stored = load_file(str(path))
        named = {key.rsplit(".", 1)[0] for key in stored}
        fits = all(
            name in layers
            and stored[f"{name}.codes"].shape == layers[name].weight.shape
            and stored[f"{name}.scale"].shape == (layers[name].weight.shape[0], 1)
            and torch.isfinite(stored[f"{name}.scale"]).all()
            for name in named
        )
    except Exception as exc:  # a torn or foreign file: calibrate again, and overwrite it
        log.warning("fp8 rounding cache %s unreadable (%s): calibrating again", path, exc)
        return None
    if not fits:
        log.warning("fp8 rounding cache %s does not fit these layers: calibrating again", path)
        return None
    with torch.no_grad():
        for name in named:
            weight = layers[name].weight
            code, scale = stored[f"{name}.codes"], stored[f"{name}.scale"]
            weight.copy_(rounded_weight(code.to(weight.device), scale.to(weight.device), weight.dtype))
    return len(named)


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Written beside and renamed into place (the workers of a model, and a group's ranks, calibrate the same
    weights at the same time); temporary files that a stopped process left are removed first."""
    from safetensors.torch import save_file

    encoded = {k: json.dumps(v) for k, v in metadata.items()}
    try:
        _remove_stale_partials(path.parent)  # a folder not made yet holds none
        write_atomically(
            path, lambda temporary: save_file(tensors, str(temporary), metadata=encoded), ".partial"
        )
    except Exception as exc:  # the cache only saves the next start's calibration (safetensors' errors too)
        log.warning("fp8 rounding: not cached in %s (%s: %s)", path, type(exc).__name__, exc)
        return False
    return True


def _remove_stale_partials(folder: Path) -> None:
    cutoff = time.time() - STALE_PARTIAL_S
    for stale in folder.glob("*.partial"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()
