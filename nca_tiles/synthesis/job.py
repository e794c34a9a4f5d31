"""The synthesis job: everything the pixels depend on, its levels, its sweeps and its chunk grid.

A job has one level per level of its model (one for a single-scale model). Level ``k`` is a canvas
of ``ceil(W / f_k) × ceil(H / f_k)`` cells, cut into chunks of the job's chunk side. Its sweeps:
sweep 0 starts the level (x_T from counter-based noise on the first level; on a finer one the
coarser level's result upsampled and re-noised to ``t_start``), sweep ``i ≥ 1`` performs its
denoising step ``i − 1``. The job's sweeps are the levels' sweeps in order, coarsest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from nca_tiles.diffusion.levels import SynthesisModel, level_etas, level_seed, level_timesteps
from nca_tiles.diffusion.scale_space import level_size


@dataclass(frozen=True)
class LevelJob:
    factor: int  # one cell is factor × factor output pixels
    width: int
    height: int
    model_hash: str
    timesteps: tuple[int, ...]  # the (t) visited, in order
    t_start: int | None = None  # None: from pure noise; else lifted from the coarser level
    eta: float = 0.0  # DDIM η of this level's steps

    @property
    def sweeps(self) -> int:
        return 1 + len(self.timesteps)


@dataclass(frozen=True)
class Sweep:
    level: int
    index: int  # 0: the level's start; i ≥ 1: its denoising step i − 1


@dataclass(frozen=True)
class Job:
    """Everything the pixels depend on, plus the chunking the buffers are laid out with."""

    model_hash: str
    seed: int
    width: int
    height: int
    chunk: int
    sampler: str
    levels: tuple[LevelJob, ...]

    @property
    def sweeps(self) -> int:
        return sum(level.sweeps for level in self.levels)

    @property
    def steps(self) -> int:
        """Denoising steps over all levels."""
        return sum(len(level.timesteps) for level in self.levels)

    def sweep(self, n: int) -> Sweep:
        """The ``n``-th sweep of the job as (level, index within the level)."""
        for k, level in enumerate(self.levels):
            if n < level.sweeps:
                return Sweep(k, n)
            n -= level.sweeps
        raise IndexError(f"the job has {self.sweeps} sweeps")

    def is_last_sweep(self, n: int) -> bool:
        return n == self.sweeps - 1

    def level_seed(self, level: int) -> int:
        return level_seed(self.seed, level)

    def sweep_pixels(self, n: int) -> int:
        level = self.levels[self.sweep(n).level]
        return level.width * level.height

    def to_dict(self) -> dict:
        d = asdict(self)
        d["levels"] = [{**level, "timesteps": list(level["timesteps"])} for level in d["levels"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        d = dict(d)
        if "levels" not in d:  # manifest version 1: a single-scale job
            d["levels"] = [{"factor": 1, "width": d["width"], "height": d["height"], "model_hash": d["model_hash"],
                            "timesteps": d.pop("timesteps")}]
        eta = d.pop("eta", 0.0)  # before per-level η: one η for every level
        levels = tuple(LevelJob(**{"eta": eta, **level, "timesteps": tuple(level["timesteps"])}) for level in d.pop("levels"))
        return cls(**d, levels=levels)


def make_job(model: SynthesisModel, seed: int, width: int, height: int, chunk: int, sampler: str,
             steps: int | Sequence[int] | None, eta: float | Sequence[float] | None = None) -> Job:
    levels = tuple(
        LevelJob(factor=lv.factor, width=level_size(width, lv.factor), height=level_size(height, lv.factor),
                 model_hash=lv.pipeline.hash, timesteps=tuple(ts), t_start=lv.t_start, eta=level_eta)
        for lv, ts, level_eta in zip(model.levels, level_timesteps(model, sampler, steps), level_etas(model, eta))
    )
    return Job(model_hash=model.hash, seed=seed, width=width, height=height, chunk=chunk, sampler=sampler,
               levels=levels)


# -- the chunk grid ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """A chunk [y0, y1) × [x0, x1) of a level and the window its denoising step reads."""

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
    """Every chunk of a canvas in row-major order, with its window (chunk ± halo, clipped)."""
    chunks = []
    for y0 in range(0, height, chunk):
        for x0 in range(0, width, chunk):
            y1, x1 = min(y0 + chunk, height), min(x0 + chunk, width)
            chunks.append(Chunk(y0, y1, x0, x1, max(0, y0 - halo), min(height, y1 + halo),
                                max(0, x0 - halo), min(width, x1 + halo)))
    return chunks


def level_grids(job: Job, model: SynthesisModel) -> list[list[Chunk]]:
    """The chunk grid of every level, windows sized by that level's model."""
    return [chunk_grid(level.height, level.width, job.chunk, lv.pipeline.halo)
            for level, lv in zip(job.levels, model.levels)]


def batches(chunks: list[Chunk], batch: int) -> list[list[Chunk]]:
    """Groups of up to ``batch`` chunks whose windows have the same shape (one model call each)."""
    by_shape: dict[tuple[int, int], list[Chunk]] = {}
    for c in chunks:
        by_shape.setdefault(c.window_shape, []).append(c)
    return [group[i : i + batch] for group in by_shape.values() for i in range(0, len(group), batch)]
