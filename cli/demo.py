"""``nca-tiles demo``: the whole pipeline on the bundled sample slide, offline."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles_cli.options import device_option, overwrite_option, seed_option


@click.command(short_help="Run the whole pipeline on the bundled sample slide.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), show_default=True, help="Output folder.")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Model to use (default: the bundled one).")
@click.option("--width", type=int, default=1280, show_default=True, help="Synthetic slide width in px (at most 8192).")
@click.option("--height", type=int, default=1280, show_default=True, help="Synthetic slide height in px (at most 8192).")
@click.option("--chunk", type=int, default=512, show_default=True,
              help="Chunk side in px: the slide is synthesized chunk by chunk, seamlessly (at least 2 × the model's halo).")
@click.option("--steps", type=int, default=20, show_default=True, help="DDIM denoising steps (at most the model's timesteps: 300 for the bundled model).")
@seed_option()
@device_option()
@overwrite_option()
def demo(out, model, width, height, chunk, steps, seed, device, overwrite) -> None:
    """Extract patches from the bundled H&E sample slide, synthesize a slide with the bundled
    model, write it as a pyramidal OME-TIFF, and draw real beside synthetic tissue plus a zoom
    across a chunk border. Needs no network. Rerun to resume an interrupted demo."""
    from nca_tiles.runtime.preflight import check_writable
    check_writable(out, "--out")  # before minutes of work
    import shutil

    import tifffile

    from nca_tiles.demo import PANEL, SAMPLE_SLIDE, DemoPaths, check_options, comparison_figure, densest_tissue_region
    from nca_tiles.errors import NcaTilesError
    from nca_tiles.training.patches import extract_patches
    from nca_tiles.wsi.thumbnail import write_preview
    from nca_tiles.training.sample_grid import save_png
    from nca_tiles.diffusion.pipeline import load_model
    from nca_tiles.synthesis.slide_job import SlideRequest, synthesize_slide

    pipeline = load_model(model, device)
    check_options(width, height, chunk, steps, seed, pipeline.halo, pipeline.schedule.timesteps)
    paths = DemoPaths(out)
    if paths.figure.exists():
        if not overwrite:
            raise NcaTilesError(f"a finished demo is already in {out}: pass --overwrite to run it again, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    click.echo(f"1/4 extracting tissue patches from the sample slide ({SAMPLE_SLIDE.name}) ...")
    if not paths.patches.exists():
        result = extract_patches([SAMPLE_SLIDE], paths.patches, target_mpp=pipeline.mpp, progress=False)
        click.echo(f"    {result.n_patches} patches of 64 px at {pipeline.mpp} µm/px -> {paths.patches}")

    click.echo(f"2/4 synthesizing a {width} × {height} px slide in {chunk} px chunks, {steps} DDIM steps ...")
    if not paths.slide.exists():
        req = SlideRequest(width=width, height=height, out=paths.slide, seed=seed, chunk=chunk, steps=steps)
        synthesize_slide(pipeline, req, model_path=model, device=device)

    click.echo("3/4 drawing real vs synthetic tissue and a zoom across a chunk border ...")
    synthetic_full = tifffile.imread(paths.slide, level=0)
    side = min(PANEL, width, height)
    real = densest_tissue_region(SAMPLE_SLIDE, pipeline.mpp, side)
    y0, x0 = (height - side) // 2, (width - side) // 2
    figure = comparison_figure(real, synthetic_full[y0 : y0 + side, x0 : x0 + side], synthetic_full, chunk)
    save_png(figure, paths.figure)

    click.echo("4/4 writing a thumbnail ...")
    write_preview(paths.slide, paths.thumbnail, size=1024)

    click.echo(
        f"\ndone. In {out}/:\n"
        f"  {paths.slide.name}  pyramidal OME-TIFF, {width} × {height} px at {pipeline.mpp} µm/px\n"
        f"  {paths.figure.name}  real vs synthetic tissue, and a zoom across a chunk border\n"
        f"  {paths.thumbnail.name}  a thumbnail of the synthetic slide\n"
        f"  {paths.patches.name}  the real patches (nca-tiles info {paths.patches})\n"
        f"Open the slide in QuPath: File > Open... > {paths.slide} (read by Bio-Formats, pixel size in µm).\n"
        f"Bigger: nca-tiles synthesize --width 100000 --height 100000 --out big.ome.tif --dry-run"
    )
