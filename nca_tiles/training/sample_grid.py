"""PNGs to watch training.

A level trained on the whole schedule: sixteen patch-sized samples from pure noise and one 4×
larger canvas. A finer level of a scale-space model (trained only up to ``--max-timestep``, where
the sampler hands it the coarser level's result) never starts from pure noise, so samples from
noise would show nothing it learned: its grid shows what it makes of a hand-over instead — real
validation patches, the state the sampler would hand over for them, and the level's result.
"""

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


HANDOVER_COLUMNS = 8


def save_handover_grid(pipeline, real: np.ndarray, path: Path, start: int, relay_factor: int | None,
                       seed: int = 0, steps: int = 50) -> np.ndarray:
    """Three rows of ``real`` (N, H, W, 3) uint8 patches: the patches; the state at timestep
    ``start`` the sampler hands this level for them (with ``relay_factor``: blurred as one that
    many times coarser leaves it, docs/design.md §7; re-noised to ``start``); the level's DDIM result."""
    import torch

    from nca_tiles.diffusion import rng
    from nca_tiles.diffusion.levels import hand_over
    from nca_tiles.diffusion.pipeline import to_model_space, to_uint8

    x0 = to_model_space(real)
    seeds = [rng.derive_seed(seed, i) for i in range(len(real))]
    timesteps = pipeline.schedule.sampling_timesteps("ddim", min(steps, start + 1), start)
    x_t, result = hand_over(pipeline, x0, start, relay_factor, seeds, timesteps)
    grid = tile_grid(np.concatenate([real, to_uint8(x_t), to_uint8(result)]), columns=len(real))
    save_png(grid, Path(path))
    return grid


def handover_patches(images: np.ndarray, n: int = HANDOVER_COLUMNS) -> np.ndarray:
    """n patches spread evenly over ``images`` (a store's split, grouped by slide): fixed across a run."""
    idx = np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int)
    return images[idx]


def save_png(image: np.ndarray, path: Path) -> None:
    """Write a uint8 (H, W, 3) image as PNG, atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
