"""Atomic outputs (nca_tiles.runtime.outputs): files and folders appear only when complete, a
failed write leaves the old output and no temporary, and a killed writer's temporaries are
recognised and removed by the next writer of the same output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nca_tiles.runtime.outputs import (
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    output_lock,
    remove_stale_temporaries,
)


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_file_appears_complete_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    with atomic_output(out) as new:
        assert new.parent == tmp_path and new.name.startswith(".a.txt.nca-tiles-new-")
        new.write_text("new")
        assert out.read_text() == "old"  # not yet
    assert out.read_text() == "new" and names(tmp_path) == {"a.txt"}


def test_a_failed_write_keeps_the_old_output_and_no_temporary(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out) as new:
            new.write_text("half")
            raise RuntimeError("the writer failed")
    assert out.read_text() == "old" and names(tmp_path) == {"a.txt"}


def test_a_folder_replaces_a_folder(tmp_path):
    out = tmp_path / "store.zarr"
    (out / "old").mkdir(parents=True)
    with atomic_output(out) as new:
        (new / "fresh").mkdir(parents=True)
    assert names(out) == {"fresh"} and names(tmp_path) == {"store.zarr"}
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as new:
            (new / "partial").mkdir(parents=True)
            raise KeyboardInterrupt
    assert names(out) == {"fresh"} and names(tmp_path) == {"store.zarr"}


def test_a_file_never_replaces_a_folder(tmp_path):
    out = tmp_path / "thumb.png"
    out.mkdir()
    with pytest.raises(IsADirectoryError):
        with atomic_output(out) as new:
            new.write_bytes(b"png")
    assert out.is_dir() and names(tmp_path) == {"thumb.png"}


def test_atomic_writes_create_the_folder_and_use_the_usual_permissions(tmp_path):
    umask = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "sub" / "w.bin", b"\x00\x01")
        atomic_write_json(tmp_path / "sub" / "m.json", {"b": 1, "a": 2})
    finally:
        os.umask(umask)
    assert (tmp_path / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "m.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert (tmp_path / "sub" / "w.bin").stat().st_mode & 0o777 == 0o640
    assert names(tmp_path / "sub") == {"w.bin", "m.json"}


KILLED_WRITER = """
import os, signal, sys
from nca_tiles.runtime.outputs import atomic_output
with atomic_output(sys.argv[1]) as new:
    new.write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_writer_removes_what_a_killed_one_left(tmp_path):
    out = tmp_path / "a.txt"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = names(tmp_path)
    assert left.startswith(".a.txt.nca-tiles-new-")
    (tmp_path / ".b.txt.nca-tiles-new-0123456789ab.tmp").write_text("another output's")
    with output_lock(out):
        assert [p.name for p in remove_stale_temporaries(out)] == [left]
        atomic_write_bytes(out, b"whole")
    assert names(tmp_path) == {"a.txt", ".b.txt.nca-tiles-new-0123456789ab.tmp"}
