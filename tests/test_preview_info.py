"""Thumbnails and slide descriptions (library and CLI), and the export/preview/info commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from helpers import (
    MPP, assert_one_line_error, corrupt_fine_levels, corrupt_last_chunk, read_only_dir, smooth_image,
    truncated_copy, write_canvas, write_ome_pyramid,
)
from PIL import Image

from nca_tiles.errors import NcaTilesError
from nca_tiles.export.ometiff import write_ome_tiff
from nca_tiles.export.omezarr import write_ome_zarr
from nca_tiles.wsi.thumbnail import make_thumbnail, pick_level, write_preview
from nca_tiles.wsi.info import describe_slide, slide_kind
from nca_tiles_cli.main import cli

HEIGHT, WIDTH = 1000, 777


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    image = smooth_image(HEIGHT, WIDTH)
    return write_canvas(tmp_path_factory.mktemp("work"), image, chunk=256, inner=64), image


@pytest.fixture(scope="module")
def slides(canvas, tmp_path_factory):
    work_dir, _ = canvas
    folder = tmp_path_factory.mktemp("slides")
    tiff = write_ome_tiff(work_dir / "canvas.zarr" / "rgb", folder / "slide.ome.tif", mpp=MPP, tile=256, progress=False)
    zarr_dir = write_ome_zarr(work_dir / "canvas.zarr" / "rgb", folder / "slide.ome.zarr", mpp=MPP, chunk=256, progress=False)
    return {"tiff": tiff, "zarr": zarr_dir}


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX), dtype=float)


def test_pick_level_takes_the_smallest_that_is_large_enough():
    sizes = [(1000, 777), (500, 389), (250, 195)]
    assert pick_level(sizes, 200) == 2
    assert pick_level(sizes, 250) == 2
    assert pick_level(sizes, 251) == 1
    assert pick_level(sizes, 5000) == 0
    assert pick_level(list(reversed(sizes)), 300) == 1  # order does not matter


@pytest.mark.parametrize("kind", ["tiff", "zarr"])
def test_thumbnail_of_our_exports_looks_like_the_canvas(slides, canvas, kind):
    _, image = canvas
    thumb = make_thumbnail(slides[kind], 200)
    assert thumb.mode == "RGB" and max(thumb.size) == 200
    assert thumb.size == (155, 200)
    error = np.abs(np.asarray(thumb, dtype=float) - resized(image, thumb.size))
    assert error.mean() < 3.0


def test_thumbnail_is_never_upscaled(slides):
    assert make_thumbnail(slides["tiff"], 5000).size == (WIDTH, HEIGHT)


def test_thumbnail_of_openslide_slide(sample_slide):
    thumb = make_thumbnail(sample_slide, 256)
    assert thumb.mode == "RGB" and max(thumb.size) == 256


def test_thumbnail_of_large_single_level_and_grayscale_tiffs(tmp_path):
    rgb = smooth_image(1500, 1200)
    tifffile.imwrite(tmp_path / "flat.tif", rgb, photometric="rgb", tile=(256, 256))
    thumb = make_thumbnail(tmp_path / "flat.tif", 100)  # read with a stride, never whole
    assert thumb.size == (80, 100)
    assert np.abs(np.asarray(thumb, dtype=float) - resized(rgb, thumb.size)).mean() < 4.0
    gray = (np.arange(300 * 200, dtype=np.uint32).reshape(300, 200) % 4096).astype(np.uint16)
    tifffile.imwrite(tmp_path / "gray.tif", gray)
    assert make_thumbnail(tmp_path / "gray.tif", 64).mode == "RGB"


def test_write_preview_is_atomic_and_checks_its_arguments(slides, tmp_path):
    out = write_preview(slides["tiff"], tmp_path / "thumb.png", size=64)
    assert Image.open(out).size == (50, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thumb.png"]
    with pytest.raises(NcaTilesError, match=".png"):
        write_preview(slides["tiff"], tmp_path / "thumb.xyz")
    with pytest.raises(NcaTilesError, match="positive"):
        make_thumbnail(slides["tiff"], 0)


def test_read_only_out_is_refused_before_the_slide_is_read(slides, tmp_path, monkeypatch):
    import nca_tiles.wsi.thumbnail

    def no_work(*args, **kwargs):
        raise AssertionError("the slide was read before --out was checked")

    with read_only_dir(tmp_path / "ro") as ro:
        result = run("preview", slides["tiff"], "--out", ro / "thumb.png", "--size", "64")
        assert_one_line_error(result, f"cannot write --out {ro / 'thumb.png'}", "choose another location")
        monkeypatch.setattr(nca_tiles.wsi.thumbnail, "make_thumbnail", no_work)
        with pytest.raises(NcaTilesError, match="cannot write --out .*not writable"):
            write_preview(slides["tiff"], ro / "sub" / "thumb.png")
        assert list(ro.iterdir()) == []


def test_describe_our_ome_tiff(slides):
    text = describe_slide(slides["tiff"])
    assert "OME-TIFF" in text and "image name: slide" in text
    assert "levels: 3 (SubIFD pyramid)" in text
    assert "level 0: 777 x 1000 px" in text and "level 2: 195 x 250 px (downsample 4)" in text
    assert "tiles 256 x 256, compression JPEG" in text and "YCbCr 2x2" in text
    assert "pixel size: 0.5 x 0.5 µm/px" in text
    assert '"model_hash": "abc123"' in text


def test_describe_our_ome_zarr(slides):
    text = describe_slide(slides["zarr"])
    assert "OME-Zarr (NGFF 0.4, zarr v2)" in text and "levels: 3" in text
    assert "level 1: 389 x 500 px (downsample 2)" in text
    assert "chunks 256 x 256" in text and "zstd" in text
    assert "pixel size: 0.5 x 0.5 µm/px" in text and "generator:" in text


def test_describe_openslide_slide(sample_slide):
    assert slide_kind(sample_slide) == "openslide"
    text = describe_slide(sample_slide)
    assert "aperio (read with OpenSlide)" in text
    assert "level 0: 2220 x 2967 px" in text and "0.499 x 0.499 µm/px" in text
    assert "tiles 240 x 240, compression JPEG" in text


def test_describe_plain_tiff_with_resolution_tags(tmp_path):
    tifffile.imwrite(
        tmp_path / "plain.tif", smooth_image(64, 48), photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    text = describe_slide(tmp_path / "plain.tif")
    assert "levels: 1" in text and "level 0: 48 x 64 px" in text and "0.25 x 0.25 µm/px" in text


def test_unreadable_slides_raise_ncatileserror(slides, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "cut.ome.tif").write_bytes(slides["tiff"].read_bytes()[:200])
    for path in ("notes.txt", "empty", "cut.ome.tif", "missing.tif"):
        with pytest.raises(NcaTilesError):
            describe_slide(tmp_path / path)
        with pytest.raises(NcaTilesError):
            make_thumbnail(tmp_path / path)


@pytest.fixture(scope="module")
def damaged_slides(tmp_path_factory, sample_slide, slides) -> dict:
    """Truncated copies of an Aperio SVS (tifffile logs broken directories on them), of our
    OME-TIFF, and an OME-TIFF whose tiles are garbage."""
    folder = tmp_path_factory.mktemp("damaged")
    tiles = folder / "tiles.ome.tif"
    write_ome_pyramid(tiles, smooth_image(300, 400), 0.5, compression="jpeg")
    corrupt_fine_levels(tiles, 3)
    return {
        "svs 30%": truncated_copy(sample_slide, folder / "cut30.svs", 0.3),
        "svs 99%": truncated_copy(sample_slide, folder / "cut99.svs", 0.99),
        "ome-tiff 50%": truncated_copy(slides["tiff"], folder / "cut50.ome.tif", 0.5),
        "header only": truncated_copy(slides["tiff"], folder / "cut1.ome.tif", 0.001),
        "garbage tiles": tiles,
    }


@pytest.mark.parametrize("case", ["svs 30%", "svs 99%", "ome-tiff 50%", "header only", "garbage tiles"])
def test_damaged_slides_say_truncated_or_corrupt(damaged_slides, case, caplog, tmp_path):
    path = damaged_slides[case]
    calls = [lambda: make_thumbnail(path, 64), lambda: write_preview(path, tmp_path / "t.png", size=64)]
    if case != "garbage tiles":  # info reads no pixels: intact directories describe fine
        calls.append(lambda: describe_slide(path))
    for call in calls:
        with pytest.raises(NcaTilesError) as info:
            call()
        message = str(info.value)
        assert str(path) in message and "the file is truncated or corrupt; copy it again" in message, message
        for leak in ("IndexError", "list index out of range", "empty Zarr", "NotImplementedError", "\n"):
            assert leak not in message
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]  # nothing logged past us
    assert not (tmp_path / "t.png").exists()


# ---------------------------------------------------------------------------------------------
# CLI


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_error(result, fragment: str) -> None:
    assert result.exit_code != 0
    assert "Error:" in result.output and fragment in result.output, result.output
    assert "Traceback" not in result.output


def test_cli_export_ome_tiff_then_refuse_existing_then_overwrite(canvas, tmp_path):
    work_dir, _ = canvas
    out = tmp_path / "slide.ome.tif"
    result = run("export", work_dir, "--out", out, "--tile", "256", "--compression", "zstd")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and len(tif.series[0].levels) == 3 and tif.pages[0].compression == 50000
    before = out.stat().st_mtime_ns
    assert_clean_error(run("export", work_dir, "--out", out), "--overwrite")
    assert out.stat().st_mtime_ns == before
    result = run("export", work_dir / "canvas.zarr", "--out", out, "--overwrite", "--quality", "80")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG and len(tif.series[0].levels) == 2


def test_cli_export_ome_zarr_from_the_suffix(canvas, tmp_path):
    work_dir, _ = canvas
    out = tmp_path / "slide.ome.zarr"
    result = run("export", work_dir / "canvas.zarr" / "rgb", "--out", out, "--tile", "256")
    assert result.exit_code == 0, result.output
    assert json.loads((out / ".zattrs").read_text())["multiscales"][0]["version"] == "0.4"
    assert_clean_error(run("export", work_dir, "--out", tmp_path / "b.zarr", "--compression", "lzw"), "OME-TIFF only")


def test_cli_export_argument_errors(canvas, tmp_path):
    work_dir, _ = canvas
    out = tmp_path / "x.ome.tif"
    assert_clean_error(run("export", work_dir, "--out", out, "--tile", "100"), "multiple of 16")
    assert_clean_error(run("export", work_dir, "--out", out, "--compression", "webp"), "unknown compression")
    assert_clean_error(run("export", work_dir, "--out", out, "--quality", "0"), "quality")
    assert_clean_error(run("export", work_dir, "--out", out, "--mpp", "-1"), "pixel size")
    assert_clean_error(run("export", tmp_path / "nowhere", "--out", out), "does not exist")
    assert_clean_error(run("export", work_dir, "--out", work_dir, "--format", "ome-zarr", "--overwrite"), "canvas")
    assert not out.exists()


def test_cli_export_needs_a_pixel_size(tmp_path):
    work_dir = write_canvas(tmp_path / "work", smooth_image(64, 64), chunk=64, mpp=None)
    out = tmp_path / "x.ome.tif"
    assert_clean_error(run("export", work_dir, "--out", out), "--mpp")
    assert run("export", work_dir, "--out", out, "--mpp", "0.25").exit_code == 0
    with tifffile.TiffFile(out) as tif:
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata


def test_cli_export_refuses_unfinished_synthesis(tmp_path):
    from nca_tiles.synthesis.job import Job, LevelJob
    from nca_tiles.synthesis.workdir import Manifest

    work_dir = write_canvas(tmp_path / "work", smooth_image(64, 64), chunk=64)
    level = LevelJob(factor=1, width=64, height=64, model_hash="0" * 16, timesteps=(299, 150, 0))
    job = Job(model_hash="0" * 16, seed=0, width=64, height=64, chunk=64, sampler="ddim", levels=(level,))
    manifest = Manifest(job, sweeps_done=3).to_dict()
    (work_dir / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run("export", work_dir, "--out", tmp_path / "x.ome.tif"), "has not finished (3 of 4 sweeps)")
    # every sweep done but the synthesis' own export failed: the canvas is complete
    (work_dir / "manifest.json").write_text(json.dumps({**manifest, "sweeps_done": 4}))
    assert run("export", work_dir, "--out", tmp_path / "x.ome.tif").exit_code == 0


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_cli_export_failing_midway_leaves_no_output(tmp_path, suffix):
    work_dir = write_canvas(tmp_path / "work", smooth_image(400, 300), chunk=64)
    corrupt_last_chunk(work_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run("export", work_dir, "--out", out_dir / f"slide{suffix}", "--tile", "64")
    assert result.exit_code != 0
    assert list(out_dir.iterdir()) == []


def test_cli_preview(slides, sample_slide, tmp_path):
    out = tmp_path / "thumb.png"
    result = run("preview", slides["zarr"], "--out", out, "--size", "128")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (99, 128)  # 777 x 1000 scaled to 128
    assert_clean_error(run("preview", slides["tiff"], "--out", out), "--overwrite")
    assert run("preview", sample_slide, "--out", out, "--overwrite", "--size", "64").exit_code == 0
    assert max(Image.open(out).size) == 64
    assert_clean_error(run("preview", tmp_path / "missing.svs", "--out", tmp_path / "t.png"), "does not exist")
    assert_clean_error(run("preview", slides["tiff"], "--out", tmp_path / "t.xyz"), ".png")
    assert_clean_error(run("preview", slides["tiff"], "--out", tmp_path / "t.png", "--size", "0"), "positive")
    (tmp_path / "notes.txt").write_text("hello")
    assert_clean_error(run("preview", tmp_path / "notes.txt", "--out", tmp_path / "t.png"), "cannot read")


def test_cli_info_ome_zarr(slides):
    result = run("info", slides["zarr"])
    assert result.exit_code == 0, result.output
    assert "OME-Zarr" in result.output and "levels: 3" in result.output


def _info_takes_slide_files_for_models() -> bool:
    """cli/info.py asks checkpoint.is_model_path first, which (at the time of writing) accepts
    any existing file as a training checkpoint, so `info FILE` torch.loads slides."""
    try:
        from conftest import SAMPLE_SLIDE

        from nca_tiles.diffusion.checkpoint import is_model_path

        return bool(is_model_path(SAMPLE_SLIDE))
    except Exception:
        return False


@pytest.mark.xfail(
    _info_takes_slide_files_for_models(),
    reason="nca_tiles.diffusion.checkpoint.is_model_path treats every file as a checkpoint (bug outside export)",
    strict=True,
)
def test_cli_info_files(slides, sample_slide):
    result = run("info", slides["tiff"])
    assert result.exit_code == 0, result.output
    assert "OME-TIFF" in result.output and "SubIFD pyramid" in result.output
    result = run("info", sample_slide)
    assert result.exit_code == 0, result.output
    assert "aperio" in result.output


def test_info_and_preview_of_every_format_the_reader_reads(tmp_path):
    """info and preview go through the one reader: a PNG reads too, and a 72 dpi TIFF has no µm/px
    for info as for extract-patches."""
    from helpers import write_plain_tiff

    image = smooth_image(120, 90)
    Image.fromarray(image).save(tmp_path / "flat.png")
    text = describe_slide(tmp_path / "flat.png")
    assert "format: PNG (read with Pillow)" in text and "level 0: 90 x 120 px" in text and "pixel size: unknown" in text
    assert make_thumbnail(tmp_path / "flat.png", 60).size == (45, 60)
    write_plain_tiff(tmp_path / "dpi72.tif", image, 25400 / 72, unit="INCH")
    assert "pixel size: unknown" in describe_slide(tmp_path / "dpi72.tif")
