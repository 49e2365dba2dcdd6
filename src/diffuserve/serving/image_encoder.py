"""The worker's CPU encoding: a batch's pixels in each image's format, in parallel threads, into the results
and previews sent to the server."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from diffuserve.messages import BatchResult, DeviceBatch, PartialImages, PreviewBatch
from diffuserve.serving.codecs import MEDIA_TYPES, PNG_PIECES, encode_pixels
from diffuserve.types import EncodedImage

log = logging.getLogger(__name__)

# Below this many pixels an image encodes in well under a millisecond: handing it to a thread costs more.
SMALL_IMAGE_PIXELS = 256 * 256


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

    def encode_batch(self, batch: DeviceBatch) -> BatchResult:
        """Every image of a batch in its requested format, grouped back by request; an encoder failure fails
        this batch only."""
        job = batch.job
        started = time.perf_counter()
        try:
            encoded = self.encode(batch.pixels, job.formats, done=batch.device_encoded)
        except Exception as exc:
            log.exception("encoding batch %s failed", job.batch_id)
            return BatchResult(batch_id=job.batch_id, error=f"{type(exc).__name__}: {exc}")
        result = BatchResult(
            batch_id=job.batch_id,
            inference_ms=batch.inference_ms,
            denoise_ms=batch.denoise_ms,
            decode_ms=batch.decode_ms,
            encode_ms=(time.perf_counter() - started) * 1000 + batch.device_encode_ms,
            text_tokens=batch.text_tokens,
            adapter_loads=batch.adapter_loads,
            adapter_hits=batch.adapter_hits,
            prompt_hits=batch.prompt_hits,
            prompt_misses=batch.prompt_misses,
        )
        cursor = 0
        for item in job.items:
            media_type = MEDIA_TYPES[item.output_format]
            result.images.append(
                [EncodedImage(encoded[cursor + i], seed, media_type) for i, seed in enumerate(item.seeds)]
            )
            cursor += len(item.seeds)
        return result

    def encode_previews(self, batch: PreviewBatch) -> list[PartialImages]:
        """A step's previews in each item's output format, one message per item. A preview that cannot be
        encoded is left out (its request still gets its final image)."""
        messages = []
        for preview in batch.previews:
            item = batch.job.items[preview.item_index]
            formats = [(item.output_format, item.output_compression)] * len(preview.pixels)
            try:
                encoded = self.encode(preview.pixels, formats)
            except Exception:
                log.exception("a preview of batch %s could not be encoded", batch.job.batch_id)
                continue
            media_type = MEDIA_TYPES[item.output_format]
            images = [
                EncodedImage(data, seed, media_type) for data, seed in zip(encoded, item.seeds, strict=True)
            ]
            messages.append(
                PartialImages(batch.job.batch_id, preview.item_index, preview.partial_index, images)
            )
        return messages
