"""Encoders for a whole batch: the CPU's images in parallel threads, and JPEG on the GPU (nvJPEG) where it runs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from diffuserve.engine.encode import PNG_PIECES, encode_pixels, quality_for

log = logging.getLogger(__name__)

# Below this many pixels an image encodes in well under a millisecond: handing it to a thread costs more.
SMALL_IMAGE_PIXELS = 256 * 256

GpuJpegEncoder = Callable[[Any, Sequence[int], Sequence[int | None]], dict[int, bytes]]


class BatchEncoder:
    """Encodes a batch's images, each in its own format. Pillow's encoders and zlib release the GIL, so
    threads use several cores: one image per thread, and a PNG's deflate pieces on a second pool (a second
    pool, so an image's thread never waits on a pool its own siblings fill)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or min(8, len(os.sched_getaffinity(0)))
        self._images: ThreadPoolExecutor | None = None
        self._pieces: ThreadPoolExecutor | None = None

    def encode(
        self,
        pixels: np.ndarray,
        formats: Sequence[tuple[str, int | None]],
        done: dict[int, bytes] | None = None,
    ) -> list[bytes]:
        """One encoded image per row of `pixels` (N×H×W×3 uint8); `done` holds images already encoded."""
        done = done or {}
        todo = [i for i in range(len(formats)) if i not in done]
        small = pixels.shape[1] * pixels.shape[2] <= SMALL_IMAGE_PIXELS
        if small or self.threads == 1:
            fresh = {i: encode_pixels(pixels[i], *formats[i]) for i in todo}
        else:
            images, pieces = self._pools()
            results = images.map(lambda i: encode_pixels(pixels[i], *formats[i], pool=pieces), todo)
            fresh = dict(zip(todo, results, strict=True))
        return [done[i] if i in done else fresh[i] for i in range(len(formats))]

    def _pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        if self._images is None or self._pieces is None:
            self._images = ThreadPoolExecutor(self.threads, thread_name_prefix="encode")
            self._pieces = ThreadPoolExecutor(min(self.threads, PNG_PIECES), thread_name_prefix="deflate")
        return self._images, self._pieces


def gpu_jpeg_encoder(device: str) -> GpuJpegEncoder | None:
    """torchvision's nvJPEG encoder for a CUDA worker, or None where it can't run (CPU, no torchvision, a
    torchvision without GPU encoding): those JPEGs are then encoded on the CPU."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch
        from torchvision.io import encode_jpeg
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None

    def encode(pixels: Any, indices: Sequence[int], compressions: Sequence[int | None]) -> dict[int, bytes]:
        # One call per quality (the encoder takes one); a list of CHW uint8 tensors is encoded as a batch.
        # The copy to the host synchronises with the encoder's stream before the bytes are read.
        out: dict[int, bytes] = {}
        by_quality: dict[int, list[int]] = {}
        for index, compression in zip(indices, compressions, strict=True):
            quality = quality_for(compression)
            by_quality.setdefault(quality, []).append(index)
        for quality, group in by_quality.items():
            encoded = encode_jpeg([pixels[i].contiguous() for i in group], quality=quality)
            for index, data in zip(group, encoded, strict=True):
                out[index] = data.cpu().numpy().tobytes()
        return out

    failed = False

    def safe_encode(
        pixels: Any, indices: Sequence[int], compressions: Sequence[int | None]
    ) -> dict[int, bytes]:
        nonlocal failed
        if failed:
            return {}
        try:
            return encode(pixels, indices, compressions)
        except RuntimeError as exc:  # a torchvision built without nvJPEG: the CPU encodes JPEGs from now on
            log.warning("GPU JPEG encoding failed (%s); encoding JPEGs on the CPU from now on", exc)
            failed = True
            return {}

    return safe_encode
