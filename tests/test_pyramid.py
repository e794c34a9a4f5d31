"""The 2x area-average pyramid, opening canvases, and the checks every exporter makes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zarr
from helpers import GENERATOR, MPP, noisy_image, reference_pyramid, write_canvas

from nca_tiles.errors import NcaTilesError
from nca_tiles.export.pyramid import (
    check_mpp,
    chunk_side,
    create_scratch_level,
    default_image_name,
    downsample_2x,
    downsample_level,
    iter_blocks,
    level_shapes,
    open_canvas,
    paths_overlap,
    tee_downsample,
)


@pytest.mark.parametrize("shape", [(8, 8), (7, 5), (1, 1), (1, 6), (5, 1), (33, 64)])
def test_downsample_2x_matches_area_average(shape):
    image = noisy_image(*shape, seed=sum(shape))
    assert np.array_equal(downsample_2x(image), reference_pyramid(image, 2)[1])


def test_downsample_2x_rounds_half_to_even():
    # sums 4q + 2: 0+0+1+1 -> 0.5 -> 0; 1+1+2+2 -> 1.5 -> 2; 2+2+3+3 -> 2.5 -> 2; 254,254,255,255 -> 254
    blocks = [(0, 0, 1, 1), (1, 1, 2, 2), (2, 2, 3, 3), (254, 254, 255, 255), (0, 0, 0, 3), (0, 1, 1, 1)]
    image = np.zeros((2, 2 * len(blocks), 3), dtype=np.uint8)
    for i, (a, b, c, d) in enumerate(blocks):
        image[:, 2 * i : 2 * i + 2] = np.array([[a, b], [c, d]], dtype=np.uint8)[..., None]
    assert downsample_2x(image)[0, :, 0].tolist() == [0, 2, 2, 254, 1, 1]


def test_downsample_2x_keeps_constant_and_extreme_values():
    for value in (0, 1, 128, 255):
        image = np.full((9, 11, 3), value, dtype=np.uint8)
        assert (downsample_2x(image) == value).all()


def test_level_shapes_halve_rounding_up_until_one_tile():
    assert level_shapes(1000, 777, 256) == [(1000, 777), (500, 389), (250, 195)]
    assert level_shapes(200, 100, 256) == [(200, 100)]
    assert level_shapes(513, 10, 256) == [(513, 10), (257, 5), (129, 3)]
    with pytest.raises(NcaTilesError):
        level_shapes(10, 10, 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_downsample_level_chunk_by_chunk_equals_reference(tmp_path, workers):
    image = noisy_image(301, 263, seed=3)
    src = zarr.create_array(str(tmp_path / "src"), shape=image.shape, chunks=(64, 64, 3), dtype="uint8")
    src[:] = image
    levels = [src]
    for index, (h, w) in enumerate(level_shapes(301, 263, 64)[1:], start=1):
        dst = create_scratch_level(tmp_path / f"l{index}", h, w, 64)
        downsample_level(levels[-1], dst, chunk=64, workers=workers)
        levels.append(dst)
    expected = reference_pyramid(image, len(levels))
    assert len(levels) == 4
    for got, want in zip(levels, expected, strict=True):
        assert np.array_equal(got[:], want)


def test_downsample_level_refuses_wrong_shapes(tmp_path):
    src = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError):
        downsample_level(src, np.zeros((4, 5, 3), np.uint8), chunk=4)


@pytest.mark.parametrize("side, read_width", [(64, 64), (64, 128), (48, 100)])
def test_iter_blocks_covers_the_level_in_tiff_order(side, read_width):
    image = noisy_image(150, 131, seed=5)
    seen = np.zeros(image.shape[:2], dtype=int)
    positions = []
    for y, x, pixels in iter_blocks(image, side, read_width):
        assert np.array_equal(pixels, image[y : y + side, x : x + side])
        seen[y : y + pixels.shape[0], x : x + pixels.shape[1]] += 1
        positions.append((y, x))
    assert (seen == 1).all()
    assert positions == sorted(positions)  # row-major


def test_tee_downsample_builds_the_next_level_while_streaming(tmp_path):
    image = noisy_image(130, 99, seed=9)
    below = create_scratch_level(tmp_path / "below", 65, 50, 32)
    passed = list(tee_downsample(iter_blocks(image, 64), below))
    assert len(passed) == math.ceil(130 / 64) * math.ceil(99 / 64)
    assert np.array_equal(below[:], reference_pyramid(image, 2)[1])
    with pytest.raises(ValueError):
        list(tee_downsample(iter([(1, 0, image[:2, :2])]), below))


def test_open_canvas_from_a_work_dir_its_group_its_array_and_numpy(tmp_path):
    from nca_tiles.synthesis.export_job import open_source_canvas

    image = noisy_image(40, 30)
    work = write_canvas(tmp_path, image, chunk=16)
    for source in (work, work / "canvas.zarr", work / "canvas.zarr" / "rgb", str(work)):
        canvas = open_source_canvas(source)
        assert canvas.mpp == MPP and canvas.generator == GENERATOR
        assert (canvas.height, canvas.width) == (40, 30)
        assert canvas.path == work / "canvas.zarr" / "rgb"
        assert np.array_equal(canvas.array[:], image)
    assert np.array_equal(open_canvas(work / "canvas.zarr" / "rgb").array[:], image)  # any zarr array
    from_numpy = open_canvas(image)
    assert from_numpy.mpp is None and from_numpy.path is None and from_numpy.chunk == 1024


def test_open_canvas_errors(tmp_path):
    with pytest.raises(NcaTilesError, match="does not exist"):
        open_canvas(tmp_path / "missing")
    with pytest.raises(NcaTilesError, match="no canvas"):
        open_canvas(tmp_path)  # an empty folder
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(NcaTilesError, match="is a zarr group, not an array"):
        open_canvas(tmp_path / "g.zarr")
    group.create_array("rgb", shape=(4, 4), dtype="uint8")
    with pytest.raises(NcaTilesError, match=r"\(H, W, 3\) uint8"):
        open_canvas(tmp_path / "g.zarr" / "rgb")
    with pytest.raises(NcaTilesError, match=r"\(H, W, 3\) uint8"):
        open_canvas(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(NcaTilesError):
        open_canvas(42)


def test_chunk_side_reads_sharded_canvases_in_small_blocks():
    sharded = zarr.create_array({}, shape=(4096, 4096, 3), chunks=(128, 128, 3), shards=(1024, 1024, 3), dtype="uint8")
    plain = zarr.create_array({}, shape=(4096, 4096, 3), chunks=(1024, 1024, 3), dtype="uint8")
    assert chunk_side(sharded) == 512
    assert chunk_side(plain) == 1024


def test_checks_shared_by_exporters(tmp_path):
    assert check_mpp(0.25) == 0.25
    assert check_mpp("0.5") == 0.5
    for bad in (0, -1, float("nan"), float("inf"), None, "x"):
        with pytest.raises(NcaTilesError):
            check_mpp(bad)
    assert default_image_name(tmp_path / "slide.ome.tif") == "slide"
    assert default_image_name(tmp_path / "slide.OME.ZARR") == "slide"
    assert default_image_name(tmp_path / "slide") == "slide"
    assert paths_overlap(tmp_path / "a", tmp_path / "a" / "b")
    assert paths_overlap(tmp_path / "a" / "b", tmp_path / "a")
    assert not paths_overlap(tmp_path / "a.ome.tif", tmp_path / "a")
