"""Resolution pyramids of an RGB canvas, built chunk by chunk.

A canvas is an (H, W, 3) uint8 array: a zarr array (usually ``WORK_DIR/canvas.zarr/rgb``) or,
for small images and tests, a NumPy array. Each lower level halves the one above it by area
averaging (the mean of each 2x2 block, rounded half to even so that repeated halving does not
drift brighter). The last row/column of an odd-sized level is averaged over the pixels that
exist. Levels are computed from the level above, one block at a time, so host memory stays at a
few chunks per worker whatever the size of the slide: either a whole level at once
(``downsample_level``, used for OME-Zarr) or while the level above is streamed out block by block
(``tee_downsample``, used for OME-TIFF, so that each level is read only once).

Also here: opening a canvas (``open_canvas``) and the checks every exporter makes of its inputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.threads import usable_cores

DEFAULT_CHUNK = 1024  # block side for a canvas that has no chunking (NumPy input)
SMALL_BLOCK = 512  # read sharded canvases in blocks of about this side
# Largest tile (OME-TIFF) or chunk (OME-Zarr) side: beyond it a tile costs hundreds of MB per
# encoder thread, and viewers read 256-1024.
MAX_TILE = 8192


class RegionArray(Protocol):
    """What the pyramid code needs of an (H, W, 3) array: a shape and 2-D region slicing."""

    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> Any: ...

    def __setitem__(self, key: Any, value: Any) -> None: ...


@dataclass
class Canvas:
    """An opened canvas: the (H, W, 3) uint8 array and what its attributes say about it."""

    array: Any
    mpp: float | None = None
    generator: dict[str, Any] | None = None
    path: Path | None = None  # the zarr array's directory when opened from disk
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def chunk(self) -> int:
        """Square chunk side used to read the canvas and to lay out lower levels."""
        return chunk_side(self.array)


def chunk_side(array: Any) -> int:
    """The side of the square blocks in which ``array`` is best read: its chunk; for a sharded
    array (the synthesis canvas: one shard per compute chunk, small inner chunks) the shard
    halved while it stays a multiple of the inner chunk and above ``SMALL_BLOCK``: zarr decodes
    only the inner chunks a read needs, and smaller blocks keep every buffer small."""
    chunks = getattr(array, "chunks", None)
    if not chunks or not isinstance(chunks, tuple):
        return DEFAULT_CHUNK
    side = int(max(chunks[0], chunks[1]))
    shards = getattr(array, "shards", None)
    if shards:
        inner, side = side, int(max(shards[0], shards[1]))
        while side > SMALL_BLOCK and side % 2 == 0 and (side // 2) % inner == 0:
            side //= 2
    return side


def open_canvas(source: Any) -> Canvas:
    """Open a canvas from a zarr array's path, a zarr array or a NumPy array, and check it is
    (H, W, 3) uint8. (Where synthesis keeps its canvas is synthesis' business:
    ``nca_tiles.synthesis.export_job.open_source_canvas`` resolves work dirs.)"""
    if isinstance(source, Canvas):
        return source
    path: Path | None = None
    attrs: dict[str, Any] = {}
    if isinstance(source, (str, os.PathLike)):
        array, path = _open_zarr_array(Path(source))
        attrs = dict(array.attrs)
    elif isinstance(source, np.ndarray):
        array = source
    elif hasattr(source, "shape") and hasattr(source, "__getitem__"):
        array = source
        attrs = dict(getattr(source, "attrs", {}) or {})
    else:
        raise NcaTilesError(f"cannot read a canvas from {type(source).__name__}: give a path or an array")

    if len(array.shape) != 3 or array.shape[2] != 3 or np.dtype(array.dtype) != np.uint8:
        raise NcaTilesError(
            f"canvas must be an (H, W, 3) uint8 RGB array, got shape {tuple(array.shape)} {array.dtype}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise NcaTilesError(f"canvas is empty: shape {tuple(array.shape)}")
    mpp = attrs.get("mpp")
    generator = attrs.get("generator")
    return Canvas(
        array=array,
        mpp=float(mpp) if isinstance(mpp, (int, float)) else None,
        generator=generator if isinstance(generator, dict) else None,
        path=path,
        attrs=attrs,
    )


def _open_zarr_array(path: Path) -> tuple[Any, Path]:
    """The zarr array at ``path``."""
    import zarr

    if not path.exists():
        raise NcaTilesError(f"{path} does not exist: give a synthesis work directory or a zarr array")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a zarr node"
        raise NcaTilesError(
            f"no canvas at {path}: give a synthesis work directory or a zarr array ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(node, zarr.Group):
        raise NcaTilesError(f"{path} is a zarr group, not an array: give the (H, W, 3) uint8 array inside it")
    return node, path


def _looks_like_zarr(path: Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))


def check_mpp(mpp: Any) -> float:
    """The pixel size as a positive float, or NcaTilesError."""
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise NcaTilesError(f"pixel size must be a positive number of µm/px (--mpp), got {mpp!r}")
    return value


def default_image_name(out: Path) -> str:
    """The output file name without its image suffixes (``slide.ome.tif`` -> ``slide``)."""
    name = out.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def paths_overlap(path: Path, other: Path) -> bool:
    """True when ``path`` is ``other`` or inside it, or ``other`` is inside ``path``."""
    a, b = path.resolve(), other.resolve()
    return a == b or b in a.parents or a in b.parents


# --------------------------------------------------------------------------------------------
# Level geometry


def level_shapes(height: int, width: int, fits: int) -> list[tuple[int, int]]:
    """(height, width) of every level, each half the one above (rounded up), down to the first
    level whose longer side is at most ``fits`` (one tile or chunk)."""
    if fits < 1:
        raise NcaTilesError(f"level size limit must be positive, got {fits}")
    shapes = [(height, width)]
    while max(shapes[-1]) > fits:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def downsample_2x(block: np.ndarray) -> np.ndarray:
    """Halve an (h, w, c) uint8 block by 2x2 area averaging, rounding half to even.

    An odd last row or column is averaged over the pixels that exist: replicating the edge
    before averaging gives exactly that mean (mean(a, a, b, b) == mean(a, b)).
    """
    h, w = block.shape[:2]
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    # Strided pairwise sums in uint16: ~10x faster than reshape(...).sum(axis=(1, 3)).
    rows = block[0::2].astype(np.uint16)
    rows += block[1::2]
    sums = rows[:, 0::2] + rows[:, 1::2]
    # sum = 4q + r: round r < 2 down, r > 2 up, r == 2 to the even of q and q + 1.
    # (sum + 1 + (q & 1)) >> 2 does that without floats; at most 1020 + 2, fits uint16.
    q_is_odd = (sums >> 2) & 1
    sums += 1
    sums += q_is_odd
    sums >>= 2
    return sums.astype(np.uint8)


def region_blocks(height: int, width: int, step: int) -> Iterator[tuple[slice, slice]]:
    """Row-major (rows, cols) slices of the ``step``-sized blocks covering a height x width image."""
    for y in range(0, height, step):
        for x in range(0, width, step):
            yield slice(y, min(y + step, height)), slice(x, min(x + step, width))


def default_workers() -> int:
    """Threads for chunk work: NumPy, zarr codecs and JPEG release the GIL. At most the cores
    this process may use (its affinity and cgroup quota), not the machine's."""
    return max(1, min(8, usable_cores()))


def downsample_level(
    src: RegionArray,
    dst: RegionArray,
    *,
    chunk: int,
    workers: int | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> None:
    """Fill ``dst`` (ceil(H/2), ceil(W/2), 3) with the 2x area average of ``src`` (H, W, 3).

    Works one ``chunk`` x ``chunk`` output block at a time, assembled from the 2 x 2 source
    blocks of ``chunk`` side it covers, read one after the other: memory is about four
    source chunks' worth per worker (reading the 2*chunk region at once costs zarr several
    times more). Output blocks never share a chunk of ``dst`` as long as ``chunk`` is a
    multiple of dst's chunking, so threads may write at once.
    """
    src_h, src_w = int(src.shape[0]), int(src.shape[1])
    dst_h, dst_w = int(dst.shape[0]), int(dst.shape[1])
    if (dst_h, dst_w) != (math.ceil(src_h / 2), math.ceil(src_w / 2)):
        raise ValueError(f"level shapes do not halve: {src.shape} -> {dst.shape}")
    # Source reads must start on even pixels so no 2x2 block straddles two reads.
    read = chunk if chunk % 2 == 0 else 2 * chunk

    def one_block(rows_cols: tuple[slice, slice]) -> None:
        rows, cols = rows_cols
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start, 3), dtype=np.uint8)
        for sy in range(2 * rows.start, min(2 * rows.stop, src_h), read):
            for sx in range(2 * cols.start, min(2 * cols.stop, src_w), read):
                part = downsample_2x(np.asarray(src[sy : min(sy + read, src_h), sx : min(sx + read, src_w)]))
                oy, ox = sy // 2 - rows.start, sx // 2 - cols.start
                out[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part
        dst[rows, cols] = out
        if on_chunk is not None:
            on_chunk()

    blocks = region_blocks(dst_h, dst_w, chunk)
    workers = workers or default_workers()
    if workers == 1:
        for block in blocks:
            one_block(block)
        return
    with ThreadPoolExecutor(workers) as pool:
        # Futures hold only slices; each running task holds its own few chunks.
        for _ in pool.map(one_block, blocks):
            pass


def copy_level(
    src: RegionArray,
    dst: RegionArray,
    *,
    chunk: int,
    workers: int | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> None:
    """Copy ``src`` into ``dst`` (same shape) block by block."""
    if tuple(src.shape[:2]) != tuple(dst.shape[:2]):
        raise ValueError(f"shapes differ: {src.shape} vs {dst.shape}")

    def one_block(rows_cols: tuple[slice, slice]) -> None:
        rows, cols = rows_cols
        dst[rows, cols] = np.asarray(src[rows, cols])
        if on_chunk is not None:
            on_chunk()

    blocks = region_blocks(int(src.shape[0]), int(src.shape[1]), chunk)
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        for _ in pool.map(one_block, blocks):
            pass


def count_blocks(height: int, width: int, chunk: int) -> int:
    return math.ceil(height / chunk) * math.ceil(width / chunk)


def iter_blocks(level: RegionArray, side: int, read_width: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """(y, x, pixels) of the ``side`` x ``side`` blocks of ``level`` in row-major order (the
    order of TIFF tiles); blocks on the bottom and right edges are smaller.

    Reads one band of ``side`` rows by ``read_width`` columns (aligned to multiples of
    ``read_width``) at a time, so that when the level is chunked more coarsely than ``side``,
    each chunk is decoded once per band rather than once per block.
    """
    height, width = int(level.shape[0]), int(level.shape[1])
    read_width = max(read_width or side, side)
    for y in range(0, height, side):
        y_end = min(y + side, height)
        band: np.ndarray | None = None
        band_x = band_end = 0
        for x in range(0, width, side):
            x_end = min(x + side, width)
            if band is None or x_end > band_end:
                band_x = (x // read_width) * read_width
                band_end = min(width, max(band_x + read_width, -(-x_end // read_width) * read_width))
                band = np.asarray(level[y:y_end, band_x:band_end])
            yield y, x, band[:, x - band_x : x_end - band_x]


def create_scratch_level(path: str | os.PathLike[str], height: int, width: int, chunk: int) -> Any:
    """An empty (height, width, 3) uint8 zarr array at ``path`` for an intermediate level."""
    import zarr

    return zarr.create_array(
        store=str(path),
        shape=(height, width, 3),
        chunks=(min(chunk, height), min(chunk, width), 3),
        dtype="uint8",
        fill_value=0,
        overwrite=True,
    )


def tee_downsample(
    blocks: Iterator[tuple[int, int, np.ndarray]], below: RegionArray
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Pass ``blocks`` of a level through unchanged, writing the 2x area average of each into
    ``below`` (the next level), so that a level is read once both to be written out and to make
    the next one. Blocks must start on even pixels; chunking ``below`` by half the block side
    makes every write exactly one chunk. ``below`` is complete once ``blocks`` is exhausted.
    """
    for y, x, pixels in blocks:
        if y % 2 or x % 2:
            raise ValueError(f"blocks must start on even pixels, got ({y}, {x})")
        half = downsample_2x(pixels)
        below[y // 2 : y // 2 + half.shape[0], x // 2 : x // 2 + half.shape[1]] = half
        yield y, x, pixels
