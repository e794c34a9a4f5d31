"""Tissue layout of whole slides at a coarse µm/px: what the coarse levels of a scale-space model
must get right, and what 64 px patches cannot show (docs/design.md §8).

Per slide, from its tissue mask at ``mpp`` µm per mask pixel (saturation, Otsu, as patch
extraction finds tissue): the tissue fraction, the areas of the tissue regions (connected
components) and of the lumina (holes inside tissue: glands, vessels, tears). Two slides are
compared by |Δ tissue fraction| and the Wasserstein-1 distances of log10 areas, so that a region
of 0.01 mm² and one of 1 mm² weigh alike.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nca_tiles.errors import NcaTilesError

# Smaller than this is speckle, not layout: a few cells.
MIN_AREA_UM2 = 500.0
DISTANCES = ("tissue_fraction", "region_area_log10", "lumen_area_log10")


@dataclass(frozen=True)
class LayoutStats:
    mpp: float
    tissue_fraction: float
    region_areas_um2: np.ndarray
    lumen_areas_um2: np.ndarray

    def summary(self) -> dict[str, Any]:
        def median(a: np.ndarray) -> float | None:
            return float(np.median(a)) if len(a) else None

        return {"tissue_fraction": self.tissue_fraction, "regions": len(self.region_areas_um2),
                "median_region_um2": median(self.region_areas_um2), "lumina": len(self.lumen_areas_um2),
                "median_lumen_um2": median(self.lumen_areas_um2)}


def layout_of_mask(mask: np.ndarray, mpp: float) -> LayoutStats:
    """Layout statistics of a boolean tissue mask whose pixels are ``mpp`` µm."""
    from scipy import ndimage

    pixel_um2 = mpp * mpp
    eight = np.ones((3, 3), bool)
    regions, n = ndimage.label(mask, structure=eight)
    region_areas = np.bincount(regions.ravel(), minlength=n + 1)[1:] * pixel_um2
    background, m = ndimage.label(~mask)  # 4-connected: holes separated by a diagonal stay apart
    sizes = np.bincount(background.ravel(), minlength=m + 1)
    border = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    lumen = np.ones(m + 1, bool)
    lumen[0] = False
    lumen[border] = False  # glass around the tissue is no lumen
    lumen_areas = sizes[lumen] * pixel_um2
    return LayoutStats(mpp, float(mask.mean()) if mask.size else 0.0,
                       region_areas[region_areas >= MIN_AREA_UM2].astype(float),
                       lumen_areas[lumen_areas >= MIN_AREA_UM2].astype(float))


def slide_layout(path: str | Path, mpp: float, source_mpp: float | None = None) -> LayoutStats:
    """Layout statistics of a slide (any format ``open_slide`` reads) at ``mpp`` µm/px."""
    from nca_tiles.wsi.slide import open_slide
    from nca_tiles.wsi.tissue import tissue_mask

    with open_slide(path, source_mpp) as slide:
        if mpp < slide.mpp * 0.99:
            raise NcaTilesError(f"{path} is at {slide.mpp:g} µm/px: a layout at {mpp:g} µm/px needs a finer slide; "
                                "choose a coarser --layout-mpp")
        tm = tissue_mask(slide, mpp / slide.mpp, min_object_area=0, max_hole_area=0)
        return layout_of_mask(tm.mask, tm.downsample * slide.mpp)


def _w1_log10(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wasserstein_distance

    if len(a) == 0 and len(b) == 0:
        return 0.0
    if len(a) == 0 or len(b) == 0:
        return float("nan")  # one has none at all: no distance between distributions
    return float(wasserstein_distance(np.log10(a), np.log10(b)))


def layout_distances(a: LayoutStats, b: LayoutStats) -> dict[str, float]:
    return {
        "tissue_fraction": abs(a.tissue_fraction - b.tissue_fraction),
        "region_area_log10": _w1_log10(a.region_areas_um2, b.region_areas_um2),
        "lumen_area_log10": _w1_log10(a.lumen_areas_um2, b.lumen_areas_um2),
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    def mean(values: list[float]) -> float:
        values = [v for v in values if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    return {key: mean([row[key] for row in rows]) for key in DISTANCES}


def evaluate_layout(synthetic: list[LayoutStats], real: list[LayoutStats]) -> dict[str, Any]:
    """Mean distances of synthetic slides to real ones, beside the real-vs-real floor (pairs of real
    slides) and a ceiling: an all-tissue canvas (no glass, one region, no lumina: what a model
    without layout draws)."""
    if not synthetic or not real:
        raise NcaTilesError("layout evaluation needs at least one synthetic and one real slide")
    ceiling_stats = [LayoutStats(s.mpp, 1.0, np.array([s.region_areas_um2.sum() or 1.0]), np.array([]))
                     for s in synthetic]
    floor = [layout_distances(a, b) for a, b in itertools.combinations(real, 2)]
    return {
        "mpp": synthetic[0].mpp,
        "results": {
            "floor": _mean(floor),
            "synthetic": _mean([layout_distances(s, r) for s in synthetic for r in real]),
            "ceiling": _mean([layout_distances(c, r) for c in ceiling_stats for r in real]),
        },
        "synthetic": [s.summary() for s in synthetic],
        "real": [r.summary() for r in real],
    }


def format_layout_table(results: dict[str, Any]) -> str:
    labels = {"tissue_fraction": "|Δ tissue fraction|", "region_area_log10": "W1 log10 tissue region area",
              "lumen_area_log10": "W1 log10 lumen area"}
    header = ["layout metric", "real vs real (floor)", "synthetic", "all tissue (ceiling)"]
    rows = [[label] + [f"{results['results'][c][key]:.3f}" for c in ("floor", "synthetic", "ceiling")]
            for key, label in labels.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = lambda r: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([f"layout at {results['mpp']:g} µm/px (nan: no real pairs, or no lumina on one side)",
                      fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, rows)])
