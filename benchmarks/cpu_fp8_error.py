"""Where tier L's fp8 error comes from, on the trained digits model, on CPU: the linears tier L quantizes are
swapped for an emulation of its kernel (torchao's dynamic fp8 e4m3 with row-wise scales: each weight row and
each activation row scaled to e4m3's range and rounded, products summed in float32, the result in bf16), in
groups, and each group's images are compared with bf16 eager's (the same prompts and seeds).

    python benchmarks/cpu_fp8_error.py --out docs/bench      # writes cpu-fp8-error.json (~1 minute on 2 cores)

Rows: every quantized linear (what tier L runs), the same without the AdaLN products, weights alone rounded,
activations alone, each kind of layer alone (its name with the block index as N), and the same swap with no
rounding at all (float32 sums in bf16: the floor any change of kernel gives).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common import environment, log, out_dir, write_json
from diffuserve.engine.calls import calibration_calls
from diffuserve.engine.config import DType, EngineConfig, Weights
from diffuserve.engine.engine import Engine
from diffuserve.engine.tiers.calibrate import calibrate_fp8
from diffuserve.engine.tiers.quantize import quantizable_linears
from diffuserve.models.digits.prompts import eval_prompt
from diffuserve.types import TINY_FLUX, Tier

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
# The AdaLN modulation products (shift, scale and gate of each block's norms): the engine computes them once per
# call for all its steps (tiers.modulation), so keeping them in bf16 would cost one read of their weights a call.
ADALN = ("norm1.linear", "norm1_context.linear", "norm.linear")


def round_rows(values: torch.Tensor) -> torch.Tensor:
    """Each row scaled so its largest magnitude is e4m3's largest, rounded to e4m3, scaled back (float32)."""
    scale = values.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (values.float() / scale).to(torch.float8_e4m3fn).float() * scale


class EmulatedFp8Linear(nn.Module):
    """`linear` as tier L's kernel computes it: rounded operands, float32 sums, output in the input's dtype."""

    def __init__(self, linear: nn.Linear, weights: bool, activations: bool) -> None:
        super().__init__()
        self.linear = linear
        self.activations = activations
        weight = linear.weight.detach()
        self.weight = round_rows(weight) if weights else weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = (round_rows(rows) if self.activations else rows.float()) @ self.weight.T
        if self.linear.bias is not None:
            y = y + self.linear.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def layer_kind(name: str) -> str:
    """The name with its block's index as N."""
    return re.sub(r"^(\w+)\.\d+\.", r"\1.N.", name)


def swapped(
    model: nn.Module, chosen: set[int], take: Callable[[str], bool], weights: bool, activations: bool
) -> Any:
    """Swap the chosen linears whose name `take` accepts; returns the undo list."""
    undo = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) in chosen and take(name):
                setattr(parent, child_name, EmulatedFp8Linear(child, weights, activations))
                undo.append((parent, child_name, child))
    return undo


def restore(layers: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.copy_(weights[name])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-class", type=int, default=10, help="prompts per digit")
    parser.add_argument("--steps", default="4,28")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = out_dir(args.out)
    torch.manual_seed(0)

    config = EngineConfig(
        model_repo="digits", model_name="digits", tier=Tier.E, max_batch=10 * args.per_class,
        weights=Weights.PRETRAINED, dtype=DType.BFLOAT16, warmup=False,
    )  # fmt: skip
    engine = Engine(config, "cpu")
    engine.load()
    pipeline = engine.pipeline
    denoiser = pipeline.transformer
    tier_l = quantizable_linears(denoiser)  # what tier L rounds
    prompts = [eval_prompt(d, i) for i, d in enumerate(d for d in range(10) for _ in range(args.per_class))]

    def images(steps: int) -> torch.Tensor:
        return pipeline(
            prompt=prompts, height=TINY_FLUX.native_size, width=TINY_FLUX.native_size,
            guidance_scale=TINY_FLUX.default_guidance, max_sequence_length=TINY_FLUX.max_sequence_length,
            num_inference_steps=steps, output_type="pt",
            generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
        ).images.float()  # fmt: skip

    # FP8_ROUNDING=calibrated as the engine does it (its calibration prompts, not the ones measured here).
    originals = {name: layer.weight.detach().clone() for name, layer in tier_l.items()}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        calibration = calibration_calls(pipeline, TINY_FLUX, 10)
        calibrate_fp8(tier_l, calibration.run, cache_dir=cache_dir, context=calibration.context, notes=notes)
    log(notes[-1])
    calibrated = {name: layer.weight.detach().clone() for name, layer in tier_l.items()}
    restore(tier_l, originals)

    variants: list[tuple[str, dict[str, nn.Linear], Callable[[str], bool], bool, bool]] = [
        ("tier L (FP8_ROUNDING=nearest)", tier_l, lambda _: True, True, True),
        ("tier L (FP8_ROUNDING=calibrated)", tier_l, lambda _: True, True, True),
        ("tier L, weights only (nearest)", tier_l, lambda _: True, True, False),
        ("tier L, weights only (calibrated)", tier_l, lambda _: True, True, False),
        ("tier L (calibrated), AdaLN products in bf16", tier_l, lambda n: not n.endswith(ADALN), True, True),
        ("tier L, activations only", tier_l, lambda _: True, False, True),
        ("tier L, no rounding (kernel change only)", tier_l, lambda _: True, False, False),
    ]
    kinds = sorted({layer_kind(name) for name in tier_l})
    variants += [(kind, tier_l, lambda n, kind=kind: layer_kind(n) == kind, True, True) for kind in kinds]
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        reference = images(steps)
        for label, layers, take, weights, activations in variants:
            if "calibrated" in label:
                restore(tier_l, calibrated)
            undo = swapped(denoiser, {id(layer) for layer in layers.values()}, take, weights, activations)
            result = images(steps)
            for parent, child_name, child in undo:
                setattr(parent, child_name, child)
            restore(tier_l, originals)
            error = float((result - reference).norm() / reference.norm())
            rows.append({"variant": label, "steps": steps, "layers": len(undo), "rel_err_vs_E": error})
            log(f"{steps} steps, {label}: {len(undo)} layers, {100 * error:.2f} %")
    write_json(
        out / "cpu-fp8-error.json",
        {
            "environment": environment(),
            "prompts": len(prompts),
            "calibration": notes[-1],
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
