"""Streaming tiled synthesis over a zarr canvas (docs/design.md §3, §7).

One denoising step is one *sweep* over every chunk of a level's canvas: read the window chunk ± s
from the buffer holding x_t (clipped to the canvas), run the level's s NCA steps on it, crop the
chunk, apply the schedule's step with noise keyed by global coordinates, and write the chunk of
x_{t-1} into the level's other buffer. Reflect padding at an interior window edge is wrong, but
the error travels one pixel per NCA step and after s steps reaches exactly the chunk border: the
result is the whole-canvas result. A level's first sweep draws x_T, or (on a finer level of a
scale-space model) upsamples the coarser level's result and re-noises it: each fine chunk reads
the coarse cells it is interpolated from (one cell of halo), so that move is exact too. Sweeps
never write what they read, so a sweep interrupted anywhere can simply be run again: a rerun
resumes from the last completed sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from nca_tiles.diffusion.levels import SynthesisModel
from nca_tiles.diffusion.pipeline import initial_noise, predict_noise, reverse_step, to_uint8
from nca_tiles.diffusion.scale_space import coarse_window, renoise, upsample_window
from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.memory import configure_allocator, release_free_heap
from nca_tiles.runtime.threads import rebalance_threads, usable_cores
from nca_tiles.synthesis.job import Chunk, Job, batches
from nca_tiles.synthesis.workdir import RGB, Manifest, WorkDir, buffer_name


# -- the work of one sweep on a group of chunks ------------------------------------------------
# The reader and writer threads run numpy and zarr only, no torch op: a torch op on another thread
# starts that thread's own OpenMP team, whose threads then spin against the model's (its calls ran
# 2–13 % slower; README § Tiled vs whole vs in memory).
def read_windows(src, group: list[Chunk]) -> torch.Tensor:
    """The windows of a group as a float32 (B, 3, h, w) tensor."""
    arrays = np.stack([src[c.wy0 : c.wy1, c.wx0 : c.wx1] for c in group])
    return torch.from_numpy(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2)))


def start_chunks(model: SynthesisModel, work: WorkDir, job: Job, level: int, group: list[Chunk]) -> list[torch.Tensor]:
    """A level's first sweep on a group, (3, h, w) each: x_T keyed by global coordinates on the
    first level; on a finer one the coarser level's result, upsampled and re-noised to t_start."""
    if level == 0:
        return [initial_noise(job.level_seed(0), c.y0, c.x0, c.y1 - c.y0, c.x1 - c.x0) for c in group]
    coarse, fine = job.levels[level - 1], job.levels[level]
    src = work.array(buffer_name(job, level - 1, coarse.sweeps - 1), mode="r")
    alpha_bar = model.levels[level].pipeline.schedule.alpha_bar(fine.t_start)
    ratio = coarse.factor // fine.factor
    out = []
    for c in group:
        cy0, cy1 = coarse_window(c.y0, c.y1, ratio, coarse.height)
        cx0, cx1 = coarse_window(c.x0, c.x1, ratio, coarse.width)
        window = torch.from_numpy(np.ascontiguousarray(src[cy0:cy1, cx0:cx1])).permute(2, 0, 1)
        up = upsample_window(window, (cy0, cx0), (coarse.height, coarse.width), (c.y0, c.x0),
                             (c.y1 - c.y0, c.x1 - c.x0), ratio)
        out.append(renoise(up, alpha_bar, job.seed, level, (c.y0, c.x0)))
    return out


def denoise_group(model: SynthesisModel, job: Job, level: int, index: int, group: list[Chunk],
                  windows: torch.Tensor) -> list[torch.Tensor]:
    """Denoising step ``index − 1`` of ``level`` on a group of windows: the chunks of x_{t_prev}."""
    pipeline = model.levels[level].pipeline
    timesteps = job.levels[level].timesteps
    t = timesteps[index - 1]
    t_prev = timesteps[index] if index < len(timesteps) else -1
    seed = job.level_seed(level)
    windows = windows.to(pipeline.device)
    eps = predict_noise(pipeline, windows, t, [(c.wy0, c.wx0) for c in group], [seed] * len(group))
    out = []
    for i, c in enumerate(group):
        ys, xs = slice(c.y0 - c.wy0, c.y1 - c.wy0), slice(c.x0 - c.wx0, c.x1 - c.wx0)
        out.append(reverse_step(pipeline, job.sampler, eps[i, :, ys, xs], windows[i, :, ys, xs],
                                t, t_prev, seed, (c.y0, c.x0), job.levels[level].eta))
    return out


def chunk_arrays(chunks: list[torch.Tensor], as_rgb: bool) -> list[np.ndarray]:
    """(h, w, 3) arrays to store: uint8 for the rgb canvas, else float32 views of the chunks."""
    return [to_uint8(x) if as_rgb else x.permute(1, 2, 0).cpu().numpy() for x in chunks]


def write_arrays(dst, group: list[Chunk], arrays: list[np.ndarray]) -> None:
    for c, a in zip(group, arrays):
        dst[c.y0 : c.y1, c.x0 : c.x1] = a


def write_chunks(dst, group: list[Chunk], chunks: list[torch.Tensor], as_rgb: bool) -> None:
    write_arrays(dst, group, chunk_arrays(chunks, as_rgb))


def sweep_target(work: WorkDir, job: Job, sweep: int):
    """Where sweep ``sweep`` writes: a float buffer of its level, the very last sweep to rgb."""
    if job.is_last_sweep(sweep):
        return work.array(RGB)
    s = job.sweep(sweep)
    return work.array(buffer_name(job, s.level, s.index))


def sweep_source(work: WorkDir, job: Job, sweep: int):
    """The buffer a denoising sweep reads: its level's previous sweep's."""
    s = job.sweep(sweep)
    return work.array(buffer_name(job, s.level, s.index - 1), mode="r")


def run_group(model: SynthesisModel, work: WorkDir, job: Job, sweep: int, group: list[Chunk]) -> int:
    """Do one sweep's work on one group, reading and writing the store itself. Returns pixels done.

    Used by the dask executor: each task reads its own windows straight from the store.
    """
    s = job.sweep(sweep)
    dst = sweep_target(work, job, sweep)
    if s.index == 0:
        out = start_chunks(model, work, job, s.level, group)
    else:
        out = denoise_group(model, job, s.level, s.index, group, read_windows(sweep_source(work, job, sweep), group))
    write_chunks(dst, group, out, as_rgb=job.is_last_sweep(sweep))
    del out
    release_free_heap()  # see nca_tiles.runtime.memory
    return sum(c.pixels for c in group)


# -- executors -----------------------------------------------------------------------------------
ProgressFn = Callable[[int], None]  # called with the number of canvas pixels just finished


class InProcessExecutor:
    """Runs sweeps in this process: batches windows per model call and overlaps zarr reads and
    writes with compute (one reader and one writer thread; at most three groups in memory)."""

    def __init__(self, model: SynthesisModel, batch: int = 1):
        self.model = model
        self.batch = batch

    def run_sweep(self, work: WorkDir, job: Job, sweep: int, chunks: list[Chunk], progress: ProgressFn) -> None:
        s = job.sweep(sweep)
        groups = batches(chunks, self.batch)
        dst = sweep_target(work, job, sweep)
        as_rgb = job.is_last_sweep(sweep)
        if s.index == 0:
            for group in groups:
                write_chunks(dst, group, start_chunks(self.model, work, job, s.level, group), as_rgb)
                release_free_heap()
                progress(sum(c.pixels for c in group))
            return
        src = sweep_source(work, job, sweep)
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer:
            pending_write: Future | None = None
            next_read = reader.submit(read_windows, src, groups[0])
            for i, group in enumerate(groups):
                windows = next_read.result()
                if i + 1 < len(groups):
                    next_read = reader.submit(read_windows, src, groups[i + 1])
                out = denoise_group(self.model, job, s.level, s.index, group, windows)
                del windows
                if pending_write is not None:
                    pending_write.result()  # bounded: one group being written at a time
                pending_write = writer.submit(write_arrays, dst, group, chunk_arrays(out, as_rgb))
                del out
                release_free_heap()  # see nca_tiles.runtime.memory
                rebalance_threads()  # a fair share of the cores: see nca_tiles.runtime.threads
                progress(sum(c.pixels for c in group))
            if pending_write is not None:
                pending_write.result()

    def close(self) -> None:
        pass


_WORKER_MODELS: dict[tuple, SynthesisModel] = {}


def _worker_model(model_path: str | None, device: str, precision: str, threads: int | None) -> SynthesisModel:
    """The model, loaded once per worker process."""
    from nca_tiles.diffusion.levels import load_synthesis_model

    key = (model_path, device, precision)
    if key not in _WORKER_MODELS:
        configure_allocator()  # once per worker process: see nca_tiles.runtime.memory
        if threads:
            torch.set_num_threads(threads)
        _WORKER_MODELS[key] = load_synthesis_model(model_path, device, precision)
    return _WORKER_MODELS[key]


def _dask_task(model_path: str | None, device: str, precision: str, threads: int | None,
               work_path: str, job_dict: dict, sweep: int, group: list[Chunk]) -> int:
    model = _worker_model(model_path, device, precision, threads)
    job = Job.from_dict(job_dict)
    if model.hash != job.model_hash:  # e.g. another file at the same path on a remote worker
        raise NcaTilesError(f"worker loaded model {model.hash} from {model_path}, the job needs {job.model_hash}")
    return run_group(model, WorkDir(Path(work_path)), job, sweep, group)


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


def dask_worker_threads(workers: int) -> int:
    """Torch threads for each of ``workers`` local dask workers: the cores this process may use
    (its affinity and cgroup quota) split between them, at least one each."""
    return max(1, usable_cores() // workers)


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
            workers = workers or 1
            self.threads = dask_worker_threads(workers)
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
def run_sweeps(work: WorkDir, manifest: Manifest, executor, grids: list[list[Chunk]],
               progress: ProgressFn = lambda n: None, on_sweep: Callable[[int], None] | None = None) -> Manifest:
    """Run the sweeps still to do, recording each completed sweep in the manifest. ``grids``: the
    chunk grid of each level (``job.level_grids``)."""
    job = manifest.job
    for sweep in range(manifest.sweeps_done, job.sweeps):
        executor.run_sweep(work, job, sweep, grids[job.sweep(sweep).level], progress)
        manifest.sweeps_done = sweep + 1
        work.write_manifest(manifest)  # atomic: a crash before this line redoes the sweep
        if on_sweep is not None:
            on_sweep(sweep)
    return manifest
