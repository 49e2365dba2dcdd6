"""A pipeline's output as uint8 pixels in host memory, converted on the device, with the decode step timed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

# The attribute by which a wrapper of a VAE's `decode` names what it wraps, so the undecorated decode can be
# found again. (Not `__wrapped__`: diffusers' own decorators set that to the unbound function.)
INNER_DECODE = "_diffuserve_inner"


def plain_decode(vae: Any) -> Callable[..., Any]:
    """The VAE's decode without this project's wrappers (the clock, a group's joint decode): what a decode
    that is not the batch's final one (a preview) calls, on one rank, unclocked."""
    decode: Callable[..., Any] = vae.decode
    while (inner := getattr(decode, INNER_DECODE, None)) is not None:
        decode = inner
    return decode


def to_uint8(images: Any) -> tuple[np.ndarray, Any]:
    """N×H×W×3 uint8 pixels in host memory from what a pipeline returned — a [0, 1] tensor (N×3×H×W, on any
    device), a [0, 1] float array (N×H×W×3) or PIL images — and, for a tensor, the N×3×H×W uint8 tensor
    still on its device (for device-side encoders), else None.

    The arithmetic is diffusers' own `numpy_to_pil` (×255 in float32, round half to even), done where the
    tensor lives: the same pixels, without a float32 copy of the batch crossing to the host first.
    """
    import torch

    if isinstance(images, torch.Tensor):
        on_device = (images.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
        return on_device.permute(0, 2, 3, 1).contiguous().cpu().numpy(), on_device
    if isinstance(images, np.ndarray):
        return np.clip(np.round(images.astype(np.float32) * 255), 0, 255).astype(np.uint8), None
    return np.stack([np.asarray(image.convert("RGB")) for image in images]), None


class DecodeClock:
    """Marks when the pipeline starts decoding latents, by wrapping its VAE's `decode`, so a batch's time splits
    into denoise (text encoders and the denoising loop) and decode (VAE, post-processing, copy to host).

    On CUDA the mark is an event on the stream, so reading it costs no synchronisation; elsewhere a host clock.
    """

    def __init__(self, pipeline: Any, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._mark: Any = None
        vae = getattr(pipeline, "vae", None)
        decode = getattr(vae, "decode", None)
        if vae is not None and decode is not None and not getattr(decode, "_diffuserve_clock", False):
            vae.decode = self._wrap(decode)

    def _wrap(self, decode: Callable[..., Any]) -> Callable[..., Any]:
        def timed_decode(*args: Any, **kwargs: Any) -> Any:
            if self._mark is None:  # tiled or sliced decoding calls in several times: the first one counts
                self._mark = self._now()
            return decode(*args, **kwargs)

        timed_decode._diffuserve_clock = True  # type: ignore[attr-defined]
        # Previews decode through the original, so only the batch's final decode sets the mark.
        setattr(timed_decode, INNER_DECODE, decode)
        return timed_decode

    def _now(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._mark = None

    def decode_ms(self, finished: Any) -> float:
        """Milliseconds from the decode mark to `finished` (an event recorded after the host copy, or a
        perf_counter value); 0 when the pipeline never decoded (a latent output, or no VAE)."""
        if self._mark is None:
            return 0.0
        if self.cuda:
            finished.synchronize()
            return float(self._mark.elapsed_time(finished))
        return (finished - self._mark) * 1000

    def finished(self) -> Any:
        """A mark after the batch's pixels reached the host (the copy in `to_uint8` synchronises)."""
        return self._now()
