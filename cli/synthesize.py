"""``nca-tiles synthesize``: a whole-slide image of any size, chunk by chunk."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles_cli.export import COMPRESSION_NAMES
from nca_tiles_cli.options import (
    compile_option,
    device_option,
    eta_option,
    model_option,
    overwrite_option,
    seed_option,
    steps_option,
    threads_option,
)


@click.command(short_help="Synthesize a whole-slide image of any size, chunk by chunk.")
@model_option()
@click.option("--width", type=int, required=True, help="Slide width in pixels.")
@click.option("--height", type=int, required=True, help="Slide height in pixels.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output slide (.ome.tif, or .ome.zarr with --format ome-zarr).")
@click.option("--chunk", type=int, default=1024, show_default=True, help="Chunk side in pixels (one zarr shard, one unit of work).")
@seed_option()
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@steps_option()
@eta_option()
@device_option()
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--batch", type=int, default=1, show_default=True, help="Windows per model call.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Where the canvas lives while synthesizing (default: OUT.work, removed when done).")
@click.option("--keep-canvas", is_flag=True, help="Keep the zarr canvas (float buffers too) after writing OUT.")
@overwrite_option()
@click.option("--workers", type=int, default=None, help="Run on a local dask cluster of N worker processes.")
@click.option("--scheduler", default=None, help="Run on an existing dask cluster (tcp://host:port).")
@click.option("--format", "format_", type=click.Choice(["ome-tiff", "ome-zarr"]), default="ome-tiff", show_default=True)
@click.option("--tile", type=int, default=512, show_default=True, help="OME-TIFF tile side.")
@click.option("--compression", default="jpeg", show_default=True, help=f"OME-TIFF compression: {', '.join(COMPRESSION_NAMES)}.")
@click.option("--quality", type=int, default=90, show_default=True, help="JPEG quality.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (grid, halo overhead, disk per file system, memory, time) and the pre-flight "
                   "checks, and stop; exits non-zero if the job would be refused.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@compile_option()
@threads_option()
def synthesize(model, width, height, out, chunk, seed, sampler, steps, eta, device, precision, batch, work_dir,
               keep_canvas, overwrite, workers, scheduler, format_, tile, compression, quality, dry_run,
               no_progress) -> None:
    """Synthesize a WIDTH × HEIGHT slide with a Diff-NCA model, streaming chunk by chunk over a
    zarr canvas, and write it as a pyramidal OME-TIFF that QuPath opens.

    The pixels are a pure function of (model, seed, size, sampler, steps): any --chunk, --batch
    or number of workers gives the same slide. An interrupted run resumes when rerun.
    """
    from nca_tiles.diffusion.levels import load_synthesis_model
    from nca_tiles.errors import NcaTilesError
    from nca_tiles.synthesis.slide_job import SlideRequest, plan_job, synthesize_slide

    loaded = load_synthesis_model(model, device, precision)
    req = SlideRequest(width=width, height=height, out=out, seed=seed, chunk=chunk, sampler=sampler, steps=steps,
                       eta=eta, batch=batch, work_dir=work_dir, keep_canvas=keep_canvas, format=format_, tile=tile,
                       compression=compression, quality=quality, workers=workers, scheduler=scheduler,
                       overwrite=overwrite)
    if dry_run:
        text, problems = plan_job(req, loaded)
        click.echo(text)
        if problems:
            more = f" (and {len(problems) - 1} more reason(s) above)" if len(problems) > 1 else ""
            raise NcaTilesError(f"the job would be refused: {problems[0]}{more}")
        return
    synthesize_slide(req, loaded, progress=not no_progress)
    click.echo(f"wrote {out}")
