"""A whole ``synthesize`` job: work dir, sweeps, export, clean-up — resumable at every sweep.

What always holds, however the job is chunked, spread over workers, interrupted or raced:

- the slide is a pure function of (model, seed, size, sampler, steps);
- a rerun of the same request resumes, or finishes what a killed run left (its clean-up too);
- the output appears only when complete;
- one job per work dir and per output at a time: the second is refused at once, naming the first;
- everything that can refuse the job (options, writable locations, free disk, the scheduler) is
  checked before the work dir is created or anything is computed.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from nca_tiles import __version__
from nca_tiles.bounds import check_int, check_seed
from nca_tiles.synthesis.job import Job, level_grids, make_job
from nca_tiles.synthesis.workdir import RGB, Manifest, WorkDir, check_chunk_layout
from nca_tiles.synthesis.diskspace import DiskNeed, FileSystemCheck, canvas_bytes, check_file_systems, check_free_disk, output_needs
from nca_tiles.errors import NcaTilesError
from nca_tiles.synthesis.export_job import output_exists, refuse_existing, write_output
from nca_tiles.runtime.locking import exclusive_lock
from nca_tiles.runtime.memory import configure_allocator
from nca_tiles.runtime.outputs import output_lock
from nca_tiles.runtime.preflight import check_writable
from nca_tiles.diffusion.levels import SynthesisModel, load_synthesis_model
from nca_tiles.synthesis.sweeps import DaskExecutor, InProcessExecutor, run_sweeps

# Bounds of the request: beyond them a typo would only fail (or hang) deep inside a run.
MAX_SIDE = 1_000_000  # px: five times the largest scanned slides; 27 TB of canvas
MAX_CHUNK = 16_384  # px: one window of the small model is already ~50 GB at this side
MAX_CHUNKS = 200_000  # per sweep: the chunk list and the tasks of a sweep stay manageable
MAX_BATCH = 1024
MAX_WORKERS = 1024


@dataclass(frozen=True)
class SlideRequest:
    width: int
    height: int
    out: Path
    seed: int = 0
    chunk: int = 1024
    sampler: str = "ddim"
    # One count shared by the levels, or one per level; None: the model's own (levels.level_timesteps).
    steps: int | tuple[int, ...] | None = None
    eta: float | tuple[float, ...] | None = None  # None: each level's default (levels.level_etas)
    batch: int = 1
    work_dir: Path | None = None
    keep_canvas: bool = False
    format: str = "ome-tiff"
    tile: int = 512
    compression: str = "jpeg"
    quality: int = 90
    workers: int | None = None
    scheduler: str | None = None
    overwrite: bool = False  # replace an existing --out that this job did not write


def default_work_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.work"


def check_request(req: SlideRequest, model: SynthesisModel) -> None:
    """Refuse a request that cannot run with ``model``, before anything is written."""
    halo = model.max_halo
    for name in ("width", "height"):
        value = getattr(req, name)
        if value <= 0:
            raise NcaTilesError(f"--{name} must be a positive number of pixels")
        check_int(f"--{name}", value, 2, MAX_SIDE, " px")
    if req.chunk < 2 * halo:
        raise NcaTilesError(f"--chunk {req.chunk} is smaller than twice the model's halo ({2 * halo} px): use a larger --chunk")
    check_int("--chunk", req.chunk, 2 * halo, MAX_CHUNK, " px")
    check_chunk_layout(req.chunk)
    chunks = -(-req.width // req.chunk) * -(-req.height // req.chunk)
    if chunks > MAX_CHUNKS:
        raise NcaTilesError(f"--chunk {req.chunk} cuts the slide into {chunks:,} chunks, more than {MAX_CHUNKS:,}: "
                            "use a larger --chunk")
    if req.batch < 1:
        raise NcaTilesError("--batch must be ≥ 1")
    check_int("--batch", req.batch, 1, MAX_BATCH)
    check_seed("--seed", req.seed)
    if req.sampler == "ddim" and isinstance(req.steps, int) and not model.is_scale_space:
        check_int("--steps", req.steps, 1, model.timesteps, f" (the model has {model.timesteps} timesteps)")
    # What make_job would refuse (steps and η per level, the sampler), refused now.
    make_job(model, req.seed, req.width, req.height, req.chunk, req.sampler, req.steps, req.eta)
    if req.workers is not None and req.scheduler is not None:
        raise NcaTilesError("give --workers or --scheduler, not both")
    if req.workers is not None:
        if req.workers < 1:
            raise NcaTilesError("--workers must be ≥ 1")
        check_int("--workers", req.workers, 1, MAX_WORKERS)
    if req.format not in ("ome-tiff", "ome-zarr"):
        raise NcaTilesError(f"unknown --format {req.format!r}: ome-tiff or ome-zarr")
    if req.format == "ome-tiff":
        from nca_tiles.export.ometiff import check_tiff_options

        check_tiff_options(req.tile, req.compression, req.quality)
    else:
        from nca_tiles.export.pyramid import MAX_TILE

        if req.tile < 16 or req.tile % 16 or req.tile > MAX_TILE:
            raise NcaTilesError(f"--tile must be a multiple of 16 up to {MAX_TILE}, got {req.tile}")
    # Checked before any work: the writer would refuse these only after the whole canvas is done.
    if req.format == "ome-tiff" and req.out.is_dir():
        raise NcaTilesError(f"--out {req.out} is a directory: give a file name such as slide.ome.tif")
    work_dir = (req.work_dir or default_work_dir(req.out)).resolve()
    out = req.out.resolve()
    if work_dir == out or out.is_relative_to(work_dir) or work_dir.is_relative_to(out):
        raise NcaTilesError(f"--work-dir {req.work_dir} and --out {req.out} overlap: keep them apart")


def generator_metadata(model: SynthesisModel, req: SlideRequest, job: Job) -> dict:
    return {
        "software": f"nca-tiles {__version__}",
        "model": model.hash,
        "model_preset": (model.finest.meta.get("training") or {}).get("preset"),
        "levels": model.describe(),
        "seed": req.seed,
        "sampler": req.sampler,
        "steps": job.steps,
        "eta": [level.eta for level in job.levels],  # each level's, coarse to fine
        "chunk": req.chunk,  # what a seam check of the slide needs to know
    }


# -- the output this job wrote ----------------------------------------------------------------
def _identity(path: Path) -> list:
    st = os.stat(path)
    if os.path.isdir(path):  # a directory's mtime may change when it is renamed
        return [st.st_dev, st.st_ino]
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _export_options(req: SlideRequest) -> dict:
    options = {"path": str(req.out.absolute()), "format": req.format, "tile": req.tile}
    if req.format == "ome-tiff":
        options.update(compression=req.compression, quality=req.quality)
    return options


def is_job_output(manifest: Manifest | None, req: SlideRequest) -> bool:
    """True when ``req.out`` is the file (or store) this job finished writing: the manifest
    recorded its identity just before it was renamed into place."""
    if manifest is None or manifest.sweeps_done < manifest.job.sweeps:
        return False
    record = manifest.extra.get("output")
    if not isinstance(record, dict) or record.get("options") != _export_options(req):
        return False
    try:
        return record.get("identity") == _identity(req.out)
    except OSError:
        return False


# -- pre-flight ---------------------------------------------------------------------------------
def disk_needs(req: SlideRequest, job: Job, work: WorkDir, manifest: Manifest | None) -> list[DiskNeed]:
    """What the job still has to write, and where: the rest of the canvas, the output, the
    export's scratch (in the work dir)."""
    needs = []
    if manifest is None or manifest.sweeps_done < job.sweeps:
        have = work.canvas_disk_usage() if manifest is not None else 0
        needs.append(DiskNeed("the canvas", work.path, max(0, job_canvas_bytes(job) - have), "--work-dir"))
    needs += output_needs(job.width, job.height, req.out, req.format, req.tile, req.compression, req.quality,
                          scratch_dir=work.path, scratch_option="--work-dir")
    return needs


def job_canvas_bytes(job: Job) -> int:
    return canvas_bytes(job.width, job.height, job.chunk, [(level.width, level.height) for level in job.levels])


def check_locations(req: SlideRequest, work: WorkDir) -> None:
    check_writable(req.out, "--out")
    check_writable(work.path, "--work-dir")


def dry_run_report(model: SynthesisModel, req: SlideRequest) -> tuple[list[str], list[str]]:
    """The pre-flight of ``synthesize_slide`` without running it: lines describing the disk each
    file system needs, and the reasons the job would be refused (empty: it would run)."""
    check_request(req, model)
    job = make_job(model, req.seed, req.width, req.height, req.chunk, req.sampler, req.steps, req.eta)
    work = WorkDir(req.work_dir or default_work_dir(req.out))
    problems: list[str] = []
    manifest = None

    def attempt(check) -> None:
        try:
            check()
        except NcaTilesError as exc:
            problems.append(str(exc))

    attempt(lambda: check_locations(req, work))

    def job_state() -> None:
        nonlocal manifest
        manifest = work.read_manifest()
        work.check_job(manifest, job)
        if manifest is None:
            work.check_can_create()
        if output_exists(req.out) and not req.overwrite and not is_job_output(manifest, req):
            refuse_existing(req.out)

    attempt(job_state)
    file_systems: list[FileSystemCheck] = check_file_systems(disk_needs(req, job, work, manifest))
    problems += [fs.problem for fs in file_systems if fs.problem]
    return [fs.describe() for fs in file_systems], problems


def plan_job(req: SlideRequest, model: SynthesisModel, calibrate: bool = True) -> tuple[str, list[str]]:
    """``synthesize --dry-run``: the plan (levels, grid, halo, FLOPs, disk, memory, time) and the
    pre-flight as text, and the reasons the job would be refused (empty: it would run)."""
    from nca_tiles.synthesis.calibration import ExportOptions
    from nca_tiles.synthesis.plan import describe_plan, make_plan

    check_request(req, model)
    job = make_job(model, req.seed, req.width, req.height, req.chunk, req.sampler, req.steps, req.eta)
    export = ExportOptions(req.format, req.tile, req.compression, req.quality)
    plan = make_plan(model, job, req.batch, calibrate, export=export)
    lines, problems = dry_run_report(model, req)
    refusals = [f"would refuse the job: {problem}" for problem in problems] or ["the job would run"]
    described = [describe_plan(plan, model, job, req.batch, req.work_dir or default_work_dir(req.out))]
    if calibrate and (req.workers or req.scheduler):
        described.append("  (the time is for one in-process run: the dask workers' speed-up is not estimated)")
    text = "\n".join([*described, "pre-flight:", *(f"  {line}" for line in lines + refusals)])
    return text, problems


# -- progress -----------------------------------------------------------------------------------
class SweepProgress:
    """``sweep 5/21  23%|██▎      | 01:02, ETA 03:25``: the sweep, the share of the whole job, and
    an ETA from the mean time per pixel of the denoising sweeps run so far (sweep 0 only draws
    noise: its speed says nothing of the rest), which settles instead of swinging with each group."""

    def __init__(self, job: Job, sweeps_done: int, enabled: bool):
        from tqdm import tqdm

        self.job = job
        self.sweeps = job.sweeps
        self.total = sum(job.sweep_pixels(n) for n in range(job.sweeps))
        self.done = sum(job.sweep_pixels(n) for n in range(sweeps_done))
        self.bar = tqdm(total=self.total, initial=self.done, disable=not enabled, file=sys.stderr,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}{postfix}", dynamic_ncols=True)
        self.sweep = sweeps_done
        self.denoised_pixels = 0
        self.denoising_seconds = 0.0
        self.last = time.monotonic()
        self.start_sweep(sweeps_done)

    def start_sweep(self, sweep: int) -> None:
        self.sweep = min(sweep, self.sweeps - 1)
        self.bar.set_description_str(f"sweep {self.sweep + 1}/{self.sweeps}", refresh=False)
        self.bar.set_postfix_str(self.eta(), refresh=True)

    def advance(self, pixels: int) -> None:
        now = time.monotonic()
        if self.job.sweep(self.sweep).index > 0:
            self.denoised_pixels += pixels
            self.denoising_seconds += now - self.last
        self.last = now
        self.done += pixels
        self.bar.set_postfix_str(self.eta(), refresh=False)
        self.bar.update(pixels)

    def eta(self) -> str:
        if self.denoised_pixels == 0:
            return "ETA --:--"  # sweep 0 only draws noise: its speed says nothing of the rest
        return f"ETA {self.bar.format_interval((self.total - self.done) * self.denoising_seconds / self.denoised_pixels)}"

    def close(self) -> None:
        self.bar.close()


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


# -- the job --------------------------------------------------------------------------------------
def make_executor(model: SynthesisModel, req: SlideRequest):
    if req.workers or req.scheduler:
        return DaskExecutor(model.path, model.device.type, model.precision, req.batch, req.workers, req.scheduler)
    return InProcessExecutor(model, req.batch)


def synthesize_slide(req: SlideRequest, model: SynthesisModel | Path | str | None = None, *, device: str = "auto",
                     precision: str = "auto", progress: bool = True) -> Path:
    """Synthesize the slide ``req`` describes and write it to ``req.out``; resume if interrupted.

    ``model``: a loaded model (``load_synthesis_model``), or the path of one (None: the bundled
    model), loaded on ``device`` with ``precision``. Dask workers load it from its path.
    Holds the work dir and the output for the whole job: a second job on either is refused at
    once, naming the process that holds it. An existing ``req.out`` is refused unless
    ``req.overwrite``, or unless it is this job's own finished output (the job was killed during
    its clean-up: the rerun finishes it).
    """
    started = time.monotonic()
    if not isinstance(model, SynthesisModel):
        model = load_synthesis_model(model, device, precision)
    check_request(req, model)
    job = make_job(model, req.seed, req.width, req.height, req.chunk, req.sampler, req.steps, req.eta)
    work = WorkDir(req.work_dir or default_work_dir(req.out))
    check_locations(req, work)
    with ExitStack() as stack:
        stack.enter_context(exclusive_lock(work.path, "work dir", "use another --work-dir"))
        stack.enter_context(output_lock(req.out))
        manifest = work.read_manifest()
        work.check_job(manifest, job)
        if output_exists(req.out):
            if is_job_output(manifest, req):
                finish(work, manifest, req)
                if progress:
                    print(f"{req.out} was already written by this job: finished its clean-up", file=sys.stderr)
                return req.out
            if not req.overwrite:
                refuse_existing(req.out)
        if manifest is None:
            work.check_can_create()
        check_free_disk(disk_needs(req, job, work, manifest))
        configure_allocator()
        generator = generator_metadata(model, req, job)

        executor = None
        if manifest is None or manifest.sweeps_done < job.sweeps:
            # Connected before the work dir exists: an unreachable scheduler leaves nothing behind.
            executor = make_executor(model, req)
        try:
            manifest = work.open_or_create(job, {"mpp": model.mpp, "generator": generator})
            if executor is not None and manifest.sweeps_done < job.sweeps:
                bar = SweepProgress(job, manifest.sweeps_done, progress)
                try:
                    manifest = run_sweeps(work, manifest, executor, level_grids(job, model), bar.advance,
                                          lambda sweep: bar.start_sweep(sweep + 1))
                finally:
                    bar.close()
        finally:
            if executor is not None:
                executor.close()

        def record_output(complete: Path) -> None:
            # Just before the rename: a rerun after a kill right after it knows the output as ours.
            manifest.extra["output"] = {"options": _export_options(req), "identity": _identity(complete)}
            work.write_manifest(manifest)

        write_output(work.array(RGB, mode="r"), req.out, fmt=req.format, mpp=model.mpp, generator=generator,
                     tile=req.tile, compression=req.compression, quality=req.quality, scratch_dir=work.path,
                     progress=progress, on_complete=record_output)
        finish(work, manifest, req)
    if progress:
        print(f"synthesized {job.width} × {job.height} px ({job.sweeps} sweeps) and wrote {req.out} "
              f"in {format_duration(time.monotonic() - started)}", file=sys.stderr)
    return req.out


def finish(work: WorkDir, manifest: Manifest, req: SlideRequest) -> None:
    """Mark the job finished and remove what is not to be kept (idempotent: a rerun after a kill
    here does it again)."""
    if not manifest.finished:
        manifest.finished = True
        work.write_manifest(manifest)
    if req.keep_canvas:
        return
    if req.work_dir is None:
        work.remove()  # our own scratch space: nothing worth keeping
    else:
        work.delete_buffers()
