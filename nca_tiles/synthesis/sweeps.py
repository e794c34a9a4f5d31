"""Streaming tiled synthesis over a zarr canvas (docs/design.md §3).

One denoising step is one *sweep* over every chunk of the canvas: read the window chunk ± s from
the buffer holding x_t (clipped to the canvas), run the model's s NCA steps on it, crop the
chunk, apply the schedule's step with noise keyed by global coordinates, and write the chunk of
x_{t-1} into the other buffer. Reflect padding at an interior window edge is wrong, but the error
travels one pixel per NCA step and after s steps reaches exactly the chunk border: the result is
the whole-canvas result. Sweeps never write what they read, so a sweep interrupted anywhere can
simply be run again: a rerun resumes from the last completed sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nca_tiles.synthesis.workdir import RGB, Job, Manifest, WorkDir, buffer_name
from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.memory import configure_allocator, release_free_heap
from nca_tiles.runtime.threads import rebalance_threads
from nca_tiles.diffusion.pipeline import Pipeline, initial_noise, predict_noise, reverse_step, to_uint8


@dataclass(frozen=True)
class Chunk:
    """A chunk [y0, y1) × [x0, x1) of the canvas and the window its step reads."""

    y0: int
    y1: int
    x0: int
    x1: int
    wy0: int
    wy1: int
    wx0: int
    wx1: int

    @property
    def window_shape(self) -> tuple[int, int]:
        return self.wy1 - self.wy0, self.wx1 - self.wx0

    @property
    def pixels(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    @property
    def window_pixels(self) -> int:
        h, w = self.window_shape
        return h * w


def chunk_grid(height: int, width: int, chunk: int, halo: int) -> list[Chunk]:
    """Every chunk of the canvas in row-major order, with its window (chunk ± halo, clipped)."""
    chunks = []
    for y0 in range(0, height, chunk):
        for x0 in range(0, width, chunk):
            y1, x1 = min(y0 + chunk, height), min(x0 + chunk, width)
            chunks.append(Chunk(y0, y1, x0, x1, max(0, y0 - halo), min(height, y1 + halo),
                                max(0, x0 - halo), min(width, x1 + halo)))
    return chunks


def batches(chunks: list[Chunk], batch: int) -> list[list[Chunk]]:
    """Groups of up to ``batch`` chunks whose windows have the same shape (one model call each)."""
    by_shape: dict[tuple[int, int], list[Chunk]] = {}
    for c in chunks:
        by_shape.setdefault(c.window_shape, []).append(c)
    return [group[i : i + batch] for group in by_shape.values() for i in range(0, len(group), batch)]


# -- the work of one sweep on a group of chunks ------------------------------------------------
def read_windows(src, group: list[Chunk]) -> torch.Tensor:
    """The windows of a group as a float32 (B, 3, h, w) tensor."""
    arrays = [src[c.wy0 : c.wy1, c.wx0 : c.wx1] for c in group]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def initial_chunks(job: Job, group: list[Chunk]) -> list[torch.Tensor]:
    """Sweep 0: x_T of each chunk of a group, (3, h, w) each, keyed by global coordinates."""
    return [initial_noise(job.seed, c.y0, c.x0, c.y1 - c.y0, c.x1 - c.x0) for c in group]


def denoise_group(pipeline: Pipeline, job: Job, sweep: int, group: list[Chunk], windows: torch.Tensor) -> list[torch.Tensor]:
    """Denoising step ``sweep − 1`` on a group of windows: the chunks of x_{t_prev}, (3, h, w) each."""
    t = job.timesteps[sweep - 1]
    t_prev = job.timesteps[sweep] if sweep < len(job.timesteps) else -1
    windows = windows.to(pipeline.device)
    eps = predict_noise(pipeline, windows, t, [(c.wy0, c.wx0) for c in group], [job.seed] * len(group))
    out = []
    for i, c in enumerate(group):
        ys, xs = slice(c.y0 - c.wy0, c.y1 - c.wy0), slice(c.x0 - c.wx0, c.x1 - c.wx0)
        out.append(reverse_step(pipeline, job.sampler, eps[i, :, ys, xs], windows[i, :, ys, xs],
                                t, t_prev, job.seed, (c.y0, c.x0), job.eta))
    return out


def write_chunks(dst, group: list[Chunk], chunks: list[torch.Tensor], as_rgb: bool) -> None:
    for c, x in zip(group, chunks):
        dst[c.y0 : c.y1, c.x0 : c.x1] = to_uint8(x) if as_rgb else x.permute(1, 2, 0).cpu().numpy()


def is_last_sweep(job: Job, sweep: int) -> bool:
    return sweep == job.sweeps - 1


def sweep_target(work: WorkDir, job: Job, sweep: int):
    """Where sweep ``sweep`` writes: x_T and intermediate steps to a float buffer, the last to rgb."""
    return work.array(RGB if is_last_sweep(job, sweep) else buffer_name(sweep))


def run_group(pipeline: Pipeline, work: WorkDir, job: Job, sweep: int, group: list[Chunk]) -> int:
    """Do one sweep's work on one group, reading and writing the store itself. Returns pixels done.

    Used by the dask executor: each task reads its own windows straight from the store.
    """
    dst = sweep_target(work, job, sweep)
    if sweep == 0:
        out = initial_chunks(job, group)
    else:
        windows = read_windows(work.array(buffer_name(sweep - 1), mode="r"), group)
        out = denoise_group(pipeline, job, sweep, group, windows)
    write_chunks(dst, group, out, as_rgb=is_last_sweep(job, sweep))
    del out
    release_free_heap()  # see nca_tiles.runtime.memory
    return sum(c.pixels for c in group)


# -- executors -----------------------------------------------------------------------------------
ProgressFn = Callable[[int], None]  # called with the number of canvas pixels just finished


class InProcessExecutor:
    """Runs sweeps in this process: batches windows per model call and overlaps zarr reads and
    writes with compute (one reader and one writer thread; at most three groups in memory)."""

    def __init__(self, pipeline: Pipeline, batch: int = 1):
        self.pipeline = pipeline
        self.batch = batch

    def run_sweep(self, work: WorkDir, job: Job, sweep: int, chunks: list[Chunk], progress: ProgressFn) -> None:
        groups = batches(chunks, self.batch)
        dst = sweep_target(work, job, sweep)
        as_rgb = is_last_sweep(job, sweep)
        if sweep == 0:
            for group in groups:
                write_chunks(dst, group, initial_chunks(job, group), as_rgb)
                release_free_heap()
                progress(sum(c.pixels for c in group))
            return
        src = work.array(buffer_name(sweep - 1), mode="r")
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer:
            pending_write: Future | None = None
            next_read = reader.submit(read_windows, src, groups[0])
            for i, group in enumerate(groups):
                windows = next_read.result()
                if i + 1 < len(groups):
                    next_read = reader.submit(read_windows, src, groups[i + 1])
                out = denoise_group(self.pipeline, job, sweep, group, windows)
                del windows
                if pending_write is not None:
                    pending_write.result()  # bounded: one group being written at a time
                pending_write = writer.submit(write_chunks, dst, group, out, as_rgb)
                del out
                release_free_heap()  # see nca_tiles.runtime.memory
                rebalance_threads()  # a fair share of the cores: see nca_tiles.runtime.threads
                progress(sum(c.pixels for c in group))
            if pending_write is not None:
                pending_write.result()

    def close(self) -> None:
        pass


_WORKER_PIPELINES: dict[tuple, Pipeline] = {}


def _worker_pipeline(model_path: str | None, device: str, precision: str, threads: int | None) -> Pipeline:
    """The model, loaded once per worker process."""
    from nca_tiles.diffusion.pipeline import load_model

    key = (model_path, device, precision)
    if key not in _WORKER_PIPELINES:
        configure_allocator()  # once per worker process: see nca_tiles.runtime.memory
        if threads:
            torch.set_num_threads(threads)
        _WORKER_PIPELINES[key] = load_model(model_path, device, precision)
    return _WORKER_PIPELINES[key]


def _dask_task(model_path: str | None, device: str, precision: str, threads: int | None,
               work_path: str, job_dict: dict, sweep: int, group: list[Chunk]) -> int:
    pipeline = _worker_pipeline(model_path, device, precision, threads)
    job = Job.from_dict(job_dict)
    if pipeline.hash != job.model_hash:  # e.g. another file at the same path on a remote worker
        raise NcaTilesError(f"worker loaded model {pipeline.hash} from {model_path}, the job needs {job.model_hash}")
    return run_group(pipeline, WorkDir(Path(work_path)), job, sweep, group)


CONNECT_TIMEOUT_S = 5  # dask waits 30 s by default, and then raises a traceback


def connect(scheduler: str):
    """A dask client of the scheduler at ``scheduler``, or a one-line error within a few seconds."""
    from dask.distributed import Client

    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, ValueError, TypeError, TimeoutError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NcaTilesError(
            f"cannot connect to the dask scheduler --scheduler {scheduler} ({reason}): start it, or give its "
            f"address as tcp://HOST:PORT"
        ) from None


class DaskExecutor:
    """Runs each sweep as dask.distributed tasks, one per group of chunks.

    Each task reads its own windows from the store (no map_overlap copies) and writes only its
    own chunks, which are whole zarr shards: no two tasks ever write the same file. The model is
    loaded once per worker. The store must be on a file system every worker sees.
    """

    def __init__(self, model_path: Path | None, device: str, precision: str, batch: int = 1,
                 workers: int | None = None, scheduler: str | None = None):
        from dask.distributed import Client, LocalCluster

        self.model_path = None if model_path is None else str(Path(model_path).resolve())
        self.device, self.precision, self.batch = device, precision, batch
        self.cluster = None
        self.threads = None
        if scheduler:
            self.client = connect(scheduler)
        else:
            import os

            workers = workers or 1
            self.threads = max(1, (os.cpu_count() or 1) // workers)
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=40)
            self.client = Client(self.cluster)

    def run_sweep(self, work: WorkDir, job: Job, sweep: int, chunks: list[Chunk], progress: ProgressFn) -> None:
        from dask.distributed import as_completed

        futures = [
            self.client.submit(_dask_task, self.model_path, self.device, self.precision, self.threads,
                               str(work.path.resolve()), job.to_dict(), sweep, group, pure=False)
            for group in batches(chunks, self.batch)
        ]
        for future in as_completed(futures):
            progress(future.result())

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# -- the job ---------------------------------------------------------------------------------------
def run_sweeps(work: WorkDir, manifest: Manifest, executor, chunks: list[Chunk],
               progress: ProgressFn = lambda n: None, on_sweep: Callable[[int], None] | None = None) -> Manifest:
    """Run the sweeps still to do, recording each completed sweep in the manifest."""
    job = manifest.job
    for sweep in range(manifest.sweeps_done, job.sweeps):
        executor.run_sweep(work, job, sweep, chunks, progress)
        manifest.sweeps_done = sweep + 1
        work.write_manifest(manifest)  # atomic: a crash before this line redoes the sweep
        if on_sweep is not None:
            on_sweep(sweep)
    return manifest


def make_job(pipeline: Pipeline, seed: int, width: int, height: int, chunk: int, sampler: str,
             steps: int | None, eta: float = 0.0) -> Job:
    timesteps = tuple(pipeline.schedule.sampling_timesteps(sampler, steps))
    return Job(model_hash=pipeline.hash, seed=seed, width=width, height=height, chunk=chunk,
               sampler=sampler, timesteps=timesteps, eta=eta)
