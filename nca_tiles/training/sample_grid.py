"""A PNG of samples to watch training: sixteen patch-sized samples and one 4× larger canvas."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from nca_tiles.runtime.outputs import atomic_write_bytes


def tile_grid(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one image with the N images in rows of ``columns``, white gaps."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = img
    return grid


def save_sample_grid(pipeline, path: Path, seed: int = 0, steps: int = 50, size: int = 64) -> np.ndarray:
    from nca_tiles.diffusion.pipeline import generate_patches, generate_region

    patches = tile_grid(generate_patches(pipeline, 16, size=size, seed=seed, steps=steps), columns=4)
    large = generate_region(pipeline, 4 * size, 4 * size, seed=seed, steps=steps)
    h = max(patches.shape[0], large.shape[0])
    canvas = np.full((h, patches.shape[1] + 8 + large.shape[1], 3), 255, np.uint8)
    canvas[: patches.shape[0], : patches.shape[1]] = patches
    canvas[: large.shape[0], patches.shape[1] + 8 :] = large
    save_png(canvas, Path(path))
    return canvas


def save_png(image: np.ndarray, path: Path) -> None:
    """Write a uint8 (H, W, 3) image as PNG, atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
