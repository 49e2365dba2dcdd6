"""LoRA adapter files read without torch: a safetensors header, and which denoiser modules an adapter in
diffusers' (PEFT) format changes, with their rank and scale."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# safetensors' own bound on a header; a larger one is a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 2**20
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
SCALAR_FORMATS = {"F32": "<f", "F64": "<d", "F16": "<e"}
# The denoiser's name in a pipeline's adapter keys (`transformer.…`, `unet.…`); text encoders are not adapted.
DENOISERS = ("transformer", "unet")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# `<module>.lora_A.weight` (PEFT; `.lora_A.<adapter>.weight` too) or `<module>.lora_down.weight` (diffusers'
# older layout), each with an optional component prefix.
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")
_DOWN = ("lora_A", "lora_down")
# Other trainers' key layouts (whose `.lora_down.weight` / `.lora_A.weight` keys the pattern above would
# otherwise take for diffusers' modules), by the prefix of their keys.
_TRAINER_LAYOUTS = (
    (("lora_unet_", "lora_te", "lora_transformer_"), "kohya's (sd-scripts)"),
    (("diffusion_model.",), "BFL's (ComfyUI's)"),
    (("double_blocks.", "single_blocks."), "XLabs' or BFL's"),
)


class AdapterError(ValueError):
    """An adapter that cannot be used; the message says what is wrong in the client's words."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ModuleLora:
    """One adapted linear layer: ΔW = scale · B @ A, A of shape (rank, in), B of shape (out, rank)."""

    rank: int
    in_features: int
    out_features: int
    scale: float
    down: str
    up: str


@dataclass(frozen=True)
class AdapterLayout:
    """The modules an adapter file changes, keyed by their name inside the denoiser."""

    path: str
    modules: dict[str, ModuleLora]
    # The tensors' bytes as stored (the file less its header).
    nbytes: int

    @property
    def rank(self) -> int:
        return max(module.rank for module in self.modules.values())


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """The tensors (dtype, shape, byte range in the data part), the metadata and where the data part starts.
    A header that is not JSON, out of bounds or whose tensors lie past the end of the file is refused."""
    try:
        with path.open("rb") as file:
            size = path.stat().st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise AdapterError("it is not a safetensors file (shorter than its header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterError("it is not a safetensors file (its header length is out of bounds)")
            raw = file.read(length)
    except OSError as exc:
        raise AdapterError(f"it cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AdapterError("it is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError("it is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterError("it is not a safetensors file (its __metadata__ is not a JSON object)")
    data_start, data_size = 8 + length, size - 8 - length
    tensors: dict[str, TensorEntry] = {}
    for key, entry in header.items():
        tensors[key] = _entry(key, entry, data_size)
    return tensors, {str(k): str(v) for k, v in metadata.items()}, data_start


def _entry(key: str, entry: Any, data_size: int) -> TensorEntry:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise AdapterError(f"its header entry for {key!r} is malformed") from None
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_count(n) for n in shape):
        raise AdapterError(f"its header entry for {key!r} is malformed")
    shape = tuple(shape)
    width = DTYPE_BYTES.get(dtype)
    if width is None:
        raise AdapterError(
            f"tensor {key!r} has dtype {dtype[:20]!r}, not one this server reads (F32, F16, BF16…)"
        )
    if not (_count(start) and _count(end)) or not 0 <= start <= end <= data_size:
        raise AdapterError(f"tensor {key!r} lies outside the file: it is truncated or corrupt")
    if end - start != math.prod(shape) * width:
        raise AdapterError(f"tensor {key!r} has {end - start} bytes for shape {list(shape)} {dtype}")
    return TensorEntry(dtype, shape, start, end)


def _count(value: Any) -> bool:
    """A JSON whole number of at least 0 (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_layout(path: Path, check_values: bool = False) -> AdapterLayout:
    """The denoiser modules an adapter changes. Keys name the pipeline's component (`transformer.`/`unet.`,
    diffusers' `save_lora_weights`) or none (PEFT's `save_pretrained` of the denoiser alone). `check_values`
    also reads every weight once to refuse a NaN or infinity (they would blacken every image)."""
    tensors, metadata, data_start = read_header(path)
    if not tensors:
        raise AdapterError("it holds no tensors")
    pairs: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    for key in tensors:
        _check_trainer_layout(key)
        module = _strip_component(key)
        if key.endswith(".alpha"):
            alphas[module.removesuffix(".alpha")] = key
            continue
        match = _KEY.match(module)
        if match is None:
            raise AdapterError(_unsupported_key(key))
        side = "down" if match["part"] in _DOWN else "up"
        sides = pairs.setdefault(match["module"], {})
        if side in sides:
            raise AdapterError(
                f"module {match['module']!r} has two {side} weights ({sides[side]!r} and {key!r})"
            )
        sides[side] = key
    if not pairs:
        raise AdapterError("it holds no LoRA weights (<module>.lora_A.weight / lora_B.weight)")
    config = _peft_config(metadata)
    modules = {
        name: _module(name, sides, tensors, alphas.get(name), config, path, data_start)
        for name, sides in sorted(pairs.items())
    }
    if check_values:
        for lora in modules.values():
            for key in (lora.down, lora.up):
                _check_finite(path, key, tensors[key], data_start)
    nbytes = sum(entry.end - entry.start for entry in tensors.values())
    return AdapterLayout(str(path), modules, nbytes)


# A float's exponent bits, all set for infinities and NaNs, by dtype: (unsigned view, mask).
_EXPONENT = {
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F64": ("<u8", 0x7FF << 52),
}


def _check_finite(path: Path, key: str, entry: TensorEntry, data_start: int) -> None:
    import numpy as np

    kind = _EXPONENT.get(entry.dtype)
    if kind is None or entry.end == entry.start:
        return
    view, mask = kind
    values = np.memmap(
        path, dtype=view, mode="r", offset=data_start + entry.start, shape=(math.prod(entry.shape),)
    )
    for chunk in range(0, values.size, 1 << 22):
        if ((values[chunk : chunk + (1 << 22)] & mask) == mask).any():
            raise AdapterError(f"tensor {key!r} holds values that are not finite numbers (NaN or infinity)")


def _strip_component(key: str) -> str:
    # PEFT's own save_pretrained writes `base_model.model.<module>` for the model it wrapped.
    key = key.removeprefix("base_model.model.")
    head, _, rest = key.partition(".")
    if head in TEXT_ENCODERS:
        raise AdapterError(f"it adapts the text encoder ({key!r}); only the denoiser's layers can be adapted")
    return rest if head in DENOISERS else key


def _check_trainer_layout(key: str) -> None:
    for prefixes, layout in _TRAINER_LAYOUTS:
        if key.startswith(prefixes):
            raise AdapterError(
                f"tensor {key!r} is in {layout} layout, not diffusers': convert it with diffusers "
                "(pipeline.load_lora_weights, then save_lora_weights)"
            )


def _unsupported_key(key: str) -> str:
    if key.endswith((".diff", ".diff_b", ".bias", "lora_magnitude_vector", "lora_magnitude_vector.weight")):
        return f"tensor {key!r} changes weights in a way other than a LoRA product (full or DoRA differences)"
    return f"tensor {key!r} is not a LoRA weight (expected <module>.lora_A.weight / lora_B.weight)"


def _peft_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """PEFT's LoraConfig as diffusers stores it in the file's metadata (keys prefixed by the component)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise AdapterError("its lora_adapter_metadata is not JSON") from None
    if not isinstance(config, dict):
        raise AdapterError("its lora_adapter_metadata is not a JSON object")
    return {_strip_metadata_prefix(str(key)): value for key, value in config.items()}


def _strip_metadata_prefix(key: str) -> str:
    head, _, rest = key.partition(".")
    return rest if head in DENOISERS and rest else key


def _module(
    name: str,
    sides: dict[str, str],
    tensors: dict[str, TensorEntry],
    alpha_key: str | None,
    config: dict[str, Any],
    path: Path,
    data_start: int,
) -> ModuleLora:
    if set(sides) != {"down", "up"}:
        missing = "lora_A (down)" if "down" not in sides else "lora_B (up)"
        raise AdapterError(f"module {name!r} has no {missing} weight")
    down, up = tensors[sides["down"]], tensors[sides["up"]]
    for key, entry in ((sides["down"], down), (sides["up"], up)):
        if entry.dtype not in _EXPONENT:
            raise AdapterError(f"tensor {key!r} has dtype {entry.dtype}; a LoRA weight is a float tensor")
    if len(down.shape) != 2 or len(up.shape) != 2 or down.shape[0] != up.shape[1] or down.shape[0] < 1:
        raise AdapterError(
            f"module {name!r} has shapes {list(down.shape)} and {list(up.shape)}, not (rank, in) and (out, rank)"
        )
    rank = down.shape[0]
    alpha = _alpha(name, rank, alpha_key, tensors, config, path, data_start)
    rs = bool(config.get("use_rslora"))
    scale = alpha / (math.sqrt(rank) if rs else rank)
    if not math.isfinite(scale):
        raise AdapterError(f"module {name!r} has a scale that is not a finite number")
    return ModuleLora(rank, down.shape[1], up.shape[0], scale, sides["down"], sides["up"])


def _alpha(
    name: str,
    rank: int,
    alpha_key: str | None,
    tensors: dict[str, TensorEntry],
    config: dict[str, Any],
    path: Path,
    data_start: int,
) -> float:
    """The module's alpha: its `.alpha` tensor (kohya's habit), PEFT's alpha_pattern or lora_alpha, else the
    rank itself (scale 1, diffusers' default when a file says nothing)."""
    if alpha_key is not None:
        return _scalar(path, tensors[alpha_key], data_start, alpha_key)
    pattern = config.get("alpha_pattern") or {}
    if isinstance(pattern, dict):
        for key, value in pattern.items():
            try:
                matches = name == key or name.endswith("." + str(key)) or re.fullmatch(str(key), name)
            except re.error:
                raise AdapterError(f"its alpha_pattern key {str(key)[:100]!r} is not a pattern") from None
            if matches:
                return _number(value, f"its alpha_pattern value for {str(key)[:100]!r}")
    alpha = config.get("lora_alpha")
    return _number(alpha, "its lora_alpha") if alpha is not None else float(rank)


def _number(value: Any, what: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            pass
    raise AdapterError(f"{what} is not a number")


def _scalar(path: Path, entry: TensorEntry, data_start: int, key: str) -> float:
    fmt = SCALAR_FORMATS.get(entry.dtype)
    if fmt is None and entry.dtype != "BF16":
        raise AdapterError(f"tensor {key!r} (an alpha) has dtype {entry.dtype}")
    if entry.shape not in ((), (1,)):
        raise AdapterError(f"tensor {key!r} (an alpha) is not a scalar")
    with path.open("rb") as file:
        file.seek(data_start + entry.start)
        raw = file.read(entry.end - entry.start)
    if entry.dtype == "BF16":  # the top half of a float32
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    return float(struct.unpack(fmt or "<f", raw)[0])


def check_layout(layout: AdapterLayout, targets: Mapping[str, tuple[int, int]], max_rank: int) -> None:
    """Refuse an adapter this model cannot take: a module it does not adapt (another base model, or a layer
    outside the adapted ones), a shape that differs, or a rank above the compiled maximum."""
    for name, module in layout.modules.items():
        shape = targets.get(name)
        if shape is None:
            raise AdapterError(
                f"it changes {name!r}, which this model does not have or does not adapt (another base model?)"
            )
        if (module.in_features, module.out_features) != shape:
            raise AdapterError(
                f"its {name!r} is {module.in_features}→{module.out_features}, the model's is {shape[0]}→"
                f"{shape[1]}: it was trained for another base model"
            )
    if layout.rank > max_rank:
        raise AdapterError(f"its rank {layout.rank} is above this server's LORA_MAX_RANK of {max_rank}")
