"""Nuclei statistics and power spectra on images whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from nca_tiles.evaluation import fibres, nuclei, spectrum

PINK = (236, 180, 220)  # eosin-ish background
PURPLE = (70, 40, 140)  # haematoxylin-dark nucleus


def discs(centres, radius, size=64):
    """A pink patch with purple discs of ``radius`` px at ``centres``, and their count."""
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PINK
    for cy, cx in centres:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = PURPLE
    return image


GRID = [(y, x) for y in (12, 32, 52) for x in (12, 32, 52)]  # 9 nuclei 20 px apart


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def test_nuclei_of_a_grid_of_discs(mpp):
    radius = round(3 / mpp)  # a 6 µm nucleus
    patches = np.stack([discs(GRID, radius)] * 3)
    threshold = nuclei.nuclei_threshold(patches, mpp)
    stats = nuclei.nuclei_stats(patches, threshold, mpp)
    assert len(stats.area_um2) == 27
    true_px = (discs([(32, 32)], radius)[..., 0] == PURPLE[0]).sum()
    ring_px = 2 * np.pi * radius  # segmentation is right to within one ring of boundary pixels
    assert abs(np.median(stats.area_um2) / mpp**2 - true_px) <= ring_px
    assert stats.eccentricity.max() < 0.35  # round
    np.testing.assert_allclose(stats.nearest_um, 20 * mpp, rtol=0.05)
    np.testing.assert_allclose(stats.density_per_mm2, 9 / (64 * 64 * (mpp * 1e-3) ** 2))


def test_touching_nuclei_are_split():
    patches = discs([(32, 26), (32, 37)], 6)[None]  # two discs overlapping by 1 px
    stats = nuclei.nuclei_stats(patches, nuclei.nuclei_threshold(patches, 1.0), 1.0)
    assert len(stats.area_um2) == 2


def test_specks_are_not_nuclei():
    patches = discs([(20, 20)], 1)[None]  # 5 px ≈ 5 µm² at 1 µm/px: below the smallest nucleus
    stats = nuclei.nuclei_stats(patches, 0.05, 1.0)
    assert len(stats.area_um2) == 0 and stats.density_per_mm2.tolist() == [0.0]


def test_nuclei_distances_see_size_and_spacing():
    small, large = np.stack([discs(GRID, 3)] * 2), np.stack([discs(GRID, 6)] * 2)
    threshold = nuclei.nuclei_threshold(large, 1.0)
    a, b = nuclei.nuclei_stats(small, threshold, 1.0), nuclei.nuclei_stats(large, threshold, 1.0)
    same = nuclei.nuclei_distances(a, a)
    assert all(v == 0 for v in same.values())
    d = nuclei.nuclei_distances(a, b)
    assert d["area_um2"] == pytest.approx(np.pi * (36 - 9), rel=0.25)
    assert d["density_per_mm2"] == 0 and d["nearest_um"] < 1


def test_nuclei_medians_say_which_way_two_sets_differ():
    small, large = np.stack([discs(GRID, 3)] * 2), np.stack([discs(GRID[:4], 6)] * 2)
    threshold = nuclei.nuclei_threshold(large, 1.0)
    a, b = nuclei.nuclei_medians(nuclei.nuclei_stats(small, threshold, 1.0)), \
        nuclei.nuclei_medians(nuclei.nuclei_stats(large, threshold, 1.0))
    assert a["area_um2"] < b["area_um2"] and a["area_um2"] == pytest.approx(np.pi * 9, rel=0.35)
    assert a["density_per_mm2"] == pytest.approx(9 / (64 * 64 * 1e-6))
    assert b["density_per_mm2"] == pytest.approx(4 / (64 * 64 * 1e-6))
    none = nuclei.nuclei_medians(nuclei.nuclei_stats(np.stack([discs([], 3)]), threshold, 1.0))
    assert none["density_per_mm2"] == 0 and np.isnan(none["area_um2"]) and np.isnan(none["nearest_um"])


def test_power_spectrum_puts_a_stripe_pattern_in_its_band():
    period = 8  # px: 1/8 cycles per px
    stripes = (128 + 100 * np.sin(2 * np.pi * np.arange(64) / period))[None, :, None]
    patches = np.broadcast_to(stripes, (4, 64, 64, 3)).astype(np.uint8)
    ps = spectrum.power_spectrum(patches)
    edges = spectrum.band_edges(64)
    expected = np.searchsorted(edges, 1 / period) - 1
    assert ps.shape == (3, spectrum.N_BANDS) and np.all(np.argmax(ps, axis=1) == expected)


def test_spectrum_distance_of_speckle_and_smooth_texture():
    rng = np.random.default_rng(0)
    speckle = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    from scipy.ndimage import gaussian_filter

    smooth = np.stack([gaussian_filter(p.astype(float), (3, 3, 0)) for p in speckle])
    smooth = np.clip((smooth - smooth.mean()) * 8 + 128, 0, 255).astype(np.uint8)
    a, b = spectrum.power_spectrum(speckle), spectrum.power_spectrum(smooth)
    assert spectrum.spectrum_distance(a, a) == 0
    assert spectrum.spectrum_distance(a, b) > 0.5


def strands(angle_deg: float, period: float = 6.0, size: int = 64) -> np.ndarray:
    """Pink and white strands ``period`` px apart running at ``angle_deg``: a caricature of collagen."""
    yy, xx = np.mgrid[:size, :size].astype(float)
    theta = np.deg2rad(angle_deg)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    white, pink = np.array([245.0, 240, 245]), np.array(PINK, float) * 0.85
    return np.rint(white + wave[..., None] * (pink - white)).astype(np.uint8)


def crumpled(seed: int, size: int = 64) -> np.ndarray:
    """Pink and white blobs of the strands' size, every way: the texture of a model without fibres."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(np.random.default_rng(seed).standard_normal((size, size)), 1.5)
    wave = 1 / (1 + np.exp(-field / field.std() * 2))
    white, pink = np.array([245.0, 240, 245]), np.array(PINK, float) * 0.85
    return np.rint(white + wave[..., None] * (pink - white)).astype(np.uint8)


@pytest.mark.parametrize("angle", [0, 30, 90, 135])
def test_strands_are_coherent_whichever_way_they_run(angle):
    assert fibres.fibre_coherence(strands(angle)[None], 1.0)[0] > 0.9


def test_crumpled_texture_is_not_and_the_distance_says_so():
    fibrous = np.stack([strands(a) for a in (0, 45, 100, 160)])
    blobs = np.stack([crumpled(seed) for seed in range(4)])
    a, b = fibres.fibre_coherence(fibrous, 1.0), fibres.fibre_coherence(blobs, 1.0)
    assert b.max() < 0.35 < 0.9 < a.min()
    assert fibres.coherence_distance(a, a) == 0
    assert fibres.coherence_distance(a, b) == pytest.approx(a.mean() - b.mean())


def test_coherence_does_not_depend_on_orientation_and_glass_has_none():
    """A quarter turn maps the structure tensor onto itself; a flat patch has no gradients, so no
    direction."""
    patch = crumpled(7)
    turned = np.ascontiguousarray(np.rot90(patch))
    np.testing.assert_allclose(fibres.fibre_coherence(turned[None], 1.0), fibres.fibre_coherence(patch[None], 1.0),
                               rtol=1e-9)
    assert fibres.fibre_coherence(np.full((1, 64, 64, 3), 240, np.uint8), 1.0)[0] == 0  # glass: no texture


def test_real_stroma_is_more_coherent_than_noise(real_crops):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    real = fibres.fibre_coherence(real_crops[:64], 1.0)
    assert np.median(real) > 1.5 * np.median(fibres.fibre_coherence(noise, 1.0))


def test_coherence_is_nan_where_strands_are_sub_pixel():
    """At 4 µm/px (a coarse level's patches) a 1 µm strand scale is a quarter pixel: no number is
    better than one that measures the sampling."""
    patches = np.stack([strands(30, period=3), crumpled(1)])
    at_4 = fibres.fibre_coherence(patches, 4.0)
    assert at_4.shape == (2,) and np.isnan(at_4).all()
    assert np.isnan(fibres.coherence_distance(at_4, fibres.fibre_coherence(patches, 1.0)))
    assert not np.isnan(fibres.fibre_coherence(patches, 0.5)).any()
