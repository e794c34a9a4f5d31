"""Slides the tests write themselves: pyramidal OME-TIFFs, plain TIFFs, PNGs, damaged copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

# Two stain-like colours: both saturated enough to count as tissue.
PINK = (230, 130, 180)
PURPLE = (110, 50, 140)


def checkerboard(height: int, width: int, square: int, colors=(PINK, PURPLE)) -> np.ndarray:
    """RGB uint8 checkerboard of ``square`` px squares, colour 0 at the top-left."""
    yy, xx = np.mgrid[0:height, 0:width]
    parity = ((yy // square) + (xx // square)) % 2
    return np.asarray(colors, np.uint8)[parity]


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 block mean (rounded), cropping an odd last row/column: the next pyramid level."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint32).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(np.uint8)


def write_ome_pyramid(
    path: Path,
    image: np.ndarray,
    physical_size: float,
    unit: str = "µm",
    levels: int = 3,
    tile: int = 128,
    compression: str | None = None,
) -> list[np.ndarray]:
    """Tiled OME-TIFF with PhysicalSizeX/Y, reduced levels stored as SubIFDs of level 0 (the
    layout of current OME-TIFF writers). Returns the levels written."""
    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(halve(pyramid[-1]))
    metadata = {
        "axes": "YXS",
        "PhysicalSizeX": physical_size,
        "PhysicalSizeXUnit": unit,
        "PhysicalSizeY": physical_size,
        "PhysicalSizeYUnit": unit,
    }
    with tifffile.TiffWriter(path) as tif:
        common = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
        tif.write(pyramid[0], subifds=levels - 1, metadata=metadata, **common)
        for level in pyramid[1:]:
            tif.write(level, subfiletype=1, **common)
    return pyramid


def corrupt_fine_levels(path: Path, levels: int) -> None:
    """Overwrite the middle of every tile of the first ``levels`` pyramid levels with noise: the
    file still opens and its coarse levels read, but decoding finer pixels fails (needs a
    compressed file)."""
    with tifffile.TiffFile(path) as tif:
        spans = [
            span
            for level in tif.series[0].levels[:levels]
            for span in zip(level.keyframe.dataoffsets, level.keyframe.databytecounts, strict=True)
        ]
    noise = np.random.default_rng(0)
    with open(path, "r+b") as f:
        for offset, count in spans:
            f.seek(offset + count // 4)
            f.write(noise.integers(0, 256, count // 2, dtype=np.uint8).tobytes())


def write_plain_tiff(path: Path, image: np.ndarray, mpp: float | None, unit: str = "CENTIMETER", tiled=False) -> None:
    """Single-level TIFF; µm/px (if any) stored as XResolution/YResolution in ``unit``."""
    kwargs: dict = {"photometric": "rgb", "metadata": None}
    if tiled:
        kwargs["tile"] = (128, 128)
    if mpp is not None:
        per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0}[unit] / mpp
        kwargs.update(resolution=(per_unit, per_unit), resolutionunit=unit)
    tifffile.imwrite(path, image, **kwargs)


def write_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path)


def truncated_copy(source: Path, target: Path, fraction: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def random_bytes(target: Path, size: int = 20_000, seed: int = 0) -> Path:
    target.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return target


def copy(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    return target
