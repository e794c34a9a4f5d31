"""Exports stream: peak memory stays well below one uncompressed level of the canvas.

Runs benchmarks/bench_export.py on a 4096 x 4096 canvas laid out like the synthesis writes it
(sharded zarr). The export runs in a fresh child process that reports the growth of its peak RSS
during the export; holding level 0 alone would cost 48 MB.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_export.py"
SIZE = 4096
LEVEL0_MB = SIZE * SIZE * 3 / 2**20


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_export", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.make_canvas(tmp_path_factory.mktemp("work"), SIZE, 1024)


def measure(work_dir: Path, fmt: str, tmp_path: Path) -> dict:
    # Two encoder threads whatever the machine, so that the bound does not depend on it.
    env = {**os.environ, "TIFFFILE_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, str(BENCH), "--work-dir", str(work_dir), "--dir", str(tmp_path), "--format", fmt, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ome_tiff_export_memory_is_bounded(work_dir, tmp_path):
    result = measure(work_dir, "ome-tiff", tmp_path)
    assert result["size"] == SIZE and result["output_mb"] > 0
    assert result["peak_growth_mb"] < LEVEL0_MB / 2, result


@pytest.mark.slow
def test_ome_zarr_export_memory_is_bounded(work_dir, tmp_path):
    result = measure(work_dir, "ome-zarr", tmp_path)
    assert result["peak_growth_mb"] < LEVEL0_MB * 3 / 4, result
