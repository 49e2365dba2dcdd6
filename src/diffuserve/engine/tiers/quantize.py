"""fp8 weights and activations (torchao, row-wise scales) for the linear layers of the repeated blocks."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# fp8 matmuls (torch._scaled_mm) need Ada or Hopper tensor cores: compute capability 8.9 or newer.
MIN_CAPABILITY = (8, 9)


def fp8_available(device: str) -> tuple[bool, str]:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False, f"no fp8 matmul kernel on {device}"
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < MIN_CAPABILITY:
        return False, f"GPU compute capability {capability} has no fp8 tensor cores (needs 8.9+)"
    try:
        import torchao  # noqa: F401
    except ImportError:
        from diffuserve.extras import install_command

        return False, f"torchao is not installed ({install_command('gpu')})"
    return True, ""


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """Linear layers inside the repeated blocks, by name: they hold nearly all FLOPs; embedders and the output
    projection keep the pipeline's dtype (small, and the most sensitive to rounding). Names containing a part
    of `skip` are left out too."""
    names = set(getattr(model, "_repeated_blocks", None) or [])
    chosen: dict[str, nn.Linear] = {}
    seen: set[int] = set()  # a block nested in another repeated block lists its layers once
    for block_name, module in model.named_modules():
        if type(module).__name__ not in names:
            continue
        for name, child in module.named_modules():
            if (
                isinstance(child, nn.Linear)
                and id(child) not in seen
                and not any(part in name for part in skip)
                and child.weight.numel() > 0
                # _scaled_mm wants both matrix sides in multiples of 16.
                and child.in_features % 16 == 0
                and child.out_features % 16 == 0
            ):
                chosen[f"{block_name}.{name}"] = child
                seen.add(id(child))
    return chosen


def quantize_fp8(model: nn.Module, layers: dict[str, nn.Linear], notes: list[str]) -> bool:
    """Dynamic fp8 (e4m3) row-wise quantization of `layers` in place (`fp8_available` said yes). Only pays off
    when compiled: torchao's eager path quantizes activations in separate kernels (measured 403 ms/step eager
    vs 110 compiled on FLUX.1-dev)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    if not layers:
        notes.append(
            f"fp8: skipped, no quantizable linear layers in {type(model).__name__}'s repeated blocks"
        )
        return False
    chosen = {id(layer) for layer in layers.values()}
    params = sum(int(layer.weight.numel()) for layer in layers.values())
    quantize_(
        model,
        # set_inductor_config=False: torchao's recommended settings turn on coordinate-descent tuning, which
        # made the regional compile of FLUX take over 5 minutes on an H100 (seen in the first GPU run).
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
        filter_fn=lambda module, _fqn: id(module) in chosen,
    )
    notes.append(f"fp8 e4m3 row-wise (torchao): {len(chosen)} linear layers, {params / 1e9:.2f} B weights")
    return True
