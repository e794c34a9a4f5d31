"""``nca-tiles info``: describe a patch store, a trained model, a preset, or a slide."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(short_help="Describe a patch store, model, preset or slide.")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--preset", help="Print a model preset's config and parameter count instead.")
def info(path: Path | None, preset: str | None) -> None:
    """Describe PATH: a patch store (.zarr from extract-patches), a trained model (run directory or
    checkpoint file), or a slide (OME-TIFF, OME-Zarr, or anything OpenSlide reads)."""
    from nca_tiles.info import describe

    click.echo(describe(path, preset))
