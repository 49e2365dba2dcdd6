"""The device-side uint8 conversion gives diffusers' own pixels; the decode clock splits a call's time."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from diffuserve.engine.frames import DecodeClock, to_uint8


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


class FakeVae:
    def decode(self, latents: Any) -> Any:
        time.sleep(0.02)
        return latents


class FakePipeline:
    def __init__(self) -> None:
        self.vae = FakeVae()

    def __call__(self) -> None:
        time.sleep(0.01)
        self.vae.decode(None)


def test_decode_clock_times_from_the_vae_call_and_wraps_once() -> None:
    pipe = FakePipeline()
    clock = DecodeClock(pipe, "cpu")
    DecodeClock(pipe, "cpu")  # a second clock on the same pipeline must not wrap the wrapper
    assert getattr(pipe.vae.decode, "_diffuserve_clock", False)
    clock.start()
    assert clock.decode_ms(clock.finished()) == 0.0, "nothing decoded yet"
    pipe()
    ms = clock.decode_ms(clock.finished())
    assert 15 <= ms < 1000
