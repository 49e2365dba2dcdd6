"""Which files of a repo a diffusers pipeline needs, and what keeps a folder from loading as one."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Weight formats, best first: safetensors wherever a component has them, then PyTorch pickles, then the rest.
WEIGHT_FORMATS: dict[str, int] = {
    ".safetensors": 0,
    ".bin": 1,
    ".pt": 2,
    ".pth": 2,
    ".ckpt": 2,
    ".msgpack": 3,
    ".h5": 3,
    ".onnx": 4,
    ".onnx_data": 4,
    ".pb": 4,
    ".gguf": 5,
}
_INDEX = re.compile(r"(?P<stem>.+?)(?P<fmt>\.safetensors|\.bin)\.index(?:\.(?P<variant>[\w-]+))?\.json")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def pipeline_components(model_index: Mapping[str, Any]) -> dict[str, str]:
    """Component folder → class name, from model_index.json (entries like `"vae": ["diffusers", "AutoencoderKL"]`;
    `[null, null]` marks an optional component that is absent)."""
    components = {}
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list | tuple) or len(value) != 2:
            continue
        if value[0] is not None and value[1] is not None:
            components[name] = str(value[1])
    return components


def _weight_kind(filename: str) -> tuple[bool, int, str] | None:
    """(is a variant, format rank, variant) of a weight file, None for any other file. Shards and their index
    count as their model's weights: `diffusion_pytorch_model.fp16-00001-of-00002.safetensors` is fp16."""
    name = filename.rsplit("/", 1)[-1]
    index = _INDEX.fullmatch(name)
    if index:
        stem, suffix, variant = index["stem"], index["fmt"], index["variant"]
    else:
        suffix = next((s for s in WEIGHT_FORMATS if name.endswith(s)), "")
        if not suffix:
            return None
        stem, variant = name[: -len(suffix)], None
    stem = _SHARD.sub("", stem)
    if variant is None and "." in stem:
        variant = stem.split(".", 1)[1]
    return (variant is not None, WEIGHT_FORMATS[suffix], variant or "")


def select_files(model_index: Mapping[str, Any], filenames: Iterable[str]) -> list[str]:
    """The repo files a pipeline needs: model_index.json, top-level code of a custom pipeline, and in each
    component's folder its configs plus one copy of its weights — the default (non-variant) one in the best
    format present, so a repo shipping safetensors, .bin, ONNX, Flax and fp16 copies costs one download. Other
    top-level files (single-file checkpoints, sample images, READMEs) are left out."""
    components = pipeline_components(model_index)
    filenames = list(filenames)
    chosen = [
        name for name in filenames if "/" not in name and (name == "model_index.json" or name.endswith(".py"))
    ]
    per_component: dict[str, list[str]] = {}
    for name in filenames:
        top = name.split("/", 1)[0]
        if "/" in name and top in components:
            per_component.setdefault(top, []).append(name)
    for names in per_component.values():
        weights = {name: kind for name in names if (kind := _weight_kind(name)) is not None}
        chosen += [name for name in names if name not in weights]
        if weights:
            best = min(weights.values())
            chosen += [name for name, kind in weights.items() if kind == best]
    return sorted(set(chosen))


def _component_kind(class_name: str) -> str:
    if "Scheduler" in class_name:
        return "scheduler"
    if "Tokeniz" in class_name:
        return "tokenizer"
    if "Processor" in class_name or "FeatureExtractor" in class_name:
        return "processor"
    return "model"


def missing_files(folder: Path) -> list[str]:
    """What keeps `folder` from loading as a pipeline: model_index.json, a component's folder, its config, its
    weights or a shard its index names. Empty when complete. Tokenizers, schedulers and processors have no
    weights, only their own files."""
    index_file = folder / "model_index.json"
    try:
        model_index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return ["model_index.json"]
    missing: list[str] = []
    for name, class_name in pipeline_components(model_index).items():
        part = folder / name
        if not part.is_dir():
            missing.append(f"{name}/")
            continue
        # is_file() follows the cache's symlinks: a link to a blob that is not there counts as missing.
        present = {p.relative_to(part).as_posix() for p in part.rglob("*") if p.is_file()}
        kind = _component_kind(class_name)
        if kind == "scheduler" and "scheduler_config.json" not in present:
            missing.append(f"{name}/scheduler_config.json")
        elif kind == "tokenizer" and not present.intersection(TOKENIZER_FILES):
            missing.append(f"{name}/tokenizer files")
        elif kind == "processor" and not present.intersection(PROCESSOR_FILES):
            missing.append(f"{name}/preprocessor_config.json")
        elif kind == "model":
            if "config.json" not in present:
                missing.append(f"{name}/config.json")
            missing += _missing_weights(part, name, present)
    return missing


def _missing_weights(part: Path, name: str, present: set[str]) -> list[str]:
    indexes = [p for p in present if _INDEX.fullmatch(p.rsplit("/", 1)[-1])]
    for index in indexes:
        try:
            shards = set(json.loads((part / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return [f"{name}/{index} (unreadable)"]
        base = index.rsplit("/", 1)[0] + "/" if "/" in index else ""
        lost = sorted(f"{name}/{base}{shard}" for shard in shards if base + shard not in present)
        if lost:
            return lost
    has_weights = any(
        _weight_kind(p) is not None and not _INDEX.fullmatch(p.rsplit("/", 1)[-1]) for p in present
    )
    return [] if has_weights else [f"{name}/ (no weights)"]
