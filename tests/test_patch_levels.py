"""Patches at several µm/px (one store per level) and per-file --source-mpp patterns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import copy, write_png

from nca_tiles.errors import NcaTilesError
from nca_tiles.training.levels import extract_patch_levels
from nca_tiles.training.patches import extract_patches, open_patch_store, source_mpp_of
from nca_tiles.wsi.slide import open_slide, read_region_at_mpp
from nca_tiles_cli.main import cli


@pytest.fixture(scope="module")
def slides(tmp_path_factory, sample_slide) -> Path:
    """The sample slide (0.499 µm/px, in its metadata) and an overview of it at ~4 µm/px as a PNG
    (no metadata: needs --source-mpp), as a low-magnification scan would be."""
    folder = tmp_path_factory.mktemp("slides")
    copy(sample_slide, folder / "sample.svs")
    with open_slide(sample_slide) as slide:
        write_png(folder / "overview.png", read_region_at_mpp(slide, 0, 0, 1110, 1483, 3.992))
    return folder


def test_source_mpp_patterns_pick_the_first_match():
    patterns = {"ovary_*.jpg": 0.25, "*.png": 4.0, "*": 1.0}
    assert source_mpp_of(Path("x/ovary_a.jpg"), patterns) == 0.25
    assert source_mpp_of(Path("x/o.png"), patterns) == 4.0 and source_mpp_of(Path("x/o.tif"), patterns) == 1.0
    assert source_mpp_of(Path("x/o.tif"), {"*.png": 4.0}) is None and source_mpp_of(Path("a"), 0.5) == 0.5


def test_one_store_per_level_and_each_slide_where_it_fits(slides, tmp_path):
    results = extract_patch_levels([slides], tmp_path / "levels", [2.0, 8.0], source_mpp={"*.png": 3.992},
                                   split_by="region", patch_size=32)
    fine, coarse = (open_patch_store(tmp_path / "levels" / name) for name in ("mpp-2.zarr", "mpp-8.zarr"))
    assert (fine.mpp, coarse.mpp) == (2.0, 8.0)
    # The 4 µm/px overview is too coarse for 2 µm/px: skipped there, used at 8 µm/px.
    assert [Path(s["path"]).name for s in fine.slides] == ["sample.svs"]
    assert "coarser than --mpp 2" in next(s.reason for s in results[0].skipped if s.path.name == "overview.png")
    assert sorted(Path(s["path"]).name for s in coarse.slides) == ["overview.png", "sample.svs"]


def test_coarse_levels_keep_tissue_borders(slides, tmp_path):
    """At the coarse level the tissue threshold is low: patches with much glass are kept there."""
    options = dict(split_by="region", patch_size=32, source_mpp={"*.png": 3.992})
    extract_patch_levels([slides / "sample.svs"], tmp_path / "l", [2.0, 8.0], **options)
    strict = extract_patches([slides / "sample.svs"], tmp_path / "strict.zarr", target_mpp=8.0, **options)
    kept, strict_n = len(open_patch_store(tmp_path / "l" / "mpp-8.zarr")), strict.n_patches
    assert kept > strict_n
    glassy = np.asarray(open_patch_store(tmp_path / "l" / "mpp-8.zarr").images[:]).min(axis=-1) > 200
    assert glassy.mean(axis=(1, 2)).max() > 0.4  # some coarse patches are mostly glass


@pytest.mark.parametrize("args,message", [
    (["--mpp", "1,x"], "--mpp takes numbers"),
    (["--source-mpp", "a=b"], "--source-mpp takes a number"),
    (["--mpp", "1,4", "--coarse-min-tissue", "2"], "--coarse-min-tissue"),
])
def test_bad_level_options_are_one_line(slides, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["extract-patches", str(slides), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code != 0 and result.output.count("\n") == 1 and message in result.output, result.output


def test_a_single_mpp_needs_two_for_levels(slides, tmp_path):
    with pytest.raises(NcaTilesError, match="two or more"):
        extract_patch_levels([slides], tmp_path / "o", [1.0])


def test_one_entry_point_for_one_or_several_mpp(slides, tmp_path):
    """``extract_patch_stores`` (what extract-patches runs): one µm/px writes one store at --out,
    several write one store per µm/px into the --out folder."""
    from nca_tiles.training.levels import extract_patch_stores

    options = dict(split_by="region", patch_size=32, source_mpp={"*.png": 3.992})
    (single,) = extract_patch_stores([slides / "sample.svs"], tmp_path / "one.zarr", [8.0], **options)
    assert single.out == tmp_path / "one.zarr" and open_patch_store(single.out).mpp == 8.0
    levels = extract_patch_stores([slides / "sample.svs"], tmp_path / "levels", [8.0, 2.0], coarse_min_tissue=0.05,
                                  **options)
    assert [r.out for r in levels] == [tmp_path / "levels" / "mpp-2.zarr", tmp_path / "levels" / "mpp-8.zarr"]
    assert len(open_patch_store(levels[1].out)) > single.n_patches  # the coarse level's low tissue threshold
