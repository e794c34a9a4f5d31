"""The invariants of tiled synthesis: tiled equals whole, any executor, resume after kill -9,
memory bounded by the chunk, not the canvas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nca_tiles.diffusion.levels import load_synthesis_model
from nca_tiles.diffusion.pipeline import generate_region, load_model
from nca_tiles.synthesis.job import batches, chunk_grid
from nca_tiles.synthesis.slide_job import SlideRequest, synthesize_slide
from helpers import (
    assert_same_image,
    needs_proc,
    run_measuring,
    save_test_model,
    save_test_scale_space_model,
    synthesize_test_slide,
)

W, H = 150, 230  # sides that are not multiples of any chunk size below


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def ddpm_model_dir(tmp_path_factory) -> Path:
    # A short schedule (T = 12), so that a DDPM run with noise at every step stays quick.
    return save_test_model(tmp_path_factory.mktemp("ddpm_model"), timesteps=12, seed=1)


def synthesize(model_dir: Path, out: Path, chunk: int, sampler="ddim", steps=4, **kw) -> np.ndarray:
    return synthesize_test_slide(model_dir, out, W, H, chunk, sampler, steps, **kw)


def test_chunk_grid_covers_canvas_once():
    chunks = chunk_grid(H, W, 48, halo=5)
    cover = np.zeros((H, W), int)
    for c in chunks:
        cover[c.y0 : c.y1, c.x0 : c.x1] += 1
        assert c.wy0 == max(0, c.y0 - 5) and c.wx1 == min(W, c.x1 + 5)
    assert (cover == 1).all()
    assert sorted(sum((g for g in batches(chunks, 3)), []), key=lambda c: (c.y0, c.x0)) == chunks


@pytest.mark.parametrize("sampler,steps", [("ddim", 4), ("ddpm", None)])
def test_tiled_equals_whole(model_dir, ddpm_model_dir, tmp_path, sampler, steps):
    model = model_dir if sampler == "ddim" else ddpm_model_dir
    whole = synthesize(model, tmp_path / "whole.ome.tif", chunk=max(W, H), sampler=sampler, steps=steps)
    assert whole.std() > 5  # a real image, not a constant
    in_memory = generate_region(load_model(model, "cpu"), H, W, seed=7, steps=steps, sampler=sampler)
    assert_same_image(in_memory, whole)
    for chunk in (32, 48, 64, 100):
        tiled = synthesize(model, tmp_path / f"tiled{chunk}.ome.tif", chunk=chunk, sampler=sampler, steps=steps)
        assert_same_image(tiled, whole)


def test_batching_does_not_change_pixels(model_dir, tmp_path):
    one = synthesize(model_dir, tmp_path / "b1.ome.tif", chunk=32, batch=1)
    many = synthesize(model_dir, tmp_path / "b5.ome.tif", chunk=32, batch=5)
    assert_same_image(one, many)


def test_seed_changes_pixels(model_dir, tmp_path):
    pipeline = load_model(model_dir, "cpu")
    a = generate_region(pipeline, 40, 40, seed=1, steps=3)
    b = generate_region(pipeline, 40, 40, seed=2, steps=3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_dask_cluster_equals_in_process(model_dir, tmp_path):
    from dask.distributed import LocalCluster

    in_process = synthesize(model_dir, tmp_path / "local.ome.tif", chunk=64)
    distributed = synthesize(model_dir, tmp_path / "dask.ome.tif", chunk=64, workers=2)
    assert_same_image(distributed, in_process)
    # An existing cluster, reached by its scheduler's address (--scheduler tcp://…).
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = synthesize(model_dir, tmp_path / "remote.ome.tif", chunk=64, scheduler=cluster.scheduler_address)
    assert_same_image(remote, in_process)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nca_tiles_cli.main", "synthesize", *args]


def test_kill_9_then_rerun_resumes_to_the_same_slide(model_dir, tmp_path):
    args = ["--model", str(model_dir), "--width", "128", "--height", "96", "--chunk", "32", "--steps", "16",
            "--seed", "3", "--compression", "none", "--tile", "64", "--no-progress"]
    work = tmp_path / "work"
    out = tmp_path / "resumed.ome.tif"
    proc = subprocess.Popen(cli(*args, "--out", str(out), "--work-dir", str(work)))
    manifest = work / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["sweeps_done"] >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(manifest.read_text())["sweeps_done"]
    assert 3 <= done < 17 and not out.exists()
    subprocess.run(cli(*args, "--out", str(out), "--work-dir", str(work)), check=True)
    straight = tmp_path / "straight.ome.tif"
    subprocess.run(cli(*args, "--out", str(straight)), check=True)
    assert np.array_equal(tifffile.imread(out, level=0), tifffile.imread(straight, level=0))
    assert not (work / "canvas.zarr" / "x0").exists()  # float buffers removed when done


PEAK_RSS = """
import sys
from pathlib import Path
from nca_tiles.diffusion.levels import load_synthesis_model
from nca_tiles.synthesis.slide_job import SlideRequest, synthesize_slide
model = load_synthesis_model(sys.argv[1], "cpu")
before = peak_kib()
side = int(sys.argv[2])
req = SlideRequest(width=side, height=side, out=Path(sys.argv[3]), chunk=256, steps=int(sys.argv[4]),
                   compression="none", tile=256)
synthesize_slide(req, model, progress=False)
print(before, peak_kib())
"""


@needs_proc
@pytest.mark.parametrize("kind, compile_mode",
                         [("single-scale", "off"), ("scale-space", "off"), ("single-scale", "on")])
def test_memory_is_bounded_by_chunk_not_canvas(model_dir, tmp_path, kind, compile_mode):
    """Also across the levels of a scale-space model: its coarse level and the move between levels
    (one denoising step a level) stay within the bound; and with the compiled rule. The compile
    mode is pinned: under --compile auto a run compiles once its eager calls pass 10 s, so on a
    slow machine the larger canvas alone would pay the compile's one-time ~180 MiB."""
    model, steps = (model_dir, 1) if kind == "single-scale" else (save_test_scale_space_model(tmp_path / "ss"), 2)
    env = {"NCA_TILES_COMPILE": compile_mode}
    # The small canvas is 2 × 2 chunks, so that both runs hold as many chunks in flight (reads
    # ahead, writes behind, each with its step's temporaries: the noise of a stochastic level);
    # what differs is the canvas alone.
    small_before, small = run_measuring(PEAK_RSS, model, 512, tmp_path / "small.ome.tif", steps, env=env)
    large_before, large = run_measuring(PEAK_RSS, model, 2048, tmp_path / "large.ome.tif", steps, env=env)
    assert small > small_before  # the measurement sees the run (no inherited peak hides it)
    assert large <= 1.5 * small, (small, large)
    # Stronger: the larger canvas adds far less than one of its float buffers (48 MiB) to the peak.
    growth = (large - large_before) - (small - small_before)
    assert growth < 24 * 1024, f"peak grew by {growth} KiB for a 64× larger canvas"


PLAN_VS_PEAK = """
import sys
from pathlib import Path
from nca_tiles.diffusion.levels import load_synthesis_model
from nca_tiles.synthesis.job import make_job
from nca_tiles.synthesis.plan import make_plan
from nca_tiles.synthesis.slide_job import SlideRequest, synthesize_slide
before = peak_kib()  # before the model loads: --compile on loads inductor's modules with it
model = load_synthesis_model(sys.argv[1], "cpu")
side, chunk, steps = map(int, sys.argv[3:6])
plan = make_plan(model, make_job(model, 1, side, side, chunk, "ddim", steps), 1, calibrate=False)
synthesize_slide(SlideRequest(width=side, height=side, out=Path(sys.argv[2]), chunk=chunk, steps=steps, seed=1),
                 model, progress=False)
print(before, peak_kib(), plan.host_bytes // 1024, plan.compile_bytes // 1024)
"""


@needs_proc
@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_the_plans_host_memory_estimate_covers_the_run(model_dir, tmp_path, compile_mode):
    """What --dry-run prints as host memory is what the run adds to the process' peak: it had
    counted the tensors alone (15 MiB here against a measured 54 MiB, 130 MiB compiled)."""
    from nca_tiles.diffusion import compiled

    if compile_mode == "on" and not compiled.available("cpu"):
        pytest.skip("no C++ compiler for torch.compile")
    before, peak, estimate, compile_part = run_measuring(
        PLAN_VS_PEAK, model_dir, tmp_path / "slide.ome.tif", 1024, 256, 2, env={"NCA_TILES_COMPILE": compile_mode})
    assert (compile_part > 0) == (compile_mode == "on")
    assert peak - before <= estimate, f"the run added {(peak - before) // 1024} MiB, the plan said {estimate // 1024}"
    assert estimate <= 3 * (peak - before), "the estimate is too far above the run to size a machine by"


def test_the_reader_and_writer_threads_run_no_torch_op(tmp_path):
    """Their work is numpy and zarr only: a torch op on another thread starts that thread's own
    OpenMP team, whose spinning threads slowed the model's calls on the main thread (2–13 %)."""
    import torch
    import zarr
    from torch.utils._python_dispatch import TorchDispatchMode

    from nca_tiles.synthesis.job import Chunk
    from nca_tiles.synthesis.sweeps import chunk_arrays, read_windows, write_arrays

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.aten.lift_fresh.default:  # torch.from_numpy: wraps, computes nothing
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    src = zarr.create_array(tmp_path / "src.zarr", shape=(40, 50, 3), chunks=(16, 16, 3), dtype="float32")
    src[:] = np.random.default_rng(0).standard_normal((40, 50, 3)).astype(np.float32)
    dst = zarr.create_array(tmp_path / "dst.zarr", shape=(40, 50, 3), chunks=(16, 16, 3), dtype="float32")
    group = [Chunk(0, 20, 0, 25, 0, 30, 0, 35), Chunk(20, 40, 25, 50, 10, 40, 15, 50)]
    with RecordOps() as reader:
        windows = read_windows(src, group)
    assert reader.ops == []
    np.testing.assert_array_equal(windows[1].permute(1, 2, 0).numpy(), src[10:40, 15:50])
    chunks = [windows[0, :, :20, :25], windows[1, :, 10:, 10:]]
    arrays = chunk_arrays(chunks, as_rgb=False)  # on the main thread: torch may run here
    with RecordOps() as writer:
        write_arrays(dst, group, arrays)
    assert writer.ops == []
    np.testing.assert_array_equal(dst[:20, :25], src[:20, :25])
    np.testing.assert_array_equal(dst[20:, 25:], src[20:, 25:])
