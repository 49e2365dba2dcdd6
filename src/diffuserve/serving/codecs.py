"""Image codecs (WebP, PNG, JPEG) for uint8 pixel arrays, run by the worker's encoder stage off the device's path."""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from concurrent.futures import Executor

import numpy as np
from PIL import Image

from diffuserve.types import image_quality

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# libwebp's effort 0-6. Pillow's default 4 took 211 ms at 1024² on the H100 host and 2 took 53 ms, for a file
# no larger; docs/design/serving.md has the measured choice between the fast efforts.
WEBP_METHOD = 0
# zlib level when the client gives no output_compression: the fastest that still compresses.
DEFAULT_PNG_LEVEL = 1
# PNG rows are deflated in this many independent pieces at most (pigz's scheme): one core each.
PNG_PIECES = 8
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_pixels(
    pixels: np.ndarray,
    output_format: str,
    compression: int | None = None,
    *,
    pool: Executor | None = None,
) -> bytes:
    """Encode one H×W×3 uint8 image. `compression` is OpenAI's output_compression, which only JPEG and WebP
    use: the encoder's quality, so 100 (OpenAI's default) is the best quality and lower values give smaller
    files. PNG is lossless whatever it says. `pool` lets PNG deflate in parallel."""
    if output_format == "png":
        return encode_png(pixels, DEFAULT_PNG_LEVEL, pool=pool)
    if output_format not in ("jpeg", "webp"):
        raise ValueError(f"unsupported output_format {output_format!r}")
    quality = image_quality(compression)
    extra = {"method": WEBP_METHOD} if output_format == "webp" else {}
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format=output_format.upper(), quality=quality, **extra)
    return buffer.getvalue()


def encode_png(pixels: np.ndarray, level: int, *, pool: Executor | None = None) -> bytes:
    """An RGB PNG whose image data is deflated in independent pieces on several cores.

    Pillow deflates a whole image on one core: about 100 ms for a 1024² photo even at zlib level 1, longer than
    the rest of a FLUX.1-schnell request's serving path. Each piece here is a raw deflate stream ended by a
    sync flush (pigz's way), so their concatenation is one valid zlib stream that any PNG decoder reads.
    Rows use PNG's "up" filter, computed in one vectorised pass: close to Pillow's adaptive choice in size on
    photos, and with it the pixels stay exactly the same (PNG is lossless).
    """
    height, width, channels = pixels.shape
    if channels != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected H×W×3 uint8 pixels, got {pixels.shape} {pixels.dtype}")
    filtered = np.empty((height, 1 + width * 3), dtype=np.uint8)
    rows = pixels.reshape(height, width * 3)
    filtered[:, 0] = 2  # filter type "up": each byte minus the byte above it (mod 256)
    filtered[0, 0] = 0  # the first row has nothing above it
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    raw = filtered.reshape(-1)
    pieces = _split_rows(height, 1 + width * 3, PNG_PIECES if pool is not None else 1)
    chunks = [raw[start:stop] for start, stop in pieces]
    last = len(chunks) - 1
    if pool is not None and len(chunks) > 1:
        compressed = list(pool.map(lambda ic: _deflate(ic[1], level, ic[0] == last), enumerate(chunks)))
    else:
        compressed = [_deflate(chunk, level, index == last) for index, chunk in enumerate(chunks)]
    # zlib framing: header for a 32 KiB window (level bits left as "default", which decoders ignore) and the
    # Adler-32 of all raw bytes.
    stream = b"\x78\x01" + b"".join(compressed) + struct.pack(">I", zlib.adler32(raw.data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def _split_rows(height: int, row_bytes: int, pieces: int) -> list[tuple[int, int]]:
    # Pieces of at least 64 KiB: smaller ones cost more in per-call overhead and lost context than they save.
    pieces = max(1, min(pieces, height, (height * row_bytes) // 65536 or 1))
    bounds = [round(i * height / pieces) * row_bytes for i in range(pieces + 1)]
    return list(itertools.pairwise(bounds))


def _deflate(data: np.ndarray, level: int, final: bool) -> bytes:
    deflater = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: the zlib frame is written once
    body = deflater.compress(data.data)
    return body + deflater.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
