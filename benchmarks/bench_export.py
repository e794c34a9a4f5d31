"""Peak memory and time of exporting a synthetic canvas as a pyramidal OME-TIFF (or OME-Zarr).

    python benchmarks/bench_export.py --size 8192            # prints a summary
    python benchmarks/bench_export.py --size 4096 --json     # one JSON line (used by the tests)

The canvas is laid out like the synthesis writes it (WORK_DIR/canvas.zarr/rgb: uint8, inner
chunks of 128 inside shards of --chunk) and filled shard by shard with a cheap tissue-like
texture. The export then runs in a fresh child process, which reports its resident memory
just before exporting and its peak (VmHWM, reset just before) after: the difference is what the
export costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nca_tiles.runtime.memory import peak_rss_bytes, reset_peak_rss, rss_bytes


def make_canvas(work_dir: Path, size: int, chunk: int, mpp: float = 0.5) -> Path:
    """Write a (size, size, 3) uint8 canvas shard by shard; return the work directory."""
    import numpy as np
    import zarr

    group = zarr.open_group(str(work_dir / "canvas.zarr"), mode="w")
    inner = min(128, chunk)
    rgb = group.create_array(
        "rgb",
        shape=(size, size, 3),
        chunks=(inner, inner, 3),
        shards=(chunk, chunk, 3),
        dtype="uint8",
        fill_value=0,
        attributes={"mpp": mpp, "generator": {"model": "benchmark", "seed": 0}},
    )
    # One shard of texture, shifted differently for every shard: cheap to make, and no two
    # shards alike. Pink background, purple "nuclei" blobs and some noise compress like H&E.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:chunk, 0:chunk].astype(np.float32)
    blobs = (np.sin(xx / 9.0) * np.sin(yy / 7.0) > 0.6).astype(np.float32)
    base = np.stack([230 - 90 * blobs, 190 - 120 * blobs, 215 - 40 * blobs], axis=-1)
    texture = np.clip(base + rng.normal(0, 6, size=base.shape), 0, 255).astype(np.uint8)
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            h, w = min(chunk, size - y), min(chunk, size - x)
            shifted = np.roll(texture, tuple(rng.integers(0, chunk, size=2)), axis=(0, 1))
            rgb[y : y + h, x : x + w] = shifted[:h, :w]
    return work_dir


def export_in_this_process(work_dir: Path, out: Path, fmt: str, compression: str, tile: int) -> dict:
    """Export (imports done first, so that they do not count) and measure."""
    import numpy  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    from nca_tiles.export.ometiff import write_ome_tiff
    from nca_tiles.export.omezarr import write_ome_zarr
    from nca_tiles.synthesis.export_job import open_source_canvas as open_canvas

    canvas = open_canvas(work_dir)
    reset_peak_rss()
    before = rss_bytes()
    start = time.perf_counter()
    if fmt == "ome-tiff":
        write_ome_tiff(canvas, out, mpp=canvas.mpp, compression=compression, tile=tile, progress=False)
        size_on_disk = out.stat().st_size
    else:
        write_ome_zarr(canvas, out, mpp=canvas.mpp, chunk=tile, progress=False)
        size_on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {
        "size": canvas.width,
        "format": fmt,
        "compression": compression if fmt == "ome-tiff" else "blosc-zstd",
        "tile": tile,
        "rss_before_export_mb": round(before / 2**20, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_growth_mb": round((peak - before) / 2**20, 1),
        "level0_uncompressed_mb": round(canvas.width * canvas.height * 3 / 2**20, 1),
        "seconds": round(seconds, 2),
        "output_mb": round(size_on_disk / 2**20, 1),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="canvas side in pixels")
    parser.add_argument("--chunk", type=int, default=1024, help="canvas shard side")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--format", choices=("ome-tiff", "ome-zarr"), default="ome-tiff")
    parser.add_argument("--compression", default="jpeg")
    parser.add_argument("--dir", type=Path, help="where to put the canvas and output (default: a temp dir)")
    parser.add_argument("--work-dir", type=Path, help="export this existing work directory instead of making one")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    suffix = ".ome.tif" if args.format == "ome-tiff" else ".ome.zarr"
    if args.child:  # the measured process: export only
        out = args.out_dir / f"bench{suffix}"
        print(json.dumps(export_in_this_process(args.dir, out, args.format, args.compression, args.tile)))
        return 0

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work_dir = args.work_dir or make_canvas(Path(tmp), args.size, args.chunk)
        out_dir = Path(tmp)
        child = subprocess.run(
            [sys.executable, __file__, "--child", "--dir", str(work_dir), "--out-dir", str(out_dir),
             "--format", args.format, "--compression", args.compression, "--tile", str(args.tile)],
            capture_output=True,
            text=True,
            check=False,
        )
    if child.returncode != 0:
        sys.stderr.write(child.stderr)
        return child.returncode
    result = json.loads(child.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"export {result['size']}² canvas -> {result['format']} ({result['compression']}, tile {result['tile']}): "
            f"{result['seconds']} s on {result['cpus']} CPUs, output {result['output_mb']} MB\n"
            f"peak RSS {result['peak_rss_mb']} MB = {result['rss_before_export_mb']} MB before export "
            f"+ {result['peak_growth_mb']} MB during it "
            f"(one uncompressed level 0: {result['level0_uncompressed_mb']} MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
