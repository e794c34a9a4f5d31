"""What a synthesis job will cost, computed before anything runs (``synthesize --dry-run``)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nca_tiles.diffusion import compiled
from nca_tiles.diffusion.levels import SynthesisModel, cost_ratio_to_single_scale, macs_per_denoising_step
from nca_tiles.diffusion.pipeline import COMPILE_PAYS_AFTER_S, Pipeline
from nca_tiles.synthesis.calibration import (
    CALIBRATION_BUDGET_S,
    ExportOptions,
    FixedCosts,
    LevelCalibration,
    ModelTime,
    WindowShape,
    calibrate_level,
    level_fixed_seconds,
    model_times,
    probe_fixed_costs,
    window_shapes,
)
from nca_tiles.synthesis.diskspace import canvas_bytes, format_bytes
from nca_tiles.synthesis.job import Job, level_grids

MIB = 2**20
# What a run adds to the host's peak besides the tensors counted below, whatever the canvas:
# zarr's codecs and their buffers, the reader and writer threads' heaps (40–50 MiB measured on
# CPU with chunks of 256 and 512; README § Measurements).
RUNTIME_HOST_BYTES = 64 * MIB
# The first torch.compile in a process: inductor's, dynamo's and sympy's modules and the
# generated kernels, once, whatever the canvas (--no-compile: none). Measured on CPU: 170–180 MiB
# (2026-11), about 220 MiB on 2026-12-06's machine with the same torch (a run added 305 MiB where
# 192 here made the plan say 279: tests/test_synthesis.py, the plan's estimate covers the run).
COMPILE_HOST_BYTES = 256 * MIB


@dataclass(frozen=True)
class LevelEstimate:
    """A level's time: the median of the calibration, and from its fastest and slowest repeats."""

    seconds: float
    low: float
    high: float
    model: ModelTime  # the model calls (median), compile and eager calls before it included
    other: float  # the level's sweeps without the model: x_T or re-noise, zarr I/O, sampler steps

@dataclass(frozen=True)
class LevelPlan:
    factor: int
    width: int
    height: int
    chunks_y: int
    chunks_x: int
    steps: int
    window_pixels_per_sweep: int
    macs_per_cell_step: int
    # Model seconds per megapixel of window per denoising step (calibrated: median, the mode the
    # run mostly uses, compile excluded).
    seconds_per_megapixel_step: float | None = None
    windows: tuple[WindowShape, ...] = ()  # the distinct window shapes of a sweep, with their counts
    calibration: LevelCalibration | None = None
    estimate: LevelEstimate | None = None

    @property
    def halo_overhead(self) -> float:
        """Pixels computed ÷ pixels kept, per denoising step (docs/design.md §3)."""
        return self.window_pixels_per_sweep / (self.width * self.height)

    @property
    def flops(self) -> float:
        return 2.0 * self.macs_per_cell_step * self.window_pixels_per_sweep * self.steps

    @property
    def estimated_seconds(self) -> float | None:
        if self.estimate is not None:
            return self.estimate.seconds
        if self.seconds_per_megapixel_step is None:
            return None
        return self.seconds_per_megapixel_step * self.window_pixels_per_sweep / 1e6 * self.steps


@dataclass(frozen=True)
class Estimate:
    seconds: float
    low: float
    high: float


@dataclass(frozen=True)
class Plan:
    levels: list[LevelPlan]
    canvas_pixels: int
    sweeps: int
    canvas_bytes: int
    host_bytes: int  # the run's peak host memory above the loaded model, compile_bytes included
    device_bytes: int
    cost_ratio_to_single_scale: float  # FLOPs per output pixel ÷ the finest level alone, same steps
    fixed_costs: FixedCosts | None = None  # the probe of what a run does besides the model
    export_seconds: float = 0.0  # writing the output, estimated from the probe
    calibration_seconds: float = 0.0  # wall time of the whole calibration
    threads: int | None = None  # torch threads the calibration ran with
    compile_bytes: int = 0  # of host_bytes: torch.compile's, if the run may compile

    @property
    def chunks_y(self) -> int:
        return self.levels[-1].chunks_y

    @property
    def chunks_x(self) -> int:
        return self.levels[-1].chunks_x

    @property
    def window_pixels_per_sweep(self) -> int:
        return self.levels[-1].window_pixels_per_sweep

    @property
    def halo_overhead(self) -> float:
        return self.levels[-1].halo_overhead

    @property
    def estimated_seconds(self) -> float | None:
        times = [level.estimated_seconds for level in self.levels]
        return None if any(t is None for t in times) else sum(times) + self.export_seconds

    @property
    def estimate(self) -> Estimate | None:
        """The whole job's time with its spread (None: not calibrated)."""
        if any(level.estimate is None for level in self.levels):
            return None
        return Estimate(*(sum(getattr(level.estimate, k) for level in self.levels) + self.export_seconds
                          for k in ("seconds", "low", "high")))

    @property
    def seconds_per_megapixel_step(self) -> float | None:
        return self.levels[-1].seconds_per_megapixel_step


def activation_bytes(pipeline: Pipeline, window_pixels: int) -> int:
    """Live float32 tensors of one window's model call at inference: over the window the two state
    buffers that swap every NCA step and ε̂; over one band of rows (model.band_pixels) the padded
    and perceived state, the 2c input of the hidden layer, three hidden-size tensors, the update
    and its mask."""
    cfg = pipeline.model.config
    band = min(window_pixels, pipeline.model.band_pixels(pipeline.device))
    return 4 * (window_pixels * (2 * cfg.channels + cfg.image_channels) + band * (6 * cfg.channels + 3 * cfg.hidden))


def may_compile(model: SynthesisModel) -> bool:
    """Whether a run of ``model`` in this process may still pay torch.compile's first compile
    (--compile on or auto, the rule not compiled here yet)."""
    from nca_tiles.diffusion.model import rule_is_warm

    return any(lv.pipeline.compile != "off" for lv in model.levels) and not rule_is_warm()


def make_plan(model: SynthesisModel, job: Job, batch: int, calibrate: bool = True,
              export: ExportOptions | None = None, budget_s: float | None = None) -> Plan:
    """The plan of ``job``; ``calibrate``: with a time estimate from timing the job's own window
    shapes (nca_tiles.synthesis.calibration), in about ``budget_s`` seconds (default:
    CALIBRATION_BUDGET_S for the device)."""
    levels, act = [], 0
    grids = level_grids(job, model)
    for level, grid, lv in zip(job.levels, grids, model.levels):
        window = max(c.window_pixels for c in grid)
        act = max(act, activation_bytes(lv.pipeline, window) * batch)
        levels.append(LevelPlan(
            factor=level.factor, width=level.width, height=level.height,
            chunks_y=-(-level.height // job.chunk), chunks_x=-(-level.width // job.chunk),
            steps=len(level.timesteps), window_pixels_per_sweep=sum(c.window_pixels for c in grid),
            macs_per_cell_step=macs_per_denoising_step(lv.pipeline), windows=window_shapes(grid),
        ))
    window = max(c.window_pixels for grid in grids for c in grid)
    io = 3 * batch * window * 3 * 4  # one group being read, one computed, one written
    step = 6 * batch * job.chunk**2 * 3 * 4  # the schedule's step and its noise: ~6 chunk-sized tensors
    on_cpu = model.device.type == "cpu"
    compile_bytes = COMPILE_HOST_BYTES if may_compile(model) else 0
    plan = Plan(
        levels=levels,
        canvas_pixels=job.width * job.height,
        sweeps=job.sweeps,
        canvas_bytes=canvas_bytes(job.width, job.height, job.chunk, [(lv.width, lv.height) for lv in job.levels]),
        host_bytes=io + step + (act if on_cpu else 0) + RUNTIME_HOST_BYTES + compile_bytes,
        device_bytes=act + step if not on_cpu else 0,
        cost_ratio_to_single_scale=cost_ratio_to_single_scale(model, [list(lv.timesteps) for lv in job.levels]),
        compile_bytes=compile_bytes,
    )
    return calibrate_plan(plan, model, job, batch, export or ExportOptions(), budget_s) if calibrate else plan


def calibrate_plan(plan: Plan, model: SynthesisModel, job: Job, batch: int, export: ExportOptions,
                   budget_s: float | None = None) -> Plan:
    """``plan`` with its time estimate: each level's window shapes timed (the budget shared out
    by the levels' FLOPs), the run's model calls replayed on those times (compile included), plus
    what the run does besides the model, from a probe."""
    from dataclasses import replace

    from nca_tiles.diffusion import compiled
    from nca_tiles.diffusion.model import rule_is_warm
    from nca_tiles.runtime.memory import configure_allocator

    configure_allocator()  # as synthesize_slide: the allocator the run's model calls meet
    started = time.perf_counter()
    warm = rule_is_warm()  # compiled in this process already: a run here pays no compile
    budget = CALIBRATION_BUDGET_S.get(model.device.type, 20.0) if budget_s is None else budget_s
    flops = [level.flops for level in plan.levels]
    calibrations: list[LevelCalibration] = []
    share = 0.0
    with compiled.warmth_unchanged():
        for level, lv, level_job, level_flops in zip(plan.levels, model.levels, job.levels, flops):
            share += level_flops / (sum(flops) or 1.0)
            calibrations.append(calibrate_level(
                lv.pipeline, level.windows, batch, level_job.timesteps[0], level.steps,
                deadline=started + budget * share, compiled_before=warm or any(c.compiled for c in calibrations)))
    fixed = probe_fixed_costs(job, model.finest, export, model.mpp)
    pipelines = [lv.pipeline for lv in model.levels]
    steps = [level.steps for level in plan.levels]
    times = {stat: model_times(calibrations, pipelines, steps, stat, warm) for stat in ("low", "median", "high")}
    grids = level_grids(job, model)
    levels = []
    for k, (level, cal) in enumerate(zip(plan.levels, calibrations)):
        other = level_fixed_seconds(fixed, job, k, grids[k], batch)
        low, mid, high = (times[stat][k].seconds + other for stat in ("low", "median", "high"))
        levels.append(replace(
            level, calibration=cal, seconds_per_megapixel_step=cal.median_s_per_megapixel(),
            estimate=LevelEstimate(mid, min(low, mid), max(high, mid), times["median"][k], other)))
    return replace(plan, levels=levels, fixed_costs=fixed, export_seconds=fixed.export_s_per_px * plan.canvas_pixels,
                   calibration_seconds=time.perf_counter() - started, threads=torch.get_num_threads())


def format_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    if s < 2 * 365 * 86400:
        return f"{s / 86400:.1f} days"
    return f"{s / (365 * 86400):.1f} years"


_UNITS = ((120, 1, "s"), (7200, 60, "min"), (2 * 86400, 3600, "h"), (2 * 365 * 86400, 86400, "days"),
          (math.inf, 365 * 86400, "years"))


def _unit(seconds: float) -> tuple[int, str]:
    return next((divisor, unit) for limit, divisor, unit in _UNITS if seconds < limit)


def format_span(low: float, high: float) -> str:
    """``2.6–3.4 min``: a range of seconds in the unit ``format_seconds`` gives its upper end."""
    divisor, unit = _unit(high)
    digits = 0 if high / divisor >= 100 or unit == "s" and high >= 10 else 1
    return f"{low / divisor:.{digits}f}–{high / divisor:.{digits}f} {unit}"


def format_estimate(seconds: float, low: float, high: float) -> str:
    """``3.0 min (2.6–3.4 min)``: an estimate and its range, in one unit."""
    divisor, unit = _unit(high)
    digits = 0 if high / divisor >= 100 or unit == "s" and high >= 10 else 1
    return f"{seconds / divisor:.{digits}f} {unit} ({format_span(low, high)})"


def format_short(seconds: float) -> str:
    """Seconds of a part of the job: tenths below 10 s, else as ``format_seconds``."""
    return f"{seconds:.1f} s" if seconds < 10 else format_seconds(seconds)


def describe_calibration(cal: LevelCalibration, limit: int = 4) -> str:
    """``9 window shapes, timed compiled at batch 1: 532×532 ×1 (3×), …``."""
    shapes = sorted(cal.shapes, key=lambda s: -s.shape.count * s.shape.pixels)
    listed = [f"{s.shape} ×{s.shape.count:,} ({len(s.seconds)}×)" for s in shapes[:limit]]
    if len(shapes) > limit:
        repeats = sorted({len(s.seconds) for s in shapes[limit:]})
        listed.append(f"{len(shapes) - limit} more ({repeats[0]}–{repeats[-1]}×)" if len(repeats) > 1 else
                      f"{len(shapes) - limit} more ({repeats[0]}× each)")
    text = (f"{len(shapes)} window shape{'s' if len(shapes) > 1 else ''}, timed "
            f"{'compiled' if cal.compiled else 'eager'} at batch {cal.batch}: {', '.join(listed)}")
    untimed = len(shapes) - len(cal.timed)
    if untimed:
        text += (f" ({untimed} not timed, the time budget spent: the per-pixel time of the timed shape nearest in "
                 "size)")
    return text


def describe_model_time(total: ModelTime, levels: list[LevelPlan], device: torch.device) -> str:
    """How the run's model calls will run, as the replay of the run found: eager, compiled, or
    eager then compiled."""
    cals = [level.calibration for level in levels if level.calibration is not None]
    if total.eager >= total.seconds - 1e-9:  # never compiles
        auto = [c for c in cals if c.compile_mode == "auto"]
        cpu_default = compiled.default_mode() == "auto" and not compiled.auto_compiles(device)
        why = ("--compile auto: compiling would not pay for this job" if any(c.eager_s_per_pixel for c in auto) else
               "torch.compile unavailable here" if auto else
               "--compile auto is eager on a CPU" if cpu_default else "--no-compile")
        return f"model calls: {format_short(total.seconds)}, eager ({why})"
    threshold = COMPILE_PAYS_AFTER_S.get(device.type, 30.0)
    parts = [f"model calls: {format_short(total.seconds)}, compiled"]
    if total.eager > 0:
        parts.append(f"after {format_short(total.eager)} eager (--compile auto compiles once eager calls have "
                     f"taken {threshold:g} s)")
    if total.compile > 0:
        parts.append(f"the compile {'assumed' if total.compile_assumed else 'timed here'}: "
                     f"{format_short(total.compile)}, once per process (less with a warm inductor cache)")
    else:
        parts.append("the rule compiled in this process already")
    return ", ".join(parts)


def describe_plan(plan: Plan, model: SynthesisModel, job: Job, batch: int, work_dir: Path) -> str:
    finest = model.finest
    lines = [
        f"canvas: {job.width} × {job.height} px ({plan.canvas_pixels / 1e6:,.1f} MP) at {model.mpp} µm/px",
        f"model: {model.hash} ({model.describe()}), device {model.device}, {model.precision}",
        f"sampler: {job.sampler}, {job.steps} denoising steps, seed {job.seed}",
    ]
    for k, (level, lv) in enumerate(zip(plan.levels, model.levels)):
        p = lv.pipeline
        name = f"level {k} (1/{level.factor})" if model.is_scale_space else "level"
        lines.append(
            f"{name}: {level.width} × {level.height} cells of {level.factor * model.mpp:g} µm, "
            f"{level.chunks_y} × {level.chunks_x} chunks of {job.chunk}, {level.steps} steps, "
            f"model {p.hash} ({p.model.num_parameters():,} parameters, halo {p.halo} px), "
            f"halo overhead {level.halo_overhead:.3f}×, {level.flops / 1e12:,.2f} TFLOP"
            + ("" if level.estimated_seconds is None else ", " + (
                format_seconds(level.estimated_seconds) if level.estimate is None else
                format_estimate(level.estimate.seconds, level.estimate.low, level.estimate.high)))
        )
    lines += [
        f"chunk grid: {plan.chunks_y} × {plan.chunks_x} = {plan.chunks_y * plan.chunks_x:,} chunks of {job.chunk} px, "
        f"batch {batch}",
        f"halo overhead: {plan.halo_overhead:.3f}× pixels computed per pixel kept "
        f"(interior chunks: {((job.chunk + 2 * finest.halo) / job.chunk) ** 2:.3f}×)",
        f"FLOPs per output pixel ÷ single-scale sampling at the same {job.steps} steps: "
        f"{plan.cost_ratio_to_single_scale:.3f}",
        f"disk for the canvas: {format_bytes(plan.canvas_bytes)} in {work_dir} (as zarr stores it: edge inner chunks "
        "whole, shard indexes)",
        f"host memory per process (estimate, on top of the loaded model; each dask worker is one): "
        f"{format_bytes(plan.host_bytes)}"
        + (f", of which torch.compile's {format_bytes(plan.compile_bytes)} once (--no-compile: none)"
           if plan.compile_bytes else ""),
        f"device memory (estimate): {format_bytes(plan.device_bytes)}" if plan.device_bytes else "device memory: none (CPU)",
    ]
    estimate = plan.estimate
    if estimate is not None:
        sources = {level.calibration.spread_source for level in plan.levels}
        spread = ("one timing per window shape: no spread measured" if None in sources else
                  "from the fastest and slowest calibration repeats" + (
                      ", of a slice of the largest window where each shape was timed once"
                      if "slice" in sources else ""))
        lines.append(
            f"time (estimate, calibrated on {model.device} with {plan.threads} torch thread"
            f"{'s' if plan.threads != 1 else ''}): "
            f"{format_estimate(estimate.seconds, estimate.low, estimate.high)[:-1]} {spread})"
        )
        models = [level.estimate.model for level in plan.levels]
        total = ModelTime(sum(m.seconds for m in models), sum(m.compile for m in models),
                          sum(m.eager for m in models), any(m.compile_assumed for m in models))
        other = sum(level.estimate.other for level in plan.levels)
        lines.append(
            f"  {describe_model_time(total, plan.levels, model.device)}; the rest of the sweeps (x_T, zarr reads "
            f"and writes, sampler steps): {format_short(other)}; the export ({plan.fixed_costs.export}): "
            f"{format_short(plan.export_seconds)}; not counted: starting the process and loading the model"
        )
        for k, level in enumerate(plan.levels):
            name = f"level {k}" if model.is_scale_space else "calibration"
            lines.append(f"  {name}: {describe_calibration(level.calibration)}; "
                         f"{level.seconds_per_megapixel_step:.3f} s per megapixel of window per denoising step")
        lines.append(f"  calibrating took {format_short(plan.calibration_seconds)} "
                     f"(sweep costs besides the model: probe chunks in {tempfile.gettempdir()})")
    elif plan.estimated_seconds is not None:
        lines.append(
            f"time (estimate on {model.device}): {format_seconds(plan.estimated_seconds)} "
            f"({plan.seconds_per_megapixel_step:.3f} s per megapixel per denoising step at full resolution)"
        )
        if model.device.type == "cpu" and plan.estimated_seconds > 86400:
            lines.append("this is more than a day on this CPU: a GPU (--device cuda --batch 4) or a dask cluster "
                         "(--workers N, --scheduler tcp://HOST:8786) is the way")
    return "\n".join(lines)
