"""Patches at several µm/px, one store per level: the training data of a scale-space model.

The finest level keeps tissue only (``min_tissue``); coarser levels keep background and tissue
borders too (``coarse_min_tissue``), because a coarse level is where the layout of tissue and
glass is learned (docs/design.md §7). A slide too coarse for a level is skipped at that level
only: a low-magnification overview still feeds the coarse levels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from nca_tiles.errors import NcaTilesError
from nca_tiles.training.patches import ExtractionResult, SourceMpp, extract_patches

COARSE_MIN_TISSUE = 0.05


def level_store_name(mpp: float) -> str:
    return f"mpp-{mpp:g}.zarr"


def extract_patch_levels(slides: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], mpps: Sequence[float],
                         *, min_tissue: float = 0.6, coarse_min_tissue: float = COARSE_MIN_TISSUE,
                         source_mpp: SourceMpp = None, overwrite: bool = False, **options) -> list[ExtractionResult]:
    """One patch store per µm/px in ``mpps``, written as ``out/mpp-<mpp>.zarr``. ``options`` are
    those of ``extract_patches`` (patch size, stride, seed, split, ...)."""
    mpps = sorted(set(mpps))
    if len(mpps) < 2:
        raise NcaTilesError("give two or more --mpp values for a multi-resolution extraction (e.g. --mpp 1,4)")
    if not 0.0 <= coarse_min_tissue <= 1.0:
        raise NcaTilesError(f"--coarse-min-tissue must be between 0 and 1, got {coarse_min_tissue}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NcaTilesError(f"--out {out} is a file: give a folder for the stores of several --mpp values")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, mpp in enumerate(mpps):
        results.append(extract_patches(
            slides, out / level_store_name(mpp), target_mpp=mpp, min_tissue=min_tissue if i == 0 else coarse_min_tissue,
            source_mpp=source_mpp, overwrite=overwrite, skip_too_coarse=True, **options))
    return results


def extract_patch_stores(slides: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], mpps: Sequence[float],
                         *, coarse_min_tissue: float = COARSE_MIN_TISSUE, **options) -> list[ExtractionResult]:
    """What ``nca-tiles extract-patches`` runs: one µm/px in ``mpps`` writes one patch store at
    ``out`` (``extract_patches``), several write one store per µm/px into the folder ``out``
    (``extract_patch_levels``; ``coarse_min_tissue`` applies only there). ``options`` are those of
    ``extract_patches``."""
    if len(mpps) == 1:
        return [extract_patches(slides, out, target_mpp=mpps[0], **options)]
    return extract_patch_levels(slides, out, mpps, coarse_min_tissue=coarse_min_tissue, **options)
