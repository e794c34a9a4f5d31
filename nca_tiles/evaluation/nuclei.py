"""Nuclei statistics of H&E patches: structure that a colour-dominated metric cannot see.

Nuclei are found in the haematoxylin optical density (Ruifrok & Johnston colour deconvolution):
smoothed, thresholded at one level shared by every set compared (taken from the real reference,
so that a model cannot pass by being darker or lighter), small specks removed, touching nuclei
split by a watershed on the distance transform. Per nucleus: area (µm²), eccentricity, distance
to the nearest other nucleus in the same patch (µm); per patch: nuclei per mm². Two sets are
compared by the Wasserstein-1 distance of each distribution (docs/design.md §8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nca_tiles.evaluation import metrics

# Smallest nucleus kept: lymphocyte nuclei are ≈ 5 µm across (≈ 20 µm²); below ~8 µm² it is noise.
MIN_NUCLEUS_AREA_UM2 = 8.0
SMOOTHING_UM = 1.0  # Gaussian σ before thresholding: suppresses pixel noise, keeps nuclei


@dataclass(frozen=True)
class NucleiStats:
    """Per-nucleus and per-patch measurements of one set of patches."""

    area_um2: np.ndarray  # (nuclei,)
    eccentricity: np.ndarray  # (nuclei,)
    nearest_um: np.ndarray  # (nuclei with a neighbour in the same patch,)
    density_per_mm2: np.ndarray  # (patches,)


STAT_NAMES = ("density_per_mm2", "area_um2", "eccentricity", "nearest_um")


def haematoxylin(patches: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (N, H, W) of uint8 RGB patches."""
    return metrics.stain_density_maps(patches, "haematoxylin").astype(np.float32)


def _smoothed(h: np.ndarray, mpp: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = SMOOTHING_UM / mpp
    return np.stack([gaussian_filter(x, sigma) for x in h])


def nuclei_threshold(reference: np.ndarray, mpp: float) -> float:
    """The haematoxylin level that separates nuclei from the rest in real ``reference`` patches
    (Otsu over all their smoothed pixels)."""
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(_smoothed(haematoxylin(reference), mpp).ravel()))


def segment_nuclei(h_smooth: np.ndarray, threshold: float, mpp: float) -> np.ndarray:
    """Labelled nuclei (H, W) int32 of one smoothed haematoxylin image."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    min_area = max(1, int(round(MIN_NUCLEUS_AREA_UM2 / mpp**2)))
    mask = h_smooth > threshold
    blobs, _ = ndi.label(mask)
    mask &= (np.bincount(blobs.ravel()) >= min_area)[blobs]  # drop specks (label 0 is masked anyway)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    distance = ndi.distance_transform_edt(mask)
    # Seeds at least a small nucleus' radius apart (≈ 2.5 µm): splits touching nuclei only.
    min_distance = max(1, int(round(2.5 / mpp)))
    peaks = peak_local_max(distance, min_distance=min_distance, labels=ndi.label(mask)[0], exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask).astype(np.int32)


def nuclei_stats(patches: np.ndarray, threshold: float, mpp: float) -> NucleiStats:
    """Nuclei measurements of a set of uint8 RGB patches at ``mpp`` µm/px."""
    from scipy.spatial import cKDTree
    from skimage.measure import regionprops

    smooth = _smoothed(haematoxylin(patches), mpp)
    areas, eccentricities, nearest, density = [], [], [], []
    patch_mm2 = patches.shape[1] * patches.shape[2] * (mpp * 1e-3) ** 2
    for image in smooth:
        regions = regionprops(segment_nuclei(image, threshold, mpp))
        density.append(len(regions) / patch_mm2)
        areas.extend(r.area * mpp**2 for r in regions)
        eccentricities.extend(r.eccentricity for r in regions)
        if len(regions) >= 2:
            centroids = np.array([r.centroid for r in regions])
            d, _ = cKDTree(centroids).query(centroids, k=2)
            nearest.extend(d[:, 1] * mpp)
    return NucleiStats(np.asarray(areas, float), np.asarray(eccentricities, float), np.asarray(nearest, float),
                       np.asarray(density, float))


def _w1(u: np.ndarray, v: np.ndarray) -> float:
    """Wasserstein-1 distance; NaN where a set has no values (e.g. no nuclei at all)."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(u, v)) if len(u) and len(v) else float("nan")


def nuclei_medians(stats: NucleiStats) -> dict[str, float]:
    """The median of each statistic (NaN where there is none): a distance says how far two sets
    are, the medians which way — too many nuclei or too few, too large or too small."""
    return {name: float(np.median(v)) if len(v := getattr(stats, name)) else float("nan") for name in STAT_NAMES}


def nuclei_distances(a: NucleiStats, b: NucleiStats) -> dict[str, float]:
    """W1 distance of each nuclei statistic between two sets."""
    return {name: _w1(getattr(a, name), getattr(b, name)) for name in STAT_NAMES}
