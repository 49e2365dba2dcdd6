"""A pipeline's output as uint8 pixels in host memory, converted on the device; JPEGs encoded on the GPU
(nvJPEG) where the worker has one; the VAE's plain decode under a group's joint one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from diffuserve.types import image_quality

log = logging.getLogger(__name__)

GpuJpegEncoder = Callable[[Any, Sequence[int], Sequence[int | None]], dict[int, bytes]]

# The attribute by which a wrapper of a VAE's `decode` names what it wraps, so the undecorated decode can be
# found again. (Not `__wrapped__`: diffusers' own decorators set that to the unbound function.)
INNER_DECODE = "_diffuserve_inner"


def plain_decode(vae: Any) -> Callable[..., Any]:
    """The VAE's decode without a group's joint decode around it: what a preview, decoded by the leader
    alone, calls."""
    return getattr(vae.decode, INNER_DECODE, vae.decode)  # type: ignore[no-any-return]


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


def gpu_jpeg_encoder(device: str) -> GpuJpegEncoder | None:
    """torchvision's nvJPEG encoder for a CUDA worker, or None where it can't run (CPU, no torchvision); a
    torchvision without GPU encoding fails once, and the CPU encodes JPEGs from then on."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch
        from torchvision.io import encode_jpeg
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    broken: list[str] = []

    def encode(pixels: Any, indices: Sequence[int], compressions: Sequence[int | None]) -> dict[int, bytes]:
        # One call per quality (the encoder takes one); the copy to the host waits for the encoder's stream.
        by_quality: dict[int, list[int]] = {}
        for index, compression in zip(indices, compressions, strict=True):
            by_quality.setdefault(image_quality(compression), []).append(index)
        out: dict[int, bytes] = {}
        try:
            for quality, group in [] if broken else by_quality.items():
                encoded = encode_jpeg([pixels[i].contiguous() for i in group], quality=quality)
                out.update((i, data.cpu().numpy().tobytes()) for i, data in zip(group, encoded, strict=True))
        except RuntimeError as exc:
            log.warning("GPU JPEG encoding failed (%s); encoding JPEGs on the CPU from now on", exc)
            broken.append(str(exc))
            return {}
        return out

    return encode
