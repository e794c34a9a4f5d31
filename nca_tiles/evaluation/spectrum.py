"""Texture at every scale: the radially averaged power spectrum of a set of patches.

The power spectrum says how much of an image's variation lives at each spatial frequency: speckle
puts its power at the highest frequencies, nuclei around 1/(7 µm), stroma fibres and glands lower.
Per channel, each patch minus its mean is windowed (Hann, so the patch border is no edge), its 2D
power is averaged over rings of equal frequency, and the set's mean is taken in log10. Two sets
are compared by the mean absolute difference of their log spectra over channels and frequencies:
0 means the same texture at every scale; 1 means a tenfold power difference on average. Per band,
``power_ratio`` says which way: above 1, more contrast at that scale than the reference (blobs
too strong); below 1, less (detail missing).
"""

from __future__ import annotations

import numpy as np

N_BANDS = 8  # log-spaced frequency bands between the lowest and the Nyquist frequency


def band_edges(size: int) -> np.ndarray:
    """Edges of the log-spaced radial frequency bands, in cycles per pixel."""
    return np.geomspace(1.0 / size, 0.5, N_BANDS + 1)


def power_spectrum(patches: np.ndarray) -> np.ndarray:
    """Mean log10 power per channel and frequency band, (3, N_BANDS), of uint8 RGB patches."""
    n, h, w, _ = patches.shape
    x = patches.astype(np.float64) / 255.0
    x -= x.mean(axis=(1, 2), keepdims=True)
    x *= np.outer(np.hanning(h), np.hanning(w))[None, :, :, None]
    power = np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2  # (n, h, w, 3)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    radius = np.hypot(fy, fx)
    band = np.digitize(radius, band_edges(min(h, w))) - 1  # -1: below the first edge (the mean)
    out = np.empty((3, N_BANDS))
    mean_power = power.mean(axis=0)  # (h, w, 3)
    for b in range(N_BANDS):
        ring = band == b
        out[:, b] = np.log10(mean_power[ring].mean(axis=0) + 1e-12) if ring.any() else np.nan
    return out


def band_periods(size: int) -> list[tuple[float, float]]:
    """Each band's periods, (longest, shortest) in pixels, coarsest band first."""
    edges = band_edges(size)
    return [(float(1.0 / lo), float(1.0 / hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def power_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Power of spectrum ``a`` over ``b`` per band (N_BANDS,): the geometric mean over channels."""
    return 10.0 ** np.mean(a - b, axis=0)


def spectrum_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |log10 power difference| of two spectra from ``power_spectrum``."""
    return float(np.nanmean(np.abs(a - b)))
