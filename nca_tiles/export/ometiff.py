"""Write a canvas as a pyramidal OME-TIFF that QuPath (through Bio-Formats) opens.

Layout (docs/design.md section 5): full resolution in the first IFD, each lower level (2x area
average) as one of its SubIFDs with ``subfiletype=1``; tiled with full-size tiles (edge tiles
padded by repeating the last row/column, which keeps JPEG from ringing at the border);
interleaved 8-bit RGB, stored as YCbCr 2x2 by tifffile when JPEG-compressed; physical pixel size
and the generator recorded in the OME-XML.

Tiles are streamed from the zarr levels to tifffile through generators, so memory stays at a
few chunks whatever the size of the slide. The file is written under a temporary name in the
output folder and renamed at the very end: an interrupted export never leaves ``out`` behind, and
the next export of ``out`` removes what a killed one left (nca_tiles.runtime.outputs).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from nca_tiles import __version__
from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.outputs import atomic_output, os_error_message, output_lock, remove_stale_temporaries, scratch_prefix
from nca_tiles.runtime.preflight import check_writable
from nca_tiles.export.pyramid import (
    MAX_TILE,
    Canvas,
    check_mpp,
    create_scratch_level,
    default_image_name,
    iter_blocks,
    level_shapes,
    open_canvas,
    paths_overlap,
    tee_downsample,
)
from nca_tiles.wsi.info import GENERATOR_MARKER, GENERATOR_NAMESPACE

# Compressions Bio-Formats 7.x decodes in TIFF, by our name -> tifffile's name (None: raw).
# Not WebP, JPEG-XL, LERC or LZMA: Bio-Formats cannot read them.
COMPRESSIONS: dict[str, str | None] = {
    "jpeg": "jpeg",
    "deflate": "adobe_deflate",
    "lzw": "lzw",
    "zstd": "zstd",
    "packbits": "packbits",
    "none": None,
}
# Lossless codecs that gain from horizontal differencing; predictor 2 is the only one
# Bio-Formats undoes.
PREDICTOR_COMPRESSIONS = {"deflate", "lzw", "zstd"}
# tifffile encodes these with imagecodecs only (deflate and predictors fall back to zlib/NumPy).
NEEDS_IMAGECODECS = {"jpeg", "lzw", "zstd", "packbits"}

# BigTIFF when the pixels (all levels, uncompressed) exceed 2 GiB: classic TIFF offsets stop at
# 4 GiB, and LZW can expand incompressible data by up to 1.5x.
BIGTIFF_ABOVE_BYTES = 2**31


def check_tiff_options(tile: int, compression: str, quality: int) -> None:
    """Raise NcaTilesError for options the writer (or Bio-Formats) cannot honour."""
    if compression not in COMPRESSIONS:
        raise NcaTilesError(f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 16 or tile % 16 or tile > MAX_TILE:
        raise NcaTilesError(f"tile must be a positive multiple of 16 up to {MAX_TILE} (e.g. 256, 512), got {tile!r}")
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise NcaTilesError(f"JPEG quality must be an integer from 1 to 100, got {quality!r}")
    if compression in NEEDS_IMAGECODECS and importlib.util.find_spec("imagecodecs") is None:
        raise NcaTilesError(
            f"{compression} compression needs the imagecodecs package: pip install imagecodecs "
            "(or choose deflate or none)"
        )


def generator_annotation(generator: dict[str, Any]) -> dict[str, str]:
    """The generator as OME MapAnnotation key/value strings (nested values as JSON)."""
    return {
        str(key): value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
        for key, value in generator.items()
    }


def ome_metadata(*, name: str, mpp: float, generator: dict[str, Any] | None) -> dict[str, Any]:
    """tifffile ``metadata=`` for an OME-TIFF image of one RGB plane (axes YXS)."""
    description = f"Synthetic whole-slide image made by nca-tiles {__version__}."
    metadata: dict[str, Any] = {
        "axes": "YXS",
        "Creator": f"nca-tiles {__version__}",
        "Name": name,
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": "RGB"},
    }
    if generator:
        description += GENERATOR_MARKER + json.dumps(generator, ensure_ascii=False, sort_keys=True)
        # Under "Value", so that generator keys such as "Description" stay map entries.
        metadata["MapAnnotation"] = {"Namespace": GENERATOR_NAMESPACE, "Value": generator_annotation(generator)}
    metadata["Description"] = description
    return metadata


def padded_tiles(blocks: Iterator[tuple[int, int, np.ndarray]], tile: int) -> Iterator[np.ndarray]:
    """Full ``tile`` x ``tile`` x 3 tiles from (y, x, pixels) blocks: edge blocks are padded by
    repeating their last row/column (tifffile would pad with zeros, and JPEG would then ring
    into the image along its right and bottom borders)."""
    for _, _, pixels in blocks:
        if pixels.shape[0] != tile or pixels.shape[1] != tile:
            pixels = np.pad(pixels, ((0, tile - pixels.shape[0]), (0, tile - pixels.shape[1]), (0, 0)), mode="edge")
        yield np.ascontiguousarray(pixels)


def _counted(tiles: Iterator[np.ndarray], bar: Any) -> Iterator[np.ndarray]:
    for item in tiles:
        yield item
        bar.update(1)


def write_ome_tiff(
    canvas: Any,
    out: str | os.PathLike[str],
    *,
    mpp: float,
    generator: dict[str, Any] | None = None,
    name: str | None = None,
    tile: int = 512,
    compression: str = "jpeg",
    quality: int = 90,
    scratch_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    bigtiff: bool | None = None,
    workers: int | None = None,
    on_complete: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``canvas`` ((H, W, 3) uint8: zarr array, path to one, work directory or NumPy
    array) to ``out`` as a tiled pyramidal OME-TIFF and return ``out``.

    mpp: µm per pixel at full resolution. generator: JSON-able description of how the image was
    made, recorded in the OME-XML (default: the canvas' ``generator`` attribute). name: the OME
    image name (default: from ``out``). tile: tile side, a multiple of 16. compression: one of
    ``COMPRESSIONS``. quality: JPEG quality 1-100. scratch_dir: where the lower levels are
    kept while they are written (default: a hidden folder next to ``out``; they take about a
    third of the canvas' stored size). bigtiff: None decides from the size. workers: tile
    encoding threads (default: tifffile's, half the cores). on_complete: called with the
    complete temporary file just before it is renamed to ``out`` (e.g. to record its identity).

    An existing ``out`` is replaced, only once the new file is complete. Another process writing
    ``out`` at the same time is refused.
    """
    import tifffile

    check_tiff_options(tile, compression, quality)
    mpp = check_mpp(mpp)
    opened: Canvas = open_canvas(canvas)
    out = Path(out)
    if out.is_dir():
        raise NcaTilesError(f"{out} is a directory: give an output file name such as slide.ome.tif")
    if opened.path is not None and paths_overlap(out, opened.path):
        raise NcaTilesError(f"{out} would overwrite the canvas itself: choose another output")
    check_writable(out, "--out")
    if scratch_dir is not None:
        check_writable(Path(scratch_dir) / "scratch", "the export's scratch folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    name = name or default_image_name(out)
    metadata = ome_metadata(name=name, mpp=mpp, generator=opened.generator if generator is None else generator)
    workers = workers or max(1, min(8, tifffile.TIFF.MAXWORKERS))

    shapes = level_shapes(opened.height, opened.width, tile)
    if bigtiff is None:
        bigtiff = sum(h * w * 3 for h, w in shapes) > BIGTIFF_ABOVE_BYTES
    options: dict[str, Any] = {
        "photometric": "rgb",  # with JPEG, tifffile stores YCbCr 2x2: what Bio-Formats expects
        "planarconfig": "contig",
        "tile": (tile, tile),
        "compression": COMPRESSIONS[compression],
        "resolutionunit": "CENTIMETER",
        "maxworkers": workers,
        # By default tifffile buffers up to 512 MB of tiles for its encoder threads.
        "buffersize": 2 * workers * tile * tile * 3,
        "dtype": np.uint8,
    }
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}
    elif compression in PREDICTOR_COMPRESSIONS:
        options["predictor"] = 2

    with output_lock(out):
        remove_stale_temporaries(out, *([scratch_dir] if scratch_dir is not None else []))
        try:
            _write_levels(opened, out, shapes, tile, mpp, metadata, options, bigtiff, scratch_dir, progress,
                          on_complete)
        except OSError as exc:
            raise os_error_message(exc, out) from exc
    return out


def _write_levels(opened: Canvas, out: Path, shapes: list[tuple[int, int]], tile: int, mpp: float,
                  metadata: dict[str, Any], options: dict[str, Any], bigtiff: bool, scratch_dir: Any,
                  progress: bool, on_complete: Callable[[Path], None] | None) -> None:
    import tifffile
    from tqdm import tqdm

    with ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(out), suffix=".tmp", dir=scratch_dir or out.parent))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        total = sum(math.ceil(h / tile) * math.ceil(w / tile) for h, w in shapes)
        bar = stack.enter_context(tqdm(total=total, desc=f"export {out.name}", unit="tile", disable=not progress))
        tmp_out = stack.enter_context(atomic_output(out))
        with tifffile.TiffWriter(tmp_out, bigtiff=bigtiff, ome=True) as tif:
            level = opened.array
            read_width = opened.chunk
            for index, (height, width) in enumerate(shapes):
                blocks = iter_blocks(level, tile, read_width)
                if index + 1 < len(shapes):
                    # Make the next level while this one streams out: each level is read once.
                    below = create_scratch_level(scratch / f"level{index + 1}", *shapes[index + 1], tile // 2)
                    blocks = tee_downsample(blocks, below)
                pixels_per_cm = 1e4 / (mpp * 2**index)
                tif.write(
                    _counted(padded_tiles(blocks, tile), bar),
                    shape=(height, width, 3),
                    resolution=(pixels_per_cm, pixels_per_cm),
                    subifds=len(shapes) - 1 if index == 0 else None,
                    subfiletype=1 if index else 0,
                    metadata=metadata if index == 0 else None,
                    software=f"nca-tiles {__version__}" if index == 0 else False,
                    **options,
                )
                if index + 1 < len(shapes):
                    level, read_width = below, tile
        if on_complete is not None:
            on_complete(tmp_out)
