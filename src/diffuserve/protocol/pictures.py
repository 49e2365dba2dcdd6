"""Uploaded pictures and masks for edits: decoded with Pillow under strict limits, every failure a 400 naming
its field, then fitted to the output size the model will paint at."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffuserve.errors import InvalidRequest
from diffuserve.protocol.generation import snap_size
from diffuserve.types import ModelInfo

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
T = TypeVar("T")
DATA_URL = re.compile(
    r"^data:(?P<media>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I
)


@dataclass
class Picture:
    """A decoded upload: RGB pixels at its own size."""

    image: Image.Image
    param: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def decode_picture(data: bytes, param: str, max_pixels: int) -> Picture:
    """A PNG, JPEG or WebP as RGB (EXIF orientation applied, the first frame of an animation). Anything else,
    a truncated file, or more than `max_pixels` pixels (a decompression bomb) is a 400 naming `param`."""
    image = _load(data, param, max_pixels, "send a whole PNG, JPEG or WebP file")
    return Picture(
        _decoded(lambda: image.convert("RGB"), param, "send a whole PNG, JPEG or WebP file"), param
    )


def decode_mask(data: bytes, param: str, max_pixels: int) -> np.ndarray:
    """OpenAI's mask: an image with an alpha channel whose transparent pixels mark what to repaint. Returns
    H×W uint8, 255 where the model repaints."""
    image = _load(data, param, max_pixels, "send a whole PNG file")
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise InvalidRequest(
            f"`{param}` has no alpha channel: send a PNG whose fully transparent pixels mark what to repaint",
            param=param,
        )
    alpha = _decoded(
        lambda: np.asarray(image.convert("RGBA").getchannel("A")), param, "send a whole PNG file"
    )
    return np.where(alpha < 128, 255, 0).astype(np.uint8)


def _load(data: bytes, param: str, max_pixels: int, advice: str) -> Image.Image:
    """The upload decoded, EXIF orientation applied; every failure a 400 naming `param`."""
    image = _open(data, param, max_pixels)

    def load() -> Image.Image:
        image.load()
        return ImageOps.exif_transpose(image)

    return _decoded(load, param, advice)


def _decoded(step: Callable[[], T], param: str, advice: str) -> T:
    try:
        return step()
    except Exception as exc:  # corrupt data raises more than OSError (struct.error, IndexError …)
        raise InvalidRequest(f"`{param}` could not be decoded ({exc}); {advice}", param=param) from None


def _open(data: bytes, param: str, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidRequest(f"`{param}` is empty", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            message = f"`{param}` is not a PNG, JPEG or WebP image"
        else:
            message = f"`{param}` has too many pixels to decode safely"
        raise InvalidRequest(message, param=param) from None
    except Exception as exc:  # a header Pillow cannot parse raises more than OSError
        raise InvalidRequest(f"`{param}` could not be read as an image ({exc})", param=param) from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequest(
            f"`{param}` is {width}x{height}, more than the {max_pixels} pixels this server decodes",
            param=param,
        )
    return image


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


def fit_picture(picture: Picture, width: int, height: int) -> np.ndarray:
    """H×W×3 uint8 at the output size (stretched as diffusers' own image processor does)."""
    image = picture.image
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def fit_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    resized = Image.fromarray(mask, "L").resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=np.uint8)
