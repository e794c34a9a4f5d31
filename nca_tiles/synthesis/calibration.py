"""The time estimate of ``synthesize --dry-run``, calibrated on the job's own windows.

Where a real ``synthesize`` spends its time, and how each part is calibrated here:

- **the model** on every window of every denoising sweep. A level's windows come in a handful of
  shapes (interior, edge and corner chunks, each ± the halo, clipped to the canvas): each distinct
  shape is timed with the job's batch and the way the run will execute the rule (compiled or
  eager), a few repeats each within a time budget — the shapes that weigh most first, and the
  largest one always. A shape the budget leaves untimed (only on huge jobs, where edge shapes weigh
  little) takes the per-pixel time of the timed shape nearest in size. The estimate is Σ over shapes
  of windows × seconds per window × steps; its spread comes from the fastest and the slowest
  repeat of each shape.
- **the compile** of the cell rule (``torch.compile``, once per process, inductor: seconds on a
  CPU): timed here on a slice of real windows (the compiled rule runs on bands of rows, so a few
  bands of the real width compile what the real windows need); a later call that compiles another
  graph adds its excess too.
- **``--compile auto``**: the run starts eager and compiles once its model calls have taken
  ``COMPILE_PAYS_AFTER_S``, then keeps the compiled rule only if it runs faster than eager
  (``pipeline.TRIAL_CALLS``); the estimate replays that on the calibrated times (eager ÷ compiled
  from the same slice timed both ways): where compiled is slower, the compile is paid and the rest
  of the run, every later level too, runs eager.
- **the rest of a sweep**: x_T (or, on a finer level, the upsampled coarser level re-noised), the
  zarr reads of windows and writes of chunks, the sampler's step, the per-group upkeep and the
  manifest; and the final **export**: each timed once on probe chunks in a temporary folder and
  scaled by pixels. Counted as if they did not overlap with the model (the run reads and writes on
  threads, which on a busy CPU mostly compete with it).

Not counted: starting the process and loading the model (a few seconds), and other processes that
start or end on the machine while the job runs.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nca_tiles.diffusion import compiled
from nca_tiles.diffusion.model import DiffNCA
from nca_tiles.diffusion.pipeline import COMPILE_PAYS_AFTER_S, Pipeline, initial_noise, predict_noise, reverse_step
from nca_tiles.synthesis.job import Chunk, Job

CALIBRATION_BUDGET_S = {"cpu": 20.0, "cuda": 10.0}  # wall seconds for all the timed model calls of a job
MAX_REPEATS = 3  # timed calls per window shape, at most
# ... and within the budget, at most about this share of the level's own model time (a dry run of
# a small job should not take longer than the job), though MIN_CALIBRATION_S in any case.
RELATIVE_BUDGET = 0.5
MIN_CALIBRATION_S = 2.0
PROBE_SIDE = 512  # chunk side of the I/O probe, at most: its costs are scaled by pixels


# -- the job's window shapes ----------------------------------------------------------------------
@dataclass(frozen=True)
class WindowShape:
    height: int
    width: int
    count: int  # windows of this shape in one sweep of the level

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def __str__(self) -> str:
        return f"{self.height}×{self.width}"


def window_shapes(grid: list[Chunk]) -> tuple[WindowShape, ...]:
    """The distinct window shapes of a level's grid with how many windows have each, in the order
    a sweep runs them (``job.batches`` groups windows by shape in order of first appearance)."""
    counts: dict[tuple[int, int], int] = {}
    for c in grid:
        counts[c.window_shape] = counts.get(c.window_shape, 0) + 1
    return tuple(WindowShape(h, w, n) for (h, w), n in counts.items())


def calls_per_sweep(shapes: tuple[WindowShape, ...], batch: int) -> list[tuple[int, int]]:
    """(shape index, windows) of each model call of a sweep, in order."""
    calls = []
    for i, s in enumerate(shapes):
        full, rest = divmod(s.count, batch)
        calls += [(i, batch)] * full + ([(i, rest)] if rest else [])
    return calls


# -- calibration results -------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeTiming:
    shape: WindowShape
    seconds: tuple[float, ...]  # per window, one entry per timed repeat (empty: not timed)


@dataclass(frozen=True)
class LevelCalibration:
    """How one level's model calls were timed, and what they took."""

    compiled: bool  # the rule ran compiled for the timings (how the run spends most of its model time)
    compile_mode: str  # the pipeline's setting: "auto", "on" or "off"
    batch: int  # windows per model call (the job's batch)
    shapes: tuple[ShapeTiming, ...]  # every window shape of the level, in sweep order
    compile_seconds: float | None  # compiling while this level was timed (None: nothing compiled)
    eager_ratio: float | None  # eager ÷ compiled seconds on the same slice (--compile auto only)
    eager_s_per_pixel: float | None  # eager seconds per window pixel on that slice (--compile auto only)
    seconds: float  # wall time this level's calibration took
    slice_seconds: tuple[float, ...] = ()  # repeats on a slice of the largest window (its real width)

    @property
    def timed(self) -> list[ShapeTiming]:
        return [s for s in self.shapes if s.seconds]

    @property
    def spread_source(self) -> str | None:
        """Where the spread of a shape timed once comes from: "shapes" (the shapes timed twice or
        more), "slice" (repeats of a slice of the largest window), or None (nothing repeated)."""
        if any(len(s.seconds) > 1 for s in self.shapes):
            return "shapes"
        return "slice" if len(self.slice_seconds) > 1 else None

    def _relative_spread(self) -> tuple[float, float]:
        """Fastest and slowest repeat relative to the median: over the shapes timed twice or more,
        else over the slice's repeats."""
        series = [s.seconds for s in self.timed if len(s.seconds) > 1] or (
            [self.slice_seconds] if len(self.slice_seconds) > 1 else [])
        if not series:
            return 1.0, 1.0
        ratios = [(min(t) / statistics.median(t), max(t) / statistics.median(t)) for t in series]
        return min(r[0] for r in ratios), max(r[1] for r in ratios)

    def seconds_per_window(self, index: int, stat: str = "median") -> float:
        """Seconds per window of shape ``index`` in the calibrated mode: ``stat`` "low" (its
        fastest repeat), "median" or "high" (its slowest). A shape timed once takes the relative
        spread of the shapes timed more often (or of the slice); an untimed one the per-pixel time
        of the timed shape nearest in size."""
        timing = self.shapes[index]
        source = timing if timing.seconds else min(
            self.timed, key=lambda s: abs(math.log(s.shape.pixels / timing.shape.pixels)))
        scale = timing.shape.pixels / source.shape.pixels
        times = source.seconds
        median = statistics.median(times)
        if stat == "median":
            return median * scale
        if len(times) > 1:
            return (min(times) if stat == "low" else max(times)) * scale
        low, high = self._relative_spread()
        return median * scale * (low if stat == "low" else high)

    def median_s_per_megapixel(self) -> float:
        """Seconds per megapixel of window, over a whole sweep (median times)."""
        seconds = sum(s.shape.count * self.seconds_per_window(i) for i, s in enumerate(self.shapes))
        return seconds / (sum(s.shape.count * s.shape.pixels for s in self.shapes) / 1e6)


# -- timing model calls --------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@contextmanager
def _rule(pipeline: Pipeline, compiled_rule: bool):
    """Run the pipeline's rule compiled or eager for a while, then leave it as it was."""
    model = pipeline.model
    saved = pipeline.compile, model.compiled, pipeline.eager_seconds
    pipeline.compile, model.compiled = ("on" if compiled_rule else "off"), compiled_rule
    try:
        yield
    finally:
        pipeline.compile, model.compiled, pipeline.eager_seconds = saved


def _call(pipeline: Pipeline, height: int, width: int, n: int, t: int) -> tuple[float, bool]:
    """Wall seconds of one model call on ``n`` windows of height × width (from host memory, as the
    run's windows come), and whether it compiled a new graph."""
    x = torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(height * 7919 + width))
    counting = pipeline.model.compiled
    before = _graphs() if counting else 0
    _synchronize(pipeline.device)
    start = time.perf_counter()
    predict_noise(pipeline, x, t, [(0, 0)] * n, [0] * n)
    _synchronize(pipeline.device)
    seconds = time.perf_counter() - start
    return seconds, counting and _graphs() > before


def slice_height(height: int, width: int, device: torch.device) -> int:
    """Rows of a slice of a window that runs the rule on the same band shapes as the window (two
    bands of rows; the whole window where it has fewer)."""
    rows = max(2, DiffNCA.band_pixels(device) // width)
    return min(height, 2 * rows)


SLICE_REPEATS = 3  # timings of the slice of the largest window (cheap: two bands of rows)


def calibrate_level(pipeline: Pipeline, shapes: tuple[WindowShape, ...], batch: int, t: int, steps: int,
                    deadline: float, compiled_before: bool) -> LevelCalibration:
    """Time a level's window shapes in the mode the run will use for most of its model calls.

    First a slice of the largest window (two bands of rows at its real width: the compiled rule
    runs on bands, so this compiles what every window needs, and is the whole window where it has
    fewer rows): eager once under --compile auto (is compiling going to pay?), then in the run's
    mode, the first call compiling, SLICE_REPEATS more. Then every shape, largest share of the
    work first, up to MAX_REPEATS times each, within ``deadline`` (time.perf_counter) and about
    RELATIVE_BUDGET of the level's model time; the largest shape is always timed once.
    ``compiled_before``: an earlier level of the run compiles the rule (under --compile auto this
    level then compiles after its first call)."""
    started = time.perf_counter()
    mode = pipeline.compile
    device = pipeline.device
    can_compile = mode != "off" and compiled.available(device)
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i].count * shapes[i].pixels)
    main = order[0]
    n_main = min(batch, shapes[main].count)
    width = shapes[main].width
    rows = slice_height(shapes[main].height, width, device)
    slice_pixels = n_main * rows * width
    times: dict[int, list[float]] = {i: [] for i in range(len(shapes))}

    with _rule(pipeline, False):
        _call(pipeline, 16, 16, 1, t)  # eager warm-up: thread pools, allocator (no compile)
    eager_rate = None
    compile_now = can_compile and (mode == "on" or compiled_before)
    if can_compile and mode == "auto":
        with _rule(pipeline, False):
            eager_rate = _call(pipeline, rows, width, n_main, t)[0] / slice_pixels
        if not compile_now:  # does the run reach the point where compiling pays?
            eager_total = eager_rate * steps * sum(s.count * s.pixels for s in shapes) + pipeline.eager_seconds
            compile_now = eager_total >= 0.5 * COMPILE_PAYS_AFTER_S.get(device.type, 30.0)

    compile_seconds = 0.0
    pending: list[tuple[int, float]] = []  # calls that compiled a graph: (shape, seconds)
    with _rule(pipeline, compile_now):
        first, compiled_graph = _call(pipeline, rows, width, n_main, t)  # compiles (compiled, not warm)
        slice_times = []
        for _ in range(SLICE_REPEATS):
            seconds, new_graph = _call(pipeline, rows, width, n_main, t)
            if not new_graph:
                slice_times.append(seconds)
        steady = statistics.median(slice_times) if slice_times else first
        if compiled_graph:
            compile_seconds += max(0.0, first - steady)
        elif rows == shapes[main].height:
            slice_times.insert(0, first)  # nothing compiled: a repeat like the others
        if rows == shapes[main].height:  # the slice is the whole window: real repeats of it
            times[main] += [seconds / n_main for seconds in slice_times][:MAX_REPEATS]
        eager_ratio = eager_rate * slice_pixels / steady if compile_now and eager_rate is not None else None

        def predicted(i: int) -> float:
            n = min(batch, shapes[i].count)
            if times[i]:
                return statistics.median(times[i]) * n
            timed = [j for j in times if times[j]]
            if not timed:
                return steady / slice_pixels * shapes[i].pixels * n
            j = min(timed, key=lambda j: abs(math.log(shapes[j].pixels / shapes[i].pixels)))
            return statistics.median(times[j]) / shapes[j].pixels * shapes[i].pixels * n

        def level_seconds() -> float:  # the level's model time as far as timed so far
            return steps * sum(predicted(i) / min(batch, s.count) * s.count for i, s in enumerate(shapes))

        for repeat in range(MAX_REPEATS):
            for i in order:
                if len(times[i]) > repeat:
                    continue
                required = not times[main] and i == main
                # Within the budget, and never much longer than the model calls it calibrates.
                stop = min(deadline, started + max(MIN_CALIBRATION_S, RELATIVE_BUDGET * level_seconds()))
                if not required and time.perf_counter() + predicted(i) > stop:
                    continue
                n = min(batch, shapes[i].count)
                attempts = 3 if required else 1  # the largest shape again if a call compiled a graph
                for attempt in range(attempts):
                    seconds, new_graph = _call(pipeline, shapes[i].height, shapes[i].width, n, t)
                    if not new_graph or attempt == attempts - 1:
                        times[i].append(seconds / n)
                        break
                    pending.append((i, seconds))
    calibration = LevelCalibration(
        compiled=compile_now, compile_mode=mode, batch=batch,
        shapes=tuple(ShapeTiming(s, tuple(times[i])) for i, s in enumerate(shapes)), compile_seconds=None,
        eager_ratio=eager_ratio, eager_s_per_pixel=eager_rate, seconds=0.0, slice_seconds=tuple(slice_times))
    for i, seconds in pending:  # a call that compiled: its time beyond a steady call's is compile time
        compile_seconds += max(0.0, seconds - calibration.seconds_per_window(i) * min(batch, shapes[i].count))
    return replace(calibration, compile_seconds=compile_seconds if compile_now else None,
                   seconds=time.perf_counter() - started)


# -- the run's model time, replayed on the calibrated times -------------------------------------
@dataclass(frozen=True)
class ModelTime:
    seconds: float  # all model calls
    compile: float  # compiling the rule (included in seconds)
    eager: float  # model calls that run eager before --compile auto compiles (included in seconds)
    compile_assumed: bool = False  # the compile was not timed: COMPILE_PAYS_AFTER_S was assumed


def model_times(calibrations: list[LevelCalibration], pipelines: list[Pipeline], steps: list[int],
                stat: str = "median", warm: bool = False) -> list[ModelTime]:
    """Each level's model seconds: every model call of the run in order, eager or compiled as
    ``run_model`` would run it (``warm``: the rule is compiled in the running process already).

    The compile is paid by the first level whose calls run compiled — which need not be the level
    whose calibration compiled the rule: an early level may calibrate compiled yet stay eager in
    the run (too little work for ``--compile auto`` to switch), and the later levels' calibrations
    then find the rule compiled and time no compile. So compile seconds carry over to the next
    level that runs compiled; a level's own new graphs (other window sizes) add their excess."""
    out = []
    unpaid = 0.0  # compile seconds timed by earlier levels' calibrations that no replayed call paid yet
    reverted = False  # a replayed --compile auto trial found compiled slower: eager from then on
    for cal, pipeline, n_steps in zip(calibrations, pipelines, steps):
        shapes = tuple(s.shape for s in cal.shapes)
        per_window = [cal.seconds_per_window(i, stat) for i in range(len(shapes))]
        total = n_steps * sum(s.count * p for s, p in zip(shapes, per_window))  # all calls as calibrated
        if reverted:
            eager = total * ((cal.eager_ratio or 1.0) if cal.compiled else 1.0)
            out.append(ModelTime(eager, 0.0, eager))
            continue
        threshold = COMPILE_PAYS_AFTER_S.get(pipeline.device.type, 30.0)
        timed = cal.compile_seconds is not None
        own = cal.compile_seconds if timed else 0.0

        def compile_cost() -> tuple[float, bool]:
            """(seconds, assumed) this level pays on switching to compiled."""
            if warm:
                return own, False
            if timed or unpaid > 0:
                return unpaid + own, False
            return threshold, True  # never timed: assume about the threshold

        if cal.compiled and cal.compile_mode == "on":  # compiled from the first call
            paid, assumed = compile_cost()
            out.append(ModelTime(total + paid, paid, 0.0, assumed))
            warm, unpaid = True, 0.0
            continue
        if cal.compile_mode != "auto" or cal.eager_s_per_pixel is None:  # eager throughout
            out.append(ModelTime(total, 0.0, total))
            unpaid += own
            continue
        # --compile auto: each call runs eager until the pipeline's eager model time reaches the
        # threshold (or after its first call when the rule is warm), then compiled.
        if cal.compiled:  # calibrated compiled: eager calls cost eager_ratio times more
            eager_factor, compiled_factor = cal.eager_ratio or 1.0, 1.0
            if eager_factor < 1.0:  # compiled is slower: the trial (run_model) goes back to eager
                compiled_factor, reverted = eager_factor, True
        else:  # calibrated eager (the run was not expected to compile): compiled costs as much
            eager_factor, compiled_factor = 1.0, 1.0
        eager_seconds = pipeline.eager_seconds
        eager_time = done = 0.0  # eager seconds spent; the calibrated seconds of that work
        switched = False
        calls = calls_per_sweep(shapes, cal.batch)
        for _ in range(n_steps):
            for i, n in calls:
                cost = n * per_window[i]
                eager_time += cost * eager_factor
                eager_seconds += cost * eager_factor
                done += cost
                if warm or eager_seconds >= threshold:
                    switched = True
                    break
            if switched:
                break
        if not switched:
            out.append(ModelTime(eager_time, 0.0, eager_time))
            unpaid += own
            continue
        paid, assumed = compile_cost()
        rest = (total - done) * compiled_factor
        out.append(ModelTime(eager_time + paid + rest, paid, eager_time, assumed))
        warm, unpaid = True, 0.0
    return out


# -- everything else a sweep does, and the export --------------------------------------------
@dataclass(frozen=True)
class FixedCosts:
    """Seconds per pixel (or per event) of the work of a run that is not the model, from a probe."""

    noise_s_per_px: float  # x_T of a chunk (the first level's first sweep)
    lift_s_per_px: float  # upsample the coarser level and re-noise (a finer level's first sweep)
    read_s_per_px: float  # a window from the float zarr buffer
    write_s_per_px: float  # a chunk into the float zarr buffer
    rgb_s_per_px: float  # a chunk to uint8 into the rgb array (the job's last sweep)
    step_s_per_px: float  # the sampler's step on a chunk
    group_s: float  # per model call: handing free heap back, the thread share
    sweep_s: float  # per sweep: the manifest
    export_s_per_px: float  # the output file, per canvas pixel
    export: str  # what was exported, in words
    seconds: float  # wall time of the probe


@dataclass(frozen=True)
class ExportOptions:
    format: str = "ome-tiff"
    tile: int = 512
    compression: str = "jpeg"
    quality: int = 90

    def describe(self) -> str:
        return self.format if self.format == "ome-zarr" else f"{self.format}, {self.compression}"


def _median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _smooth_rgb(side: int) -> torch.Tensor:
    """A tissue-like probe image in model space: smooth blobs and a little grain (noise would make
    the compressors slower than on a real slide)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, max(2, side // 32), max(2, side // 32), generator=g) * 2 - 1
    up = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)[0]
    return (up + 0.05 * torch.randn(3, side, side, generator=g)).clamp(-1, 1)


def probe_fixed_costs(job: Job, pipeline: Pipeline, export: ExportOptions, mpp: float) -> FixedCosts:
    """Time, on probe chunks in a temporary folder, what a run does besides the model."""
    import zarr

    from nca_tiles.diffusion.checkpoint import atomic_write_json
    from nca_tiles.diffusion.scale_space import renoise, upsample_window
    from nca_tiles.runtime.memory import release_free_heap
    from nca_tiles.runtime.threads import rebalance_threads
    from nca_tiles.synthesis.export_job import write_output
    from nca_tiles.synthesis.sweeps import read_windows, write_chunks
    from nca_tiles.synthesis.workdir import inner_chunk

    started = time.perf_counter()
    inner = inner_chunk(job.chunk)
    side = job.chunk if job.chunk <= PROBE_SIDE else max(inner, PROBE_SIDE // inner * inner)
    halo = pipeline.halo
    px = side * side
    level = job.levels[-1]
    t = level.timesteps[0]
    t_prev = level.timesteps[1] if len(level.timesteps) > 1 else -1
    with tempfile.TemporaryDirectory(prefix="nca-tiles-dry-run-") as tmp:
        group = zarr.open_group(Path(tmp) / "canvas.zarr", mode="w")
        layout = {"shape": (2 * side, 2 * side, 3), "chunks": (inner, inner, 3), "shards": (side, side, 3)}
        buffer = group.create_array("x", **layout, dtype="float32", compressors=None, fill_value=0.0)
        rgb = group.create_array("rgb", **layout, dtype="uint8", fill_value=0)
        chunks = [Chunk(y, y + side, x, x + side, y, y + side, x, x + side) for y in (0, side) for x in (0, side)]
        image = _smooth_rgb(side)

        noise = _median_time(lambda: initial_noise(0, side, side, side, side))
        writes, rgb_writes = [], []
        for c in chunks:
            x = initial_noise(0, c.y0, c.x0, side, side)
            start = time.perf_counter()
            write_chunks(buffer, [c], [x], as_rgb=False)
            writes.append(time.perf_counter() - start)
            start = time.perf_counter()
            write_chunks(rgb, [c], [image], as_rgb=True)
            rgb_writes.append(time.perf_counter() - start)
        lo, hi = max(0, side // 2 - halo), min(2 * side, side // 2 + side + halo)
        window = Chunk(lo, hi, lo, hi, lo, hi, lo, hi)
        read = _median_time(lambda: read_windows(buffer, [window])) / window.window_pixels
        x = initial_noise(1, 0, 0, side, side).to(pipeline.device)
        eps = initial_noise(2, 0, 0, side, side).to(pipeline.device)
        step = _median_time(lambda: reverse_step(pipeline, job.sampler, eps, x, t, t_prev, 0, (0, 0), level.eta))
        lift = 0.0
        if len(job.levels) > 1:
            ratio = job.levels[-2].factor // job.levels[-1].factor
            c_side = side // ratio + 2
            coarse = initial_noise(3, 0, 0, c_side, c_side)
            lift = _median_time(lambda: renoise(
                upsample_window(coarse, (0, 0), (c_side, c_side), (0, 0), (side, side), ratio), 0.5, 0, 1, (0, 0)))
        group_s = _median_time(lambda: (release_free_heap(), rebalance_threads()))
        manifest = {"job": job.to_dict(), "sweeps_done": 0, "finished": False}
        sweep_s = _median_time(lambda: atomic_write_json(Path(tmp) / "manifest.json", manifest))
        out = Path(tmp) / ("probe.ome.zarr" if export.format == "ome-zarr" else "probe.ome.tif")
        start = time.perf_counter()
        write_output(rgb, out, fmt=export.format, mpp=mpp, generator=None, tile=export.tile,
                     compression=export.compression, quality=export.quality, scratch_dir=Path(tmp), progress=False)
        export_s = (time.perf_counter() - start) / (4 * px)
    return FixedCosts(
        noise_s_per_px=noise / px, lift_s_per_px=lift / px, read_s_per_px=read,
        write_s_per_px=statistics.median(writes) / px, rgb_s_per_px=statistics.median(rgb_writes) / px,
        step_s_per_px=step / px, group_s=group_s, sweep_s=sweep_s, export_s_per_px=export_s,
        export=export.describe(), seconds=time.perf_counter() - started)


def level_fixed_seconds(costs: FixedCosts, job: Job, level: int, grid: list[Chunk], batch: int) -> float:
    """A level's sweeps without the model: its first sweep, then per denoising step the window
    reads, the sampler's step and the chunk writes (the job's very last sweep writes uint8 rgb),
    the per-call upkeep and the manifest."""
    from nca_tiles.synthesis.job import batches

    steps = len(job.levels[level].timesteps)
    chunk_px = sum(c.pixels for c in grid)
    window_px = sum(c.window_pixels for c in grid)
    groups = len(batches(grid, batch))
    start = (costs.noise_s_per_px if level == 0 else costs.lift_s_per_px) * chunk_px
    start += costs.write_s_per_px * chunk_px + groups * costs.group_s + costs.sweep_s
    sweep = (costs.read_s_per_px * window_px + costs.step_s_per_px * chunk_px + groups * costs.group_s
             + costs.sweep_s)
    write = costs.write_s_per_px * chunk_px
    last = level == len(job.levels) - 1
    writes = (steps - 1) * write + (costs.rgb_s_per_px * chunk_px if last else write) if steps else 0.0
    return start + steps * sweep + writes
