"""``nca-tiles preview``: write a thumbnail of a slide."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles.errors import NcaTilesError
from nca_tiles_cli.options import check_output, out_path_option, overwrite_option


@click.command(short_help="Write a PNG thumbnail of a slide.")
@click.argument("path", metavar="FILE", type=click.Path(path_type=Path))
@out_path_option("Thumbnail image: .png (or .jpg).")
@click.option("--size", type=int, default=1024, show_default=True, help="Longer side of the thumbnail, in pixels.")
@overwrite_option()
def preview(path: Path, out: Path, size: int, overwrite: bool) -> None:
    """Write a thumbnail of FILE: an OME-TIFF or TIFF, an OME-Zarr directory, any slide
    OpenSlide reads (.svs, .ndpi, .mrxs, ...), a PNG or JPEG. It is read from the smallest pyramid level that is
    at least --size pixels, and never upscaled."""
    if not path.exists():
        raise NcaTilesError(f"{path} does not exist")
    if size < 1:
        raise NcaTilesError(f"--size must be a positive number of pixels, got {size}")
    check_output(out, overwrite)

    from nca_tiles.wsi.thumbnail import write_preview

    write_preview(path, out, size=size)
    click.echo(f"wrote {out}")
