"""The real-vs-synthetic zoom figure: nested fields around tissue, honest pixels."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from nca_tiles.errors import NcaTilesError
from nca_tiles.evaluation.zoom_figure import FigureRow, field_centre, field_panel, zoom_figure
from nca_tiles.wsi.slide import open_slide

SAMPLE = Path(__file__).parents[1] / "nca_tiles" / "data" / "sample" / "cmu_small_region.svs"


def _slide_with_tissue_square(path: Path, mpp: float = 2.0) -> Path:
    """White 400² image with a 100² pink square at x 250–350, y 50–150."""
    image = np.full((400, 400, 3), 255, np.uint8)
    image[50:150, 250:350] = (200, 80, 150)
    tifffile.imwrite(path, image, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def test_field_centre_lies_in_the_tissue(tmp_path):
    with open_slide(_slide_with_tissue_square(tmp_path / "a.tif")) as slide:
        assert slide.mpp == pytest.approx(2.0)
        x, y = field_centre(slide, field_um=200.0)  # a 100 px field: the square itself
        assert 250 <= x <= 350 and 50 <= y <= 150


def test_coarse_slide_is_enlarged_pixel_for_pixel(tmp_path):
    with open_slide(_slide_with_tissue_square(tmp_path / "a.tif")) as slide:
        # 40 µm at 2 µm/px is 20 slide pixels, shown at 80 px: blocks of 4 equal pixels.
        panel = field_panel(slide, (300.0, 100.0), 40.0, 80)
    assert panel.shape == (80, 80, 3)
    blocks = panel.reshape(20, 4, 20, 4, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()


def test_field_beyond_the_slide_is_white(tmp_path):
    with open_slide(_slide_with_tissue_square(tmp_path / "a.tif")) as slide:
        panel = field_panel(slide, (0.0, 0.0), 1600.0, 64)  # 800 px field around the top-left corner
    assert (panel[:31, :31] == 255).all()


def test_figure_has_a_row_per_slide_and_a_column_per_field(tmp_path):
    rows = [FigureRow(_slide_with_tissue_square(tmp_path / "a.tif"), "a"), FigureRow(SAMPLE, "real")]
    image = zoom_figure(rows, fields_um=(400.0, 100.0), panel=64)
    assert image.shape[1] == 2 * 64 + 8
    assert image.shape[0] == 18 + 2 * (64 + 18 + 8)
    # The sample slide's row shows tissue (not only background) at every field.
    real_row = image[18 + 64 + 18 + 8 + 18:][:64]
    assert real_row.std() > 10


def test_bad_input(tmp_path):
    with pytest.raises(NcaTilesError, match="no slides"):
        zoom_figure([])
    with pytest.raises(NcaTilesError, match="> 0"):
        zoom_figure([FigureRow(SAMPLE, "real")], fields_um=(100.0, 0.0))
