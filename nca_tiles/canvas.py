"""The synthesis work directory: zarr canvas buffers and the manifest that makes jobs resumable.

Layout::

    WORK_DIR/
      manifest.json     the job (model hash, seed, size, chunk, sampler, steps) and sweeps done
      canvas.zarr/      x0, x1: float32 (H, W, 3) buffers for x_t and x_{t-1};
                        rgb: the final uint8 (H, W, 3) image

Each compute chunk is one zarr *shard* (one file), so no two writers ever share a file
(zarr v3 has no synchronizer, design.md §6); inner chunks are small, so reading a chunk's halo
fetches little beyond the halo itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nca_tiles import __version__
from nca_tiles.checkpoint import atomic_write_json
from nca_tiles.errors import NcaTilesError

MANIFEST_NAME = "manifest.json"
CANVAS_NAME = "canvas.zarr"
BUFFERS = ("x0", "x1")
RGB = "rgb"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Job:
    """Everything the pixels depend on, plus the chunking the buffers are laid out with."""

    model_hash: str
    seed: int
    width: int
    height: int
    chunk: int
    sampler: str
    timesteps: tuple[int, ...]  # the (t) visited, in order
    eta: float = 0.0

    @property
    def sweeps(self) -> int:
        """Sweep 0 writes x_T; sweep i ≥ 1 performs denoising step i − 1."""
        return 1 + len(self.timesteps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        return cls(**{**d, "timesteps": tuple(d["timesteps"])})


@dataclass
class Manifest:
    job: Job
    sweeps_done: int = 0
    finished: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "manifest_version": MANIFEST_VERSION,
            "nca_tiles_version": __version__,
            "job": self.job.to_dict(),
            "sweeps_done": self.sweeps_done,
            "finished": self.finished,
            **self.extra,
        }


def inner_chunk(chunk: int, limit: int = 128) -> int:
    """The largest divisor of ``chunk`` that is ≤ ``limit``: the zarr read granularity."""
    return max(d for d in range(1, min(chunk, limit) + 1) if chunk % d == 0)


def buffer_name(sweep: int) -> str:
    """The buffer sweep ``sweep`` writes (sweeps alternate between the two)."""
    return BUFFERS[sweep % 2]


class WorkDir:
    """Create, check and resume a synthesis work directory."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def canvas_path(self) -> Path:
        return self.path / CANVAS_NAME

    def read_manifest(self) -> Manifest | None:
        if not self.manifest_path.exists():
            return None
        try:
            d = json.loads(self.manifest_path.read_text())
            extra = {k: v for k, v in d.items() if k not in ("manifest_version", "nca_tiles_version", "job", "sweeps_done", "finished")}
            return Manifest(Job.from_dict(d["job"]), int(d["sweeps_done"]), bool(d["finished"]), extra)
        except (ValueError, KeyError, TypeError) as exc:
            raise NcaTilesError(f"{self.manifest_path} is corrupt ({exc}): delete {self.path} to start afresh") from None

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.manifest_path, manifest.to_dict())

    def open_or_create(self, job: Job, attrs: dict) -> Manifest:
        """Resume the job in this work dir, or start it; a different job's work dir is refused."""
        import zarr

        manifest = self.read_manifest()
        if manifest is not None:
            if manifest.job != job:
                diff = sorted(k for k, v in job.to_dict().items() if manifest.job.to_dict().get(k) != v)
                raise NcaTilesError(
                    f"work dir {self.path} holds a different job (differs in {', '.join(diff)}): "
                    "use another --work-dir, or delete it to start afresh"
                )
            if not manifest.finished and not self.canvas_path.exists():
                raise NcaTilesError(f"work dir {self.path} lost its canvas: delete it to start afresh")
            return manifest
        if self.path.exists() and any(self.path.iterdir()):
            raise NcaTilesError(f"work dir {self.path} is not empty and has no manifest: choose another --work-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(self.canvas_path, mode="w")
        shape = (job.height, job.width, 3)
        inner = inner_chunk(job.chunk)
        for name in BUFFERS:
            # Float noise does not compress: store raw, fastest to read and write.
            group.create_array(name, shape=shape, chunks=(inner, inner, 3), shards=(job.chunk, job.chunk, 3),
                               dtype="float32", compressors=None, fill_value=0.0)
        group.create_array(RGB, shape=shape, chunks=(inner, inner, 3), shards=(job.chunk, job.chunk, 3),
                           dtype="uint8", fill_value=0, attributes=attrs)
        manifest = Manifest(job)
        self.write_manifest(manifest)  # last: a work dir with a manifest is complete
        return manifest

    def array(self, name: str, mode: str = "r+"):
        import zarr

        return zarr.open_array(self.canvas_path / name, mode=mode)

    def delete_buffers(self) -> None:
        for name in BUFFERS:
            shutil.rmtree(self.canvas_path / name, ignore_errors=True)
