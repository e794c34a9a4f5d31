"""``nca-tiles export``: write a kept canvas as a pyramidal OME-TIFF or an OME-Zarr."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles_cli.options import out_path_option, overwrite_option

FORMATS = ("ome-tiff", "ome-zarr")
# Kept here (not imported from nca_tiles.export.ometiff) so that --help imports nothing heavy; shared
# with synthesize, and tested to equal the library's list. The library validates the value.
COMPRESSION_NAMES = ("jpeg", "deflate", "lzw", "zstd", "packbits", "none")


@click.command(short_help="Export a kept canvas as pyramidal OME-TIFF or OME-Zarr.")
@click.argument("source", metavar="WORK_DIR_OR_CANVAS", type=click.Path(path_type=Path))
@out_path_option("Output: a .ome.tif file, or a .ome.zarr directory.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Output format. Default: ome-zarr when --out ends in .zarr, else ome-tiff.",
)
@click.option(
    "--tile",
    type=int,
    default=512,
    show_default=True,
    help="Tile (OME-TIFF) or chunk (OME-Zarr) side: a multiple of 16.",
)
@click.option("--compression", default=None, help=f"OME-TIFF compression: {', '.join(COMPRESSION_NAMES)}. [default: jpeg]")
@click.option("--quality", type=int, default=None, help="JPEG quality, 1-100. [default: 90]")
@click.option("--mpp", type=float, default=None, help="µm per pixel. Default: the canvas' 'mpp' attribute.")
@click.option("--name", default=None, help="Image name in the metadata. Default: from --out.")
@overwrite_option()
def export(
    source: Path,
    out: Path,
    fmt: str | None,
    tile: int,
    compression: str | None,
    quality: int | None,
    mpp: float | None,
    name: str | None,
    overwrite: bool,
) -> None:
    """(Re-)export the canvas of WORK_DIR_OR_CANVAS (a synthesis work directory, its
    canvas.zarr, or the canvas array) as a pyramidal OME-TIFF that QuPath opens, or as an
    OME-Zarr (NGFF 0.4).

    The output is written under a temporary name and renamed when complete, so an interrupted
    export leaves no --out behind.
    """
    from nca_tiles.synthesis.export_job import export_canvas

    done = export_canvas(source, out, fmt=fmt, tile=tile, compression=compression, quality=quality, mpp=mpp,
                         name=name, overwrite=overwrite)
    click.echo(f"wrote {out} ({done.format}, {done.width} x {done.height} px, {done.mpp:g} µm/px)")
