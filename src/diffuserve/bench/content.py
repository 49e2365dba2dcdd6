"""Test pictures for encoder benchmarks: a photo mosaic (realistic content) and uniform noise (random weights)."""

from __future__ import annotations

import numpy as np


def photo_mosaic(size: int = 1024) -> np.ndarray:
    """A size×size×3 uint8 photograph: four crops of the two photos scikit-learn ships (a temple in China
    and a flower), each scaled by only 1.2×, so textures and edges stay those of a real picture.

    A random-weight model makes noise, which encodes 2-3× slower than a picture does; encoder costs that
    matter to users are measured on this.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images  # 427×640 each
    half = size // 2
    tiles = [
        np.asarray(Image.fromarray(photo[:, columns]).resize((half, half), Image.Resampling.BICUBIC))
        for photo, columns in (
            (china, slice(0, 512)),
            (flower, slice(0, 512)),
            (flower, slice(128, 640)),
            (china, slice(128, 640)),
        )
    ]
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def noise_picture(size: int = 1024, seed: int = 0) -> np.ndarray:
    """What a random-weight model's images look like to an encoder: uniform noise."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
