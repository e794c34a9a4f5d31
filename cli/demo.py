"""``nca-tiles demo``: the whole pipeline on the bundled sample slide, offline."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles_cli.options import (
    compile_option,
    device_option,
    model_option,
    overwrite_option,
    seed_option,
    threads_option,
)


@click.command(short_help="Run the whole pipeline on the bundled sample slide.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), show_default=True, help="Output folder.")
@model_option()
# The side defaults are nca_tiles.demo.DEMO_SIDE, written out so that --help imports nothing heavy.
@click.option("--width", type=int, default=1024, show_default=True, help="Synthetic slide width in px (at most 8192).")
@click.option("--height", type=int, default=1024, show_default=True, help="Synthetic slide height in px (at most 8192).")
@click.option("--chunk", type=int, default=512, show_default=True,
              help="Chunk side in px: the slide is synthesized chunk by chunk, seamlessly (at least 2 × the model's halo).")
@click.option("--steps", type=int, default=None,
              help="DDIM denoising steps, shared by the model's levels as synthesize shares them (at most the model's "
                   "timesteps: 300 for the bundled model). Default: synthesize's — the steps the model records for "
                   "each level, else 50 shared — so the demo shows what a slide looks like.")
@seed_option()
@device_option()
@overwrite_option()
@compile_option()
@threads_option()
def demo(out, model, width, height, chunk, steps, seed, device, overwrite) -> None:
    """Extract patches from the bundled H&E sample slide, synthesize a slide with the bundled
    model, write it as a pyramidal OME-TIFF, and draw real beside synthetic tissue plus a zoom
    across a chunk border. Needs no network. Rerun to resume an interrupted demo."""
    from nca_tiles.demo import run_demo

    result = run_demo(out, model=model, width=width, height=height, chunk=chunk, steps=steps, seed=seed,
                      device=device, overwrite=overwrite, say=click.echo)
    click.echo("\n" + result.summary())
