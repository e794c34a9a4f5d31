"""The public API (``import nca_tiles``): cheap to import, every name resolves, and the example
that uses it end to end runs on the bundled sample slide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tifffile
import zarr

import nca_tiles

REPO = Path(__file__).resolve().parents[1]


def test_import_is_cheap_and_every_name_resolves():
    check = "import sys, nca_tiles; print(sorted(m for m in ('torch', 'zarr', 'dask', 'tifffile') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    for name in nca_tiles.__all__:
        assert getattr(nca_tiles, name) is not None, name
    assert nca_tiles.train.__name__ == "run_training"
    assert set(nca_tiles.__all__) <= set(dir(nca_tiles))


def test_the_api_example_runs_end_to_end(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "api_end_to_end.py"), "--work", str(work), "--train-steps", "2",
         "--size", "96", "--chunk", "48", "--n", "8", "--steps", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seam score" in result.stdout
    assert tifffile.imread(work / "slide.ome.tif", level=0).shape == (96, 96, 3)
    assert zarr.open_group(str(work / "slide.ome.zarr"), mode="r")["0"].shape == (3, 96, 96)
    assert (work / "run" / "model" / "weights.pt").exists() and (work / "patches.zarr").is_dir()
