"""Tissue masks on the real H&E sample and on drawn images."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import PINK, write_png

from nca_tiles.wsi.slide import open_slide, read_level0_region
from nca_tiles.wsi.tissue import TissueMask, pixel_tissue_fractions, saturation_and_value, tissue_from_rgb, tissue_mask


@pytest.fixture(scope="module")
def sample_mask(sample_slide) -> TissueMask:
    with open_slide(sample_slide) as slide:
        return tissue_mask(slide, 16)


def test_sample_mask_finds_the_tissue(sample_slide, sample_mask):
    assert sample_mask.downsample == 16
    assert sample_mask.mask.shape == (round(2967 / 16), round(2220 / 16))
    assert 0.2 < sample_mask.tissue_fraction < 0.6  # a strip of skin on glass
    with open_slide(sample_slide) as slide:
        thumbnail = read_level0_region(slide, 0, 0, 2220, 2967, *sample_mask.mask.shape[::-1])
    saturation, _ = saturation_and_value(thumbnail)
    assert saturation[sample_mask.mask].mean() > 0.25
    assert saturation[~sample_mask.mask].mean() < 0.06
    assert not sample_mask.mask[:10, :10].any()  # the glass in the top-left corner


def test_blank_glass_has_no_tissue():
    glass = np.full((100, 100, 3), 242, np.uint8)
    glass += np.random.default_rng(0).integers(0, 6, glass.shape, dtype=np.uint8)  # sensor noise
    mask, _ = tissue_from_rgb(glass)
    assert not mask.any()


def test_all_tissue_stays_all_tissue():
    # Otsu alone would split a tissue-only field into two classes; the clipped threshold does not.
    tissue = np.tile(np.asarray([[PINK, (150, 60, 140)]], np.uint8), (100, 50, 1))
    mask, threshold = tissue_from_rgb(tissue)
    assert mask.all() and threshold <= 0.15


def test_specks_removed_and_holes_filled():
    image = np.full((200, 200, 3), 245, np.uint8)
    image[50:150, 50:150] = PINK
    image[95:100, 95:100] = 245  # a 25 px hole inside the tissue
    image[10:13, 10:13] = PINK  # a 9 px speck on the glass
    mask, _ = tissue_from_rgb(image, min_object_pixels=64, max_hole_pixels=64)
    assert mask[95:100, 95:100].all()
    assert not mask[10:13, 10:13].any()
    assert mask[50:150, 50:150].all() and mask.sum() == 100 * 100


def test_fractions_match_brute_force(tmp_path):
    image = np.full((320, 480, 3), 245, np.uint8)
    image[40:200, 100:300] = PINK
    path = tmp_path / "block.png"
    write_png(path, image)
    with open_slide(path, source_mpp=1.0) as slide:
        mask = tissue_mask(slide, 4)
    xs = np.arange(0, 480 - 32, 16)
    ys = np.full_like(xs, 32)
    fractions = mask.fractions(xs, ys, 32)
    truth = np.array([(image[32:64, x : x + 32] == PINK).all(-1).mean() for x in xs])
    assert np.abs(fractions - truth).max() <= 0.13  # one 4 px mask column of 8
    assert fractions[(xs >= 100) & (xs + 32 <= 300)].min() == pytest.approx(0.75)  # rows 32..64 vs 40..


def test_pixel_tissue_fractions_of_glass_tissue_and_half_and_half():
    glass, tissue = np.full((16, 16, 3), 242, np.uint8), np.full((16, 16, 3), PINK, np.uint8)
    half = glass.copy()
    half[:, :8] = PINK
    dark = np.zeros((16, 16, 3), np.uint8)  # black dirt: not stain
    np.testing.assert_allclose(pixel_tissue_fractions(np.stack([glass, tissue, half, dark])), [0, 1, 0.5, 0])
