"""FP8_ROUNDING=calibrated on a GPU with fp8: torchao's own quantization finds GPTQ's codes in the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffuserve.engine.calls import calibration_calls
from diffuserve.engine.tiers.calibrate import calibrate_fp8, fingerprint
from diffuserve.engine.tiers.quantize import fp8_available, quantizable_linears, quantize_fp8
from diffuserve.models.tiny_flux import build_tiny_flux
from diffuserve.types import TINY_FLUX

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_torchao_quantizes_calibrated_weights_to_exactly_the_cached_codes(tmp_path: Path) -> None:
    if not fp8_available("cuda")[0]:
        pytest.skip(fp8_available("cuda")[1])
    from safetensors.torch import load_file

    pipe = build_tiny_flux().to("cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    layers = quantizable_linears(model)
    calibration = calibration_calls(pipe, TINY_FLUX, 4)
    key = fingerprint(layers, calibration.context)
    notes: list[str] = []
    calibrate_fp8(layers, calibration.run, cache_dir=str(tmp_path), context=calibration.context, notes=notes)
    stored = load_file(str(tmp_path / "fp8-rounding" / f"{key}.safetensors"))
    assert quantize_fp8(model, layers, notes)
    for name, layer in layers.items():
        qdata = layer.weight.qdata  # torchao's Float8Tensor
        assert torch.equal(qdata.float().cpu(), stored[f"{name}.codes"].float()), name
