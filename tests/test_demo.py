"""`nca-tiles demo` end to end on the bundled sample slide and model (small settings)."""

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from nca_tiles.demo import chunk_corner_crop
from nca_tiles_cli.demo import demo as demo_command
from nca_tiles_cli.main import cli
from tests.cli_support import assert_one_line_error, run_cli

ARGS = ["--width", "160", "--height", "128", "--chunk", "64", "--steps", "2"]


def test_demo_writes_slide_figure_and_thumbnail(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    slide = tifffile.imread(out / "synthetic.ome.tif", level=0)
    assert slide.shape == (128, 160, 3) and slide.std() > 1
    figure = np.asarray(Image.open(out / "real_vs_synthetic.png"))
    assert figure.shape[1] > 2 * 128 and figure.shape[2] == 3
    assert Image.open(out / "synthetic_thumbnail.png").size == (160, 128)
    assert (out / "patches.zarr").is_dir()
    assert "QuPath" in result.output and not (out / "synthetic.ome.tif.work").exists()

    again = CliRunner().invoke(cli, ["demo", "--out", str(out), *ARGS])
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_chunk_corner_crop_is_centred_on_a_corner():
    image = np.arange(300 * 400 * 3, dtype=np.uint8).reshape(300, 400, 3)
    crop, by, bx = chunk_corner_crop(image, chunk=128, crop=64)
    assert crop.shape == (64, 64, 3)
    assert (by, bx) == (32, 32)
    np.testing.assert_array_equal(crop[by, bx], image[128, 256])


@pytest.mark.parametrize("args, fragments", [
    (["--width", 0], ["--width", "between 2 and 8,192"]),
    (["--height", 10**6], ["--height", "8,192", "nca-tiles synthesize"]),
    (["--chunk", 19], ["--chunk", "between 20 and", "halo of 10 px"]),  # the bundled model's halo is 10
    (["--chunk", 10**6], ["--chunk", "8,192"]),
    (["--steps", 0], ["--steps", "between 1 and 300"]),
    (["--steps", 301], ["--steps", "between 1 and 300"]),
    (["--seed", -1], ["--seed", "between 0 and 4,294,967,295"]),
    (["--seed", 2**32], ["--seed", "between 0 and 4,294,967,295"]),
])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, args, fragments):
    assert_one_line_error(run_cli("demo", "--out", tmp_path / "demo", *ARGS, *args), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_every_option_has_help():
    assert all(param.help for param in demo_command.params), [p.name for p in demo_command.params if not p.help]
    assert "--chunk" in run_cli("demo", "--help").output
