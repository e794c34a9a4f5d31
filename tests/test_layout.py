"""Whole-slide layout statistics on masks and slides whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_png

from nca_tiles.errors import NcaTilesError
from nca_tiles.evaluation.layout import evaluate_layout, format_layout_table, layout_distances, layout_of_mask, slide_layout


def tissue_with_holes(speck: bool = True) -> np.ndarray:
    """A 100 × 100 mask: one 60 × 60 block of tissue with two square holes (10² and 5² px) and a
    lone speck (2 × 2 px) of tissue in the glass."""
    mask = np.zeros((100, 100), bool)
    mask[20:80, 20:80] = True
    mask[30:40, 30:40] = False
    mask[50:55, 50:55] = False
    mask[5:7, 5:7] = speck
    return mask


def test_layout_of_a_known_mask():
    stats = layout_of_mask(tissue_with_holes(), mpp=8.0)  # a pixel is 64 µm²
    assert stats.tissue_fraction == pytest.approx((3600 - 125 + 4) / 10000)
    assert stats.region_areas_um2.tolist() == [(3600 - 125) * 64.0]  # the speck (256 µm²) is below the floor
    assert sorted(stats.lumen_areas_um2.tolist()) == [25 * 64.0, 100 * 64.0]  # the glass around is no lumen


def test_distances_are_zero_for_the_same_and_grow_with_size():
    a = layout_of_mask(tissue_with_holes(), 8.0)
    assert all(v == 0 for v in layout_distances(a, a).values())
    bigger = layout_of_mask(np.kron(tissue_with_holes(speck=False), np.ones((10, 10), bool)), 8.0)  # 100× the areas
    d = layout_distances(a, bigger)
    assert d["region_area_log10"] == pytest.approx(2.0, abs=0.01) and d["lumen_area_log10"] == pytest.approx(2.0, abs=0.01)


def test_slide_layout_reads_slides_at_the_asked_resolution(tmp_path):
    rgb = np.full((400, 400, 3), 245, np.uint8)  # glass
    block = np.kron(tissue_with_holes(), np.ones((4, 4), bool))  # the mask at 4× the pixels
    rgb[block] = (200, 80, 160)  # H&E-ish pink-purple
    write_png(tmp_path / "s.png", rgb)
    stats = slide_layout(tmp_path / "s.png", mpp=8.0, source_mpp=2.0)  # a mask pixel = 4 image pixels
    expected = layout_of_mask(tissue_with_holes(), 8.0)
    assert stats.tissue_fraction == pytest.approx(expected.tissue_fraction, abs=0.01)
    assert sorted(stats.lumen_areas_um2.tolist()) == pytest.approx(sorted(expected.lumen_areas_um2.tolist()), rel=0.1)
    with pytest.raises(NcaTilesError, match="coarser --layout-mpp"):
        slide_layout(tmp_path / "s.png", mpp=1.0, source_mpp=2.0)


def test_evaluate_layout_brackets_with_floor_and_ceiling():
    real = [layout_of_mask(tissue_with_holes(), 8.0), layout_of_mask(np.roll(tissue_with_holes(), 7, axis=1), 8.0)]
    results = evaluate_layout([real[0]], real)
    assert results["results"]["floor"]["tissue_fraction"] == 0
    assert results["results"]["ceiling"]["tissue_fraction"] > 0.5
    table = format_layout_table(results)
    assert "W1 log10 lumen area" in table and "all tissue (ceiling)" in table
