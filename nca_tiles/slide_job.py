"""A whole ``synthesize`` job: work dir, sweeps, export, clean-up — resumable at every sweep."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from nca_tiles import __version__
from nca_tiles.canvas import RGB, WorkDir
from nca_tiles.errors import NcaTilesError
from nca_tiles.memory import configure_allocator
from nca_tiles.plan import canvas_bytes, check_free_disk
from nca_tiles.sampling import Pipeline
from nca_tiles.synthesis import DaskExecutor, InProcessExecutor, chunk_grid, make_job, run_sweeps


@dataclass(frozen=True)
class SlideRequest:
    width: int
    height: int
    out: Path
    seed: int = 0
    chunk: int = 1024
    sampler: str = "ddim"
    steps: int | None = 50
    eta: float = 0.0
    batch: int = 1
    work_dir: Path | None = None
    keep_canvas: bool = False
    format: str = "ome-tiff"
    tile: int = 512
    compression: str = "jpeg"
    quality: int = 90
    workers: int | None = None
    scheduler: str | None = None


def default_work_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.work"


def check_request(req: SlideRequest, halo: int) -> None:
    for name in ("width", "height"):
        if getattr(req, name) <= 0:
            raise NcaTilesError(f"--{name} must be a positive number of pixels")
    if min(req.width, req.height) < 2:
        raise NcaTilesError("--width and --height must be at least 2 px")
    if req.chunk < 2 * halo:
        raise NcaTilesError(f"--chunk {req.chunk} is smaller than twice the model's halo ({2 * halo} px): use a larger --chunk")
    if req.batch < 1:
        raise NcaTilesError("--batch must be ≥ 1")
    if not 0.0 <= req.eta <= 1.0:  # also refuses NaN
        raise NcaTilesError(f"--eta must be between 0 (deterministic DDIM) and 1, got {req.eta}")
    if req.workers is not None and req.workers < 1:
        raise NcaTilesError("--workers must be ≥ 1")
    if req.format not in ("ome-tiff", "ome-zarr"):
        raise NcaTilesError(f"unknown --format {req.format!r}: ome-tiff or ome-zarr")
    # Checked before any work: the writer would refuse these only after the whole canvas is done.
    if req.format == "ome-tiff" and req.out.is_dir():
        raise NcaTilesError(f"--out {req.out} is a directory: give a file name such as slide.ome.tif")
    work_dir = (req.work_dir or default_work_dir(req.out)).resolve()
    out = req.out.resolve()
    if work_dir == out or out.is_relative_to(work_dir) or work_dir.is_relative_to(out):
        raise NcaTilesError(f"--work-dir {req.work_dir} and --out {req.out} overlap: keep them apart")


def generator_metadata(pipeline: Pipeline, req: SlideRequest, job) -> dict:
    return {
        "software": f"nca-tiles {__version__}",
        "model": pipeline.hash,
        "model_preset": (pipeline.meta.get("training") or {}).get("preset"),
        "seed": req.seed,
        "sampler": req.sampler,
        "steps": len(job.timesteps),
        "eta": req.eta,
    }


def synthesize_slide(pipeline: Pipeline, req: SlideRequest, model_path: Path | None = None,
                     device: str = "auto", progress: bool = True) -> Path:
    """Synthesize the slide ``req`` describes and write it to ``req.out``; resume if interrupted.

    ``model_path`` and ``device`` are what dask workers load the model from (None: bundled model).
    """
    from tqdm import tqdm

    check_request(req, pipeline.halo)
    configure_allocator()
    job = make_job(pipeline, req.seed, req.width, req.height, req.chunk, req.sampler, req.steps, req.eta)
    work = WorkDir(req.work_dir or default_work_dir(req.out))
    if work.read_manifest() is None:
        check_free_disk(work.path, canvas_bytes(req.width, req.height))
    generator = generator_metadata(pipeline, req, job)
    manifest = work.open_or_create(job, {"mpp": pipeline.mpp, "generator": generator})

    chunks = chunk_grid(job.height, job.width, job.chunk, pipeline.halo)
    total = job.sweeps * job.width * job.height
    bar = tqdm(total=total, initial=manifest.sweeps_done * job.width * job.height, unit="px", unit_scale=True,
               disable=not progress, dynamic_ncols=True, desc=f"sweep {manifest.sweeps_done}/{job.sweeps}")
    def on_pixels(n: int) -> None:
        bar.update(n)  # tqdm shows the rate in (M)px/s and the ETA

    def on_sweep(sweep: int) -> None:
        bar.set_description(f"sweep {sweep + 1}/{job.sweeps}")

    if manifest.sweeps_done < job.sweeps:
        if req.workers or req.scheduler:
            executor = DaskExecutor(model_path, device, pipeline.precision, req.batch, req.workers, req.scheduler)
        else:
            executor = InProcessExecutor(pipeline, req.batch)
        try:
            manifest = run_sweeps(work, manifest, executor, chunks, on_pixels, on_sweep)
        finally:
            executor.close()
    bar.close()

    export(work, req, pipeline.mpp, generator, progress)
    manifest.finished = True
    work.write_manifest(manifest)
    if not req.keep_canvas:
        if req.work_dir is None:
            shutil.rmtree(work.path, ignore_errors=True)  # our own scratch space: nothing worth keeping
        else:
            work.delete_buffers()
    return req.out


def export(work: WorkDir, req: SlideRequest, mpp: float, generator: dict, progress: bool) -> None:
    rgb = work.array(RGB, mode="r")
    if req.format == "ome-zarr":
        from nca_tiles.omezarr import write_ome_zarr

        write_ome_zarr(rgb, req.out, mpp=mpp, generator=generator, progress=progress)
    else:
        from nca_tiles.ometiff import write_ome_tiff

        write_ome_tiff(rgb, req.out, mpp=mpp, generator=generator, tile=req.tile, compression=req.compression,
                       quality=req.quality, scratch_dir=work.path, progress=progress)
