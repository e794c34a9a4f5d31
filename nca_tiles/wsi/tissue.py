"""Where the tissue is: a boolean mask computed from a low-resolution thumbnail of a slide.

Tissue is coloured (stained), glass is white or grey: pixels whose HSV saturation is above an Otsu
threshold are tissue. Specks smaller than ``min_object_area`` are dropped and holes smaller than
``max_hole_area`` (nuclei-free lumens, tears inside tissue) are filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nca_tiles.wsi.slide import Slide, read_level0_region

# Otsu adapts to stain strength, but it always splits the histogram in two, even when a thumbnail
# is all glass or all tissue; clipping keeps the threshold where stain vs glass actually is
# (background saturation is ~0.01-0.03, pale eosin ~0.1, haematoxylin 0.3+).
MIN_THRESHOLD, MAX_THRESHOLD = 0.05, 0.15
# Near-black pixels have meaningless saturation (scanner borders, out-of-focus dirt).
MIN_BRIGHTNESS = 0.1
MAX_THUMBNAIL_SIDE = 4096


@dataclass(frozen=True)
class TissueMask:
    """``mask[i, j]`` covers level-0 pixels [j*downsample, (j+1)*downsample) x [i*downsample, ...)."""

    mask: np.ndarray  # bool (height, width)
    downsample: float  # level-0 pixels per mask pixel, same in x and y
    threshold: float  # the saturation threshold used

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fractions(self, xs: np.ndarray, ys: np.ndarray, size: float) -> np.ndarray:
        """Tissue fraction of the squares of side ``size`` at top-lefts (xs, ys), all in level-0
        pixels, from a summed-area table: constant time per square."""
        h, w = self.mask.shape
        table = np.zeros((h + 1, w + 1), np.int64)
        table[1:, 1:] = self.mask.cumsum(0, dtype=np.int64).cumsum(1)
        xs, ys = np.asarray(xs, float) / self.downsample, np.asarray(ys, float) / self.downsample
        side = size / self.downsample
        x0, y0 = np.clip(np.rint(xs), 0, w).astype(int), np.clip(np.rint(ys), 0, h).astype(int)
        x1 = np.clip(np.maximum(np.rint(xs + side), x0 + 1), 0, w).astype(int)
        y1 = np.clip(np.maximum(np.rint(ys + side), y0 + 1), 0, h).astype(int)
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
        return inside / area


def tissue_mask(
    slide: Slide,
    downsample: float,
    *,
    min_object_area: float | None = None,
    max_hole_area: float | None = None,
) -> TissueMask:
    """Tissue mask of ``slide`` from a thumbnail at ``downsample`` level-0 px per mask pixel
    (made coarser if the thumbnail would exceed ``MAX_THUMBNAIL_SIDE``).

    Specks of at most ``min_object_area`` and holes of at most ``max_hole_area`` level-0 pixels²
    are removed (default: 64 mask pixels each, i.e. 8x8).
    """
    width, height = slide.dimensions
    downsample = max(1.0, downsample, max(width, height) / MAX_THUMBNAIL_SIDE)
    out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
    # Read exactly out*downsample level-0 px so the mask scale is the same in x and y; the sliver
    # past the edge reads as white background.
    thumbnail = read_level0_region(slide, 0, 0, out_w * downsample, out_h * downsample, out_w, out_h)
    mask_pixel_area = downsample * downsample
    min_objects = 64 if min_object_area is None else min_object_area / mask_pixel_area
    max_holes = 64 if max_hole_area is None else max_hole_area / mask_pixel_area
    mask, threshold = tissue_from_rgb(
        thumbnail, min_object_pixels=int(min_objects), max_hole_pixels=int(max_holes)
    )
    return TissueMask(mask=mask, downsample=downsample, threshold=threshold)


def tissue_from_rgb(
    rgb: np.ndarray, *, min_object_pixels: int = 64, max_hole_pixels: int = 64
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an RGB uint8 thumbnail, and the saturation threshold used."""
    from skimage.filters import threshold_otsu

    saturation, brightness = saturation_and_value(rgb)
    lit = brightness >= MIN_BRIGHTNESS
    values = saturation[lit]
    if values.size == 0 or values.min() == values.max():
        threshold = MAX_THRESHOLD
    else:
        threshold = min(max(float(threshold_otsu(values)), MIN_THRESHOLD), MAX_THRESHOLD)
    mask = lit & (saturation > threshold)
    mask = _remove_small_components(mask, min_object_pixels)
    holes = _remove_small_components(~mask, max_hole_pixels, keep_border=True)
    return ~holes, threshold


def pixel_tissue_fractions(patches: np.ndarray) -> np.ndarray:
    """Share of each uint8 RGB patch's (N, H, W, 3) pixels that are stained: lit and saturated above
    the lowest tissue threshold (glass is ~0.01–0.03, pale eosin ~0.1). Per pixel, no Otsu: one
    patch may be all tissue or all glass."""
    saturation, brightness = saturation_and_value(patches)
    return ((saturation > MIN_THRESHOLD) & (brightness >= MIN_BRIGHTNESS)).mean(axis=(-2, -1))


def saturation_and_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value (brightness), floats in [0, 1], of an RGB uint8 array."""
    channels = rgb.astype(np.float32) / 255.0
    high, low = channels.max(axis=-1), channels.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    return saturation, high


def _remove_small_components(mask: np.ndarray, max_pixels: int, keep_border: bool = False) -> np.ndarray:
    """``mask`` without its 8-connected components of at most ``max_pixels`` pixels; with
    ``keep_border``, components touching the edge are kept whatever their size (background
    around tissue is not a hole)."""
    from scipy import ndimage

    if max_pixels <= 0 or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = sizes <= max_pixels
    small[0] = False  # the label of everything outside the mask
    if keep_border:
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        small[np.unique(edge)] = False
    return mask & ~small[labels]
