"""What a synthesis job will cost, computed before anything runs (``synthesize --dry-run``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nca_tiles.diffusion.levels import SynthesisModel, cost_ratio_to_single_scale, macs_per_denoising_step
from nca_tiles.diffusion.pipeline import Pipeline, predict_noise
from nca_tiles.synthesis.diskspace import canvas_bytes, format_bytes
from nca_tiles.synthesis.job import Job, level_grids

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
    seconds_per_megapixel_step: float | None = None

    @property
    def halo_overhead(self) -> float:
        """Pixels computed ÷ pixels kept, per denoising step (docs/design.md §3)."""
        return self.window_pixels_per_sweep / (self.width * self.height)

    @property
    def flops(self) -> float:
        return 2.0 * self.macs_per_cell_step * self.window_pixels_per_sweep * self.steps

    @property
    def estimated_seconds(self) -> float | None:
        if self.seconds_per_megapixel_step is None:
            return None
        return self.seconds_per_megapixel_step * self.window_pixels_per_sweep / 1e6 * self.steps


@dataclass(frozen=True)
class Plan:
    levels: list[LevelPlan]
    canvas_pixels: int
    sweeps: int
    canvas_bytes: int
    host_bytes: int
    device_bytes: int
    cost_ratio_to_single_scale: float  # FLOPs per output pixel ÷ the finest level alone, same steps

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
        return None if any(t is None for t in times) else sum(times)

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


def make_plan(model: SynthesisModel, job: Job, batch: int, calibrate: bool = True) -> Plan:
    levels, act = [], 0
    for level, grid, lv in zip(job.levels, level_grids(job, model), model.levels):
        window = max(c.window_pixels for c in grid)
        act = max(act, activation_bytes(lv.pipeline, window) * batch)
        levels.append(LevelPlan(
            factor=level.factor, width=level.width, height=level.height,
            chunks_y=-(-level.height // job.chunk), chunks_x=-(-level.width // job.chunk),
            steps=len(level.timesteps), window_pixels_per_sweep=sum(c.window_pixels for c in grid),
            macs_per_cell_step=macs_per_denoising_step(lv.pipeline),
            seconds_per_megapixel_step=calibrate_speed(lv.pipeline, job.chunk) if calibrate else None,
        ))
    window = max(c.window_pixels for grid in level_grids(job, model) for c in grid)
    io = 3 * batch * window * 3 * 4  # one group being read, one computed, one written
    step = 6 * batch * job.chunk**2 * 3 * 4  # the schedule's step and its noise: ~6 chunk-sized tensors
    on_cpu = model.device.type == "cpu"
    return Plan(
        levels=levels,
        canvas_pixels=job.width * job.height,
        sweeps=job.sweeps,
        canvas_bytes=canvas_bytes(job.width, job.height, job.chunk, [(lv.width, lv.height) for lv in job.levels]),
        host_bytes=io + step + (act if on_cpu else 0),
        device_bytes=act + step if not on_cpu else 0,
        cost_ratio_to_single_scale=cost_ratio_to_single_scale(model, [list(lv.timesteps) for lv in job.levels]),
    )


def calibrate_speed(pipeline: Pipeline, chunk: int, side: int = 256) -> float:
    """Seconds per megapixel of window per denoising step, timed on one small window."""
    side = min(side, chunk + 2 * pipeline.halo)
    x = torch.zeros(1, 3, side, side)
    predict_noise(pipeline, x[:, :, :16, :16], 1, [(0, 0)], [0])  # warm-up
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    predict_noise(pipeline, x, 1, [(0, 0)], [0])
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (side * side / 1e6)


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
            + ("" if level.estimated_seconds is None else f", {format_seconds(level.estimated_seconds)}")
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
        f"host memory (estimate, on top of the loaded model and libraries): {format_bytes(plan.host_bytes)}",
        f"device memory (estimate): {format_bytes(plan.device_bytes)}" if plan.device_bytes else "device memory: none (CPU)",
    ]
    if plan.estimated_seconds is not None:
        lines.append(
            f"time (estimate from a calibration run on {model.device}): {format_seconds(plan.estimated_seconds)} "
            f"({plan.seconds_per_megapixel_step:.3f} s per megapixel per denoising step at full resolution)"
        )
        if model.device.type == "cpu" and plan.estimated_seconds > 86400:
            lines.append("this is more than a day on this CPU: a GPU (--device cuda --batch 4) or a dask cluster "
                         "(--workers N, --scheduler tcp://HOST:8786) is the way")
    return "\n".join(lines)
