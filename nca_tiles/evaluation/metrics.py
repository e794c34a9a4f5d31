"""Offline quality metrics for synthetic H&E patches and slides.

Every metric works on uint8 RGB patch arrays of shape (N, H, W, 3), needs no downloaded weights
and runs on the CPU in seconds:

- Fréchet distance (Heusel et al. 2017) and KID (Bińkowski et al. 2018) in the feature space of a
  *fixed, seeded random* CNN. These are NOT Inception-FID/KID: the numbers are only comparable
  with each other (same seed, same n), never with published FIDs.
- Wasserstein-1 distances of haematoxylin, eosin and DAB optical densities after Ruifrok–Johnston
  colour deconvolution (Ruifrok & Johnston 2001).
- A classifier two-sample test (Lopez-Paz & Oquab 2017): held-out ROC AUC of a small CNN trained
  to tell the two sets apart (0.5 = indistinguishable).
- The seam score of a synthesized slide: gradient magnitude across chunk borders over gradient
  magnitude inside chunks (1.00 = no seam), computed in bounded strips.
- Colour-matched noise, the "ceiling" reference any model should beat.

torch is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from nca_tiles.errors import NcaTilesError

if TYPE_CHECKING:  # pragma: no cover
    import torch

NOT_INCEPTION_NOTE = (
    "FD and KID use features of a fixed, seeded random CNN: they are NOT Inception-FID/KID and are "
    "not comparable to published FID/KID values, only to each other at the same seed and n."
)


# --------------------------------------------------------------------------- input checks


def check_patches(patches: Any, name: str = "patches", min_count: int = 1) -> np.ndarray:
    """Return ``patches`` as a uint8 (N, H, W, 3) array, or raise NcaTilesError saying what is wrong."""
    if not isinstance(patches, np.ndarray):
        patches = np.asarray(patches)
    if patches.dtype != np.uint8:
        raise NcaTilesError(f"{name} must be uint8 RGB patches, got dtype {patches.dtype}")
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise NcaTilesError(f"{name} must have shape (N, H, W, 3), got {patches.shape}")
    if patches.shape[0] < min_count or patches.shape[1] == 0 or patches.shape[2] == 0:
        raise NcaTilesError(f"{name} needs at least {min_count} non-empty patches, got shape {patches.shape}")
    return patches


def _check_features(features: np.ndarray, name: str, min_count: int = 2) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < min_count or features.shape[1] == 0:
        raise NcaTilesError(f"{name} must be a (N, D) feature array with N >= {min_count}, got {features.shape}")
    return features


# --------------------------------------------------------------------------- random features


@functools.lru_cache(maxsize=4)
def _random_feature_net(seed: int) -> "torch.nn.Module":
    import torch
    from torch import nn

    class RandomFeatureNet(nn.Module):
        """Four 3x3 conv + ReLU stages with 2x average pooling between them; the global average
        of every stage is concatenated (32 + 64 + 128 + 128 = 352 features), so the features see
        colour, fine texture and coarser structure at once."""

        widths = (32, 64, 128, 128)

        def __init__(self) -> None:
            super().__init__()
            chans = (3, *self.widths)
            self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(len(self.widths)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = []
            for i, conv in enumerate(self.convs):
                if i > 0:
                    x = nn.functional.avg_pool2d(x, 2, ceil_mode=True)
                x = torch.relu(conv(x))
                pooled.append(x.mean(dim=(2, 3)))
            return torch.cat(pooled, dim=1)

    net = RandomFeatureNet()
    # Our own generator: the weights depend on the seed only, not on the global torch RNG state.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in net.convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=gen)
            conv.bias.normal_(0.0, 0.1, generator=gen)
    return net.eval()


def random_features(patches: np.ndarray, seed: int = 0, batch: int = 256) -> np.ndarray:
    """Features (N, 352) float64 of a fixed CNN with seed-initialised random weights (CPU)."""
    import torch

    from nca_tiles.diffusion.pipeline import to_model_space

    patches = check_patches(patches)
    net = _random_feature_net(seed)
    out = []
    with torch.inference_mode():
        for start in range(0, len(patches), batch):
            out.append(net(to_model_space(patches[start : start + batch])).double().numpy())
    return np.concatenate(out)


# Luminance weights (ITU-R BT.601); the spread below which a patch counts as flat (1 grey level);
# grey levels per standard deviation in structure patches (±4 σ fit in uint8).
LUMA = (0.299, 0.587, 0.114)
FLAT_SPREAD = 1.0
LEVELS_PER_SPREAD = 32


def structure_patches(patches: np.ndarray) -> np.ndarray:
    """Each patch's luminance standardised per patch (zero mean, unit spread; 128 ± 32 per σ),
    as grey uint8 RGB patches: blind to hue, brightness and contrast, so a metric on them measures
    shapes and texture — colour dominates the random-feature FD and the C2ST (docs/design.md §8)."""
    patches = check_patches(patches)
    grey = patches.astype(np.float32) @ np.asarray(LUMA, np.float32)  # (N, H, W)
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    spread = np.maximum(np.sqrt(np.square(grey).mean(axis=(1, 2), keepdims=True)), FLAT_SPREAD)
    levels = np.clip(np.rint(128 + LEVELS_PER_SPREAD * grey / spread), 0, 255).astype(np.uint8)
    return np.repeat(levels[..., None], 3, axis=-1)


# --------------------------------------------------------------------------- Fréchet distance


@contextlib.contextmanager
def _single_torch_thread():
    """Run torch single-threaded, then restore the caller's setting. The C2ST net and the 352 x 352
    eigendecompositions are small: threads cost more than they gain (3-10x slower on a busy
    2-core machine), and one thread makes results independent of the machine's core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of a symmetric matrix (float64), by torch's LAPACK on one
    thread: numpy's multithreaded OpenBLAS takes seconds instead of milliseconds on a busy CPU."""
    import torch

    with _single_torch_thread():
        values, vectors = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64)))
    return values.numpy(), vectors.numpy()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features."""
    features = _check_features(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = _eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2 but, unlike a general
    matrix square root, stays real and stable for the rank-deficient covariances of small sets.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise NcaTilesError(f"mismatched Gaussian shapes: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(_eigh((middle + middle.T) / 2)[0], 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # tiny negative values are rounding error


def feature_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


# --------------------------------------------------------------------------- KID


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # k(x, y) = (x.y / d + 1)^3, the kernel of Bińkowski et al. 2018.
    k = x @ y.T / x.shape[1] + 1.0
    return k * k * k  # much faster than k ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of the squared MMD between two (m, D) samples, polynomial kernel."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    # Dropping the diagonals (k(x_i, x_i)) is what makes the estimate unbiased.
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018), here on any features: mean and std of the unbiased polynomial-
    kernel MMD^2 over ``n_subsets`` random subsets of ``min(subset_size, N_a, N_b)`` from each set.
    Unbiased, so it can be slightly negative when the sets are alike."""
    features_a = _check_features(features_a, "features_a")
    features_b = _check_features(features_b, "features_b")
    if features_a.shape[1] != features_b.shape[1]:
        raise NcaTilesError(f"feature sizes differ: {features_a.shape[1]} vs {features_b.shape[1]}")
    if n_subsets < 1:
        raise NcaTilesError(f"n_subsets must be >= 1, got {n_subsets}")
    size = min(subset_size, len(features_a), len(features_b))
    if size < 2:
        raise NcaTilesError(f"subset_size must be >= 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mmd2_unbiased(
                features_a[rng.choice(len(features_a), size, replace=False)],
                features_b[rng.choice(len(features_b), size, replace=False)],
            )
            for _ in range(n_subsets)
        ]
    )
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------- stain statistics

STAINS = ("haematoxylin", "eosin", "dab")


def stain_density_maps(patches: np.ndarray, stain: str) -> np.ndarray:
    """One stain's optical density per pixel, (N, H, W) float64, of uint8 RGB patches
    (skimage's ``rgb2hed``: the maps nuclei and fibres are found in)."""
    from skimage.color import rgb2hed

    channel = STAINS.index(stain)
    return np.stack([rgb2hed(p)[..., channel] for p in patches]).astype(np.float64)


def stain_optical_density(patches: np.ndarray, n_pixels: int | None = 200_000, seed: int = 0) -> np.ndarray:
    """Haematoxylin, eosin and DAB optical densities (log10 units) of a random subsample of pixels:
    an (n_pixels, 3) array, by Ruifrok–Johnston colour deconvolution (Ruifrok & Johnston 2001).

    Same as ``6 * skimage.color.rgb2hed`` (skimage divides the natural log by ln(1e-6)), but on
    sampled pixels only, so it costs little however many patches there are.
    """
    from skimage.color import hed_from_rgb

    patches = check_patches(patches)
    pixels = patches.reshape(-1, 3)
    if n_pixels is not None and n_pixels < len(pixels):
        pixels = pixels[np.sort(np.random.default_rng(seed).choice(len(pixels), n_pixels, replace=False))]
    od_rgb = -np.log10(np.maximum(pixels / 255.0, 1e-6))  # Beer–Lambert: OD is linear in stain amount
    return np.maximum(od_rgb @ hed_from_rgb, 0.0)


def wasserstein1(u: np.ndarray, v: np.ndarray) -> float:
    """Wasserstein-1 distance between two 1-D empirical distributions: the integral of |F_u - F_v|
    over the merged support (the sizes may differ)."""
    u, v = np.sort(np.ravel(np.asarray(u, np.float64))), np.sort(np.ravel(np.asarray(v, np.float64)))
    if u.size == 0 or v.size == 0:
        raise NcaTilesError("wasserstein1 needs two non-empty samples")
    grid = np.sort(np.concatenate([u, v]))
    widths = np.diff(grid)
    cdf_u = np.searchsorted(u, grid[:-1], side="right") / u.size
    cdf_v = np.searchsorted(v, grid[:-1], side="right") / v.size
    return float(np.sum(np.abs(cdf_u - cdf_v) * widths))


def stain_wasserstein(
    patches_a: np.ndarray, patches_b: np.ndarray, n_pixels: int | None = 200_000, seed: int = 0
) -> dict[str, float]:
    """W1 distance of each stain's per-pixel optical density distribution, keyed by stain name."""
    od_a = stain_optical_density(patches_a, n_pixels, seed)
    od_b = stain_optical_density(patches_b, n_pixels, seed + 1)
    return {stain: wasserstein1(od_a[:, i], od_b[:, i]) for i, stain in enumerate(STAINS)}


# --------------------------------------------------------------------------- classifier two-sample test


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank (Mann–Whitney U) formula, ties counted as half:
    (sum of positives' ranks - P(P+1)/2) / (P N)."""
    scores = np.ravel(np.asarray(scores, np.float64))
    labels = np.ravel(np.asarray(labels)).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if scores.shape != labels.shape or n_pos == 0 or n_neg == 0:
        raise NcaTilesError("roc_auc needs one score per label and both classes present")
    # Average ranks (1-based) so that tied scores share their rank.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    ranks = (starts + (counts + 1) / 2.0)[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def c2st_auc(
    patches_a: np.ndarray,
    patches_b: np.ndarray,
    seed: int = 0,
    steps: int = 300,
    batch: int = 64,
    train_fraction: float = 0.5,
) -> float:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): held-out ROC AUC of a small CNN
    trained to tell ``patches_b`` (label 1) from ``patches_a`` (label 0).

    0.5 means the classifier cannot tell the sets apart; 1.0 means it separates them perfectly.
    Both sets are cut to the same size so that chance is 0.5. Training runs on the CPU for a fixed
    number of optimiser steps (not epochs), so its cost does not depend on the set sizes.
    """
    import torch
    from torch import nn

    from nca_tiles.diffusion.pipeline import to_model_space

    patches_a = check_patches(patches_a, "patches_a", min_count=2)
    patches_b = check_patches(patches_b, "patches_b", min_count=2)
    if patches_a.shape[1:] != patches_b.shape[1:]:
        raise NcaTilesError(f"patch sizes differ: {patches_a.shape[1:]} vs {patches_b.shape[1:]}")
    if not 0.0 < train_fraction < 1.0:
        raise NcaTilesError(f"train_fraction must be in (0, 1), got {train_fraction}")

    rng = np.random.default_rng(seed)
    n = min(len(patches_a), len(patches_b))
    n_train = min(max(1, round(n * train_fraction)), n - 1)
    idx_a, idx_b = rng.permutation(len(patches_a))[:n], rng.permutation(len(patches_b))[:n]

    x_train = to_model_space(np.concatenate([patches_a[np.sort(idx_a[:n_train])], patches_b[np.sort(idx_b[:n_train])]]))
    x_test = to_model_space(np.concatenate([patches_a[np.sort(idx_a[n_train:])], patches_b[np.sort(idx_b[n_train:])]]))
    y_train = torch.cat([torch.zeros(n_train), torch.ones(n_train)])
    y_test = np.concatenate([np.zeros(n - n_train), np.ones(n - n_train)])

    # Seed through a forked RNG so that training is reproducible without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]), _single_torch_thread():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1),
        )  # fmt: skip
        optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
        loss_fn = nn.BCEWithLogitsLoss()
        batch = min(batch, len(x_train))
        order = torch.randperm(len(x_train))
        position = 0
        net.train()
        for _ in range(steps):
            if position + batch > len(order):
                order, position = torch.randperm(len(x_train)), 0
            pick = order[position : position + batch]
            position += batch
            optimiser.zero_grad()
            loss_fn(net(x_train[pick]).squeeze(1), y_train[pick]).backward()
            optimiser.step()
        net.eval()
        with torch.inference_mode():
            scores = torch.cat([net(x_test[i : i + 256]).squeeze(1) for i in range(0, len(x_test), 256)])
    return roc_auc(scores.numpy(), y_test)


# --------------------------------------------------------------------------- colour-matched noise


def colour_matched_noise(reference: np.ndarray, n: int | None = None, seed: int = 0, sigma: float = 1.0) -> np.ndarray:
    """Noise patches with the reference patches' mean colour and 3x3 colour covariance (so each
    channel's mean and std match): the "ceiling" every model must beat.

    The noise is Gaussian, smoothed over ``sigma`` pixels (0 = white noise) and re-standardised
    before colouring, so it has a little spatial correlation but no tissue structure.
    """
    from skimage.filters import gaussian

    reference = check_patches(reference, "reference")
    n = len(reference) if n is None else n
    if n < 1:
        raise NcaTilesError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    pixels = reference.reshape(-1, 3)
    if len(pixels) > 1_000_000:
        pixels = pixels[rng.choice(len(pixels), 1_000_000, replace=False)]
    pixels = pixels.astype(np.float64)
    mean, cov = pixels.mean(axis=0), np.cov(pixels, rowvar=False)
    colour = np.linalg.cholesky(cov + 1e-6 * np.eye(3))

    noise = rng.standard_normal((n, *reference.shape[1:]), dtype=np.float32)
    if sigma > 0:
        noise = gaussian(noise, sigma=(0, sigma, sigma), channel_axis=-1, mode="wrap")
    noise = (noise - noise.mean(axis=(0, 1, 2))) / noise.std(axis=(0, 1, 2))
    return np.clip(np.rint(mean + noise @ colour.T), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- seam score


def _strip_height(slide: Any, width: int, max_strip_bytes: int) -> int:
    rows = max(1, max_strip_bytes // max(1, width * 3))
    tile = slide.tile_size(0)
    # Whole tile rows per strip, so no compressed tile is decoded twice.
    if tile and rows >= tile[1]:
        rows -= rows % tile[1]
    return rows


def seam_statistics(image: Any, chunk: int, max_strip_bytes: int = 32 * 2**20) -> dict[str, Any]:
    """Seam statistics of a slide image synthesized in ``chunk`` x ``chunk`` chunks.

    ``image`` is an 8- or 16-bit array (numpy or zarr; (y, x), (y, x, c), (c, y, x) or
    (t, c, z, y, x)) or the path of any slide ``wsi.slide.open_slide`` reads (OME-TIFF, OME-Zarr,
    ...), read at level 0 as RGB uint8. The gradient of an adjacent pixel pair is the
    Euclidean norm of its RGB difference; pairs straddling a chunk border (columns x = kC-1 and
    kC, and the same for rows) are averaged separately from all other pairs. The image is read in
    strips of about ``max_strip_bytes`` (uint8), so the whole level is never in memory.

    Returns a dict with ``score`` = border mean / interior mean (1.00 = no seam), both means,
    ``control_score`` (the same ratio on a grid shifted by ``control_shift`` pixels, None for
    chunks that divide 16; JPEG blocks alone lift both scores above 1, a seam lifts only
    ``score``), the chunk size and the image's (height, width).
    """
    if not isinstance(chunk, (int, np.integer)) or chunk <= 0:
        raise NcaTilesError(f"the chunk size must be a positive integer, got {chunk}")
    if chunk == 1:
        raise NcaTilesError("with chunk size 1 every pixel pair is a border: give the synthesis chunk size (>= 2)")
    from nca_tiles.wsi.slide import ArraySlide, open_slide

    if isinstance(image, (str, os.PathLike)):
        with open_slide(image) as slide:
            return _seam_statistics(slide, chunk, max_strip_bytes)
    return _seam_statistics(ArraySlide(image), chunk, max_strip_bytes)


def _seam_statistics(slide: Any, chunk: int, max_strip_bytes: int) -> dict[str, Any]:
    width, height = slide.dimensions
    if height < 2 or width < 2:
        raise NcaTilesError(f"the image is too small for a seam score: {height} x {width}")

    # Pair i joins pixels i and i+1; gradient sums per pair, so any grid can be scored afterwards.
    if chunk >= height and chunk >= width:
        raise NcaTilesError(f"chunk size {chunk} is not smaller than the image ({height} x {width}): no borders to score")
    col_sums = np.zeros(width - 1)  # per column pair, summed over all rows
    row_sums = np.zeros(height - 1)  # per row pair, summed over all columns
    previous_row: np.ndarray | None = None
    strip = _strip_height(slide, width, max_strip_bytes)
    for y0 in range(0, height, strip):
        rows = slide.read_region(0, 0, y0, width, min(strip, height - y0)).astype(np.float32)
        col_sums += np.sqrt(np.square(np.diff(rows, axis=1)).sum(axis=-1)).sum(axis=0)
        # Carry the previous strip's last row so the pair across the strip boundary is counted.
        extended = rows if previous_row is None else np.concatenate([previous_row[None], rows])
        first_pair = y0 if previous_row is None else y0 - 1
        vertical = np.sqrt(np.square(np.diff(extended, axis=0)).sum(axis=-1)).sum(axis=1)
        row_sums[first_pair : first_pair + len(vertical)] += vertical
        previous_row = rows[-1]

    score, border_mean, inner_mean = _grid_ratio(col_sums, row_sums, chunk, 0)
    # Control: the same ratio on a grid shifted by about half a chunk, by a multiple of 16 so that
    # JPEG block edges (8 x 8, or 16 x 16 MCUs with YCbCr 2x2 subsampling), if the file is JPEG-
    # compressed, fall on it as often as on the real grid. score ~ control_score means no seam
    # beyond what compression leaves everywhere.
    shift = max(16, chunk // 2 - (chunk // 2) % 16) % chunk
    control = _grid_ratio(col_sums, row_sums, chunk, shift)[0] if shift else None
    return {
        "score": score,
        "control_score": control,
        "control_shift": int(shift),
        "border_gradient": border_mean,
        "interior_gradient": inner_mean,
        "chunk": int(chunk),
        "shape": [int(height), int(width)],
    }


def _grid_ratio(col_sums: np.ndarray, row_sums: np.ndarray, chunk: int, shift: int) -> tuple[float, float, float]:
    """(border mean / interior mean, border mean, interior mean) for the grid of lines
    x = kC + shift (and y likewise), from per-pair gradient sums."""
    height, width = len(row_sums) + 1, len(col_sums) + 1
    # Pair i (pixels i, i+1) straddles a border when i + 1 - shift is a multiple of the chunk size.
    border_cols = ((np.arange(1, width) - shift) % chunk) == 0
    border_rows = ((np.arange(1, height) - shift) % chunk) == 0
    border_count = height * border_cols.sum() + width * border_rows.sum()
    inner_count = height * (~border_cols).sum() + width * (~border_rows).sum()
    if border_count == 0 or inner_count == 0:
        return float("nan"), float("nan"), float("nan")
    border_mean = (col_sums[border_cols].sum() + row_sums[border_rows].sum()) / border_count
    inner_mean = (col_sums[~border_cols].sum() + row_sums[~border_rows].sum()) / inner_count
    if inner_mean == 0:
        ratio = 1.0 if border_mean == 0 else float("inf")  # a flat image has no seams
    else:
        ratio = border_mean / inner_mean
    return float(ratio), float(border_mean), float(inner_mean)


def seam_score(image: Any, chunk: int, max_strip_bytes: int = 32 * 2**20) -> float:
    """Mean gradient across chunk borders / mean gradient inside chunks (1.00 = no seam);
    see :func:`seam_statistics`."""
    return seam_statistics(image, chunk, max_strip_bytes)["score"]
