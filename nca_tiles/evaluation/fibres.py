"""Fibres: how strongly the eosin texture of a patch runs one way.

Stroma is fibres: eosin-pink strands a few µm wide that run side by side over tens of µm. Speckle,
crumpled texture and noise have as much eosin contrast but no common direction. The structure
tensor says which (Bigün & Granlund 1987; docs/design.md §8): in the eosin optical density (colour
deconvolution, as for nuclei), gradients at the scale of a strand, their outer products averaged
over a window a few strands wide; per pixel, coherence = (λ1 − λ2) / (λ1 + λ2) of that tensor — 1
where every gradient in the window points the same way, 0 where they point every way. Per patch:
the mean coherence weighted by λ1 + λ2 (so flat regions, glass, count for nothing). Two sets are
compared by the Wasserstein-1 distance of their per-patch coherences; the medians say which way.
A smooth image scores high too (what gradients are left are the edges of large structures, one
way within a window): read coherence beside the power per scale (spectrum.py), which tells a
blurred image from a fibrous one.
"""

from __future__ import annotations

import numpy as np

from nca_tiles.evaluation import metrics

STRAND_UM = 1.0  # σ of the gradient: collagen strands and their clefts are a few µm wide
WINDOW_UM = 6.0  # σ of the window a direction must hold over to count as a fibre


def coherence_map(image: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of one 2D image: the structure tensor's coherence and its trace (the energy)."""
    from scipy.ndimage import gaussian_filter

    strand, window = STRAND_UM / mpp, WINDOW_UM / mpp
    gy = gaussian_filter(image, strand, order=(1, 0))
    gx = gaussian_filter(image, strand, order=(0, 1))
    jxx, jyy, jxy = (gaussian_filter(g, window) for g in (gx * gx, gy * gy, gx * gy))
    trace = jxx + jyy
    anisotropy = np.sqrt((jxx - jyy) ** 2 + 4.0 * jxy**2)  # λ1 − λ2
    return anisotropy / np.maximum(trace, 1e-12), trace


def resolves_strands(mpp: float) -> bool:
    """Whether a strand's gradient scale is at least a pixel: at coarser µm/px (a 4 µm/px level)
    strands are sub-pixel and a coherence would measure the sampling, not fibres."""
    return STRAND_UM / mpp >= 1.0


def fibre_coherence(patches: np.ndarray, mpp: float) -> np.ndarray:
    """Energy-weighted mean coherence (patches,) in [0, 1] of uint8 RGB patches at ``mpp`` µm/px;
    NaN where the µm/px does not resolve strands. A border of one window is left out: there the
    window reaches past the patch."""
    if not resolves_strands(mpp):
        return np.full(len(patches), np.nan)
    margin = int(round(WINDOW_UM / mpp))
    inner = (slice(margin, -margin or None),) * 2
    out = []
    for image in metrics.stain_density_maps(patches, "eosin"):
        coherence, trace = coherence_map(image, mpp)
        weight = trace[inner]
        textured = weight.mean() > 1e-10  # glass, or any flat patch: no direction to speak of
        out.append(float((coherence[inner] * weight).sum() / weight.sum()) if textured else 0.0)
    return np.asarray(out)


def coherence_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance of two sets' per-patch coherences (NaN where they are NaN: too coarse)."""
    from scipy.stats import wasserstein_distance

    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    return float(wasserstein_distance(a, b))
