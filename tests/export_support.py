"""Real canvases on disk for the export tests, laid out as the synthesis writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MPP = 0.5
GENERATOR = {"model": "test-model", "model_hash": "abc123", "seed": 7, "sampler": "ddim", "steps": [999, 500, 0]}


def smooth_image(height: int, width: int) -> np.ndarray:
    """Low-frequency colour gradients: JPEG reproduces them within a few grey levels."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 128 + 100 * np.sin(xx / 97.0) * np.cos(yy / 131.0)
    green = 40 + 180 * yy / max(height - 1, 1)
    blue = 220 - 180 * xx / max(width - 1, 1)
    return np.clip(np.rint(np.stack([red, green, blue], axis=-1)), 0, 255).astype(np.uint8)


def noisy_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random pixels: every rounding case of the 2x2 average shows up."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_canvas(
    work_dir: Path,
    image: np.ndarray,
    *,
    chunk: int = 256,
    inner: int | None = None,
    mpp: float | None = MPP,
    generator: dict | None = GENERATOR,
) -> Path:
    """Write ``image`` as WORK_DIR/canvas.zarr/rgb (sharded when ``inner`` is given, like the
    synthesis) with the attributes the synthesis records; return the work directory."""
    import zarr

    attrs: dict = {}
    if mpp is not None:
        attrs["mpp"] = mpp
    if generator is not None:
        attrs["generator"] = generator
    group = zarr.open_group(str(work_dir / "canvas.zarr"), mode="w")
    if inner is None:
        rgb = group.create_array("rgb", shape=image.shape, chunks=(chunk, chunk, 3), dtype="uint8", attributes=attrs)
    else:
        rgb = group.create_array(
            "rgb",
            shape=image.shape,
            chunks=(inner, inner, 3),
            shards=(chunk, chunk, 3),
            dtype="uint8",
            attributes=attrs,
        )
    rgb[:] = image
    return work_dir


def reference_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Levels by the definition: each the mean (float64, rounded half to even) of the 2x2
    blocks of the one above, an odd last row/column averaged over the pixels that exist."""
    result = [image]
    for _ in range(levels - 1):
        above = result[-1].astype(np.float64)
        h, w = above.shape[:2]
        rows, cols = np.arange(0, h, 2), np.arange(0, w, 2)
        sums = np.add.reduceat(np.add.reduceat(above, rows, axis=0), cols, axis=1)
        counts = np.add.reduceat(np.add.reduceat(np.ones((h, w)), rows, axis=0), cols, axis=1)
        result.append(np.rint(sums / counts[..., None]).astype(np.uint8))
    return result


def corrupt_last_chunk(work_dir: Path) -> Path:
    """Overwrite the canvas' last chunk file with garbage, so a full read fails near the end."""
    files = sorted(
        (p for p in (work_dir / "canvas.zarr" / "rgb" / "c").rglob("*") if p.is_file()),
        key=lambda p: [int(part) for part in p.relative_to(work_dir / "canvas.zarr" / "rgb" / "c").parts],
    )
    files[-1].write_bytes(b"not a zstd frame" * 10)
    return files[-1]
