"""The device-side uint8 conversion gives diffusers' own pixels; the step marks split a call's time."""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from diffuserve.engine.calls import StepMarks, step_callback
from diffuserve.engine.frames import to_uint8


def test_tensor_conversion_matches_diffusers_pil_output() -> None:
    images = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.5 / 255, 254.5 / 255])  # edges and exact halves
    for dtype in (torch.float32, torch.bfloat16):
        source = images.to(dtype)
        expected = np.stack(
            [np.asarray(p) for p in VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(source))]
        )
        pixels, on_device = to_uint8(source)
        assert pixels.dtype == np.uint8 and pixels.shape == (3, 16, 24, 3)
        assert np.array_equal(pixels, expected)
        assert on_device.shape == (3, 3, 16, 24)


def test_numpy_and_pil_outputs_convert_too() -> None:
    array = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    pixels, on_device = to_uint8(array)
    assert on_device is None
    assert np.array_equal(pixels, (array * 255).round().astype(np.uint8))
    pils = [Image.fromarray(p) for p in pixels]
    assert np.array_equal(to_uint8(pils)[0], pixels)


def test_decode_time_runs_from_the_last_step_end_to_the_pixels_in_host_memory() -> None:
    marks = StepMarks(cuda=False)
    assert marks.since_last_step_ms() == 0.0, "no step ended yet"
    callback = step_callback(marks, None, None)
    tensors = {"latents": torch.zeros(1)}
    for step in range(3):
        time.sleep(0.01)
        assert callback(None, step, None, tensors) is tensors
    time.sleep(0.02)  # the decode
    assert 15 <= marks.since_last_step_ms() < 1000
