"""``extract-patches`` and the patch store: real slides in, zarr store out, read back and checked.

Extractions run at coarse resolutions (--mpp 2) or with --max-per-slide to stay fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from helpers import (
    assert_one_line_error, checkerboard, copy, corrupt_fine_levels, lock_held_elsewhere, random_bytes, read_only_dir,
    truncated_copy, write_ome_pyramid, write_png,
)

from nca_tiles import __version__
from nca_tiles.errors import NcaTilesError
from nca_tiles.training.patches import (
    describe_store,
    extract_patches,
    is_patch_store,
    open_patch_store,
)
from nca_tiles.wsi.slide import open_slide, read_level0_region, read_region_at_mpp
from nca_tiles.wsi.tissue import saturation_and_value
from nca_tiles_cli.main import cli

CONTRACT_KEYS = {"kind", "format_version", "target_mpp", "patch_size", "slides", "tool_version", "split_by", "seed"}


def extract(slides, out, **settings):
    return extract_patches([Path(s) for s in slides], out, progress=False, **settings)


def leftovers(folder: Path) -> list[str]:
    """Temporary stores left beside an output."""
    return [p.name for p in folder.iterdir() if ".nca-tiles-" in p.name]


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory, sample_slide) -> Path:
    """Three copies of the sample's tissue through three readers: the .svs (OpenSlide), an
    OME-TIFF pyramid with SubIFDs (tifffile) and a PNG at ~1 µm/px (Pillow, needs --source-mpp)."""
    folder = tmp_path_factory.mktemp("slides")
    copy(sample_slide, folder / "sample.svs")
    with open_slide(sample_slide) as slide:
        pixels = slide.read_region(0, 0, 0, *slide.dimensions)
        write_ome_pyramid(folder / "sample.ome.tif", pixels, 0.499, compression="zlib")
        write_png(folder / "sample.png", read_region_at_mpp(slide, 0, 0, 1110, 1483, 0.998))
    return folder


@pytest.fixture(scope="module")
def one_slide_store(tmp_path_factory, sample_slide):
    out = tmp_path_factory.mktemp("store") / "patches.zarr"
    result = extract([sample_slide], out, patch_size=64, target_mpp=2.0)
    return out, result


# --- the store --------------------------------------------------------------------------------------


def test_store_layout(one_slide_store, sample_slide):
    out, result = one_slide_store
    group = zarr.open_group(out, mode="r")
    n = result.n_patches
    assert n > 20
    assert group["images"].shape == (n, 64, 64, 3) and group["images"].dtype == np.uint8
    assert group["images"].chunks == (256, 64, 64, 3)
    for name, dtype in (("slide_index", np.int32), ("x", np.int64), ("y", np.int64), ("split", np.uint8)):
        assert group[name].shape == (n,) and group[name].dtype == dtype
    attrs = group.attrs["nca_tiles"]
    assert CONTRACT_KEYS <= set(attrs)
    assert attrs["kind"] == "patches" and attrs["format_version"] == 1
    assert attrs["target_mpp"] == 2.0 and attrs["patch_size"] == 64
    assert attrs["tool_version"] == __version__ and attrs["seed"] == 0 and attrs["split_by"] == "region"
    (entry,) = attrs["slides"]
    assert entry["path"] == str(sample_slide.resolve())
    assert (entry["width"], entry["height"], entry["mpp"], entry["n_patches"]) == (2220, 2967, 0.499, n)
    assert set(np.unique(group["split"][:])) == {0, 1, 2}


def test_patches_are_the_slide_pixels_and_tissue(one_slide_store, sample_slide):
    out, _ = one_slide_store
    store = open_patch_store(out)
    footprint = round(64 * 2.0 / 0.499)  # level-0 px under one patch
    assert ((store.x % footprint) == 0).all() and ((store.y % footprint) == 0).all()
    assert (store.x + footprint <= 2220).all() and (store.y + footprint <= 2967).all()
    with open_slide(sample_slide) as slide:
        for i in (0, len(store) // 2, len(store) - 1):
            expected = read_level0_region(slide, store.x[i], store.y[i], footprint, footprint, 64, 64)
            np.testing.assert_array_equal(store.images[i], expected)
        glass = read_level0_region(slide, 0, 0, footprint, footprint, 64, 64)
    patch_saturation = saturation_and_value(store.images[:])[0].mean(axis=(1, 2))
    assert patch_saturation.min() > 0.1 and patch_saturation.mean() > 0.25
    assert saturation_and_value(glass)[0].mean() < 0.05


def test_reader_api(one_slide_store):
    out, result = one_slide_store
    store = open_patch_store(out)
    assert store.path == out and store.mpp == 2.0 and store.patch_size == 64
    assert store.split.dtype == np.uint8 and len(store.split) == len(store) == result.n_patches
    parts = [store.indices(name) for name in ("train", "val", "test")]
    assert all(len(p) for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(store)))  # disjoint, complete
    assert result.split_counts == {"train": len(parts[0]), "val": len(parts[1]), "test": len(parts[2])}
    assert len(store.identity) == 16 and store.identity == open_patch_store(out).identity
    with pytest.raises(NcaTilesError, match="unknown split"):
        store.indices("validation")


def test_describe_store(one_slide_store):
    out, result = one_slide_store
    text = describe_store(out)
    assert f"{result.n_patches} patches of 64x64 px at 2 µm/px" in text
    assert "split by region" in text and "cmu_small_region.svs" in text
    store = open_patch_store(out)
    assert f"train {len(store.indices('train'))} | val {len(store.indices('val'))}" in text


def test_checkerboard_resampled_exactly(tmp_path):
    """8 px squares at 0.5 µm/px become 4 px squares at 1.0 µm/px."""
    path = tmp_path / "checker.png"
    write_png(path, checkerboard(256, 256, 8))
    result = extract([path], tmp_path / "p.zarr", patch_size=16, target_mpp=1.0, source_mpp=0.5, min_tissue=0.5)
    store = open_patch_store(result.out)
    assert len(store) == 8 * 8  # (256 px / 2) / 16 px patches a side, all stained
    for image in store.images[:]:
        np.testing.assert_array_equal(image, checkerboard(16, 16, 4))


def test_region_split_has_no_leakage(tmp_path, sample_slide):
    """Overlapping patches (stride < size) in one slide: every patch lies inside one region, and
    every region is in one split, so no val/test pixel is in a train patch."""
    result = extract([sample_slide], tmp_path / "p.zarr", patch_size=32, stride=16, target_mpp=2.0, seed=3)
    store = open_patch_store(result.out)
    assert store.attrs["split_by"] == "region"
    footprint = round(32 * 2.0 / 0.499)
    region = store.slides[0]["region_size"]
    assert region >= 2 * footprint
    for coordinate in (store.x, store.y):
        assert (coordinate // region == (coordinate + footprint - 1) // region).all()
    region_keys = (store.y // region) * 10_000 + store.x // region
    for key in np.unique(region_keys):
        assert len(np.unique(store.split[region_keys == key])) == 1
    counts = np.bincount(store.split, minlength=3) / len(store)
    assert counts[0] > 0.6 and 0.03 < counts[1] < 0.2 and 0.03 < counts[2] < 0.2
    # the footprints of different splits never overlap
    boxes = {s: set() for s in range(3)}
    for x, y, s in zip(store.x // 16, store.y // 16, store.split, strict=True):  # 16 divides all
        boxes[s] |= {(x + i, y + j) for i in range(footprint // 16) for j in range(footprint // 16)}
    assert not (boxes[0] & boxes[1]) and not (boxes[0] & boxes[2]) and not (boxes[1] & boxes[2])


def test_three_slides_split_by_slide(tmp_path, slides_dir):
    result = extract([slides_dir], tmp_path / "p.zarr", target_mpp=2.0, source_mpp=0.998, max_per_slide=12)
    store = open_patch_store(result.out)
    assert result.split_by == "slide" and not result.skipped
    assert [Path(s["path"]).name for s in store.slides] == ["sample.ome.tif", "sample.png", "sample.svs"]
    assert [s["n_patches"] for s in store.slides] == [12, 12, 12]
    per_slide = [set(store.split[store.slide_index == i].tolist()) for i in range(3)]
    assert all(len(s) == 1 for s in per_slide) and set().union(*per_slide) == {0, 1, 2}
    assert store.slides[1]["mpp"] == 0.998  # the PNG's --source-mpp
    assert store.slides[0]["mpp"] == pytest.approx(0.499)  # the OME-TIFF's own PhysicalSize


def test_a_small_slide_at_a_coarse_mpp_keeps_patches_in_a_region_split(tmp_path, sample_slide):
    """The sample (1.1 × 1.5 mm) at 4 µm/px with overlapping patches: the count rule alone gave
    regions narrower than one patch, every patch crossed a border and the slide came out empty
    ("no patch fits inside one split region"), so coarse levels learned from large slides only."""
    result = extract([sample_slide], tmp_path / "p.zarr", patch_size=64, stride=16, target_mpp=4.0, min_tissue=0.05)
    store = open_patch_store(result.out)
    footprint = round(64 * 4.0 / 0.499)
    region = store.slides[0]["region_size"]
    assert region >= 2 * footprint and len(store) >= 50
    for coordinate in (store.x, store.y):
        assert (coordinate // region == (coordinate + footprint - 1) // region).all()
    assert set(np.unique(store.split)) == {0, 1, 2}


def test_three_slides_split_by_region_when_asked(tmp_path, slides_dir):
    """Training on several tissues needs every slide in the training split."""
    result = extract([slides_dir], tmp_path / "p.zarr", target_mpp=2.0, source_mpp=0.998, split_by="region")
    store = open_patch_store(result.out)
    assert result.split_by == "region" and store.attrs["split_by"] == "region"
    for i in range(3):
        assert (store.split[store.slide_index == i] == 0).any()


def test_split_by_slide_refuses_too_few_slides(tmp_path, slides_dir):
    with pytest.raises(NcaTilesError, match="at least 3 usable slides"):
        extract([slides_dir / "sample.svs"], tmp_path / "p.zarr", target_mpp=2.0, split_by="slide")
    assert not leftovers(tmp_path)


def test_pyramid_level_at_the_target_is_copied(tmp_path, slides_dir, sample_slide):
    """The OME-TIFF's 4x level is at 1.996 µm/px: for --mpp 2 its pixels are taken as they are
    (256 level-0 px per 64 px patch, a 0.2 % scale change) rather than resampled with blur."""
    result = extract([slides_dir / "sample.ome.tif"], tmp_path / "p.zarr", target_mpp=2.0)
    store = open_patch_store(result.out)
    assert ((store.x % 256) == 0).all() and ((store.y % 256) == 0).all()
    with open_slide(slides_dir / "sample.ome.tif") as ome, open_slide(sample_slide) as svs:
        for i in range(len(store)):
            x, y = store.x[i] // 4, store.y[i] // 4
            np.testing.assert_array_equal(store.images[i], ome.read_region(2, x, y, 64, 64))
            from_svs = read_level0_region(svs, store.x[i], store.y[i], 256, 256, 64, 64)
            assert np.abs(from_svs.astype(int) - store.images[i]).max() <= 1  # 2x2 of 2x2 vs 4x4 means


def test_ome_zarr_gives_the_patches_of_the_same_ome_tiff(tmp_path, sample_slide):
    """Our own exports of one image, OME-Zarr and (lossless) OME-TIFF: the same patches, whether
    the OME-Zarr folder is named or found inside a folder."""
    from nca_tiles.export.ometiff import write_ome_tiff
    from nca_tiles.export.omezarr import write_ome_zarr

    with open_slide(sample_slide) as slide:
        pixels = slide.read_region(0, 0, 0, *slide.dimensions)
    (tmp_path / "zarr").mkdir()
    zarr_dir = write_ome_zarr(pixels, tmp_path / "zarr" / "sample.ome.zarr", mpp=0.499, chunk=256, progress=False)
    tiff = write_ome_tiff(pixels, tmp_path / "sample.ome.tif", mpp=0.499, tile=256, compression="deflate",
                          progress=False)
    settings = {"patch_size": 32, "target_mpp": 2.0, "max_per_slide": 40}
    stores = [
        open_patch_store(extract([source], tmp_path / f"p{i}.zarr", **settings).out)
        for i, source in enumerate([zarr_dir, tmp_path / "zarr", tiff])
    ]
    assert [Path(s.slides[0]["path"]).name for s in stores] == ["sample.ome.zarr", "sample.ome.zarr", "sample.ome.tif"]
    assert stores[0].slides[0]["mpp"] == pytest.approx(0.499) and len(stores[0]) == 40
    for store in stores[1:]:
        for name in ("x", "y", "split"):
            np.testing.assert_array_equal(getattr(store, name), getattr(stores[0], name))
        np.testing.assert_array_equal(store.images[:], stores[0].images[:])


def test_seed_and_max_per_slide(tmp_path, sample_slide):
    settings = {"patch_size": 32, "target_mpp": 2.0, "max_per_slide": 15}
    first = open_patch_store(extract([sample_slide], tmp_path / "a.zarr", seed=1, **settings).out)
    again = open_patch_store(extract([sample_slide], tmp_path / "b.zarr", seed=1, **settings).out)
    other = open_patch_store(extract([sample_slide], tmp_path / "c.zarr", seed=2, **settings).out)
    assert len(first) == 15
    assert first.identity == again.identity
    np.testing.assert_array_equal(first.images[:], again.images[:])
    assert first.identity != other.identity
    assert set(zip(first.x, first.y)) != set(zip(other.x, other.y))


def test_damaged_slides_are_skipped(tmp_path, sample_slide):
    truncated = truncated_copy(sample_slide, tmp_path / "truncated.svs", 0.6)
    noise = random_bytes(tmp_path / "noise.tif")
    result = extract([sample_slide, truncated, noise], tmp_path / "p.zarr", target_mpp=2.0)
    assert [s.path.name for s in result.skipped] == ["truncated.svs", "noise.tif"]
    assert all(s.reason for s in result.skipped)
    assert len(open_patch_store(result.out).slides) == 1
    summary = result.summary()
    assert "read 1 of 3 slide files" in summary and "skipped 2 files" in summary and "truncated.svs" in summary


def test_slide_failing_mid_read_is_rolled_back(tmp_path, slides_dir):
    """Three slides with tissue plan a split by slide; one fails while its patches are read (its
    full-resolution tiles are damaged, its thumbnail levels are not): its patches are removed and
    the two left are split by region."""
    damaged = copy(slides_dir / "sample.ome.tif", tmp_path / "damaged.ome.tif")
    corrupt_fine_levels(damaged, 2)  # patches at 1 µm/px come from level 1, the mask from level 2
    slides = [slides_dir / "sample.svs", slides_dir / "sample.png", damaged]
    result = extract(slides, tmp_path / "p.zarr", target_mpp=1.0, max_per_slide=20, source_mpp=0.998)
    assert [s.path.name for s in result.skipped] == ["damaged.ome.tif"]
    assert "while reading patches" in result.skipped[0].reason
    store = open_patch_store(result.out)
    assert result.split_by == "region" and len(store.slides) == 2 and len(store) == 40
    assert not leftovers(tmp_path)


def test_slide_without_tissue_leaves_too_few_to_split_by_slide(tmp_path, slides_dir):
    glass = tmp_path / "glass.png"
    write_png(glass, np.full((1500, 1100, 3), 243, np.uint8))
    slides = [slides_dir / "sample.svs", slides_dir / "sample.png", glass]
    result = extract(slides, tmp_path / "p.zarr", target_mpp=2.0, max_per_slide=10, source_mpp=0.998)
    assert [(s.path.name, s.reason) for s in result.skipped] == [("glass.png", "no patch with at least 60% tissue")]
    assert result.split_by == "region" and len(result.slides) == 2
    assert "read 2 of 3 slide files" in result.summary()


def test_upsampling_when_allowed(tmp_path):
    path = tmp_path / "coarse.png"
    write_png(path, checkerboard(128, 128, 8))
    result = extract([path], tmp_path / "p.zarr", patch_size=32, target_mpp=0.5, source_mpp=1.0, allow_upsample=True)
    store = open_patch_store(result.out)
    assert len(store) == 8 * 8  # 256 px a side at 0.5 µm/px in 32 px patches
    assert set(store.x.tolist()) == set(range(0, 128, 16))  # a patch covers 16 source px
    # 8 px squares become 16 px squares: interpolation blends only across square borders
    expected = checkerboard(32, 32, 16)
    for image in store.images[:]:
        for y in (4, 12, 20, 28):
            np.testing.assert_array_equal(image[y, 4::8], expected[y, 4::8])


def test_overwrite(tmp_path, sample_slide):
    out = tmp_path / "p.zarr"
    settings = {"patch_size": 64, "target_mpp": 2.0}
    first = extract([sample_slide], out, **settings)
    with pytest.raises(NcaTilesError, match="--overwrite"):
        extract([sample_slide], out, **settings)
    second = extract([sample_slide], out, overwrite=True, seed=5, **settings)
    assert open_patch_store(out).attrs["seed"] == 5 and second.n_patches == first.n_patches
    assert not leftovers(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    with pytest.raises(NcaTilesError, match="not a patch store"):
        extract([sample_slide], precious, overwrite=True, **settings)
    assert (precious / "thesis.txt").read_text() == "keep me"


# --- bad input: one line, non-zero exit, nothing written ---------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, sample_slide) -> dict[str, tuple[list[str], str]]:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty").mkdir()
    (folder / "empty" / "readme.txt").write_text("no slides")
    broken = folder / "broken"
    broken.mkdir()
    truncated_copy(sample_slide, broken / "cut.svs", 0.3)
    random_bytes(broken / "noise.svs")
    write_png(folder / "plain.png", checkerboard(128, 128, 8))
    write_png(folder / "glass.png", np.full((256, 256, 3), 244, np.uint8))
    existing = folder / "existing.zarr"
    extract([sample_slide], existing, target_mpp=4.0)
    sample = str(sample_slide)
    return {
        "missing path": ([str(folder / "nope.svs")], "does not exist"),
        "folder without slides": ([str(folder / "empty")], "no slide files"),
        "only damaged slides": ([str(broken)], "none of the 2 slide files is usable"),
        "no mpp": ([str(folder / "plain.png")], "--source-mpp"),
        "upsampling": ([sample, "--mpp", "0.25"], "--allow-upsample"),
        "patch size 0": ([sample, "--patch-size", "0"], "--patch-size"),
        "patch size 1025": ([sample, "--patch-size", "1025"], "--patch-size"),
        "negative stride": ([sample, "--stride", "-4"], "--stride"),
        "min tissue above 1": ([sample, "--min-tissue", "1.5"], "--min-tissue"),
        "no tissue": ([str(folder / "glass.png"), "--source-mpp", "0.5"], "no tissue"),
        "existing output": ([sample, "--out", str(existing)], "exists"),
        "unknown split": ([sample, "--split-by", "patient"], "--split-by"),
    }


BAD_CASES = [
    "missing path",
    "folder without slides",
    "only damaged slides",
    "no mpp",
    "upsampling",
    "patch size 0",
    "patch size 1025",
    "negative stride",
    "min tissue above 1",
    "no tissue",
    "existing output",
    "unknown split",
]


def _as_library_call(args: list[str]) -> tuple[list[str], dict]:
    """The CLI arguments as extract_patches arguments."""
    names = {
        "--mpp": ("target_mpp", float),
        "--patch-size": ("patch_size", int),
        "--stride": ("stride", int),
        "--min-tissue": ("min_tissue", float),
        "--source-mpp": ("source_mpp", float),
        "--out": ("out", Path),
        "--split-by": ("split_by", str),
    }
    slides, settings, rest = [], {}, list(args)
    while rest:
        item = rest.pop(0)
        if item in names:
            key, kind = names[item]
            settings[key] = kind(rest.pop(0))
        else:
            slides.append(item)
    return slides, settings


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_library(case, bad_inputs, tmp_path):
    args, message = bad_inputs[case]
    slides, settings = _as_library_call(args)
    out = settings.pop("out", tmp_path / "out.zarr")
    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(NcaTilesError, match=message.replace("-", r"\-")):
        extract(slides, out, **settings)
    assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing written, nothing left


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_cli(case, bad_inputs, tmp_path):
    args, message = bad_inputs[case]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out.zarr")]
    result = CliRunner().invoke(cli, ["extract-patches", *args])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.zarr").exists() and not leftovers(tmp_path)


# --- command line -------------------------------------------------------------------------------


def test_cli_extracts_and_info_describes(tmp_path, sample_slide):
    out = tmp_path / "p.zarr"
    args = ["extract-patches", str(sample_slide), "--out", str(out), "--mpp", "2", "--patch-size", "32"]
    result = CliRunner().invoke(cli, [*args, "--max-per-slide", "30", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert "read 1 of 1 slide file" in result.output and "30 patches of 32x32 px at 2 µm/px" in result.output
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert info.output.strip() == describe_store(out)
    assert describe_store(out) in result.output


def test_cli_skips_damaged_slide_and_says_why(tmp_path, sample_slide):
    folder = tmp_path / "slides"
    folder.mkdir()
    copy(sample_slide, folder / "good.svs")
    random_bytes(folder / "bad.svs")
    out = tmp_path / "p.zarr"
    result = CliRunner().invoke(cli, ["extract-patches", str(folder), "--out", str(out), "--mpp", "4"])
    assert result.exit_code == 0, result.output
    assert "read 1 of 2 slide files" in result.output
    assert "bad.svs: OpenSlide cannot open it" in result.output


def test_help_lists_the_options():
    result = CliRunner().invoke(cli, ["extract-patches", "--help"])
    assert result.exit_code == 0
    for option in ("--patch-size", "--mpp", "--stride", "--min-tissue", "--max-per-slide", "--seed",
                   "--source-mpp", "--overwrite", "--allow-upsample", "--out"):  # fmt: skip
        assert option in result.output


# --- opening stores -------------------------------------------------------------------------------


def test_open_rejects_what_is_not_a_store(tmp_path, one_slide_store):
    with pytest.raises(NcaTilesError, match="does not exist"):
        open_patch_store(tmp_path / "missing.zarr")
    (tmp_path / "folder").mkdir()
    assert not is_patch_store(tmp_path / "folder")
    with pytest.raises(NcaTilesError, match="not a patch store"):
        open_patch_store(tmp_path / "folder")
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(one_slide_store[0], damaged)
    shutil.rmtree(damaged / "split")
    assert is_patch_store(damaged)  # cheap check: the group says so
    with pytest.raises(NcaTilesError, match="corrupt"):
        open_patch_store(damaged)
    garbled = tmp_path / "garbled.zarr"
    shutil.copytree(one_slide_store[0], garbled)
    (garbled / "images" / "zarr.json").write_text("{not json")
    with pytest.raises(NcaTilesError, match="corrupt"):
        describe_store(garbled)


def test_newer_format_is_refused(tmp_path, one_slide_store):
    newer = tmp_path / "newer.zarr"
    shutil.copytree(one_slide_store[0], newer)
    meta = json.loads((newer / "zarr.json").read_text())
    meta["attributes"]["nca_tiles"]["format_version"] = 2
    (newer / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(NcaTilesError, match="format 2"):
        open_patch_store(newer)


# --- where the store goes: writable, and one extraction at a time -------------------------------


def test_read_only_out_is_refused_before_any_work(tmp_path, sample_slide, monkeypatch):
    import nca_tiles.wsi.slide

    def no_work(*args, **kwargs):
        raise AssertionError("slides were searched before --out was checked")

    monkeypatch.setattr(nca_tiles.wsi.slide, "find_slides", no_work)
    with read_only_dir(tmp_path / "ro") as ro:
        with pytest.raises(NcaTilesError, match=r"cannot write --out .*p\.zarr.*not writable"):
            extract([sample_slide], ro / "p.zarr", target_mpp=2.0)
        result = CliRunner().invoke(cli, ["extract-patches", str(sample_slide), "--out", str(ro / "p.zarr")])
        assert_one_line_error(result, "cannot write --out", "choose another location")
        assert list(ro.iterdir()) == []


def test_out_in_use_by_another_process_is_refused(tmp_path, sample_slide):
    out = tmp_path / "p.zarr"
    with lock_held_elsewhere(out) as holder:
        result = CliRunner().invoke(cli, ["extract-patches", str(sample_slide), "--out", str(out), "--mpp", "2"])
        assert_one_line_error(result, f"--out {out} is in use by process {holder.pid} on host", "choose another --out")
        assert not out.exists() and not leftovers(tmp_path)


def test_second_extraction_to_the_same_out_is_refused_while_the_first_runs(tmp_path, sample_slide, monkeypatch):
    """A second real ``nca-tiles extract-patches`` started while this one writes the store: it is
    refused at once, and the first finishes with a store that reads back whole."""
    import nca_tiles.training.patches as patches

    out = tmp_path / "p.zarr"
    second: list[subprocess.CompletedProcess] = []
    write_store = patches._write_store

    def write_store_and_race(*args, **kwargs):
        command = [sys.executable, "-m", "nca_tiles_cli.main", "extract-patches", str(sample_slide), "--out", str(out),
                   "--mpp", "4", "--overwrite"]
        second.append(subprocess.run(command, capture_output=True, text=True, timeout=120))
        return write_store(*args, **kwargs)

    monkeypatch.setattr(patches, "_write_store", write_store_and_race)
    result = extract([sample_slide], out, target_mpp=2.0, max_per_slide=20)
    (race,) = second
    assert race.returncode == 1, race.stderr
    lines = race.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in race.stderr, race.stderr
    assert f"--out {out} is in use by process {os.getpid()} on host" in lines[0]
    store = open_patch_store(out)
    assert len(store) == result.n_patches == 20 and store.mpp == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]  # the lock went with the extraction


# kill -9 once the store is written, just before it is renamed into place.
KILLED_EXTRACTION = """
import os, signal, sys
import nca_tiles.training.patches as patches
write_store = patches._write_store
def write_store_and_die(*args, **kwargs):
    write_store(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
patches._write_store = write_store_and_die
patches.extract_patches([sys.argv[1]], sys.argv[2], target_mpp=4.0, progress=False)
"""


def test_the_next_extraction_removes_what_a_killed_one_left(tmp_path, sample_slide):
    out = tmp_path / "p.zarr"
    killed = subprocess.run([sys.executable, "-c", KILLED_EXTRACTION, str(sample_slide), str(out)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and len(leftovers(tmp_path)) == 1
    extract([sample_slide], out, target_mpp=4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]


def test_identity_is_that_of_the_data_not_of_where_the_files_are(tmp_path, sample_slide):
    """A store re-extracted elsewhere (another checkout: slides and store at other paths) from the
    same slides with the same settings has the same identity: resuming a training run must not
    depend on where the repository is. Other slides, or other settings, give another identity."""
    settings = {"patch_size": 32, "target_mpp": 2.0, "max_per_slide": 15}
    here = open_patch_store(extract([sample_slide], tmp_path / "p.zarr", **settings).out)
    elsewhere = tmp_path / "elsewhere" / "data"
    elsewhere.mkdir(parents=True)
    moved = copy(sample_slide, elsewhere / sample_slide.name)
    there = open_patch_store(extract([moved], elsewhere / "store.zarr", **settings).out)
    assert here.slides[0]["path"] != there.slides[0]["path"]
    assert here.identity == there.identity
    renamed = copy(sample_slide, elsewhere / "another_case.svs")
    other = open_patch_store(extract([renamed], tmp_path / "c.zarr", **settings).out)
    assert other.identity != here.identity
    coarser = open_patch_store(extract([sample_slide], tmp_path / "d.zarr", **{**settings, "target_mpp": 4.0}).out)
    assert coarser.identity != here.identity


def test_a_region_split_keeps_the_overlapping_patches_a_stride_asks_for(tmp_path):
    """The ovarian tumour (1500², 0.25 µm/px) at 1 µm/px, stride 16: 400 positions. Regions one
    patch wide had kept one patch each (25), so the densest tissue all but vanished from the
    fine level's training data whatever --stride said."""
    tumour = Path(__file__).resolve().parents[1] / "nca_tiles/data/training/ovary_hgsc_tumour.jpg"
    result = extract([tumour], tmp_path / "p.zarr", patch_size=64, stride=16, target_mpp=1.0, source_mpp=0.25,
                     min_tissue=0.05, split_by="region")
    store = open_patch_store(result.out)
    footprint = 64 * 4
    region = store.slides[0]["region_size"]
    assert region >= 2 * footprint
    assert len(store) >= 150  # ≥ 39 % of 400 (was 25)
    for coordinate in (store.x, store.y):
        assert (coordinate // region == (coordinate + footprint - 1) // region).all()
    assert set(np.unique(store.split)) == {0, 1, 2}
