"""The engine's GPU serving path: nvJPEG output is correct and stable, and a seed gives the same image alone or in
a batch in every output format."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from benchmarks.common import photo_mosaic
from PIL import Image

from diffuserve.engine.frames import gpu_jpeg_encoder
from diffuserve.serving.codecs import encode_pixels
from diffuserve.types import BatchItem, BatchJob, Tier
from tests.helpers import engine_config, run_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def psnr(data: bytes, source: np.ndarray) -> float:
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)
    mse = float(((decoded - source) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_gpu_jpeg_is_close_to_its_source_and_stable_while_other_streams_run() -> None:
    encode = gpu_jpeg_encoder("cuda:0")
    assert encode is not None
    pictures = np.stack([photo_mosaic(512), np.ascontiguousarray(photo_mosaic(512)[::-1])])
    first = None
    stop = threading.Event()

    def busy() -> None:  # other kernels on another stream while the encoder runs
        stream = torch.cuda.Stream()
        a = torch.randn(2048, 2048, device="cuda")
        with torch.cuda.stream(stream):
            while not stop.is_set():
                (a @ a).sum().item()

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        for _ in range(20):
            # Written on the default stream just before the encode, as the engine's uint8 conversion is.
            pixels = torch.from_numpy(pictures).cuda().permute(0, 3, 1, 2).contiguous()
            # The default quality, and output_compression 80 (JPEG quality 80, as OpenAI's scale reads).
            out = encode(pixels, [0, 1], [None, 80])
            if first is None:
                first = out
            assert out == first
    finally:
        stop.set()
        thread.join()
    assert first is not None
    for index, source in enumerate(pictures):
        assert first[index][:2] == b"\xff\xd8"
        # The CPU encoder at the same quality gives about 35 dB on this photo.
        assert psnr(first[index], source) > 30
        assert psnr(first[index], source) > psnr(encode_pixels(source, "jpeg"), source) - 3


@pytest.fixture(scope="module")
def engine() -> object:
    from diffuserve.engine.engine import Engine

    # Tier E: diffusers as it is, no compile, so the test measures the serving path and nothing else.
    engine = Engine(engine_config(tier=Tier.E, max_batch=4), "cuda:0")
    engine.load()
    return engine


def job(seeds_and_formats: list[tuple[int, str]]) -> BatchJob:
    items = [
        BatchItem(f"r{i}", "the digit 7", None, [seed], fmt, None)
        for i, (seed, fmt) in enumerate(seeds_and_formats)
    ]
    return BatchJob(1, 32, 32, 4, 0.0, items)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def test_same_seed_same_image_alone_or_in_a_batch_in_every_format(engine: object) -> None:
    from diffuserve.engine.engine import Engine

    assert isinstance(engine, Engine)
    batch = run_engine(engine, job([(5, "png"), (6, "jpeg"), (7, "webp"), (8, "png")]))
    assert batch.error is None
    for (seed, fmt), images in zip(
        [(5, "png"), (6, "jpeg"), (7, "webp"), (8, "png")], batch.images, strict=True
    ):
        alone = run_engine(engine, job([(seed, fmt)]))
        assert alone.error is None
        assert alone.images[0][0].data == images[0].data, f"seed {seed} {fmt} differs alone vs in a batch"
    # The GPU JPEG of an image is within JPEG noise of its lossless pixels.
    png = decode(run_engine(engine, job([(6, "png")])).images[0][0].data)
    jpeg = decode(batch.images[1][0].data)
    assert np.abs(png - jpeg).mean() < 8


def test_device_and_encode_times_are_reported(engine: object) -> None:
    from diffuserve.engine.engine import Engine

    assert isinstance(engine, Engine)
    result = run_engine(engine, job([(1, "webp"), (2, "png")]))
    assert result.error is None
    assert result.denoise_ms > 0 and result.decode_ms > 0 and result.encode_ms > 0
    assert result.inference_ms == pytest.approx(result.denoise_ms + result.decode_ms)
