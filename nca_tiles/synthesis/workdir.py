"""The synthesis work directory: zarr canvas buffers and the manifest that makes jobs resumable.

Layout::

    WORK_DIR/
      .nca-tiles-creating  while the work dir is being created (before its manifest exists)
      manifest.json        the job (model hash, seed, size, chunk, sampler, steps), sweeps done,
                           and the identity of the output the job wrote
      canvas.zarr/         x0, x1: float32 (H, W, 3) buffers for x_t and x_{t-1};
                           rgb: the final uint8 (H, W, 3) image;
                           levelK/x0, levelK/x1: the buffers of level K of a scale-space job
                           (a single-scale job keeps its buffers at the top, as always)

Each compute chunk is one zarr *shard* (one file), so no two writers ever share a file
(zarr v3 has no synchronizer, docs/design.md §6); inner chunks are small, so reading a chunk's halo
fetches little beyond the halo itself.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from nca_tiles import __version__
from nca_tiles.diffusion.checkpoint import atomic_write_json
from nca_tiles.errors import NcaTilesError
from nca_tiles.synthesis.job import Job

MANIFEST_NAME = "manifest.json"
# Written first when a work dir is created, removed once the manifest exists: a work dir a killed
# process began creating is recognised as this tool's, and started afresh by the rerun.
CREATING_NAME = ".nca-tiles-creating"
CANVAS_NAME = "canvas.zarr"
BUFFERS = ("x0", "x1")
RGB = "rgb"
MANIFEST_VERSION = 2  # 2: jobs have levels (version 1 jobs read as one level)


def _resume_hint(started: Job, asked: Job) -> str:
    """A job started with a bundled model that has since stopped being the default (or was named)
    resumes with that model's name: say which."""
    if started.model_hash == asked.model_hash:
        return ""
    from nca_tiles.diffusion.levels import bundled_model_with_hash

    name = bundled_model_with_hash(started.model_hash)
    return "" if name is None else f"it was started with the bundled model {name!r}: rerun with --model {name} to resume it, or "


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


MIN_INNER_CHUNK = 16


def check_chunk_layout(chunk: int) -> None:
    """Refuse a chunk side the canvas cannot be laid out with: a chunk above 128 px without a
    divisor of 16 to 128 px (e.g. a prime) would get 1 px inner chunks, whose shard indexes
    (16 bytes per inner chunk) outweigh the pixels and whose reads crawl."""
    if chunk > MIN_INNER_CHUNK and inner_chunk(chunk) < MIN_INNER_CHUNK:
        raise NcaTilesError(
            f"--chunk {chunk} has no divisor between {MIN_INNER_CHUNK} and 128 to lay the canvas out with: "
            "use a multiple of 16, e.g. 1024"
        )


def buffer_name(job: Job, level: int, index: int) -> str:
    """The float buffer that sweep ``index`` of ``level`` writes (a level's sweeps alternate
    between its two buffers)."""
    name = BUFFERS[index % 2]
    return name if len(job.levels) == 1 else f"level{level}/{name}"


def buffer_names(job: Job) -> list[str]:
    return [buffer_name(job, k, i) for k in range(len(job.levels)) for i in (0, 1)]


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

    @property
    def creating_path(self) -> Path:
        return self.path / CREATING_NAME

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

    def check_job(self, manifest: Manifest | None, job: Job) -> None:
        """Refuse a work dir that holds another job."""
        if manifest is not None and manifest.job != job:
            diff = sorted(k for k, v in job.to_dict().items() if manifest.job.to_dict().get(k) != v)
            raise NcaTilesError(
                f"work dir {self.path} holds a different job (differs in {', '.join(diff)}): "
                f"{_resume_hint(manifest.job, job)}use another --work-dir, or delete it to start afresh"
            )

    def check_can_create(self) -> None:
        """Refuse to create a work dir over a folder with other contents."""
        if self.creating_path.exists() or not self.path.exists():
            return
        if not self.path.is_dir():
            raise NcaTilesError(f"work dir {self.path} is not a folder: choose another --work-dir")
        if any(self.path.iterdir()):
            raise NcaTilesError(f"work dir {self.path} is not empty and has no manifest: choose another --work-dir")

    def open_or_create(self, job: Job, attrs: dict) -> Manifest:
        """Resume the job in this work dir, or start it; a different job's work dir is refused.
        A work dir whose creation was interrupted (its marker but no manifest) is started afresh."""
        import zarr

        manifest = self.read_manifest()
        if manifest is not None:
            self.check_job(manifest, job)
            if not manifest.finished and not self.canvas_path.exists():
                raise NcaTilesError(f"work dir {self.path} lost its canvas: delete it to start afresh")
            self.creating_path.unlink(missing_ok=True)  # killed between the manifest and this
            return manifest
        self.check_can_create()
        self.path.mkdir(parents=True, exist_ok=True)
        self.creating_path.write_text(json.dumps(job.to_dict()) + "\n")  # first: marks the folder as ours
        shutil.rmtree(self.canvas_path, ignore_errors=True)  # what an interrupted creation left
        group = zarr.open_group(self.canvas_path, mode="w")
        inner = inner_chunk(job.chunk)
        layout = {"chunks": (inner, inner, 3), "shards": (job.chunk, job.chunk, 3)}
        for k, level in enumerate(job.levels):
            for i in (0, 1):
                # Float noise does not compress: store raw, fastest to read and write.
                group.create_array(buffer_name(job, k, i), shape=(level.height, level.width, 3), **layout,
                                   dtype="float32", compressors=None, fill_value=0.0)
        group.create_array(RGB, shape=(job.height, job.width, 3), **layout, dtype="uint8", fill_value=0,
                           attributes=attrs)
        manifest = Manifest(job)
        self.write_manifest(manifest)  # a work dir with a manifest is complete
        self.creating_path.unlink()
        return manifest

    def check_finished(self) -> None:
        """Refuse to export the canvas of a job whose last sweep has not run (noise, or black
        where nothing was written yet). A job whose own export failed has all its sweeps done:
        that canvas is complete."""
        manifest = self.read_manifest()
        if manifest is None:
            if self.creating_path.exists():
                raise NcaTilesError(
                    f"the synthesis in {self.path} stopped while creating its work dir: "
                    "rerun the same nca-tiles synthesize command to finish it"
                )
            return
        if manifest.sweeps_done < manifest.job.sweeps:
            raise NcaTilesError(
                f"the synthesis in {self.path} has not finished ({manifest.sweeps_done} of {manifest.job.sweeps} "
                "sweeps): rerun the same nca-tiles synthesize command to finish it"
            )

    def canvas_disk_usage(self) -> int:
        """Bytes the canvas takes on disk now (allocated blocks)."""
        total = 0
        for root, _, files in os.walk(self.canvas_path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except OSError:
                    pass
        return total

    def remove(self) -> None:
        """Delete the whole work dir, the manifest last: a removal cut short by a kill leaves a
        manifest that lets the rerun recognise the job and finish the clean-up."""
        shutil.rmtree(self.canvas_path, ignore_errors=True)
        for entry in self.path.iterdir():
            if entry.name == MANIFEST_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self.manifest_path.unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass  # someone put something there meanwhile: theirs to keep

    def array(self, name: str, mode: str = "r+"):
        import zarr

        return zarr.open_array(self.canvas_path / name, mode=mode)

    def delete_buffers(self) -> None:
        """Remove every float buffer, keep the rgb result."""
        for entry in self.canvas_path.iterdir() if self.canvas_path.is_dir() else ():
            if entry.name in BUFFERS or entry.name.startswith("level"):
                shutil.rmtree(entry, ignore_errors=True)


def find_work_dir(path: Path) -> WorkDir | None:
    """The synthesis work dir that ``path`` is, or whose canvas ``path`` is inside (e.g.
    ``WORK/canvas.zarr`` or ``WORK/canvas.zarr/rgb``); None for anything else."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / MANIFEST_NAME).is_file() or (folder / CREATING_NAME).exists():
            if folder == path or path.is_relative_to(folder / CANVAS_NAME):
                return WorkDir(folder)
            return None
    return None
