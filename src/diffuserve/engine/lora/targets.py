"""Which of the denoiser's linear layers adapters may change, and where each sits once the tier fused some."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# The AdaLN modulation layers: the tiers compute them once per call for every step (tiers.modulation), and
# adapters rarely train them. Names holding one of these parts are not adapted.
MODULATION_PARTS = ("norm", "_mod.", "adaLN", "modulation")
# A fused projection and the layers it stands for, in the order of its output (tiers.kernels.fuse_qkv).
FUSED = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def lora_targets(model: nn.Module, blocks: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every linear layer inside the repeated blocks but the modulation ones: name → (in, out). Read before
    the tier runs: fusing empties the separate projections."""
    kinds = set(getattr(model, "_repeated_blocks", None) or blocks)
    targets: dict[str, tuple[int, int]] = {}
    for prefix, block in model.named_modules():
        if type(block).__name__ not in kinds:
            continue
        for name, child in block.named_modules():
            if isinstance(child, nn.Linear) and not any(part in name for part in MODULATION_PARTS):
                targets[f"{prefix}.{name}"] = (child.in_features, child.out_features)
    return targets


@dataclass(frozen=True)
class Host:
    """A linear layer that runs in the model and the adapted layers whose outputs it computes (one, or the
    parts of a fused projection in output order)."""

    name: str
    module: nn.Linear
    parts: tuple[str, ...]


def hosts(model: nn.Module, targets: dict[str, tuple[int, int]]) -> list[Host]:
    """The layers that carry the targets' adapters in the model as it runs now (after fusing)."""
    modules = dict(model.named_modules())
    found: list[Host] = []
    hosted: set[str] = set()
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in FUSED and getattr(modules.get(parent), "fused_projections", False):
            parts = tuple(f"{parent}.{part}" for part in FUSED[leaf] if f"{parent}.{part}" in targets)
            if parts:
                found.append(Host(name, module, parts))
                hosted.update(parts)
    for name in targets:
        if name in hosted:
            continue
        module = modules.get(name)
        if isinstance(module, nn.Linear) and module.weight.numel() > 0:
            found.append(Host(name, module, (name,)))
            hosted.add(name)
    return found
