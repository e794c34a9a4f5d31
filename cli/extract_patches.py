"""``nca-tiles extract-patches``: tissue patches from slides into a zarr store for training."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles_cli.options import out_path_option, overwrite_option, seed_option


@click.command(short_help="Extract tissue patches from slides into a zarr store.")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_path_option("Patch store to write (a .zarr folder).")
@click.option("--patch-size", type=int, default=64, show_default=True, help="Patch side in pixels (1..1024).")
@click.option("--mpp", "target_mpp", type=float, default=1.0, show_default=True, help="Patch resolution in µm/px.")
@click.option("--stride", type=int, default=None, help="Pixels between patches at --mpp.  [default: patch size]")
@click.option(
    "--min-tissue", type=float, default=0.6, show_default=True, help="Least tissue fraction a patch must cover."
)
@click.option("--max-per-slide", type=int, default=None, help="Keep at most this many patches per slide (random).")
@seed_option()
@click.option("--source-mpp", type=float, default=None, help="µm/px of slides whose metadata has none.")
@overwrite_option()
@click.option("--allow-upsample", is_flag=True, help="Allow an --mpp finer than a slide's own resolution.")
@click.option("--split-by", default="auto", show_default=True,
              help="Train/val/test split: slide (whole slides), region (regions of every slide, so every tissue "
                   "is trained on), or auto (by slide with 3 or more slides).")
def extract_patches(
    slides: tuple[Path, ...],
    out: Path,
    patch_size: int,
    target_mpp: float,
    stride: int | None,
    min_tissue: float,
    max_per_slide: int | None,
    seed: int,
    source_mpp: float | None,
    overwrite: bool,
    allow_upsample: bool,
    split_by: str,
) -> None:
    """Extract tissue patches from SLIDES (files, or folders searched recursively) into --out.

    Reads every format OpenSlide reads (svs, ndpi, mrxs, scn, bif, tiled TIFF), OME-TIFF, plain
    TIFF, OME-Zarr, PNG and JPEG. Patches are area-averaged to --mpp and split train/val/test 80/10/10: by
    slide with 3 or more slides, else by region inside each slide. Unreadable slides are skipped
    and listed at the end.
    """
    from nca_tiles.training.patches import extract_patches as run_extraction

    result = run_extraction(
        slides,
        out,
        patch_size=patch_size,
        target_mpp=target_mpp,
        stride=stride,
        min_tissue=min_tissue,
        max_per_slide=max_per_slide,
        seed=seed,
        source_mpp=source_mpp,
        overwrite=overwrite,
        allow_upsample=allow_upsample,
        split_by=split_by,
    )
    click.echo(result.summary())
