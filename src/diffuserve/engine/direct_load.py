"""A local pipeline folder's diffusers models (the transformer or UNet, the VAE) built empty and filled by
engine.weights_read, before the pipeline's `from_pretrained` loads the rest (text encoders, tokenizers,
scheduler) and takes these as given. A model this cannot fill exactly is left to `from_pretrained`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffuserve.engine.weights_read import WeightsFormatError, entries, read_tensors

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"


def model_files(subfolder: Path) -> list[Path] | None:
    """The safetensors files diffusers itself would load from a model's subfolder with no variant: the
    shards its index names, or the one file; None where neither is there."""
    index = subfolder / f"{WEIGHTS}.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            return None
        files = [subfolder / name for name in names]
        return files if all(f.is_file() for f in files) else None
    single = subfolder / WEIGHTS
    return [single] if single.is_file() else None


def diffusers_models(folder: Path) -> dict[str, str]:
    """The components `model_index.json` says diffusers' model classes hold: name -> class name."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {
        name: str(value[1])
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and value[0] == "diffusers"
    }


# A component's tensors read already (engine.early_read's EarlyRead.take), or None: the load reads them.
ReadAlready = Callable[[str], dict[str, torch.Tensor] | None]


def load_models(
    folder: Path, dtype: torch.dtype, device: str, read_already: ReadAlready | None = None
) -> dict[str, Any]:
    """Each diffusers model of the folder on `device` in `dtype`, its tensors from `read_already` where it has
    them; those that cannot be filled exactly are left out (logged), for `from_pretrained` to load."""
    import diffusers

    loaded: dict[str, Any] = {}
    for name, class_name in diffusers_models(folder).items():
        cls = getattr(diffusers, class_name, None)
        files = model_files(folder / name)
        if cls is None or not hasattr(cls, "from_config") or files is None:
            continue
        started = time.perf_counter()
        state = read_already(name) if read_already is not None else None
        try:
            model = build_filled(cls, folder / name, files, dtype, device, state)
        except torch.OutOfMemoryError:
            raise  # from_pretrained would not fit either: the loader reports what the model needs
        except (WeightsFormatError, RuntimeError, ValueError, KeyError) as exc:
            log.info("%s: left to from_pretrained (%s: %s)", name, type(exc).__name__, exc)
            continue
        seconds = time.perf_counter() - started
        size = sum(f.stat().st_size for f in files)
        how = "read beside the imports, built" if state is not None else "read"
        log.info(
            "%s: %.1f GB %s in %.1f s (%.1f GB/s)",
            name,
            size / 1e9,
            how,
            seconds,
            size / 1e9 / max(seconds, 1e-9),
        )
        loaded[name] = model
    return loaded


def stored_dtypes(files: list[Path]) -> set[torch.dtype]:
    """The floating-point dtypes the files store their tensors in (from their headers)."""
    return {e.dtype for path in files for e in entries(path) if e.dtype.is_floating_point}


def build_filled(
    cls: Any,
    subfolder: Path,
    files: list[Path],
    dtype: torch.dtype,
    device: str,
    state: dict[str, torch.Tensor] | None = None,
) -> Any:
    """The model built on the meta device from its config, then given the files' tensors as its own (`assign`;
    `state` where they were read already): every parameter and buffer must come from the files, the file's
    names must be the model's exactly, the files must hold the served dtype, and the class must keep no module
    in float32."""
    if getattr(cls, "_keep_in_fp32_modules", None):
        raise ValueError(f"{cls.__name__} keeps modules in float32")
    stored = stored_dtypes(files) - {dtype}
    if stored:
        # Cast after a whole read, a float32 model would need its float32 and its served copy on the GPU at
        # once; from_pretrained casts tensor by tensor.
        raise ValueError(f"stored in {', '.join(sorted(map(str, stored)))}, served in {dtype}")
    config = cls.load_config(str(subfolder))
    with torch.device("meta"):
        model = cls.from_config(config)
    if state is None:
        state = read_tensors(files, device)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(f"names differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"not in the files: {left[:3]}")
    model.eval()
    model.register_to_config(_name_or_path=str(subfolder))  # as from_pretrained names it
    return model
