"""Slide reading: every reader on real files (the bundled Aperio slide, files written here), µm/px
from metadata, exact resampling, damaged files."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    PINK,
    PURPLE,
    checkerboard,
    halve,
    random_bytes,
    truncated_copy,
    write_ome_pyramid,
    write_plain_tiff,
    write_png,
)

from nca_tiles.wsi import slide as slide_module
from nca_tiles.errors import NcaTilesError
from nca_tiles.wsi.slide import (
    ArraySlide,
    OpenSlideSlide,
    PillowSlide,
    SlideReadError,
    TiffSlide,
    ZarrSlide,
    best_level,
    find_slides,
    open_slide,
    read_level0_region,
    read_region_at_mpp,
    resample_box,
)


@pytest.fixture(scope="module")
def sample_pixels(sample_slide) -> np.ndarray:
    with open_slide(sample_slide) as slide:
        return slide.read_region(0, 0, 0, *slide.dimensions)


@pytest.fixture(scope="module")
def ome_pyramid(tmp_path_factory):
    """A 3-level OME-TIFF (SubIFDs) of random pixels at 0.5 µm/px, and its levels."""
    path = tmp_path_factory.mktemp("ome") / "pyramid.ome.tif"
    image = np.random.default_rng(1).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    return path, write_ome_pyramid(path, image, 0.5)


def test_sample_svs_through_openslide(sample_slide, sample_pixels):
    with open_slide(sample_slide) as slide:
        assert isinstance(slide, OpenSlideSlide)
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.level_downsamples == (1.0,)
    assert sample_pixels.shape == (2967, 2220, 3) and sample_pixels.dtype == np.uint8
    assert sample_pixels[:50, :50].mean() > 220  # top-left corner is glass


def test_ome_pyramid_levels_round_trip(ome_pyramid):
    path, levels = ome_pyramid
    with open_slide(path) as slide:
        assert isinstance(slide, TiffSlide) and slide.format_name == "OME-TIFF"
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_dimensions == tuple((a.shape[1], a.shape[0]) for a in levels)
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0), rel=1e-2)
        for level, written in enumerate(levels):
            np.testing.assert_array_equal(slide.read_region(level, 0, 0, *slide.level_dimensions[level]), written)
        np.testing.assert_array_equal(slide.read_region(1, 100, 37, 50, 20), levels[1][37:57, 100:150])


def test_outside_the_image_reads_white(ome_pyramid):
    path, levels = ome_pyramid
    with open_slide(path) as slide:
        region = slide.read_region(0, -10, -5, 30, 20)
    assert (region[:5] == 255).all() and (region[:, :10] == 255).all()
    np.testing.assert_array_equal(region[5:, 10:], levels[0][:15, :20])


@pytest.mark.parametrize(("unit", "size"), [("µm", 0.25), ("nm", 250.0), ("mm", 0.00025)])
def test_ome_physical_size_units(tmp_path, unit, size):
    path = tmp_path / "unit.ome.tif"
    write_ome_pyramid(path, checkerboard(256, 256, 8), size, unit=unit, levels=1)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)


@pytest.mark.parametrize("unit", ["CENTIMETER", "INCH"])
def test_plain_tiff_resolution_tags(tmp_path, unit):
    path = tmp_path / "plain.tif"
    write_plain_tiff(path, checkerboard(100, 120, 8), 0.5, unit=unit)
    with open_slide(path) as slide:
        assert isinstance(slide, TiffSlide) and slide.format_name == "TIFF"
        assert slide.mpp == pytest.approx(0.5, rel=1e-4)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 120, 100), checkerboard(100, 120, 8))


def test_tiled_tiff_goes_through_openslide(tmp_path):
    path = tmp_path / "tiled.tif"
    image = checkerboard(300, 260, 8)
    write_plain_tiff(path, image, 0.5, tiled=True)
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideSlide)
        assert slide.mpp == pytest.approx(0.5, rel=1e-4)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 260, 300), image)


def test_no_resolution_needs_source_mpp(tmp_path):
    tif, png = tmp_path / "bare.tif", tmp_path / "bare.png"
    write_plain_tiff(tif, checkerboard(64, 64, 8), None)
    write_png(png, checkerboard(64, 64, 8))
    for path in (tif, png):
        with open_slide(path) as slide:
            with pytest.raises(NcaTilesError, match=r"--source-mpp") as info:
                _ = slide.mpp
            assert path.name in str(info.value)
        with open_slide(path, source_mpp=0.5) as slide:
            assert slide.mpp == 0.5
    with open_slide(png, source_mpp=0.5) as slide:
        assert isinstance(slide, PillowSlide)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 64, 64), checkerboard(64, 64, 8))


def test_metadata_wins_over_source_mpp(sample_slide):
    with open_slide(sample_slide, source_mpp=0.25) as slide:
        assert slide.mpp == pytest.approx(0.499)


def test_screen_dpi_is_not_a_resolution(tmp_path):
    path = tmp_path / "dpi72.tif"
    write_plain_tiff(path, checkerboard(64, 64, 8), 25400 / 72, unit="INCH")  # 72 dpi
    with open_slide(path) as slide:
        assert slide.metadata_mpp is None


@pytest.mark.parametrize("kind", ["png", "tif", "tiled-tif"])
def test_checkerboard_halves_exactly(tmp_path, kind):
    """An 8 px checkerboard at 0.5 µm/px is a 4 px checkerboard at 1.0 µm/px, whatever the reader."""
    image = checkerboard(256, 320, 8)
    path = tmp_path / f"checker.{kind.split('-')[-1]}"
    if kind == "png":
        write_png(path, image)
    else:
        write_plain_tiff(path, image, 0.5, tiled=kind == "tiled-tif")
    with open_slide(path, source_mpp=0.5) as slide:
        out = read_region_at_mpp(slide, 0, 0, 160, 128, 1.0)
        np.testing.assert_array_equal(out, checkerboard(128, 160, 4))
        # an offset by a whole square swaps the colours
        swapped = checkerboard(64, 64, 4, (PURPLE, PINK))
        np.testing.assert_array_equal(read_region_at_mpp(slide, 8, 0, 64, 64, 1.0), swapped)


def test_non_integer_factor_is_area_weighted(tmp_path):
    """1.5x: each output pixel averages 1.5x1.5 input pixels, partial pixels weighted by area.
    Reference: repeat every pixel 2x (exact), then take 3x3 block means."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    path = tmp_path / "random.png"
    write_png(path, image)
    with open_slide(path, source_mpp=1.0) as slide:
        out = read_region_at_mpp(slide, 0, 0, 80, 60, 1.5)
    doubled = image.repeat(2, axis=0).repeat(2, axis=1).astype(np.float64)
    expected = doubled.reshape(60, 3, 80, 3, 3).mean(axis=(1, 3))
    assert np.abs(out - expected).max() <= 1.0


def test_fractional_box_at_offset():
    image = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    out = resample_box(image, (3.5, 2.5, 3.5 + 12, 2.5 + 12), 8, 8)
    fine = image.repeat(2, axis=0).repeat(2, axis=1).astype(np.float64)[5 : 5 + 24, 7 : 7 + 24]
    expected = fine.reshape(8, 3, 8, 3, 3).mean(axis=(1, 3))
    assert np.abs(out - expected).max() <= 1.0


def test_best_level_is_at_or_finer_than_target(ome_pyramid):
    path, _ = ome_pyramid
    with open_slide(path) as slide:
        assert [best_level(slide, d) for d in (0.5, 1.0, 1.9, 2.0, 3.0, 4.0, 100.0)] == [0, 0, 0, 1, 1, 2, 2]


def test_pyramid_read_matches_level_zero_read(ome_pyramid, tmp_path):
    """Reading at 2.0 µm/px from level 2 gives what area-averaging level 0 gives."""
    path, levels = ome_pyramid
    flat = tmp_path / "flat.png"
    write_png(flat, levels[0])
    with open_slide(path) as pyramid, open_slide(flat, source_mpp=0.5) as single:
        from_pyramid = read_region_at_mpp(pyramid, 40, 80, 100, 60, 2.0)
        from_level0 = read_region_at_mpp(single, 40, 80, 100, 60, 2.0)
    np.testing.assert_array_equal(from_pyramid, halve(halve(levels[0]))[20:80, 10:110])
    assert np.abs(from_pyramid.astype(int) - from_level0).max() <= 1  # rounding once vs twice


def test_reads_in_bounded_pieces_give_the_same_pixels(sample_slide, monkeypatch):
    with open_slide(sample_slide) as slide:
        whole = read_level0_region(slide, 100, 200, 900, 700, 300, 233)
        monkeypatch.setattr(slide_module, "MAX_READ_SIDE", 64)
        pieces = read_level0_region(slide, 100, 200, 900, 700, 300, 233)
    # Same pixels, up to float round-off deciding an exact .5 tie the other way.
    difference = np.abs(whole.astype(int) - pieces)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_same_tissue_through_two_readers(sample_slide, sample_pixels, tmp_path):
    path = tmp_path / "sample.ome.tif"
    write_ome_pyramid(path, sample_pixels, 0.499, levels=2)
    with open_slide(sample_slide) as svs, open_slide(path) as ome:
        assert ome.mpp == pytest.approx(svs.mpp)
        np.testing.assert_array_equal(ome.read_region(0, 500, 700, 256, 256), svs.read_region(0, 500, 700, 256, 256))
        a, b = (read_region_at_mpp(s, 500, 700, 128, 128, 1.0).astype(int) for s in (svs, ome))
    assert np.abs(a - b).mean() < 2


# --- damaged and missing files --------------------------------------------------------------------


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d, s: truncated_copy(s, d / "half.svs", 0.5), id="truncated-svs"),
        pytest.param(lambda d, s: truncated_copy(s, d / "almost.svs", 0.99), id="truncated-svs-99%"),
        pytest.param(lambda d, s: random_bytes(d / "noise.svs"), id="random-svs"),
        pytest.param(lambda d, s: random_bytes(d / "noise.tif"), id="random-tif"),
        pytest.param(lambda d, s: _write(d / "header.tif", b"II*\x00" + bytes(100)), id="tiff-header-only"),
        pytest.param(lambda d, s: _write(d / "empty.png", b""), id="empty-png"),
    ],
)
def test_damaged_files_raise_with_the_reason(tmp_path, sample_slide, make):
    path = make(tmp_path, sample_slide)
    with pytest.raises(SlideReadError) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_truncated_ome_tiff(tmp_path, ome_pyramid):
    path = truncated_copy(ome_pyramid[0], tmp_path / "cut.ome.tif", 0.5)
    with pytest.raises(SlideReadError, match="truncated"):
        open_slide(path)


def test_truncated_png(tmp_path):
    path = tmp_path / "whole.png"
    write_png(path, np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    cut = truncated_copy(path, tmp_path / "cut.png", 0.6)
    with pytest.raises(SlideReadError, match="cut.png"):
        open_slide(cut)


def test_missing_file():
    with pytest.raises(NcaTilesError, match="does not exist"):
        open_slide("/no/such/slide.svs")


def test_find_slides_searches_folders(tmp_path, sample_slide):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a/one.svs", "a/b/two.ome.tif", "a/b/three.PNG", "a/notes.txt", ".hidden/four.svs"):
        (tmp_path / name).write_bytes(b"x")
    found = find_slides([tmp_path, tmp_path / "a" / "one.svs", sample_slide])
    names = [p.name for p in found]
    assert names == ["three.PNG", "two.ome.tif", "one.svs", "cmu_small_region.svs"]  # path order, once each


def test_find_slides_errors(tmp_path):
    with pytest.raises(NcaTilesError, match="does not exist"):
        find_slides([tmp_path / "missing"])
    (tmp_path / "notes.txt").write_text("no slides here")
    with pytest.raises(NcaTilesError, match="no slide files"):
        find_slides([tmp_path])


# --- truncated and corrupt files: one message that says so, nothing printed ---------------------


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.7, 0.99])
def test_truncated_svs_says_truncated_and_prints_nothing(tmp_path, sample_slide, fraction, caplog, capfd):
    path = truncated_copy(sample_slide, tmp_path / "cut.svs", fraction)
    with pytest.raises(SlideReadError) as info:
        open_slide(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "the file is truncated or corrupt; copy it again" in message
    assert "\n" not in message and "Error" not in message.replace("OpenSlide", "")  # no exception names
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.99])
def test_truncated_ome_tiff_says_truncated(tmp_path, ome_pyramid, fraction, caplog):
    path = truncated_copy(ome_pyramid[0], tmp_path / "cut.ome.tif", fraction)
    with pytest.raises(SlideReadError, match="the file is truncated or corrupt; copy it again from its source"):
        open_slide(path)
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]


def test_damaged_tiles_say_corrupt(tmp_path, ome_pyramid):
    from helpers import corrupt_fine_levels

    path = tmp_path / "tiles.ome.tif"
    write_ome_pyramid(path, ome_pyramid[1][0], 0.5, compression="jpeg")
    corrupt_fine_levels(path, 3)
    with open_slide(path) as slide:  # the structure is intact: it opens
        with pytest.raises(SlideReadError, match=r"cannot decode its pixels .*the file is truncated or corrupt"):
            slide.read_region(0, 0, 0, 256, 256)


def test_quiet_tifffile_collects_and_restores_the_logger():
    import logging

    logger = logging.getLogger("tifffile")
    before = (logger.level, logger.propagate, list(logger.handlers))
    with pytest.raises(RuntimeError):
        with slide_module.quiet_tifffile() as outer:
            logger.warning("invalid offset to first page 99")
            with slide_module.quiet_tifffile() as inner:
                logger.error("corrupted tag list @12")
            assert (logger.propagate, logger.level) == (False, logging.WARNING)
            raise RuntimeError
    assert outer == ["invalid offset to first page 99", "corrupted tag list @12"] and inner == outer[1:]
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


# --- OME-Zarr, zarr arrays and arrays: the same interface ----------------------------------------


def _write_ngff_05(path, image: np.ndarray, scale: float, unit: str) -> None:
    """An OME-NGFF 0.5 image (zarr v3, attributes under "ome"), one level, axes c, y, x."""
    import zarr

    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("s0", shape=(3, *image.shape[:2]), chunks=(3, 64, 64), dtype="uint8")[:] = np.moveaxis(image, -1, 0)
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": unit} for n in "yx"]
    datasets = [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, scale, scale]}]}]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"name": "img", "axes": axes, "datasets": datasets}]}


def test_ome_zarr_of_our_exporter(tmp_path, ome_pyramid):
    from nca_tiles.export.omezarr import write_ome_zarr

    _, levels = ome_pyramid
    path = write_ome_zarr(levels[0], tmp_path / "p.ome.zarr", mpp=0.5, chunk=256, progress=False)
    with open_slide(path) as slide:
        assert isinstance(slide, ZarrSlide) and slide.kind == "ome-zarr"
        assert slide.metadata.format == "OME-Zarr (NGFF 0.4, zarr v2)" and slide.mpp == 0.5
        assert slide.level_dimensions == ((900, 700), (450, 350), (225, 175)) and slide.tile_size(0) == (256, 256)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 900, 700), levels[0])
        level1 = slide.read_region(1, 0, 0, 450, 350)
        np.testing.assert_array_equal(slide.read_region(1, 100, 37, 50, 20), level1[37:57, 100:150])
        assert np.abs(level1.astype(int) - levels[1]).max() <= 1  # the exporter rounds half to even
        assert (slide.read_region(2, 200, 150, 50, 50)[25:, 25:] == 255).all()  # outside reads white


@pytest.mark.parametrize(("unit", "scale"), [("micrometer", 0.25), ("nanometer", 250.0), ("millimeter", 0.00025)])
def test_ngff_05_units_share_the_one_unit_table(tmp_path, unit, scale):
    image = checkerboard(128, 192, 8)
    _write_ngff_05(tmp_path / "v05.ome.zarr", image, scale, unit)
    with open_slide(tmp_path / "v05.ome.zarr") as slide:
        assert slide.metadata.format == "OME-Zarr (NGFF 0.5, zarr v3)" and slide.metadata.name == "img"
        assert slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 192, 128), image)
    assert slide_module.um_per_unit(unit) * scale == pytest.approx(0.25)


def test_bare_zarr_arrays_and_arrays_guess_their_axes(tmp_path):
    import zarr

    image = checkerboard(96, 80, 8)
    for name, data in (("yxc.zarr", image), ("cyx.zarr", np.moveaxis(image, -1, 0).copy())):
        array = zarr.create_array(tmp_path / name, shape=data.shape, chunks=(32,) * 3, dtype="uint8")
        array[:] = data
        with open_slide(tmp_path / name, source_mpp=0.5) as slide:
            assert slide.kind == "zarr" and slide.mpp == 0.5
            np.testing.assert_array_equal(slide.read_region(0, 0, 0, 80, 96), image)
    grey = ArraySlide(image[..., 0])
    np.testing.assert_array_equal(grey.read_region(0, 0, 0, 80, 96), np.repeat(image[..., :1], 3, axis=-1))
    with pytest.raises(NcaTilesError, match=r"cannot tell the image axes"):
        ArraySlide(np.zeros((5, 6, 7), np.uint8))


def test_folders_that_are_no_image_are_refused(tmp_path):
    import zarr

    (tmp_path / "plain").mkdir()
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    for name, message in (
        ("plain", "a folder without zarr metadata: not a slide file or an OME-Zarr image"),
        ("group.zarr", "a zarr group without OME-NGFF 'multiscales' metadata"),
        ("broken.zarr", "the file is truncated or corrupt"),
    ):
        with pytest.raises(SlideReadError, match=message) as info:
            open_slide(tmp_path / name)
        assert "\n" not in str(info.value)


def test_find_slides_finds_ome_zarr_folders_and_skips_other_zarr_stores(tmp_path):
    import zarr

    (tmp_path / "a").mkdir()
    _write_ngff_05(tmp_path / "a" / "img.ome.zarr", checkerboard(64, 64, 8), 0.5, "micrometer")
    (tmp_path / "a" / "img.ome.zarr" / "s0" / "decoy.tif").write_bytes(b"x")  # inside a store: not a slide
    zarr.open_group(tmp_path / "patches.zarr", mode="w").create_array("x", shape=(4,), dtype="int64")
    (tmp_path / "b.svs").write_bytes(b"x")
    assert [p.name for p in find_slides([tmp_path])] == ["img.ome.zarr", "b.svs"]
    assert find_slides([tmp_path / "patches.zarr"]) == [(tmp_path / "patches.zarr").resolve()]  # named: tried
    with pytest.raises(NcaTilesError, match="no slide files .* or OME-Zarr folders"):
        find_slides([tmp_path / "a" / "img.ome.zarr" / "s0" / "c"])


def test_float_pixels_open_but_are_refused_when_read(tmp_path):
    import tifffile

    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.zeros((32, 32), np.float32))
    with open_slide(path, source_mpp=1.0) as slide:  # info can still describe it
        assert slide.dimensions == (32, 32)
        with pytest.raises(SlideReadError, match="float32 pixels; only 8- or 16-bit images are read"):
            slide.read_region(0, 0, 0, 8, 8)


def test_corrupt_tiles_leave_no_tracebacks_behind(tmp_path):
    """zarr reads tiles concurrently: when one fails, the others must not print tracebacks later
    or at exit (checked in a fresh interpreter, which prints them when it ends)."""
    import subprocess
    import sys

    from helpers import corrupt_fine_levels

    path = tmp_path / "tiles.ome.tif"
    # Large enough for zarr to leave tile reads behind (80 tiles at level 0; 48 are not).
    image = np.random.default_rng(1).integers(0, 256, (1000, 1200, 3), dtype=np.uint8)
    write_ome_pyramid(path, image, 0.5, compression="jpeg")
    corrupt_fine_levels(path, 3)
    code = (
        "import sys\nfrom nca_tiles.wsi.slide import SlideReadError, open_slide\n"
        "with open_slide(sys.argv[1]) as slide:\n"
        "    for level in range(slide.level_count):\n"
        "        try:\n"
        "            slide.read_region(level, 0, 0, *slide.level_dimensions[level])\n"
        "        except SlideReadError as exc:\n"
        "            print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == ""
    assert run.stdout.count("the file is truncated or corrupt") == 3
