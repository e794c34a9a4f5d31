"""``nca-tiles export``: write a kept canvas as a pyramidal OME-TIFF or an OME-Zarr."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles.errors import NcaTilesError
from nca_tiles_cli.options import check_output, out_path_option, overwrite_option

FORMATS = ("ome-tiff", "ome-zarr")
# Kept here (not imported from nca_tiles.ometiff) so that --help imports nothing heavy;
# the library validates the value again.
COMPRESSION_NAMES = "jpeg, deflate, lzw, zstd, packbits, none"


def check_synthesis_finished(source: Path) -> None:
    """Refuse a work directory whose manifest says the last denoising sweep has not run: its
    canvas is still noise or half-denoised. (A synthesis whose own export failed has all its
    sweeps done but is not marked finished: that canvas is complete and may be exported.)"""
    import json

    manifest = source / "manifest.json"
    if not (source.is_dir() and manifest.is_file()):
        return
    try:
        state = json.loads(manifest.read_text())
        if state.get("finished", True):
            return
        sweeps = 1 + len(state["job"]["timesteps"])  # sweep 0 draws x_T, one more per step
        done = int(state["sweeps_done"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return  # not ours to judge: opening the canvas reports real problems
    if done < sweeps:
        raise NcaTilesError(
            f"synthesis in {source} has not finished ({done} of {sweeps} sweeps): "
            "rerun the same nca-tiles synthesize command to finish it"
        )


def infer_format(out: Path) -> str:
    """ome-zarr for a ``.zarr`` output, else ome-tiff."""
    return "ome-zarr" if out.name.lower().rstrip("/").endswith(".zarr") else "ome-tiff"


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
@click.option("--compression", default=None, help=f"OME-TIFF compression: {COMPRESSION_NAMES}. [default: jpeg]")
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
    check_output(out, overwrite)
    fmt = fmt or infer_format(out)
    if fmt == "ome-zarr" and (compression is not None or quality is not None):
        raise NcaTilesError("--compression and --quality apply to OME-TIFF only: drop them for --format ome-zarr")

    check_synthesis_finished(source)

    from nca_tiles.pyramid import open_canvas

    canvas = open_canvas(source)
    if mpp is None:
        if canvas.mpp is None:
            raise NcaTilesError(f"the canvas at {source} records no pixel size: pass --mpp (µm per pixel)")
        mpp = canvas.mpp

    if fmt == "ome-tiff":
        from nca_tiles.ometiff import write_ome_tiff

        write_ome_tiff(
            canvas,
            out,
            mpp=mpp,
            generator=canvas.generator,
            name=name,
            tile=tile,
            compression=compression if compression is not None else "jpeg",
            quality=quality if quality is not None else 90,
        )
    else:
        from nca_tiles.omezarr import write_ome_zarr

        write_ome_zarr(canvas, out, mpp=mpp, generator=canvas.generator, name=name, chunk=tile)
    click.echo(f"wrote {out} ({fmt}, {canvas.width} x {canvas.height} px, {mpp:g} µm/px)")
