"""Metric sanity: closed forms, known cases, and real H&E crops from the sample slide."""

from __future__ import annotations


import numpy as np
import pytest

from nca_tiles.evaluation import metrics
from nca_tiles.errors import NcaTilesError


@pytest.fixture(autouse=True)
def one_torch_thread():
    # The CI machine has 2 cores, shared: these small nets gain nothing from more threads.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    from skimage.filters import gaussian

    noise = gaussian(np.random.default_rng(seed).standard_normal((height, width, 3)), sigma=(3, 3, 0), channel_axis=-1)
    return np.clip(128 + noise / noise.std() * 30, 0, 255).astype(np.uint8)


def with_chunk_steps(image: np.ndarray, chunk: int, seed: int = 1) -> np.ndarray:
    """Add a random brightness offset per chunk: a step at every chunk border."""
    rows, cols = -(-image.shape[0] // chunk), -(-image.shape[1] // chunk)
    offsets = np.random.default_rng(seed).integers(-15, 16, size=(rows, cols, 1))
    steps = np.kron(offsets, np.ones((chunk, chunk, 1), dtype=int))[: image.shape[0], : image.shape[1]]
    return np.clip(image.astype(int) + steps, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_gaussians_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    # Proportional covariances commute: tr((S cS)^1/2) = sqrt(c) tr S.
    expected = np.sum((mu1 - mu2) ** 2) + (1 - np.sqrt(4.0)) ** 2 * np.trace(sigma)
    assert metrics.frechet_distance(mu1, sigma, mu2, 4.0 * sigma) == pytest.approx(expected, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_feature_frechet_distance_of_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40_000, 3))
    y = rng.normal(size=(40_000, 3)) * 2.0 + np.array([1.0, 0.0, -1.0])
    # N(0, I) vs N(m, 4I): |m|^2 + 3 (1 - 2)^2 = 2 + 3.
    assert metrics.feature_frechet_distance(x, y) == pytest.approx(5.0, rel=0.03)


def test_random_features_are_seeded_and_fd_of_a_set_with_itself_is_zero(real_crops):
    features = metrics.random_features(real_crops[:64], seed=0)
    assert features.shape == (64, 352) and features.dtype == np.float64
    np.testing.assert_array_equal(features, metrics.random_features(real_crops[:64], seed=0))
    assert not np.allclose(features, metrics.random_features(real_crops[:64], seed=1))
    assert metrics.feature_frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


# --------------------------------------------------------------------------- KID


def test_kid_of_identical_sets_is_near_zero_and_of_different_sets_positive(real_crops):
    real = metrics.random_features(real_crops[:200])
    noise = metrics.random_features(metrics.colour_matched_noise(real_crops[:200], seed=0))
    same, same_std = metrics.kernel_inception_distance(real, real, n_subsets=20, subset_size=100)
    different, different_std = metrics.kernel_inception_distance(noise, real, n_subsets=20, subset_size=100)
    assert different > 3 * different_std > 0
    # Unbiased, so zero up to subset noise (and it may be slightly negative).
    assert abs(same) < 2 * same_std and abs(same) < 0.1 * different


def test_unbiased_mmd_of_one_distribution_is_zero_on_average():
    rng = np.random.default_rng(3)
    values = [metrics.mmd2_unbiased(rng.normal(size=(100, 8)), rng.normal(size=(100, 8))) for _ in range(50)]
    shifted = metrics.mmd2_unbiased(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 1.0)
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))
    assert shifted > 10 * np.std(values)


# --------------------------------------------------------------------------- stain statistics


def test_wasserstein1_of_shifted_distributions_is_the_shift():
    u = np.random.default_rng(4).normal(size=1000)
    assert metrics.wasserstein1(u, u + 0.3) == pytest.approx(0.3, abs=1e-12)
    assert metrics.wasserstein1([0.0], [1.0, 2.0]) == pytest.approx(1.5)
    assert metrics.wasserstein1([0.0, 1.0], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(0.0)


def test_wasserstein1_matches_scipy_for_unequal_sizes():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    u, v = rng.exponential(size=300), rng.normal(size=170)
    assert metrics.wasserstein1(u, v) == pytest.approx(stats.wasserstein_distance(u, v), rel=1e-10)


def test_stain_optical_density_is_rgb2hed_in_log10_units(real_crops):
    from skimage.color import rgb2hed

    crop = real_crops[:1]
    od = metrics.stain_optical_density(crop, n_pixels=None)
    np.testing.assert_allclose(od, 6 * rgb2hed(crop[0]).reshape(-1, 3), atol=1e-10)
    white = np.full((1, 4, 4, 3), 255, np.uint8)
    np.testing.assert_array_equal(metrics.stain_optical_density(white), 0.0)


def test_stain_wasserstein_separates_real_from_noise(real_crops):
    a, b = real_crops[:150], real_crops[150:300]
    floor = metrics.stain_wasserstein(a, b, n_pixels=50_000)
    ceiling = metrics.stain_wasserstein(metrics.colour_matched_noise(a, seed=0), b, n_pixels=50_000)
    assert set(floor) == {"haematoxylin", "eosin", "dab"}
    for stain in floor:
        assert floor[stain] < ceiling[stain], stain


# --------------------------------------------------------------------------- C2ST


def test_roc_auc_rank_formula():
    labels = np.array([0, 0, 1, 1])
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert metrics.roc_auc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    # 3 of 4 (positive, negative) pairs ordered, one tied: (3 + 0.5) / 4.
    assert metrics.roc_auc([0.1, 0.4, 0.4, 0.9], labels) == pytest.approx(3.5 / 4)
    rng = np.random.default_rng(6)
    scores, labels = rng.normal(size=200).round(1), rng.integers(0, 2, 200)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert metrics.roc_auc(scores, labels) == pytest.approx(pairwise)


def test_c2st_separates_real_from_noise_and_not_real_from_real(real_crops):
    real_a, real_b = real_crops[:256], real_crops[256:512]
    noise = metrics.colour_matched_noise(real_a, 256, seed=0)
    assert metrics.c2st_auc(real_b, noise, seed=0, steps=50) == 1.0
    assert abs(metrics.c2st_auc(real_a, real_b, seed=0, steps=50) - 0.5) < 0.15


# --------------------------------------------------------------------------- colour-matched noise


def test_colour_matched_noise_matches_channel_statistics(real_crops):
    reference = real_crops[:100]
    noise = metrics.colour_matched_noise(reference, 50, seed=0)
    assert noise.shape == (50, 64, 64, 3) and noise.dtype == np.uint8
    ref, out = reference.reshape(-1, 3).astype(float), noise.reshape(-1, 3).astype(float)
    np.testing.assert_allclose(out.mean(axis=0), ref.mean(axis=0), atol=3.0)
    np.testing.assert_allclose(out.std(axis=0), ref.std(axis=0), rtol=0.1)
    np.testing.assert_array_equal(noise, metrics.colour_matched_noise(reference, 50, seed=0))


# --------------------------------------------------------------------------- seam score


def test_seam_score_of_a_smooth_texture_is_one_and_of_chunk_steps_above_one():
    texture = smooth_texture(512, 768)
    assert metrics.seam_score(texture, 64) == pytest.approx(1.0, abs=0.03)
    stats = metrics.seam_statistics(with_chunk_steps(texture, 64), 64)
    assert stats["score"] > 1.5
    assert stats["control_score"] == pytest.approx(1.0, abs=0.05)  # the shifted grid sees no step


def test_seam_score_streams_in_strips_with_the_same_result():
    image = with_chunk_steps(smooth_texture(300, 200), 48)
    whole = metrics.seam_statistics(image, 48)
    # 7-row strips: many strip boundaries, none aligned with the chunk grid.
    strips = metrics.seam_statistics(image, 48, max_strip_bytes=200 * 3 * 7)
    assert strips["score"] == pytest.approx(whole["score"], rel=1e-6)
    assert strips["border_gradient"] == pytest.approx(whole["border_gradient"], rel=1e-6)
    # The same pixels channel-first give the same score.
    assert metrics.seam_score(np.moveaxis(image, -1, 0).copy(), 48) == pytest.approx(whole["score"], rel=1e-6)


def test_seam_score_reads_ome_tiff_and_zarr_files(tmp_path):
    import tifffile
    import zarr

    image = with_chunk_steps(smooth_texture(320, 256), 64)
    expected = metrics.seam_score(image, 64)
    tiff = tmp_path / "slide.ome.tif"
    tifffile.imwrite(tiff, image, tile=(64, 64), photometric="rgb", ome=True)
    assert metrics.seam_score(tiff, 64, max_strip_bytes=256 * 3 * 100) == pytest.approx(expected, rel=1e-6)
    array = zarr.create_array(tmp_path / "slide.zarr", shape=image.shape, chunks=(64, 64, 3), dtype="uint8")
    array[:] = image
    assert metrics.seam_score(tmp_path / "slide.zarr", 64) == pytest.approx(expected, rel=1e-6)
    # OME-Zarr 0.4 layout: a zarr v2 group, channel-first level "0" named by its multiscales.
    group = zarr.open_group(tmp_path / "slide.ome.zarr", mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    group.create_array("0", shape=(3, *image.shape[:2]), chunks=(3, 64, 64), dtype="uint8")[:] = np.moveaxis(image, -1, 0)
    assert metrics.seam_score(tmp_path / "slide.ome.zarr", 64) == pytest.approx(expected, rel=1e-6)


def test_seam_score_of_the_real_slide_is_near_one(sample_slide):
    # The real scan has no chunk grid. An odd chunk size avoids its JPEG 8 x 8 block grid, which
    # lifts the score (and the control) at multiples of 8.
    assert metrics.seam_score(sample_slide, 101) == pytest.approx(1.0, abs=0.06)
    jpeg_grid = metrics.seam_statistics(sample_slide, 64)
    assert jpeg_grid["score"] > 1.2 and jpeg_grid["control_score"] > 1.2


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "patches",
    [
        np.zeros((0, 64, 64, 3), np.uint8),  # empty
        np.zeros((4, 64, 64, 3), np.float32),  # wrong dtype
        np.zeros((4, 64, 64), np.uint8),  # no channels
        np.zeros((4, 64, 64, 4), np.uint8),  # RGBA
    ],
)
def test_bad_patches_are_refused(patches):
    with pytest.raises(NcaTilesError):
        metrics.random_features(patches)
    with pytest.raises(NcaTilesError):
        metrics.stain_optical_density(patches)
    with pytest.raises(NcaTilesError):
        metrics.colour_matched_noise(patches)
    with pytest.raises(NcaTilesError):
        metrics.c2st_auc(patches, patches)


def test_bad_metric_arguments_are_refused():
    with pytest.raises(NcaTilesError):
        metrics.wasserstein1([], [1.0])
    with pytest.raises(NcaTilesError):
        metrics.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(NcaTilesError):
        metrics.kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(NcaTilesError):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("chunk", [0, -64, 1, 512])
def test_bad_chunk_sizes_are_refused(chunk):
    with pytest.raises(NcaTilesError):
        metrics.seam_score(smooth_texture(100, 120), chunk)


def test_missing_or_unreadable_slides_are_refused(tmp_path):
    with pytest.raises(NcaTilesError, match="does not exist"):
        metrics.seam_score(tmp_path / "missing.ome.tif", 64)
    not_a_slide = tmp_path / "notes.txt"
    not_a_slide.write_text("not an image")
    with pytest.raises(NcaTilesError):
        metrics.seam_score(not_a_slide, 64)
