"""Export a canvas to a slide file: the checks, locks and pre-flight around the writers.

Used by ``nca-tiles export`` and by the synthesis job. Light to import (no torch).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nca_tiles.synthesis.workdir import CANVAS_NAME, RGB, find_work_dir
from nca_tiles.synthesis.diskspace import check_free_disk, output_needs
from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.locking import exclusive_lock
from nca_tiles.runtime.outputs import output_lock
from nca_tiles.runtime.preflight import check_writable

FORMATS = ("ome-tiff", "ome-zarr")


def infer_format(out: Path) -> str:
    """ome-zarr for a ``.zarr`` output, else ome-tiff."""
    return "ome-zarr" if Path(out).name.lower().rstrip("/").endswith(".zarr") else "ome-tiff"


def output_exists(out: Path) -> bool:
    return Path(out).exists() or Path(out).is_symlink()


def refuse_existing(out: Path) -> None:
    raise NcaTilesError(f"{out} exists: pass --overwrite to replace it, or choose another --out")


def write_output(canvas: Any, out: Path, *, fmt: str, mpp: float, generator: dict | None, name: str | None = None,
                 tile: int = 512, compression: str = "jpeg", quality: int = 90, scratch_dir: Path | None = None,
                 progress: bool = True, on_complete: Callable[[Path], None] | None = None) -> Path:
    """Write ``canvas`` to ``out`` in ``fmt`` (the writers lock ``out`` and write it atomically)."""
    if fmt == "ome-zarr":
        from nca_tiles.export.omezarr import write_ome_zarr

        return write_ome_zarr(canvas, out, mpp=mpp, generator=generator, name=name, chunk=tile, progress=progress,
                              on_complete=on_complete)
    from nca_tiles.export.ometiff import write_ome_tiff

    return write_ome_tiff(canvas, out, mpp=mpp, generator=generator, name=name, tile=tile, compression=compression,
                          quality=quality, scratch_dir=scratch_dir, progress=progress, on_complete=on_complete)


@dataclass(frozen=True)
class Exported:
    out: Path
    format: str
    width: int
    height: int
    mpp: float


def open_source_canvas(source: str | os.PathLike[str]):
    """The canvas to export from ``source``: a synthesis work dir, its ``canvas.zarr`` or its
    ``rgb`` array (refused while the job is unfinished), or any (H, W, 3) uint8 zarr array."""
    from nca_tiles.export.pyramid import open_canvas

    path = Path(source)
    work = find_work_dir(path) if path.exists() else None
    if work is not None:
        work.check_finished()  # an unfinished canvas is noise, or black where not yet written
        path = work.canvas_path / RGB
    elif (path / CANVAS_NAME / RGB).is_dir():  # a work dir's layout without its manifest
        path = path / CANVAS_NAME / RGB
    elif path.name == CANVAS_NAME and (path / RGB).is_dir():
        path = path / RGB
    return open_canvas(path)


def export_canvas(source: Path, out: Path, *, fmt: str | None = None, tile: int = 512, compression: str | None = None,
                  quality: int | None = None, mpp: float | None = None, name: str | None = None,
                  overwrite: bool = False, progress: bool = True) -> Exported:
    """Export the canvas at ``source`` (a synthesis work dir, its ``canvas.zarr``, the ``rgb``
    array, or any (H, W, 3) uint8 zarr array) to ``out``.

    A canvas inside a work dir is exported only when its job has finished, and never while a
    job holds the work dir. Everything that can refuse is checked before anything is written.
    """
    out = Path(out)
    fmt = fmt or infer_format(out)
    if fmt not in FORMATS:
        raise NcaTilesError(f"unknown format {fmt!r}: {' or '.join(FORMATS)}")
    if fmt == "ome-zarr" and (compression is not None or quality is not None):
        raise NcaTilesError("--compression and --quality apply to OME-TIFF only: drop them for --format ome-zarr")
    compression = "jpeg" if compression is None else compression
    quality = 90 if quality is None else quality
    if fmt == "ome-tiff":
        from nca_tiles.export.ometiff import check_tiff_options

        check_tiff_options(tile, compression, quality)
    if output_exists(out) and not overwrite:
        refuse_existing(out)
    check_writable(out, "--out")

    work = find_work_dir(Path(source)) if Path(source).exists() else None
    holding = exclusive_lock(work.path, "work dir", "export it once that job is done") if work else nullcontext()
    with holding, output_lock(out):
        if output_exists(out) and not overwrite:  # again: another export may have written it meanwhile
            refuse_existing(out)
        canvas = open_source_canvas(source)  # refuses an unfinished synthesis
        if mpp is None:
            if canvas.mpp is None:
                raise NcaTilesError(f"the canvas at {source} records no pixel size: pass --mpp (µm per pixel)")
            mpp = canvas.mpp
        check_free_disk(output_needs(canvas.width, canvas.height, out, fmt, tile, compression, quality))
        write_output(canvas, out, fmt=fmt, mpp=mpp, generator=canvas.generator, name=name, tile=tile,
                     compression=compression, quality=quality, progress=progress)
    return Exported(out, fmt, canvas.width, canvas.height, mpp)
