"""``synthesize --dry-run``'s time estimate: calibrated on exactly the job's window shapes (with
their counts, each level of a scale-space model), the run's compile mode replayed, a spread that
brackets the estimate, and what the dry run prints. No assertion here depends on how fast
anything runs."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_one_line_error, assert_ok, entries, run_cli, save_test_model, save_test_scale_space_model
from nca_tiles.diffusion.levels import load_synthesis_model
from nca_tiles.synthesis import calibration
from nca_tiles.synthesis.calibration import LevelCalibration, ShapeTiming, WindowShape, model_times, slice_height
from nca_tiles.synthesis.job import level_grids, make_job
from nca_tiles.synthesis.plan import format_estimate, format_seconds, format_span, make_plan


@pytest.fixture(autouse=True)
def eager_and_unhurried(monkeypatch):
    """Tests run the rule eager (compiling is test_compile's business) and give the calibration
    time to time every shape, however loaded the machine."""
    monkeypatch.setenv("NCA_TILES_COMPILE", "off")
    monkeypatch.setattr(calibration, "MIN_CALIBRATION_S", 120.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("model"))


@pytest.fixture()
def recorded_calls(monkeypatch) -> list[tuple[int, int, int]]:
    """(height, width, windows) of every model call the calibration makes."""
    calls = []
    real = calibration._call

    def call(pipeline, height, width, n, t):
        calls.append((height, width, n))
        return real(pipeline, height, width, n, t)

    monkeypatch.setattr(calibration, "_call", call)
    return calls


def distinct_windows(grid) -> Counter:
    return Counter(c.window_shape for c in grid)


@pytest.mark.parametrize("batch", [1, 2])
def test_calibration_times_exactly_the_jobs_window_shapes(model_dir, recorded_calls, batch):
    model = load_synthesis_model(model_dir, "cpu")
    job = make_job(model, 0, 300, 200, 64, "ddim", 3)  # 4 × 5 chunks: interior, edges, corners
    plan = make_plan(model, job, batch, budget_s=120)
    (grid,) = level_grids(job, model)
    (level,) = plan.levels
    expected = distinct_windows(grid)
    assert len(expected) == 9
    assert {(w.height, w.width): w.count for w in level.windows} == expected
    assert sum(w.count * w.pixels for w in level.windows) == level.window_pixels_per_sweep
    cal = level.calibration
    assert [s.shape for s in cal.shapes] == list(level.windows)
    assert cal.batch == batch and not cal.compiled
    assert all(len(s.seconds) == calibration.MAX_REPEATS for s in cal.shapes)  # a generous budget: all timed
    # Every model call the calibration made was a window of the job, with the job's batch (at most
    # the windows of that shape), but for the tiny warm-up.
    windows = {(h, w, min(batch, n)) for (h, w), n in expected.items()}
    assert set(recorded_calls) - windows == {(16, 16, 1)}
    assert windows <= set(recorded_calls)


def test_the_spread_brackets_the_estimate(model_dir):
    model = load_synthesis_model(model_dir, "cpu")
    job = make_job(model, 0, 200, 150, 64, "ddim", 2)
    plan = make_plan(model, job, 1, budget_s=120)
    (level,) = plan.levels
    cal = level.calibration
    for i in range(len(cal.shapes)):
        low, mid, high = (cal.seconds_per_window(i, stat) for stat in ("low", "median", "high"))
        assert 0 < low <= mid <= high
    estimate = plan.estimate
    assert 0 < estimate.low <= estimate.seconds <= estimate.high
    assert level.estimate.low <= level.estimate.seconds <= level.estimate.high
    assert estimate.seconds == pytest.approx(level.estimate.seconds + plan.export_seconds)
    assert plan.estimated_seconds == pytest.approx(estimate.seconds)
    assert level.estimate.other > 0 and plan.export_seconds > 0  # zarr I/O, sampler steps, export: counted


def test_a_scale_space_job_calibrates_each_level(tmp_path, recorded_calls):
    model = load_synthesis_model(save_test_scale_space_model(tmp_path, factor=2, t_start=120), "cpu")
    job = make_job(model, 0, 300, 200, 64, "ddim", 6)
    plan = make_plan(model, job, 1, budget_s=120)
    grids = level_grids(job, model)
    assert len(plan.levels) == 2
    for level, grid in zip(plan.levels, grids):
        assert {(w.height, w.width): w.count for w in level.windows} == distinct_windows(grid)
        assert [s.shape for s in level.calibration.shapes] == list(level.windows)
        assert all(s.seconds for s in level.calibration.shapes)
        assert level.estimate is not None and level.estimate.seconds > 0
    coarse, fine = (set(distinct_windows(grid)) for grid in grids)
    assert coarse != fine and coarse | fine <= {(h, w) for h, w, _ in recorded_calls}
    assert plan.estimate.seconds == pytest.approx(sum(lv.estimate.seconds for lv in plan.levels) + plan.export_seconds)


def test_untimed_shapes_take_the_nearest_timed_shapes_time_per_pixel():
    shapes = (WindowShape(100, 100, 4), WindowShape(100, 50, 2), WindowShape(10, 10, 1))
    cal = LevelCalibration(compiled=False, compile_mode="off", batch=1,
                           shapes=(ShapeTiming(shapes[0], (1.0, 2.0, 3.0)), ShapeTiming(shapes[1], (0.5,)),
                                   ShapeTiming(shapes[2], ())),
                           compile_seconds=None, eager_ratio=None, eager_s_per_pixel=None, seconds=0.0)
    assert cal.seconds_per_window(0) == 2.0 and cal.seconds_per_window(0, "high") == 3.0
    # timed once: the relative spread of the shapes timed more often
    assert cal.seconds_per_window(1, "low") == pytest.approx(0.25) and cal.seconds_per_window(1, "high") == 0.75
    # untimed: per pixel as the timed shape nearest in size (100 × 50), so 0.5 × 100 / 5000
    assert cal.seconds_per_window(2) == pytest.approx(0.01)
    assert cal.spread_source == "shapes"
    # every shape timed once (a huge window): the spread of the repeats on a slice of it
    once = replace(cal, shapes=(ShapeTiming(shapes[0], (2.0,)), ShapeTiming(shapes[1], (0.5,))), slice_seconds=(1, 2, 3))
    assert once.spread_source == "slice"
    assert (once.seconds_per_window(0, "low"), once.seconds_per_window(0, "high")) == (1.0, 3.0)
    assert replace(once, slice_seconds=()).spread_source is None


def calibrated(mode: str, compiled: bool, seconds: float = 1.0, count: int = 4) -> LevelCalibration:
    shape = WindowShape(64, 64, count)
    return LevelCalibration(compiled=compiled, compile_mode=mode, batch=1, shapes=(ShapeTiming(shape, (seconds,)),),
                            compile_seconds=5.0 if compiled else None, eager_ratio=2.0 if mode == "auto" else None,
                            eager_s_per_pixel=1e-3 if mode == "auto" else None, seconds=0.0)


def pipeline(eager_seconds: float = 0.0):
    return SimpleNamespace(device=torch.device("cpu"), eager_seconds=eager_seconds)


def test_the_runs_compile_mode_is_replayed(monkeypatch):
    monkeypatch.setattr(calibration, "COMPILE_PAYS_AFTER_S", {"cpu": 10.0})
    # --compile auto: eager calls at 2 s each until 10 s of them, the compile, then compiled calls
    # at 1 s: 5 calls eager (10 s), 5 s compile, 40 − 5 calibrated seconds compiled.
    (auto,) = model_times([calibrated("auto", True)], [pipeline()], [10])
    assert (auto.seconds, auto.compile, auto.eager) == (50.0, 5.0, 10.0)
    # the rule warm in the process: one eager call, then compiled, no compile
    (warm,) = model_times([replace(calibrated("auto", True), compile_seconds=0.0)], [pipeline()], [10], warm=True)
    assert (warm.seconds, warm.compile, warm.eager) == (41.0, 0.0, 2.0)
    # a job too small for compiling to pay: eager throughout
    (small,) = model_times([calibrated("auto", True)], [pipeline()], [1])
    assert (small.seconds, small.compile, small.eager) == (8.0, 0.0, 8.0)
    (on,) = model_times([calibrated("on", True)], [pipeline()], [10])
    assert (on.seconds, on.compile, on.eager) == (45.0, 5.0, 0.0)
    (off,) = model_times([calibrated("off", False)], [pipeline()], [10])
    assert (off.seconds, off.compile, off.eager) == (40.0, 0.0, 40.0)
    # two levels: the second one's pipeline compiles after its first call, without compiling again
    # (its calibration found the rule compiled: no compile timed)
    again = replace(calibrated("auto", True), compile_seconds=0.0)
    first, second = model_times([calibrated("auto", True), again], [pipeline(), pipeline()], [10, 10])
    assert (first.compile, second.compile, second.eager, second.seconds) == (5.0, 0.0, 2.0, 41.0)


def test_a_compiled_rule_slower_than_eager_is_replayed_as_the_trial_runs_it(monkeypatch):
    monkeypatch.setattr(calibration, "COMPILE_PAYS_AFTER_S", {"cpu": 10.0})
    # compiled calls 1 s, eager 0.5 s: --compile auto compiles after 10 s of eager calls (20 of
    # them, 10 calibrated seconds), pays the compile, finds compiled slower and goes back to eager:
    # the other 20 calls cost 0.5 s each; every later level runs eager, compiling nothing.
    slower = replace(calibrated("auto", True), eager_ratio=0.5)
    first, second = model_times([slower, slower], [pipeline(), pipeline()], [10, 10])
    assert (first.seconds, first.compile, first.eager) == (25.0, 5.0, 10.0)
    assert (second.seconds, second.compile, second.eager) == (20.0, 0.0, 20.0)


def test_the_compile_is_paid_by_the_first_level_that_runs_compiled(monkeypatch):
    """The demo's dry run (bench_dry_run, 2026-11-24) estimated 46 s for a 74 s run: its coarse
    level calibrated compiled (the 5 s compile timed there) but has too little work to switch in
    the run, and the fine level's calibration found the rule compiled — so no level paid it."""
    monkeypatch.setattr(calibration, "COMPILE_PAYS_AFTER_S", {"cpu": 10.0})
    coarse = calibrated("auto", True, count=1)  # 1 step: one eager call of 2 s, never switches
    fine = replace(calibrated("auto", True), compile_seconds=0.0)
    first, second = model_times([coarse, fine], [pipeline(), pipeline()], [1, 10])
    assert (first.seconds, first.compile, first.eager) == (2.0, 0.0, 2.0)
    # 4 eager calls take the pipeline's own eager time to 8 s < 10: the fifth switches it
    assert (second.compile, second.eager, second.seconds) == (5.0, 10.0, 50.0)
    assert not second.compile_assumed
    # a level's own new graphs (other window sizes) add their excess to what it carries
    (on,) = model_times([replace(calibrated("on", True), compile_seconds=1.5)], [pipeline()], [10], warm=True)
    assert on.compile == 1.5


def test_a_compiling_level_calibrates_compiled(model_dir, monkeypatch, recorded_calls):
    from nca_tiles.diffusion import compiled

    if not compiled.available("cpu"):
        pytest.skip("no C++ compiler for torch.compile")
    monkeypatch.setenv("NCA_TILES_COMPILE", "on")
    compiled.reset()
    try:
        model = load_synthesis_model(model_dir, "cpu")
        job = make_job(model, 0, 160, 96, 64, "ddim", 2)
        plan = make_plan(model, job, 1, budget_s=120)
        (level,) = plan.levels
        assert level.calibration.compiled and level.calibration.compile_seconds is not None
        assert level.estimate.model.compile == level.calibration.compile_seconds
        main = max(level.windows, key=lambda w: w.count * w.pixels)
        height = slice_height(main.height, main.width, torch.device("cpu"))
        assert (height, main.width, 1) in recorded_calls  # the compile, on bands of the real width
        assert model.finest.compile == "on" and model.finest.eager_seconds == 0.0  # left as it was
    finally:
        compiled.reset()


def test_long_times_read_in_days_and_years():
    assert format_seconds(3 * 86400) == "3.0 days" and format_seconds(5 * 365 * 86400) == "5.0 years"
    assert format_span(2.6 * 60, 3.4 * 60) == "2.6–3.4 min"
    assert format_estimate(3e8, 2.9e8, 3.2e8) == "9.5 years (9.2–10.1 years)"
    assert format_estimate(40, 38, 45) == "40 s (38–45 s)"
    assert format_estimate(4.0, 3.5, 4.5) == "4.0 s (3.5–4.5 s)"


# -- at the command line ------------------------------------------------------------------------
def test_dry_run_prints_the_estimate_with_its_spread(model_dir, tmp_path):
    result = run_cli("synthesize", "--model", model_dir, "--width", 300, "--height", 200, "--chunk", 64,
                     "--steps", 3, "--out", tmp_path / "s.ome.tif", "--device", "cpu", "--dry-run")
    assert_ok(result)
    text = result.output
    line = next(line for line in text.splitlines() if line.startswith("time (estimate"))
    assert re.fullmatch(r"time \(estimate, calibrated on cpu with \d+ torch threads?\): [\d.]+ s \([\d.]+–[\d.]+ s "
                        r"from the fastest and slowest calibration repeats\)", line), line
    assert "calibration: 9 window shapes, timed eager at batch 1: 70×70 ×6 (3×)" in text
    assert "model calls: " in text and "eager (--no-compile)" in text and "the export (ome-tiff, jpeg)" in text
    level = next(line for line in text.splitlines() if line.startswith("level: "))
    assert re.search(r", [\d.]+ s \([\d.]+–[\d.]+ s\)$", level), level
    assert entries(tmp_path) == set()  # nothing written by the dry run


@pytest.mark.parametrize("args,message", [
    (["--width", 0], "--width"),
    (["--chunk", 3], "--chunk"),
    (["--steps", 1000], "--steps"),
    (["--batch", 0], "--batch"),
])
def test_a_bad_value_is_still_a_one_line_error(model_dir, tmp_path, args, message, recorded_calls):
    base = {"--width": 300, "--height": 200, "--chunk": 64, "--steps": 3}
    base.update(dict(zip(args[::2], args[1::2])))
    result = run_cli("synthesize", "--model", model_dir, *[str(a) for kv in base.items() for a in kv],
                     "--out", tmp_path / "s.ome.tif", "--device", "cpu", "--dry-run")
    assert_one_line_error(result, message)
    assert recorded_calls == []  # refused before any calibration


def test_with_dask_workers_the_estimate_says_it_is_for_one_process(model_dir, tmp_path):
    result = run_cli("synthesize", "--model", model_dir, "--width", 128, "--height", 96, "--chunk", 64,
                     "--steps", 2, "--out", tmp_path / "s.ome.tif", "--device", "cpu", "--workers", 2, "--dry-run")
    assert_ok(result)
    assert "the time is for one in-process run" in result.output


def test_the_description_follows_the_replayed_run(monkeypatch):
    from nca_tiles.synthesis.calibration import ModelTime
    from nca_tiles.synthesis.plan import describe_model_time

    cpu = torch.device("cpu")
    levels = [SimpleNamespace(calibration=calibrated("auto", True))]
    assert "eager (--compile auto: compiling would not pay" in describe_model_time(ModelTime(8.0, 0.0, 8.0), levels, cpu)
    text = describe_model_time(ModelTime(50.0, 5.0, 10.0), levels, cpu)
    assert "compiled, after 10 s eager" in text and "the compile timed here: 5.0 s" in text
    off = [SimpleNamespace(calibration=calibrated("off", False))]
    assert describe_model_time(ModelTime(40.0, 0.0, 40.0), off, cpu).endswith("eager (--no-compile)")
    # Not asked to: the default, eager on a CPU (it said "--no-compile", which nobody had typed).
    monkeypatch.setenv("NCA_TILES_COMPILE", "auto")
    assert describe_model_time(ModelTime(40.0, 0.0, 40.0), off, cpu).endswith("eager (--compile auto is eager on a CPU)")
