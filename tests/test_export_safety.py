"""Exports that lose nothing and corrupt nothing: one writer per output, temporaries that the
next export removes when their writer died, errors that say what happened, and no export of a
canvas whose synthesis has not finished.

Real processes and real files: kill -9, read-only folders, an immutable folder (chattr), small
tmpfs mounts (root only; skipped elsewhere).
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from helpers import (
    assert_ok, assert_one_line_error, canvas_paths, command, corrupt_last_chunk, entries, noisy_image,
    read_only_dir, run_cli, save_test_model, small_file_system, sweeps_done, synth_args, wait_for, write_canvas,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("model"))


def test_export_to_a_read_only_folder_is_refused(tmp_path):
    canvas = write_canvas(tmp_path / "canvas", noisy_image(64, 64))
    with read_only_dir(tmp_path / "ro") as ro:
        assert_one_line_error(run_cli("export", canvas, "--out", ro / "s.ome.tif"), "cannot write --out")


def test_a_failed_clean_up_does_not_hide_the_first_error(tmp_path):
    """The output folder becomes immutable (chattr +i, real) once the temporary file exists, so
    removing it fails; the canvas then fails to decode (a real corrupt chunk). The error raised
    must be the decode error, not the clean-up's "Operation not permitted"; a later export of the
    same output removes the temporary that was left."""
    from nca_tiles.export.ometiff import write_ome_tiff
    from nca_tiles.synthesis.export_job import open_source_canvas as open_canvas

    if os.geteuid() != 0 or subprocess.run(["which", "chattr"], capture_output=True).returncode:
        pytest.skip("needs root and chattr")
    work = write_canvas(tmp_path / "work", noisy_image(600, 500), chunk=128)
    corrupt_last_chunk(work)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    array = open_canvas(work).array

    class FreezeOnFirstRead:
        def __init__(self):
            self.frozen = False

        def __getattr__(self, name):
            return getattr(array, name)

        def __getitem__(self, key):
            if not self.frozen:
                self.frozen = subprocess.run(["chattr", "+i", str(out_dir)]).returncode == 0
            return array[key]

    frozen = FreezeOnFirstRead()
    try:
        with pytest.raises(Exception) as raised:  # noqa: B017 - whatever the codec raises
            write_ome_tiff(frozen, out_dir / "s.ome.tif", mpp=1.0, tile=128, compression="none", progress=False,
                           scratch_dir=tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(out_dir)], check=True)
    if not frozen.frozen:
        pytest.skip("chattr +i is not supported on this file system")
    assert not isinstance(raised.value, PermissionError), raised.value
    assert "Operation not permitted" not in str(raised.value)
    left = entries(out_dir) - {".s.ome.tif.lock"}  # immutable folder: the lock file stays too (and blocks nothing)
    assert len(left) == 1 and next(iter(left)).startswith(".s.ome.tif.nca-tiles-new-"), left
    good = write_canvas(tmp_path / "good", noisy_image(60, 50), chunk=128)
    write_ome_tiff(open_canvas(good), out_dir / "s.ome.tif", mpp=1.0, tile=128, compression="none", progress=False)
    assert entries(out_dir) == {"s.ome.tif"}


def test_a_full_disk_during_export_is_a_one_line_error(tmp_path):
    """No pre-flight in the writer itself: the file system really fills up mid-write."""
    from nca_tiles.errors import NcaTilesError
    from nca_tiles.export.ometiff import write_ome_tiff

    canvas = write_canvas(tmp_path / "canvas", noisy_image(1024, 1024), chunk=256)
    with small_file_system(tmp_path / "small", "1m") as small:
        with pytest.raises(NcaTilesError, match=r"writing .*s.ome.tif failed: .*free under .*small: free space or choose another --out"):
            write_ome_tiff(canvas / "canvas.zarr" / "rgb", small / "s.ome.tif", mpp=1.0, tile=256, compression="none", progress=False,
                           scratch_dir=tmp_path)
        assert entries(small) == set()


def test_kill_9_during_export_then_rerun_removes_the_dead_writers_temporaries(tmp_path):
    """A real kill -9 while ``export`` writes; meanwhile a second export of the same output is
    refused (the first holds the output); the rerun removes what the killed one left."""
    canvas = write_canvas(tmp_path / "canvas", noisy_image(3072, 3072), chunk=512, inner=128)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "s.ome.tif"
    proc = subprocess.Popen(command("export", canvas, "--out", out, "--compression", "none", "--tile", 256),
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(n.startswith(".s.ome.tif.nca-tiles-new-") for n in entries(out_dir)) or proc.poll() is not None,
                 what="the export's temporary file")
        assert proc.poll() is None, "the export finished before it could be killed"
        assert_one_line_error(run_cli("export", canvas, "--out", out), "output", f"in use by process {proc.pid}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    left = entries(out_dir)
    assert not out.exists() and any(n.startswith(".s.ome.tif.nca-tiles-") for n in left), left
    assert_ok(run_cli("export", canvas, "--out", out, "--compression", "none", "--tile", 256))
    assert entries(out_dir) == {"s.ome.tif"}


def test_export_refuses_the_canvas_of_a_killed_job_by_any_path(model, tmp_path):
    work = tmp_path / "work"
    proc = subprocess.Popen(command(*synth_args(model, tmp_path / "s.ome.tif", "--work-dir", work, steps=40)))
    try:
        wait_for(lambda: sweeps_done(work) >= 2 or proc.poll() is not None, what="two sweeps")
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 2 <= sweeps_done(work) < 41
    exported = tmp_path / "e.ome.tif"
    for source in canvas_paths(work):  # noise, or black where never written
        assert_one_line_error(run_cli("export", source, "--out", exported), "has not finished",
                              "rerun the same nca-tiles synthesize command")
    assert not exported.exists()
