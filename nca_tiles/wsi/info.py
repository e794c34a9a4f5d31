"""Describe a slide: levels, sizes, tiles, compression, pixel size, generator.

Everything here comes from the reader that ``slide.open_slide`` picks (its ``SlideMetadata``), so
``info`` reports what extract-patches, preview and evaluate read, for every format they read.
"""

from __future__ import annotations

import json
from pathlib import Path

from nca_tiles.errors import NcaTilesError
from nca_tiles.wsi.slide import (  # noqa: F401 - the GENERATOR_* names are imported from here by export/ometiff.py
    GENERATOR_MARKER,
    GENERATOR_NAMESPACE,
    Slide,
    damage_reason,
    damaged,
    open_slide,
    quiet_tifffile,
)


def slide_kind(path: str | Path) -> str:
    """Which reader opens ``path`` ("openslide", "tiff", "ome-zarr", "zarr", "image"), or
    NcaTilesError when none does."""
    with open_slide(path) as slide:
        return slide.kind


def describe_slide(path: str | Path) -> str:
    """A human-readable description of a slide file (NcaTilesError when it cannot be read)."""
    path = Path(path)
    try:
        with quiet_tifffile(), open_slide(path) as slide:  # tifffile's warnings would be stray lines
            return describe(slide)
    except NcaTilesError:
        raise
    except Exception as exc:  # a corrupt or truncated file: say so in one line
        raise NcaTilesError(damaged(path, f"cannot read it{damage_reason(exc)}")) from None


def describe(slide: Slide) -> str:
    """The description of an open slide; reads no pixels."""
    meta = slide.metadata
    lines = [f"{slide.path}", f"format: {meta.format}"]
    if meta.name:
        lines.append(f"image name: {meta.name}")
    count = slide.level_count
    lines.append(f"levels: {count}" + (f" ({meta.pyramid})" if count > 1 and meta.pyramid else ""))
    for i, ((w, h), downsample) in enumerate(zip(slide.level_dimensions, slide.level_downsamples, strict=True)):
        lines.append(f"  level {i}: {w} x {h} px (downsample {downsample:.4g})")
    if meta.pixels:
        lines.append(f"pixels: {meta.pixels}")
    if meta.storage:
        lines.append(f"storage: {meta.storage}")
    width, height = slide.dimensions
    if meta.mpp is None:
        lines.append("pixel size: unknown")
    else:
        um_x, um_y = meta.mpp
        lines.append(
            f"pixel size: {um_x:g} x {um_y:g} µm/px; "
            f"physical size: {width * um_x / 1000:.3f} x {height * um_y / 1000:.3f} mm"
        )
    if meta.objective_power:
        lines.append(f"objective power: {meta.objective_power}x")
    if meta.generator:
        lines.append(f"generator: {json.dumps(meta.generator, ensure_ascii=False)}")
    if meta.associated_images:
        lines.append(f"associated images: {', '.join(meta.associated_images)}")
    if meta.other_images:
        lines.append(f"other images: {', '.join(meta.other_images)}")
    return "\n".join(lines)
