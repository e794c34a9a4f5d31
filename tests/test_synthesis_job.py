"""Nothing lost, nothing corrupted: a synthesis job raced by a second process, exported while it
runs, killed with -9 at its narrowest windows, pointed at read-only or full file systems or at an
unreachable scheduler.

Real processes and real files throughout: concurrent CLI runs, kill -9, read-only folders and
small tmpfs mounts (root only; skipped elsewhere).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nca_tiles.synthesis.diskspace import canvas_bytes, ome_tiff_bytes
from helpers import (
    assert_ok, assert_one_line_error, canvas_paths, command, entries, one_line_error, read_only_dir, run_cli,
    save_test_model, small_file_system, sweeps_done, synth_args, wait_for,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("model"))


# -- 1. two processes, one job ---------------------------------------------------------------------
@pytest.mark.parametrize("shared", ["default work dir", "same --work-dir"])
def test_two_runs_on_one_work_dir_one_wins_the_other_is_refused(model, tmp_path, shared):
    args = dict(width=96, height=80, steps=24)
    if shared == "default work dir":  # both on OUT.work
        outs = [tmp_path / "s.ome.tif"] * 2
        extra = [[], []]
    else:
        outs = [tmp_path / "a.ome.tif", tmp_path / "b.ome.tif"]
        extra = [["--work-dir", tmp_path / "work"]] * 2
    procs = [subprocess.Popen(command(*synth_args(model, out, *more, **args)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for out, more in zip(outs, extra)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    winners = [r for r in results if r[0].returncode == 0]
    losers = [r for r in results if r[0].returncode != 0]
    assert len(winners) == 1 and len(losers) == 1, [(r[0].returncode, r[2]) for r in results]
    (winner, stdout, _), (_, _, loser_stderr) = winners[0], losers[0]
    one_line_error(loser_stderr, "work dir", "is in use by process", f"process {winner.pid} on host {socket.gethostname()}",
                   "wait for it to finish")
    written = Path(stdout.split("wrote ", 1)[1].strip())
    reference = tmp_path / "reference" / "s.ome.tif"
    subprocess.run(command(*synth_args(model, reference, **args)), check=True, capture_output=True)
    assert np.array_equal(tifffile.imread(written, level=0), tifffile.imread(reference, level=0))
    if shared == "default work dir":
        assert entries(tmp_path) == {"s.ome.tif", "reference"}  # no work dir, no lock files left
    else:
        assert not [o for o in outs if o != written and o.exists()]


# -- 1. export of a work dir in use -----------------------------------------------------------------------
def test_export_refuses_a_work_dir_in_use(model, tmp_path):
    work = tmp_path / "work"
    proc = subprocess.Popen(command(*synth_args(model, tmp_path / "s.ome.tif", "--work-dir", work, steps=40)))
    try:
        wait_for(lambda: sweeps_done(work) >= 2 or proc.poll() is not None, what="two sweeps")
        assert proc.poll() is None, "the run finished before it could be observed"
        for source in canvas_paths(work):
            assert_one_line_error(run_cli("export", source, "--out", tmp_path / "e.ome.tif"), "work dir",
                                  f"in use by process {proc.pid}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "e.ome.tif").exists()


# -- 3. unwritable locations are refused before any work -------------------------------------------------
def test_out_in_a_read_only_folder_is_refused_before_any_work(model, tmp_path):
    work = tmp_path / "work"
    with read_only_dir(tmp_path / "ro") as ro:
        result = run_cli(*synth_args(model, ro / "s.ome.tif", "--work-dir", work))
        assert_one_line_error(result, "cannot write --out", "not writable")
    assert not work.exists()  # nothing computed


def test_work_dir_in_a_read_only_folder_is_refused(model, tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        result = run_cli(*synth_args(model, tmp_path / "s.ome.tif", "--work-dir", ro / "work"))
        assert_one_line_error(result, "cannot write --work-dir", "not writable")
    assert entries(tmp_path) == {"ro"}


# -- 4. an unreachable scheduler ------------------------------------------------------------------------
@pytest.mark.parametrize("address", ["tcp://127.0.0.1:1", "notaurl"])
def test_unreachable_scheduler_is_a_quick_one_line_error_leaving_nothing(model, tmp_path, address):
    out = tmp_path / "s.ome.tif"
    start = time.perf_counter()
    result = subprocess.run(command(*synth_args(model, out, "--scheduler", address)), capture_output=True,
                            text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    one_line_error(result.stderr, "cannot connect to the dask scheduler", address)
    assert elapsed < 25, elapsed  # model load + a 5 s connection timeout, not dask's 30 s
    assert entries(tmp_path) == set()  # no default work dir


# -- 5. disk: what is really written, per file system -----------------------------------------------------
def test_canvas_estimate_counts_what_zarr_really_stores(model, tmp_path):
    work = tmp_path / "work"
    out = tmp_path / "s.ome.tif"
    assert_ok(run_cli(*synth_args(model, out, "--work-dir", work, "--keep-canvas", width=880, height=880, chunk=512,
                                  steps=2), "--tile", 512))
    on_disk = {name: sum(p.stat().st_blocks * 512 for p in (work / "canvas.zarr" / name).rglob("*") if p.is_file())
               for name in ("x0", "x1", "rgb")}
    sizes = {name: sum(p.stat().st_size for p in (work / "canvas.zarr" / name / "c").rglob("*") if p.is_file())
             for name in ("x0", "x1")}
    # Edge shards hold whole 128 px inner chunks (880 -> 896) plus a 260-byte index each:
    # more than the pixels, which is all the old estimate (27 bytes a pixel) counted.
    assert sizes["x0"] == sizes["x1"] == 896 * 896 * 3 * 4 + 4 * (16 * 16 + 4)
    assert sizes["x0"] > 880 * 880 * 3 * 4
    # The estimate the pre-flight and the dry run use.
    from nca_tiles.diffusion.levels import load_synthesis_model
    from nca_tiles.synthesis.job import make_job
    from nca_tiles.synthesis.plan import make_plan

    loaded = load_synthesis_model(model, "cpu")
    estimate = make_plan(loaded, make_job(loaded, 0, 880, 880, 512, "ddim", 2), 1, calibrate=False).canvas_bytes
    assert estimate == canvas_bytes(880, 880, 512)
    total = sum(p.stat().st_blocks * 512 for p in (work / "canvas.zarr").rglob("*") if p.is_file())
    assert sum(on_disk.values()) <= total <= estimate <= 1.15 * total, (total, estimate)
    assert os.path.getsize(out) <= ome_tiff_bytes(880, 880, 512, "none", 90) <= 1.3 * os.path.getsize(out)


def test_canvas_too_large_for_its_file_system_is_refused(model, tmp_path):
    # 880² px: 19.9 MiB by the old count (it fit), 20.7 MiB as zarr stores it (it does not).
    with small_file_system(tmp_path / "small", "20m") as small:
        result = run_cli(*synth_args(model, tmp_path / "s.ome.tif", "--work-dir", small / "work", width=880,
                                     height=880, chunk=512), "--tile", 512)
        assert_one_line_error(result, "not enough free disk for the canvas", "--work-dir")
        assert entries(small) == set()


def test_output_too_large_for_its_file_system_is_refused_before_any_work(model, tmp_path):
    work = tmp_path / "work"
    with small_file_system(tmp_path / "small", "2m") as small:
        args = synth_args(model, small / "s.ome.tif", "--work-dir", work, width=880, height=880, chunk=512)
        result = run_cli(*args, "--tile", 512)
        assert_one_line_error(result, "not enough free disk for the output", "--out")
        assert entries(small) == set()
        assert not work.exists()  # refused before the first sweep
        dry = run_cli(*args, "--tile", 512, "--dry-run")
        assert_one_line_error(dry, "the job would be refused", "not enough free disk for the output")
        assert f"file system of {small}: the output (estimate, none)" in dry.output
        assert f"file system of {tmp_path}: the canvas " in dry.output  # checked separately: another st_dev
        assert "would refuse the job: not enough free disk for the output" in dry.output


def test_needs_on_one_file_system_are_added_up(model, tmp_path):
    # Canvas 20.7 MiB fits in 24 MiB; canvas + output (4.8 MiB) + export scratch (0.8 MiB) do not.
    with small_file_system(tmp_path / "small", "24m") as small:
        result = run_cli(*synth_args(model, small / "s.ome.tif", width=880, height=880, chunk=512), "--tile", 512)
        assert_one_line_error(result, "not enough free disk for the canvas + the output (estimate, none) + "
                                      "the export's scratch")
        assert entries(small) == set()


# -- 6. kill -9 at the narrowest windows ---------------------------------------------------------------
KILL_AT = """
import os, signal, sys
from pathlib import Path
point = sys.argv[1]
if point == "before-manifest":
    from nca_tiles.synthesis import workdir as canvas
    canvas.WorkDir.write_manifest = lambda self, manifest: os.kill(os.getpid(), signal.SIGKILL)
else:  # after-rename: kill -9 as soon as the output has its final name
    out = os.path.abspath(sys.argv[sys.argv.index("--out") + 1])
    for name in ("replace", "rename"):
        def wrapped(src, dst, real=getattr(os, name), **kw):
            real(src, dst, **kw)
            if os.path.abspath(dst) == out:
                os.kill(os.getpid(), signal.SIGKILL)
        setattr(os, name, wrapped)
from nca_tiles_cli.main import cli
cli(sys.argv[2:])
"""


def killed_at(point: str, args: list) -> None:
    """Run the CLI in a process that kills itself with SIGKILL at ``point``: the windows are
    microseconds wide, so an outside kill cannot be timed into them; the kill itself is real."""
    result = subprocess.run([sys.executable, "-c", KILL_AT, point, *(str(a) for a in args)], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()


def test_kill_9_while_creating_the_work_dir_then_rerun_restarts_it(model, tmp_path):
    work = tmp_path / "work"
    out = tmp_path / "s.ome.tif"
    args = synth_args(model, out, "--work-dir", work)
    killed_at("before-manifest", args)
    assert (work / "canvas.zarr").exists() and not (work / "manifest.json").exists()
    assert_one_line_error(run_cli("export", work, "--out", tmp_path / "e.ome.tif"), "stopped while creating")
    assert_ok(run_cli(*args))
    reference = tmp_path / "reference.ome.tif"
    assert_ok(run_cli(*synth_args(model, reference)))
    assert np.array_equal(tifffile.imread(out, level=0), tifffile.imread(reference, level=0))


@pytest.mark.parametrize("fmt", ["ome-tiff", "ome-zarr"])
def test_kill_9_just_after_the_output_is_in_place_then_rerun_finishes_the_clean_up(model, tmp_path, fmt):
    out = tmp_path / ("s.ome.tif" if fmt == "ome-tiff" else "s.ome.zarr")
    args = synth_args(model, out, "--format", fmt)
    killed_at("after-rename", args)
    assert out.exists() and (tmp_path / f"{out.name}.work").is_dir()  # the canvas, orphaned
    identity = os.stat(out).st_ino
    result = run_cli(*args)
    assert_ok(result)
    assert entries(tmp_path) == {out.name}  # work dir and lock files gone
    assert os.stat(out).st_ino == identity  # the same output, not a new one
    # A foreign file at --out is still refused.
    other = tmp_path / "other.ome.tif"
    other.write_bytes(b"not ours")
    assert_one_line_error(run_cli(*synth_args(model, other)), "exists", "--overwrite")
