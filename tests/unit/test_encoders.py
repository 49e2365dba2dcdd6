"""Encoders: the parallel PNG is lossless and valid at any size, a batch encodes as each image would alone."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from benchmarks.common import noise_picture, photo_mosaic
from PIL import Image

from diffuserve.engine.frames import gpu_jpeg_encoder
from diffuserve.serving.codecs import encode_pixels, encode_png
from diffuserve.serving.image_encoder import BatchEncoder


def decoded(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()  # a truncated or corrupt stream fails here, not later
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("shape", [(1, 1), (1, 700), (17, 33), (256, 256), (601, 333)])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_png_is_lossless_in_one_piece_and_in_parallel_pieces(shape: tuple[int, int], level: int) -> None:
    pixels = np.random.default_rng(shape[0] * 7 + level).integers(0, 256, (*shape, 3), dtype=np.uint8)
    with ThreadPoolExecutor(4) as pool:
        for data in (encode_png(pixels, level), encode_png(pixels, level, pool=pool)):
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
            assert np.array_equal(decoded(data), pixels)


def test_png_of_a_photo_is_no_larger_than_a_few_percent_over_pillows() -> None:
    pixels = photo_mosaic(512)
    ours = encode_png(pixels, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    assert np.array_equal(decoded(ours), pixels)
    assert len(ours) < 1.05 * len(buffer.getvalue())


def test_png_rejects_what_is_not_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32), 1)


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_output_compression_is_quality_as_openai_means_it(fmt: str) -> None:
    """OpenAI's output_compression defaults to 100, its best quality: 100 is the largest, truest file here too,
    and lower values compress more."""
    pixels = photo_mosaic(256)
    best, default, small = (encode_pixels(pixels, fmt, c) for c in (100, None, 10))
    assert len(best) > len(default) > len(small)
    error = {c: np.abs(decoded(encode_pixels(pixels, fmt, c)).astype(int) - pixels).mean() for c in (100, 10)}
    assert error[100] < error[10]


def test_png_is_lossless_whatever_the_compression() -> None:
    pixels = photo_mosaic(64)
    for compression in (None, 0, 100):
        assert np.array_equal(decoded(encode_pixels(pixels, "png", compression)), pixels)


def test_a_batch_encodes_each_image_as_it_would_alone_in_the_same_order() -> None:
    pixels = np.stack([noise_picture(300, seed=s) for s in range(4)])
    formats: list[tuple[str, int | None]] = [("png", None), ("webp", None), ("jpeg", 20), ("png", 90)]
    alone = [encode_pixels(p, *f) for p, f in zip(pixels, formats, strict=True)]
    for threads in (4, 1):
        batch = BatchEncoder(threads=threads).encode(pixels, formats)
        # Lossy formats: the same bytes. PNG: the same pixels (in parallel its data is deflated in pieces).
        assert [batch[1], batch[2]] == [alone[1], alone[2]]
        for index in (0, 3):
            assert np.array_equal(decoded(batch[index]), pixels[index])
        assert BatchEncoder(threads=threads).encode(pixels, formats) == batch, "deterministic bytes"
    # Images the device already encoded are kept as they are.
    assert BatchEncoder().encode(pixels, formats, done={2: b"from the gpu"})[2] == b"from the gpu"


def test_no_gpu_jpeg_encoder_without_cuda() -> None:
    assert gpu_jpeg_encoder("cpu") is None
