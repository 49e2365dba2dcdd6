"""The digits data set as images: scikit-learn's 8×8 digits upscaled to 32×32, dark ink on white paper."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
SOURCE_SIZE = 8
# sklearn stores ink intensity as integers 0..16; its classifiers are fitted on that scale.
INK_MAX = 16.0


def load_digits_ink(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ink intensity in [0, 1], shape (N, size, size), and their labels (N,)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = torch.tensor(digits.images, dtype=torch.float32)[:, None] / INK_MAX
    # Bicubic keeps strokes round and is the upscale whose 4×4 area mean best returns the 8×8 original.
    up = F.interpolate(ink, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return up[:, 0].numpy(), digits.target.astype(np.int64)


def ink_to_pixels(ink: np.ndarray) -> np.ndarray:
    """Ink (N, H, W) in [0, 1] → RGB pixels (N, 3, H, W) in [-1, 1], the VAE's range; ink is dark."""
    pixels = 1.0 - 2.0 * ink
    return np.repeat(pixels[:, None], 3, axis=1).astype(np.float32)


def images_to_ink(images: Sequence[Image.Image], size: int = IMAGE_SIZE) -> np.ndarray:
    """Generated PIL images → ink (N, size, size) in [0, 1]; other sizes are area-resized first."""
    out = np.empty((len(images), size, size), dtype=np.float32)
    for i, image in enumerate(images):
        gray = image.convert("L")
        if gray.size != (size, size):
            gray = gray.resize((size, size), Image.Resampling.BOX)
        out[i] = 1.0 - np.asarray(gray, dtype=np.float32) / 255.0
    return out


def ink_to_features(ink: np.ndarray) -> np.ndarray:
    """Ink (N, 32, 32) → the classifier's 64 features: 4×4 area means on sklearn's 0..16 scale."""
    n, h, w = ink.shape
    k = h // SOURCE_SIZE
    blocks = ink.reshape(n, SOURCE_SIZE, k, SOURCE_SIZE, w // SOURCE_SIZE).mean(axis=(2, 4))
    return (blocks * INK_MAX).reshape(n, SOURCE_SIZE * SOURCE_SIZE)
