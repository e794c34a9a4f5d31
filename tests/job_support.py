"""Running jobs for the reliability tests: CLI subprocesses, one-line errors, small file systems."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

W, H = 70, 52


def command(*args) -> list[str]:
    return [sys.executable, "-m", "nca_tiles_cli.main", *(str(a) for a in args)]


def synth_args(model: Path, out: Path, *args, width=W, height=H, steps=2, chunk=32) -> list:
    return ["synthesize", "--model", model, "--width", width, "--height", height, "--out", out, "--chunk", chunk,
            "--steps", steps, "--device", "cpu", "--compression", "none", "--tile", 32, "--no-progress", *args]


def one_line_error(stderr: str, *fragments: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def wait_for(condition, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def sweeps_done(work: Path) -> int:
    try:
        return json.loads((work / "manifest.json").read_text())["sweeps_done"]
    except (OSError, ValueError):
        return -1


@contextmanager
def small_file_system(path: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` (a tmpfs) mounted at ``path``; skips unless root may mount."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def canvas_paths(work: Path) -> list:
    """Every way to name a work dir's canvas: the work dir, canvas.zarr (with and without a
    trailing slash), the rgb array."""
    return [work, work / "canvas.zarr", f"{work / 'canvas.zarr'}/", work / "canvas.zarr" / "rgb"]
