"""Pyramidal OME-TIFF: structure, pixels, metadata, atomicity and argument checks, read back
with tifffile and validated against the OME schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from helpers import (
    GENERATOR,
    MPP,
    corrupt_last_chunk,
    noisy_image,
    reference_pyramid,
    smooth_image,
    write_canvas,
)

from nca_tiles.export import ometiff
from nca_tiles.errors import NcaTilesError
from nca_tiles.export.ometiff import write_ome_tiff

HEIGHT, WIDTH = 1000, 777  # odd width: edge tiles and odd levels


@pytest.fixture(scope="module")
def noisy_work_dir(tmp_path_factory):
    image = noisy_image(HEIGHT, WIDTH, seed=1)
    return write_canvas(tmp_path_factory.mktemp("noisy"), image, chunk=256, inner=64), image


@pytest.fixture(scope="module")
def smooth_work_dir(tmp_path_factory):
    image = smooth_image(HEIGHT, WIDTH)
    return write_canvas(tmp_path_factory.mktemp("smooth"), image, chunk=256), image


def read_levels(path):
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


@pytest.mark.parametrize("compression", ["deflate", "lzw", "zstd", "packbits", "none"])
def test_lossless_levels_equal_canvas_and_area_average(noisy_work_dir, tmp_path, compression):
    work_dir, image = noisy_work_dir
    out = tmp_path / "slide.ome.tif"
    write_ome_tiff(work_dir / "canvas.zarr" / "rgb", out, mpp=MPP, tile=256, compression=compression, progress=False)
    levels = read_levels(out)
    assert [level.shape for level in levels] == [(1000, 777, 3), (500, 389, 3), (250, 195, 3)]
    for got, want in zip(levels, reference_pyramid(image, 3), strict=True):
        assert np.array_equal(got, want)


def test_jpeg_within_tolerance_and_lower_levels_from_area_average(smooth_work_dir, tmp_path):
    work_dir, image = smooth_work_dir
    out = write_ome_tiff(work_dir / "canvas.zarr" / "rgb", tmp_path / "slide.ome.tif", mpp=MPP, tile=256, progress=False)
    levels = read_levels(out)
    for got, want in zip(levels, reference_pyramid(image, 3), strict=True):
        error = np.abs(got.astype(int) - want.astype(int))
        assert error.mean() < 1.5, error.mean()
        assert error.max() <= 24, error.max()
        # the right and bottom edges (in padded tiles) are as good as the rest
        assert np.abs(got[:, -8:].astype(int) - want[:, -8:]).mean() < 2.0


def test_tiff_structure_is_what_bioformats_expects(smooth_work_dir, tmp_path):
    work_dir, _ = smooth_work_dir
    out = write_ome_tiff(work_dir / "canvas.zarr" / "rgb", tmp_path / "slide.ome.tif", mpp=MPP, tile=256, progress=False)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and not tif.is_bigtiff
        assert len(tif.pages) == 1  # one top-level IFD: the lower levels are its SubIFDs
        first = tif.pages[0]
        assert first.subifds is not None and len(first.subifds) == 2
        levels = tif.series[0].levels
        assert len(levels) == 3
        for index, level in enumerate(levels):
            page = level.keyframe
            assert page.subfiletype == (1 if index else 0)
            assert (page.tilewidth, page.tilelength) == (256, 256)
            assert page.samplesperpixel == 3 and page.planarconfig == 1 and page.dtype == np.uint8
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.photometric == tifffile.PHOTOMETRIC.YCBCR and page.subsampling == (2, 2)
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            assert page.resolution[0] == pytest.approx(1e4 / (MPP * 2**index))
            # every tile stored, none empty: edge tiles are padded to full size
            assert all(count > 0 for count in page.databytecounts)
            assert len(page.databytecounts) == -(-page.imagelength // 256) * -(-page.imagewidth // 256)


def test_lossless_compressions_use_predictor_2(noisy_work_dir, tmp_path):
    work_dir, _ = noisy_work_dir
    out = write_ome_tiff(work_dir / "canvas.zarr" / "rgb", tmp_path / "s.ome.tif", mpp=MPP, tile=256, compression="deflate", progress=False)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.predictor == 2 and page.photometric == tifffile.PHOTOMETRIC.RGB
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE


def test_ome_xml_validates_and_records_size_name_and_generator(smooth_work_dir, tmp_path):
    from ome_types import from_xml
    from ome_types.model import UnitsLength

    work_dir, _ = smooth_work_dir
    out = write_ome_tiff(work_dir / "canvas.zarr" / "rgb", tmp_path / "synthetic.ome.tif", mpp=MPP, tile=256, progress=False)
    with tifffile.TiffFile(out) as tif:
        xml = tif.ome_metadata
    ome = from_xml(xml, validate=True)  # raises on any schema violation
    assert len(ome.images) == 1
    image = ome.images[0]
    assert image.name == "synthetic"
    pixels = image.pixels
    assert (pixels.size_x, pixels.size_y, pixels.size_c) == (WIDTH, HEIGHT, 3)
    assert pixels.channels[0].samples_per_pixel == 3
    assert pixels.physical_size_x == pytest.approx(MPP) and pixels.physical_size_y == pytest.approx(MPP)
    assert pixels.physical_size_x_unit == UnitsLength.MICROMETER
    annotation = ome.structured_annotations.map_annotations[0]
    assert annotation.namespace == ometiff.GENERATOR_NAMESPACE
    values = {item.k: item.value for item in annotation.value.ms}
    assert values["model_hash"] == "abc123" and json.loads(values["steps"]) == [999, 500, 0]
    assert image.annotation_refs[0].id == annotation.id
    recorded = json.loads(image.description.split(ometiff.GENERATOR_MARKER, 1)[1])
    assert recorded == GENERATOR


def test_explicit_arguments_override_canvas_attributes(smooth_work_dir, tmp_path):
    from ome_types import from_xml

    work_dir, _ = smooth_work_dir
    out = write_ome_tiff(
        work_dir / "canvas.zarr" / "rgb",
        tmp_path / "a.ome.tif",
        mpp=0.25,
        generator={"seed": 1, "Description": "<&>", "Namespace": "x"},
        name="Named µ slide",
        tile=512,
        progress=False,
    )
    with tifffile.TiffFile(out) as tif:
        ome = from_xml(tif.ome_metadata, validate=True)
        assert len(tif.series[0].levels) == 2  # 1000 -> 500 fits one 512 tile
    assert ome.images[0].name == "Named µ slide"
    assert ome.images[0].pixels.physical_size_x == pytest.approx(0.25)
    annotation = ome.structured_annotations.map_annotations[0]
    assert annotation.namespace == ometiff.GENERATOR_NAMESPACE
    assert {m.k: m.value for m in annotation.value.ms} == {"seed": "1", "Description": "<&>", "Namespace": "x"}


def test_numpy_canvas_single_level(tmp_path):
    image = noisy_image(100, 60)
    out = write_ome_tiff(image, tmp_path / "small.ome.tif", mpp=1.0, compression="zstd", progress=False)
    with tifffile.TiffFile(out) as tif:
        assert len(tif.series[0].levels) == 1 and tif.pages[0].subifds is None
        assert np.array_equal(tif.series[0].asarray(), image)


def test_bigtiff_above_threshold(noisy_work_dir, tmp_path, monkeypatch):
    work_dir, image = noisy_work_dir
    monkeypatch.setattr(ometiff, "BIGTIFF_ABOVE_BYTES", image.nbytes // 2)  # pretend it is huge
    out = write_ome_tiff(work_dir / "canvas.zarr" / "rgb", tmp_path / "big.ome.tif", mpp=MPP, tile=256, compression="lzw", progress=False)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff
        assert np.array_equal(tif.series[0].levels[1].asarray(), reference_pyramid(image, 2)[1])


def test_replaces_existing_output_and_leaves_no_temporary_files(smooth_work_dir, tmp_path):
    work_dir, _ = smooth_work_dir
    out = tmp_path / "slide.ome.tif"
    out.write_bytes(b"old")
    write_ome_tiff(work_dir / "canvas.zarr" / "rgb", out, mpp=MPP, tile=256, progress=False)
    assert tifffile.TiffFile(out).is_ome
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.ome.tif"]


def test_failure_midway_leaves_no_output(tmp_path):
    work_dir = write_canvas(tmp_path / "work", noisy_image(600, 500), chunk=128)
    corrupt_last_chunk(work_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises
        write_ome_tiff(work_dir / "canvas.zarr" / "rgb", out_dir / "slide.ome.tif", mpp=MPP, tile=128, compression="none", progress=False)
    assert list(out_dir.iterdir()) == []  # no output, no temporary file, no scratch folder


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compression": "webp"}, "unknown compression"),
        ({"compression": "jpegxl"}, "unknown compression"),
        ({"compression": "lzma"}, "unknown compression"),
        ({"tile": 100}, "multiple of 16"),
        ({"tile": 0}, "multiple of 16"),
        ({"tile": 8}, "multiple of 16"),
        ({"tile": 256.0}, "multiple of 16"),
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "quality"),
        ({"quality": 9.5}, "quality"),
        ({"mpp": 0}, "pixel size"),
        ({"mpp": -0.5}, "pixel size"),
        ({"mpp": float("nan")}, "pixel size"),
        ({"mpp": None}, "pixel size"),
    ],
)
def test_bad_arguments(smooth_work_dir, tmp_path, kwargs, message):
    work_dir, _ = smooth_work_dir
    arguments = {"mpp": MPP, "progress": False, **kwargs}
    with pytest.raises(NcaTilesError, match=message):
        write_ome_tiff(work_dir / "canvas.zarr" / "rgb", tmp_path / "x.ome.tif", **arguments)
    assert not (tmp_path / "x.ome.tif").exists()


def test_bad_inputs_and_outputs(smooth_work_dir, tmp_path):
    work_dir, _ = smooth_work_dir
    with pytest.raises(NcaTilesError, match="directory"):
        write_ome_tiff(work_dir / "canvas.zarr" / "rgb", tmp_path, mpp=MPP, progress=False)
    with pytest.raises(NcaTilesError, match="canvas itself"):
        write_ome_tiff(work_dir / "canvas.zarr" / "rgb", work_dir / "canvas.zarr" / "rgb" / "x.ome.tif", mpp=MPP, progress=False)
    with pytest.raises(NcaTilesError, match=r"\(H, W, 3\) uint8"):
        write_ome_tiff(np.zeros((10, 10), np.uint8), tmp_path / "x.ome.tif", mpp=MPP, progress=False)
    with pytest.raises(NcaTilesError, match="does not exist"):
        write_ome_tiff(tmp_path / "nowhere", tmp_path / "x.ome.tif", mpp=MPP, progress=False)
