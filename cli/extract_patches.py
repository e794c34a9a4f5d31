"""``nca-tiles extract-patches``: tissue patches from slides into a zarr store for training."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles_cli.options import out_path_option, overwrite_option, seed_option


@click.command(short_help="Extract tissue patches from slides into a zarr store.")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_path_option("Patch store to write (a .zarr folder).")
@click.option("--patch-size", type=int, default=64, show_default=True, help="Patch side in pixels (1..1024).")
@click.option("--mpp", "target_mpp", default="1", show_default=True,
              help="Patch resolution in µm/px; several, comma-separated (e.g. 1,4,16), write one store per "
                   "resolution into the --out folder, for a scale-space model.")
@click.option("--stride", type=int, default=None, help="Pixels between patches at --mpp.  [default: patch size]")
@click.option(
    "--min-tissue", type=float, default=0.6, show_default=True, help="Least tissue fraction a patch must cover."
)
@click.option("--max-per-slide", type=int, default=None, help="Keep at most this many patches per slide (random).")
@seed_option()
@click.option("--source-mpp", multiple=True,
              help="µm/px of slides whose metadata has none: a number for all, or PATTERN=µm/px per file name "
                   "(e.g. 'ovary_*.jpg=0.25'); repeatable.")
@click.option("--coarse-min-tissue", type=float, default=0.05, show_default=True,
              help="With several --mpp: least tissue fraction at the coarser ones (they learn tissue borders and "
                   "background).")
@overwrite_option()
@click.option("--allow-upsample", is_flag=True, help="Allow an --mpp finer than a slide's own resolution.")
@click.option("--split-by", default="auto", show_default=True,
              help="Train/val/test split: slide (whole slides), region (regions of every slide, so every tissue "
                   "is trained on), or auto (by slide with 3 or more slides).")
def extract_patches(
    slides: tuple[Path, ...],
    out: Path,
    patch_size: int,
    target_mpp: str,
    stride: int | None,
    min_tissue: float,
    max_per_slide: int | None,
    seed: int,
    source_mpp: tuple[str, ...],
    coarse_min_tissue: float,
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
    from nca_tiles.training.levels import extract_patch_stores

    results = extract_patch_stores(
        slides, out, parse_floats("--mpp", target_mpp), patch_size=patch_size, stride=stride, min_tissue=min_tissue,
        max_per_slide=max_per_slide, seed=seed, source_mpp=parse_source_mpp(source_mpp), overwrite=overwrite,
        allow_upsample=allow_upsample, split_by=split_by, coarse_min_tissue=coarse_min_tissue)
    for result in results:
        click.echo(result.summary())


def parse_floats(option: str, text: str) -> list[float]:
    from nca_tiles.errors import NcaTilesError

    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NcaTilesError(f"{option} takes numbers separated by commas, got {text!r}") from None


def parse_source_mpp(values: tuple[str, ...]):
    """``0.5`` (all slides) or ``PATTERN=0.5`` items into what extract_patches takes."""
    from nca_tiles.errors import NcaTilesError

    if not values:
        return None
    mapping: dict[str, float] = {}
    for value in values:
        pattern, _, number = value.rpartition("=")
        try:
            mapping[pattern or "*"] = float(number)
        except ValueError:
            raise NcaTilesError(f"--source-mpp takes a number or PATTERN=number, got {value!r}") from None
    if list(mapping) == ["*"]:
        return mapping["*"]
    return dict(sorted(mapping.items(), key=lambda item: item[0] == "*"))  # the catch-all last
