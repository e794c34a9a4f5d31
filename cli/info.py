"""``nca-tiles info``: describe a patch store, a trained model, a preset, or a slide."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles.errors import NcaTilesError


@click.command(short_help="Describe a patch store, model, preset or slide.")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--preset", help="Print a model preset's config and parameter count instead.")
def info(path: Path | None, preset: str | None) -> None:
    """Describe PATH: a patch store (.zarr from extract-patches), a trained model (run directory or
    checkpoint file), or a slide (OME-TIFF, OME-Zarr, or anything OpenSlide reads)."""
    if preset is not None:
        from nca_tiles.diffusion.model import describe_preset

        click.echo(describe_preset(preset))
        return
    if path is None:
        raise NcaTilesError("give a PATH to describe, or --preset NAME")
    if not path.exists():
        raise NcaTilesError(f"{path} does not exist")

    from nca_tiles.diffusion.checkpoint import is_model_path
    from nca_tiles.diffusion.levels import describe_scale_space_model, is_scale_space_model
    from nca_tiles.training.patches import is_patch_store

    if is_scale_space_model(path):
        click.echo(describe_scale_space_model(path))
    elif is_patch_store(path):
        from nca_tiles.training.patches import describe_store

        click.echo(describe_store(path))
    elif is_model_path(path):
        from nca_tiles.diffusion.checkpoint import describe_model

        click.echo(describe_model(path))
    else:
        from nca_tiles.wsi.info import describe_slide

        click.echo(describe_slide(path))
