"""OME-Zarr (NGFF 0.4 on zarr v2): metadata, pixels, atomicity, argument checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from helpers import GENERATOR, MPP, corrupt_last_chunk, noisy_image, reference_pyramid, write_canvas

from nca_tiles.errors import NcaTilesError
from nca_tiles.export.omezarr import write_ome_zarr


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    image = noisy_image(600, 389, seed=2)
    return write_canvas(tmp_path_factory.mktemp("work"), image, chunk=256, inner=64) / "canvas.zarr" / "rgb", image


def test_multiscales_metadata(work_dir, tmp_path):
    source, _ = work_dir
    out = write_ome_zarr(source, tmp_path / "slide.ome.zarr", mpp=MPP, chunk=128, progress=False)
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == 2
    attrs = group.attrs.asdict()
    (multiscale,) = attrs["multiscales"]
    assert multiscale["version"] == "0.4"
    assert multiscale["name"] == "slide"
    assert multiscale["axes"] == [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    datasets = multiscale["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2", "3"]  # 600 -> 300 -> 150 -> 75 fits 128
    for index, dataset in enumerate(datasets):
        (transform,) = dataset["coordinateTransformations"]
        assert transform == {"type": "scale", "scale": [1.0, MPP * 2**index, MPP * 2**index]}
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["R", "G", "B"]
    assert attrs["nca_tiles"]["generator"] == GENERATOR
    # the metadata files are plain JSON that any zarr v2 reader parses
    assert json.loads((out / ".zattrs").read_text())["multiscales"][0]["version"] == "0.4"
    assert json.loads((out / "0" / ".zarray").read_text())["dimension_separator"] == "/"


def test_levels_are_channel_first_canvas_and_area_averages(work_dir, tmp_path):
    source, image = work_dir
    out = write_ome_zarr(source, tmp_path / "slide.ome.zarr", mpp=MPP, chunk=128, progress=False)
    group = zarr.open_group(str(out), mode="r")
    expected = reference_pyramid(image, 4)
    for index, want in enumerate(expected):
        array = group[str(index)]
        assert array.shape == (3, *want.shape[:2])
        assert array.chunks == (1, min(128, want.shape[0]), min(128, want.shape[1]))
        assert np.array_equal(np.moveaxis(array[:], 0, -1), want)


def test_replaces_existing_output_only_when_done(work_dir, tmp_path):
    source, image = work_dir
    out = tmp_path / "slide.ome.zarr"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_ome_zarr(source, out, mpp=MPP, chunk=512, progress=False)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.ome.zarr"]
    group = zarr.open_group(str(out), mode="r")
    assert [d["path"] for d in group.attrs["multiscales"][0]["datasets"]] == ["0", "1"]


def test_numpy_canvas_and_explicit_metadata(tmp_path):
    image = noisy_image(50, 40)
    out = tmp_path / "a.zarr"
    write_ome_zarr(image, out, mpp=2.0, generator={"seed": 3}, name="named", chunk=64, progress=False)
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["multiscales"][0]["name"] == "named"
    assert group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 2.0]
    assert group.attrs["nca_tiles"]["generator"] == {"seed": 3}
    assert np.array_equal(np.moveaxis(group["0"][:], 0, -1), image)


def test_failure_midway_leaves_no_output(tmp_path):
    work = write_canvas(tmp_path / "work", noisy_image(300, 300), chunk=64)
    corrupt_last_chunk(work)
    source = work / "canvas.zarr" / "rgb"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises
        write_ome_zarr(source, out_dir / "slide.ome.zarr", mpp=MPP, chunk=64, progress=False)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunk": 100}, "multiple of 16"),
        ({"chunk": 0}, "multiple of 16"),
        ({"mpp": 0}, "pixel size"),
        ({"mpp": None}, "pixel size"),
    ],
)
def test_bad_arguments(work_dir, tmp_path, kwargs, message):
    source, _ = work_dir
    with pytest.raises(NcaTilesError, match=message):
        write_ome_zarr(source, tmp_path / "x.ome.zarr", **{"mpp": MPP, "progress": False, **kwargs})
    assert not (tmp_path / "x.ome.zarr").exists()


def test_refuses_to_overwrite_the_canvas(work_dir):
    source, _ = work_dir  # WORK/canvas.zarr/rgb
    for target in (source.parents[1], source.parent, source):
        with pytest.raises(NcaTilesError, match="canvas itself"):
            write_ome_zarr(source, target, mpp=MPP, progress=False)
    assert source.is_dir()
