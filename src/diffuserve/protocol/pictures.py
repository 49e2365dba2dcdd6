"""Uploaded pictures and masks for edits: checked from their headers (format, pixels, sides, shape, a JPEG's
scans) before any pixel is made, then decoded by Pillow straight to the output size, every failure a 400 naming
its field; a decoding called off stops at Pillow's next read of the file."""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from diffuserve.errors import InvalidRequest
from diffuserve.protocol.generation import snap_size
from diffuserve.types import ModelInfo

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
# Encoders write at most about a dozen scans (libjpeg's progressive script: 10 for colour, 6 for grey). Each
# scan is a pass over every block of the picture, so thousands of tiny ones make a file of 1 MB cost minutes of
# CPU: a decompression bomb in time rather than memory.
MAX_JPEG_SCANS = 64
# The longest side and the most elongated shape of a picture: a thin strip of as many pixels as a square one
# makes the resampling's intermediate images far larger than either end (OpenAI's outputs are 1:3 to 3:1).
MAX_SIDE = 8192
MAX_ASPECT_RATIO = 8
# Beyond this factor Pillow first shrinks by whole-pixel averaging (reduce), then resamples what is left.
REDUCING_GAP = 3.0
# EXIF orientations and the turn that shows the picture upright; 5 to 8 swap its width and height.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
T = TypeVar("T")
DATA_URL = re.compile(
    r"^data:(?P<media>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I
)


class DecodeStopped(Exception):
    """A decoding called off: its request left or ran out of time."""


class _Stoppable(io.BytesIO):
    """An upload's bytes as a file whose every read first checks `stop`: Pillow reads the file in blocks as it
    decodes, so a decoding called off ends within one block's work."""

    def __init__(self, data: bytes, stop: threading.Event | None) -> None:
        super().__init__(data)
        self._stop = stop

    def read(self, size: int | None = -1) -> bytes:
        if self._stop is not None and self._stop.is_set():
            raise DecodeStopped
        return super().read(size)


@dataclass
class Picture:
    """An upload checked from its header and not decoded yet; `size` is as shown, EXIF orientation applied."""

    image: Image.Image
    param: str
    orientation: int

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.image.size
        return (height, width) if self.orientation >= 5 else (width, height)

    def stored_size(self, width: int, height: int) -> tuple[int, int]:
        """A size as shown, in the file's own orientation."""
        return (height, width) if self.orientation >= 5 else (width, height)

    def upright(self, image: Image.Image) -> Image.Image:
        method = UPRIGHT.get(self.orientation)
        return image.transpose(method) if method is not None else image


def open_picture(data: bytes, param: str, max_pixels: int, stop: threading.Event | None = None) -> Picture:
    """A PNG, JPEG or WebP checked from its header. Anything else, more than `max_pixels` pixels (a
    decompression bomb), a side over MAX_SIDE, a shape beyond MAX_ASPECT_RATIO or a JPEG of more than
    MAX_JPEG_SCANS scans is a 400 naming `param`."""
    return _open(data, param, max_pixels, stop)


def open_mask(data: bytes, param: str, max_pixels: int, stop: threading.Event | None = None) -> Picture:
    """OpenAI's mask, checked as a picture is: an image with an alpha channel whose transparent pixels mark
    what to repaint."""
    mask = _open(data, param, max_pixels, stop)
    if "A" not in mask.image.getbands() and "transparency" not in mask.image.info:
        raise InvalidRequest(
            f"`{param}` has no alpha channel: send a PNG whose fully transparent pixels mark what to repaint",
            param=param,
        )
    return mask


def decode_picture(data: bytes, param: str, max_pixels: int) -> Picture:
    """A picture checked as `open_picture` does, then decoded whole: RGB, upright, at its own size."""
    picture = open_picture(data, param, max_pixels)
    return Picture(Image.fromarray(fit_picture(picture, *picture.size)), param, 1)


def decode_mask(data: bytes, param: str, max_pixels: int) -> np.ndarray:
    """A mask checked as `open_mask` does, then decoded whole: H×W uint8, 255 where the model repaints."""
    mask = open_mask(data, param, max_pixels)
    return fit_mask(mask, *mask.size)


def fit_picture(picture: Picture, width: int, height: int) -> np.ndarray:
    """H×W×3 uint8 at the output size (stretched as diffusers' own image processor does). A JPEG is decoded at
    1/2, 1/4 or 1/8 of its size where the output is that much smaller (libjpeg's DCT scaling), and a large
    shrink starts with whole-pixel averaging, so no step holds more than the picture's own pixels."""
    image = picture.image
    stored = picture.stored_size(width, height)

    def decode() -> Image.Image:
        image.draft("RGB", stored)  # JPEG only; a no-op for the other formats
        image.load()
        # Palette and bilevel pictures resample only by nearest neighbour: converted first. The rest after,
        # at the output size.
        source = image.convert("RGB") if image.mode not in ("RGB", "L") else image
        if source.size != stored:
            source = source.resize(stored, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
        return picture.upright(source.convert("RGB"))

    fitted = _decoded(decode, picture.param, "send a whole PNG, JPEG or WebP file")
    return np.asarray(fitted, dtype=np.uint8)


def fit_mask(mask: Picture, width: int, height: int) -> np.ndarray:
    """H×W uint8 at the output size, 255 where the model repaints (where the mask is transparent)."""
    image = mask.image
    stored = mask.stored_size(width, height)

    def decode() -> Image.Image:
        image.load()
        alpha = image.getchannel("A") if "A" in image.getbands() else image.convert("RGBA").getchannel("A")
        if alpha.size != stored:
            alpha = alpha.resize(stored, Image.Resampling.NEAREST)
        return mask.upright(alpha)

    alpha = np.asarray(_decoded(decode, mask.param, "send a whole PNG file"))
    return np.where(alpha < 128, 255, 0).astype(np.uint8)


def _decoded(step: Callable[[], T], param: str, advice: str) -> T:
    try:
        return step()
    except DecodeStopped:
        raise
    except Exception as exc:  # corrupt data raises more than OSError (struct.error, IndexError …)
        raise InvalidRequest(f"`{param}` could not be decoded ({exc}); {advice}", param=param) from None


def _open(data: bytes, param: str, max_pixels: int, stop: threading.Event | None) -> Picture:
    if not data:
        raise InvalidRequest(f"`{param}` is empty", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(_Stoppable(data, stop), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            message = f"`{param}` is not a PNG, JPEG or WebP image"
        else:
            message = f"`{param}` has too many pixels to decode safely"
        raise InvalidRequest(message, param=param) from None
    except DecodeStopped:
        raise
    except Exception as exc:  # a header Pillow cannot parse raises more than OSError
        raise InvalidRequest(f"`{param}` could not be read as an image ({exc})", param=param) from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequest(
            f"`{param}` is {width}x{height}, more than the {max_pixels} pixels this server decodes",
            param=param,
        )
    if max(width, height) > MAX_SIDE:
        raise InvalidRequest(
            f"`{param}` is {width}x{height}: its sides may be at most {MAX_SIDE} pixels", param=param
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidRequest(
            f"`{param}` is {width}x{height}: at most {MAX_ASPECT_RATIO}:1 between its sides", param=param
        )
    if image.format == "JPEG":
        scans = jpeg_scans(data, MAX_JPEG_SCANS)
        if scans > MAX_JPEG_SCANS:
            raise InvalidRequest(
                f"`{param}` is a JPEG of more than {MAX_JPEG_SCANS} scans, more than any encoder writes",
                param=param,
            )
    # The base class's getexif reads only what the header held: PNG's own would decode the whole picture to
    # look for an eXIf chunk after the pixels (where the PNG spec does not put it).
    try:
        orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except Exception as exc:
        raise InvalidRequest(f"`{param}` has unreadable EXIF data ({exc})", param=param) from None
    return Picture(image, param, orientation if orientation in UPRIGHT else 1)


def jpeg_scans(data: bytes, limit: int) -> int:
    """How many start-of-scan segments a JPEG holds, found by walking its segments (not by searching for the
    marker's bytes, which may occur inside metadata); counting stops once past `limit`."""
    scans, at, end = 0, 2, len(data)  # after the start-of-image marker
    while at + 4 <= end:
        if data[at] != 0xFF:
            return scans  # not a marker where one must be: Pillow's decoder tells what is wrong
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker == 0xD9:  # end of image
            return scans
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        if scans > limit:
            return scans
        # The scan's entropy-coded data runs to the next 0xFF that is not a stuffed 0x00 nor a restart marker.
        while True:
            at = data.find(b"\xff", at)
            if at < 0 or at + 1 >= end:
                return scans
            following = data[at + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                at += 2
            elif following == 0xFF:
                at += 1
            else:
                break
    return scans


def decode_data_url(url: object, param: str) -> bytes:
    """The bytes of a `data:image/…;base64,…` URL (the JSON form of edits); other URLs are not fetched."""
    if not isinstance(url, str):
        raise InvalidRequest(f"`{param}` must be a data URL string", param=param)
    match = DATA_URL.match(url[:256])
    if match is None or not match.group("b64"):
        raise InvalidRequest(
            f"`{param}` must be a base64 data URL (data:image/png;base64,…); this server fetches no other URLs",
            param=param,
        )
    try:
        return base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"`{param}` is not valid base64", param=param) from None


def size_for_picture(width: int, height: int, model: ModelInfo) -> tuple[int, int]:
    """The output size for an edit that names none: the first picture's, scaled into the model's limits with
    its aspect ratio kept as near as the size step allows."""
    scale = min(1.0, model.max_size / max(width, height))
    scale = max(scale, model.min_size / min(width, height))
    return snap_size(width * scale, height * scale, model)
