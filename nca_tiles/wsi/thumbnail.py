"""Thumbnails of slides, read from the smallest pyramid level that is still large enough.

Works on our OME-TIFFs (SubIFD levels through tifffile), any other TIFF, OME-Zarr, and the
formats OpenSlide reads. Without a suitable level (a single-level TIFF, say) the level is read
with a stride through zarr, chunk by chunk, so a huge image is never held whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.outputs import atomic_output
from nca_tiles.runtime.preflight import check_writable
from nca_tiles.wsi.slide import check_intact, damage_reason, damaged, open_tiff, quiet_tifffile
from nca_tiles.wsi.info import open_ome_zarr, slide_kind

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}


def pick_level(sizes: list[tuple[int, int]], size: int) -> int:
    """Index of the smallest level whose longer side is at least ``size`` (else the largest).

    ``sizes`` are (height, width) in any order of levels.
    """
    large_enough = [i for i, (h, w) in enumerate(sizes) if max(h, w) >= size]
    if large_enough:
        return min(large_enough, key=lambda i: sizes[i][0] * sizes[i][1])
    return max(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1])


def _stride(height: int, width: int, size: int) -> int:
    """Sampling step that leaves at least 2 * ``size`` pixels on the longer side: a pyramid
    level is read whole, a much larger image (no pyramid) is subsampled, keeping enough pixels
    for the final Lanczos resize to smooth most aliasing."""
    return max(1, max(height, width) // (2 * size))


def _to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """(h, w, c) of any dtype -> (h, w, 3) uint8 for display."""
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif pixels.shape[2] == 2:
        pixels = np.concatenate([pixels, pixels[:, :, :1]], axis=2)
    pixels = pixels[:, :, :3]
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    low, high = float(np.min(pixels)), float(np.max(pixels))
    scaled = (pixels.astype(np.float64) - low) * (255.0 / (high - low) if high > low else 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _read_yxc(array: Any, axes: list[str], step: int) -> np.ndarray:
    """Read ``array`` (axes named by letters such as Y, X, S/C, Z, T) as (h, w, c), taking
    every ``step``-th row and column and the first index of any other axis."""
    axes = [a.upper() for a in axes]
    key = []
    kept = []
    for axis in axes:
        if axis in ("Y", "X"):
            key.append(slice(None, None, step))
            kept.append(axis)
        elif axis in ("S", "C") and "C" not in kept and "S" not in kept:
            key.append(slice(None))
            kept.append(axis)
        else:
            key.append(0)
    pixels = np.asarray(array[tuple(key)])
    if len(kept) == 2:  # no channel axis
        pixels = pixels[..., np.newaxis]
        kept.append("C")
    order = [kept.index("Y"), kept.index("X"), next(i for i, a in enumerate(kept) if a in ("S", "C"))]
    return np.transpose(pixels, order)


def _tiff_pixels(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    import zarr

    with open_tiff(path) as tif:  # refuses a truncated or corrupt file before reading pixels
        series = tif.series[0]
        levels = series.levels
        sizes = [(_axis(level, "Y"), _axis(level, "X")) for level in levels]
        index = pick_level(sizes, size)
        step = _stride(*sizes[index], size)
        axes = list(levels[index].axes)
        if step == 1 and set(axes) <= {"Y", "X", "S", "C"}:
            # Read whole anyway: tifffile's own read fails cleanly on a corrupt tile, where zarr's
            # asynchronous reads leave sibling tasks that print tracebacks at exit.
            return _read_yxc(levels[index].asarray(), axes, 1), sizes[0]
        array = zarr.open(series.aszarr(level=index), mode="r")
        return _read_yxc(array, axes, step), sizes[0]


def _axis(level: Any, axis: str) -> int:
    return int(level.shape[level.axes.index(axis)]) if axis in level.axes else 1


def _ome_zarr_pixels(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    image = open_ome_zarr(path)
    names = [str(axis.get("name", "")).upper() for axis in image.axes]
    sizes = []
    for level in image.levels:
        shape = dict(zip(names, level.array.shape))
        sizes.append((int(shape.get("Y", 1)), int(shape.get("X", 1))))
    index = pick_level(sizes, size)
    step = _stride(*sizes[index], size)
    return _read_yxc(image.levels[index].array, names, step), sizes[0]


def make_thumbnail(path: str | os.PathLike[str], size: int = 1024) -> Any:
    """A PIL RGB image of the slide at ``path`` whose longer side is ``size`` (never upscaled)."""
    from PIL import Image

    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise NcaTilesError(f"thumbnail size must be a positive number of pixels, got {size!r}")
    path = Path(path)
    kind = slide_kind(path)
    try:
        with quiet_tifffile():  # its warnings about damaged files would be stray lines
            if kind == "openslide":
                import openslide

                check_intact(path)  # OpenSlide opens a truncated file and fails only at the missing tiles
                with openslide.OpenSlide(str(path)) as slide:
                    return slide.get_thumbnail((size, size)).convert("RGB")
            pixels, (height, width) = _tiff_pixels(path, size) if kind == "tiff" else _ome_zarr_pixels(path, size)
    except NcaTilesError:
        raise
    except Exception as exc:  # corrupt, truncated, or an undecodable codec
        raise NcaTilesError(damaged(path, f"cannot read its pixels{damage_reason(exc)}")) from None
    # The target keeps level 0's aspect ratio (lower levels round odd sizes up).
    scale = min(1.0, size / max(height, width))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(_to_rgb8(pixels), mode="RGB").resize(target, Image.Resampling.LANCZOS)


def write_preview(path: str | os.PathLike[str], out: str | os.PathLike[str], *, size: int = 1024) -> Path:
    """Write the thumbnail of ``path`` to ``out`` (format from its suffix: .png, .jpg, ...),
    replacing ``out`` only once the image is written."""
    out = Path(out)
    image_format = IMAGE_SUFFIXES.get(out.suffix.lower())
    if image_format is None:
        raise NcaTilesError(f"cannot tell the image format of {out.name}: use a .png (or .jpg) file name")
    check_writable(out, "--out")  # before reading the slide, which may take a while
    image = make_thumbnail(path, size)
    with atomic_output(out) as tmp_out:
        image.save(tmp_out, format=image_format)
    return out
