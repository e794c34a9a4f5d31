"""Thumbnails of slides, read from the smallest pyramid level that is still large enough.

Reads through ``slide.open_slide``, so every format the tool reads has a thumbnail. Without a
suitable level (a single-level TIFF, say) the image is area-averaged to about twice the size in
bounded pieces, so a huge image is never held whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.outputs import atomic_output
from nca_tiles.runtime.preflight import check_writable
from nca_tiles.wsi.slide import Slide, damage_reason, damaged, open_slide, quiet_tifffile, read_level0_region

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
    """Reduction that leaves at least 2 * ``size`` pixels on the longer side: a pyramid level
    is read whole, a much larger image (no pyramid) is reduced first, keeping enough pixels for
    the final Lanczos resize to smooth most aliasing."""
    return max(1, max(height, width) // (2 * size))


def make_thumbnail(path: str | os.PathLike[str], size: int = 1024) -> Any:
    """A PIL RGB image of the slide at ``path`` whose longer side is ``size`` (never upscaled)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise NcaTilesError(f"thumbnail size must be a positive number of pixels, got {size!r}")
    path = Path(path)
    try:
        with quiet_tifffile(), open_slide(path) as slide:  # tifffile's warnings would be stray lines
            return thumbnail(slide, size)
    except NcaTilesError:
        raise
    except Exception as exc:  # corrupt, truncated, or an undecodable codec
        raise NcaTilesError(damaged(path, f"cannot read its pixels{damage_reason(exc)}")) from None


def thumbnail(slide: Slide, size: int) -> Any:
    """A PIL RGB image of an open slide whose longer side is ``size`` (never upscaled)."""
    from PIL import Image

    width, height = slide.dimensions
    level = pick_level([(h, w) for w, h in slide.level_dimensions], size)
    level_w, level_h = slide.level_dimensions[level]
    step = _stride(level_h, level_w, size)
    if step == 1:
        pixels = slide.read_region(level, 0, 0, level_w, level_h)
    else:
        pixels = read_level0_region(slide, 0, 0, width, height, max(1, level_w // step), max(1, level_h // step))
    # The target keeps level 0's aspect ratio (lower levels round odd sizes up).
    scale = min(1.0, size / max(height, width))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(pixels, mode="RGB").resize(target, Image.Resampling.LANCZOS)


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
