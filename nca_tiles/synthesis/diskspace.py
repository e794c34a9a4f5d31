"""Disk a job writes, counted as it is really stored, and checked per file system before any work.

The canvas is three sharded zarr arrays (canvas.py): one file per chunk, holding every inner
chunk that touches the canvas *at full inner-chunk size* plus a 16-byte index entry per inner
chunk, so an edge shard takes more than its pixels. Outputs are estimated from their tiles (every
edge tile is stored full size) and the codec; the OME-TIFF export also keeps its lower levels in
a scratch folder while it writes. Needs on one file system are added up; different file systems
(``st_dev``) are checked separately.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from nca_tiles.synthesis.workdir import inner_chunk
from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.preflight import nearest_existing
from nca_tiles.export.pyramid import level_shapes

FS_BLOCK = 4096  # a file's last block is allocated whole
SHARD_INDEX_ENTRY = 16  # zarr sharding: offset and length (uint64) per inner chunk
SHARD_INDEX_CRC = 4
ZSTD_FRAME = 32  # a compressed chunk of incompressible data: its pixels plus a frame header
# Compressed size ÷ raw size of full tiles, from synthetic slides of untrained (noise-like)
# models, the worst case: JPEG stores YCbCr 4:2:0 (half the bytes) and gets 0.27 of raw at
# quality 90, 0.55 at 100; LZW expands noise by up to 6 %; PackBits by 1/128.
RATIOS = {"none": 1.0, "packbits": 1.01, "lzw": 1.1, "deflate": 1.0, "zstd": 1.0}


def _count(n: int, step: int) -> int:
    return -(-n // step)


def _padded(n: int, step: int) -> int:
    return _count(n, step) * step


def array_bytes(width: int, height: int, chunk: int, itemsize: int, per_chunk: int = 0) -> int:
    """Disk one (H, W, 3) canvas array takes as zarr stores it: inner chunks padded, shard
    indexes, whole file-system blocks, its zarr.json."""
    inner = inner_chunk(chunk)
    shards = _count(height, chunk) * _count(width, chunk)
    inner_chunks = _count(height, inner) * _count(width, inner)
    pixels = _padded(height, inner) * _padded(width, inner) * 3
    index = shards * ((chunk // inner) ** 2 * SHARD_INDEX_ENTRY + SHARD_INDEX_CRC)
    return pixels * itemsize + index + inner_chunks * per_chunk + shards * FS_BLOCK + FS_BLOCK


def canvas_bytes(width: int, height: int, chunk: int, levels: list[tuple[int, int]] | None = None) -> int:
    """Disk the synthesis canvas takes once every sweep has run: two float32 buffers per level
    (``levels``: each level's (width, height); default one level of the slide's size) and the
    uint8 image."""
    levels = levels or [(width, height)]
    floats = sum(2 * array_bytes(w, h, chunk, 4) for w, h in levels)
    return floats + array_bytes(width, height, chunk, 1, ZSTD_FRAME) + FS_BLOCK


def jpeg_ratio(quality: int) -> float:
    return 0.3 + 0.3 * max(0, quality - 90) / 10


def ome_tiff_bytes(width: int, height: int, tile: int, compression: str, quality: int) -> int:
    """Estimated size of the OME-TIFF: every level's full tiles through the codec's worst ratio."""
    tiles = sum(_count(h, tile) * _count(w, tile) for h, w in level_shapes(height, width, tile))
    ratio = jpeg_ratio(quality) if compression == "jpeg" else RATIOS.get(compression, 1.1)
    return int(tiles * tile * tile * 3 * ratio) + tiles * 16 + 2**20  # + offsets, IFDs and OME-XML


def _zarr_levels_bytes(shapes: list[tuple[int, int]], chunk: int, files_per_chunk: int) -> int:
    total = 0
    for h, w in shapes:
        ch, cw = min(chunk, h), min(chunk, w)
        chunks = _count(h, ch) * _count(w, cw) * files_per_chunk
        total += _padded(h, ch) * _padded(w, cw) * 3 + chunks * (ZSTD_FRAME + FS_BLOCK) + FS_BLOCK
    return total


def ome_tiff_scratch_bytes(width: int, height: int, tile: int) -> int:
    """The export's scratch: every lower level at once, chunks of tile/2 (upper bound)."""
    return _zarr_levels_bytes(level_shapes(height, width, tile)[1:], tile // 2, 1)


def ome_zarr_bytes(width: int, height: int, chunk: int) -> int:
    """Upper bound of the OME-Zarr: every level, one file per channel and chunk."""
    return _zarr_levels_bytes(level_shapes(height, width, chunk), chunk, 3)


def output_needs(width: int, height: int, out: Path, fmt: str, tile: int, compression: str, quality: int,
                 scratch_dir: Path | None = None, scratch_option: str = "--out") -> list["DiskNeed"]:
    """What exporting a width × height canvas to ``out`` writes, and where (the OME-TIFF's
    scratch: in ``scratch_dir``, default beside ``out``)."""
    out = Path(out)
    if fmt == "ome-zarr":
        return [DiskNeed("the output (estimate)", out, ome_zarr_bytes(width, height, tile), "--out")]
    return [
        DiskNeed(f"the output (estimate, {compression})", out,
                 ome_tiff_bytes(width, height, tile, compression, quality), "--out"),
        DiskNeed("the export's scratch", Path(scratch_dir) if scratch_dir is not None else out.parent,
                 ome_tiff_scratch_bytes(width, height, tile), scratch_option),
    ]


@dataclass(frozen=True)
class DiskNeed:
    what: str  # "the canvas", ...
    path: Path  # where it is written (need not exist yet)
    bytes: int
    option: str  # the option that moves it elsewhere


@dataclass(frozen=True)
class FileSystemCheck:
    where: Path  # an existing folder on the file system
    needs: tuple[DiskNeed, ...]
    free: int

    @property
    def total(self) -> int:
        return sum(n.bytes for n in self.needs)

    @property
    def problem(self) -> str | None:
        if self.total <= self.free:
            return None
        options = " or ".join(dict.fromkeys(n.option for n in self.needs))
        return (f"not enough free disk for {' + '.join(n.what for n in self.needs)}: needs {format_bytes(self.total)}, "
                f"{format_bytes(self.free)} free under {self.where} (choose another {options} or a smaller slide)")

    def describe(self) -> str:
        verdict = "ok" if self.problem is None else "NOT ENOUGH"
        parts = " + ".join(f"{n.what} {format_bytes(n.bytes)}" for n in self.needs)
        return f"file system of {self.where}: {parts} = {format_bytes(self.total)}, {format_bytes(self.free)} free: {verdict}"


def check_file_systems(needs: list[DiskNeed]) -> list[FileSystemCheck]:
    """The needs grouped by file system (st_dev of the nearest existing folder), with its free space."""
    groups: dict[int, tuple[Path, list[DiskNeed]]] = {}
    for need in needs:
        where = nearest_existing(need.path)
        if not where.is_dir():
            where = where.parent
        groups.setdefault(os.stat(where).st_dev, (where, []))[1].append(need)
    return [FileSystemCheck(where, tuple(group), shutil.disk_usage(where).free) for where, group in groups.values()]


def check_free_disk(needs: list[DiskNeed]) -> None:
    """Refuse, with one line, when some file system lacks the room for what goes there."""
    for fs in check_file_systems(needs):
        if fs.problem:
            raise NcaTilesError(fs.problem)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError
