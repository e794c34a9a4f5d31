"""What a synthesis job will cost, computed before anything runs (``synthesize --dry-run``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nca_tiles.synthesis.workdir import Job
from nca_tiles.synthesis.diskspace import canvas_bytes, format_bytes
from nca_tiles.diffusion.pipeline import Pipeline, predict_noise
from nca_tiles.synthesis.sweeps import chunk_grid

@dataclass(frozen=True)
class Plan:
    chunks_y: int
    chunks_x: int
    window_pixels_per_sweep: int
    canvas_pixels: int
    sweeps: int
    canvas_bytes: int
    host_bytes: int
    device_bytes: int
    seconds_per_megapixel_step: float | None = None

    @property
    def halo_overhead(self) -> float:
        """Pixels computed ÷ pixels kept, per denoising step (docs/design.md §3)."""
        return self.window_pixels_per_sweep / self.canvas_pixels

    @property
    def estimated_seconds(self) -> float | None:
        if self.seconds_per_megapixel_step is None:
            return None
        return self.seconds_per_megapixel_step * self.window_pixels_per_sweep / 1e6 * (self.sweeps - 1)


def activation_bytes(pipeline: Pipeline, window_pixels: int) -> int:
    """Live float32 tensors of one window's model call at inference: over the window the two state
    buffers that swap every NCA step and ε̂; over one band of rows (model.band_pixels) the padded
    and perceived state, the 2c input of the hidden layer, three hidden-size tensors, the update
    and its mask."""
    cfg = pipeline.model.config
    band = min(window_pixels, pipeline.model.band_pixels(pipeline.device))
    return 4 * (window_pixels * (2 * cfg.channels + cfg.image_channels) + band * (6 * cfg.channels + 3 * cfg.hidden))


def make_plan(pipeline: Pipeline, job: Job, batch: int, calibrate: bool = True) -> Plan:
    chunks = chunk_grid(job.height, job.width, job.chunk, pipeline.halo)
    window = max(c.window_pixels for c in chunks)
    act = activation_bytes(pipeline, window) * batch
    io = 3 * batch * window * 3 * 4  # one group being read, one computed, one written
    step = 6 * batch * job.chunk**2 * 3 * 4  # the schedule's step and its noise: ~6 chunk-sized tensors
    return Plan(
        chunks_y=-(-job.height // job.chunk),
        chunks_x=-(-job.width // job.chunk),
        window_pixels_per_sweep=sum(c.window_pixels for c in chunks),
        canvas_pixels=job.width * job.height,
        sweeps=job.sweeps,
        canvas_bytes=canvas_bytes(job.width, job.height, job.chunk),
        host_bytes=io + step + (act if pipeline.device.type == "cpu" else 0),
        device_bytes=act + step if pipeline.device.type != "cpu" else 0,
        seconds_per_megapixel_step=calibrate_speed(pipeline, job.chunk) if calibrate else None,
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
    return f"{s / 3600:.1f} h"


def describe_plan(plan: Plan, pipeline: Pipeline, job: Job, batch: int, work_dir: Path) -> str:
    lines = [
        f"canvas: {job.width} × {job.height} px ({plan.canvas_pixels / 1e6:,.1f} MP) at {pipeline.mpp} µm/px",
        f"model: {pipeline.hash} ({pipeline.model.num_parameters():,} parameters, halo {pipeline.halo} px), "
        f"device {pipeline.device}, {pipeline.precision}",
        f"sampler: {job.sampler}, {len(job.timesteps)} denoising steps, seed {job.seed}",
        f"chunk grid: {plan.chunks_y} × {plan.chunks_x} = {plan.chunks_y * plan.chunks_x:,} chunks of {job.chunk} px, "
        f"batch {batch}",
        f"halo overhead: {plan.halo_overhead:.3f}× pixels computed per pixel kept "
        f"(interior chunks: {((job.chunk + 2 * pipeline.halo) / job.chunk) ** 2:.3f}×)",
        f"disk for the canvas: {format_bytes(plan.canvas_bytes)} in {work_dir} (as zarr stores it: edge inner chunks "
        "whole, shard indexes)",
        f"host memory (estimate, on top of the loaded model and libraries): {format_bytes(plan.host_bytes)}",
        f"device memory (estimate): {format_bytes(plan.device_bytes)}" if plan.device_bytes else "device memory: none (CPU)",
    ]
    if plan.estimated_seconds is not None:
        lines.append(
            f"time (estimate from a calibration run on {pipeline.device}): {format_seconds(plan.estimated_seconds)} "
            f"({plan.seconds_per_megapixel_step:.3f} s per megapixel per denoising step)"
        )
    return "\n".join(lines)
