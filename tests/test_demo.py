"""`nca-tiles demo` end to end on the bundled sample slide and model (small settings)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from nca_tiles.demo import DEMO_SIDE, chunk_corner_crop
from nca_tiles_cli.demo import demo as demo_command
from nca_tiles_cli.main import cli
from helpers import assert_one_line_error, run_cli

ARGS = ["--width", "160", "--height", "128", "--chunk", "64", "--steps", "3"]  # a step for each level


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


def test_the_demo_draws_the_slide_synthesize_draws_by_default(tmp_path):
    """The demo is a user's first picture: with no --steps it must take synthesize's default
    (it took 20 DDIM steps, which left the fine level 7, and drew blurrier tissue than any slide)."""
    from nca_tiles.demo import run_demo

    run_demo(tmp_path / "demo", width=160, height=128, chunk=64, progress=False)
    out = tmp_path / "slide.ome.tif"
    result = run_cli("synthesize", "--width", 160, "--height", 128, "--chunk", 64, "--out", out)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "demo" / "synthetic.ome.tif", level=0),
                                  tifffile.imread(out, level=0))
    assert "Default: synthesize's — the steps the model records for each level, else 50 shared" in " ".join(
        run_cli("demo", "--help").output.split())


def test_the_demo_and_a_slide_request_take_the_steps_a_model_records(tmp_path):
    """A model that records its levels' DDIM steps (build-model --steps) is drawn with them by the
    demo and by a SlideRequest without steps, as by synthesize: the demo passed 50 shared, which
    gave the bundled fine level 10 steps instead of its 17."""
    from nca_tiles.demo import run_demo
    from nca_tiles.diffusion.levels import load_synthesis_model, save_scale_space_model
    from nca_tiles.synthesis.job import make_job
    from nca_tiles.synthesis.slide_job import SlideRequest
    from helpers import save_test_model

    dirs = [save_test_model(tmp_path / name, seed=seed, mpp=mpp) for name, seed, mpp in (("c4", 5, 4.0), ("f1", 4, 1.0))]
    model_dir = save_scale_space_model(tmp_path / "m", dirs, [4, 1], [None, 100], steps=[5, 4])
    model = load_synthesis_model(model_dir, "cpu")
    req = SlideRequest(width=160, height=128, out=tmp_path / "x.ome.tif")
    job = make_job(model, req.seed, req.width, req.height, req.chunk, req.sampler, req.steps, req.eta)
    assert [len(level.timesteps) for level in job.levels] == [5, 4]
    lines: list[str] = []
    run_demo(tmp_path / "demo", model=model_dir, width=160, height=128, chunk=64, progress=False, say=lines.append)
    assert any("5 + 4 DDIM steps (coarse to fine)" in line for line in lines), lines
    out = tmp_path / "slide.ome.tif"
    result = run_cli("synthesize", "--model", model_dir, "--width", 160, "--height", 128, "--chunk", 64, "--out", out)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "demo" / "synthetic.ome.tif", level=0),
                                  tifffile.imread(out, level=0))


# kill -9 as soon as the slide has its final name: the window between the rename and the removal
# of the work dir is microseconds wide, so an outside kill cannot be timed into it.
KILL_AFTER_SLIDE = """
import os, signal, sys
slide = os.path.abspath(sys.argv[1])
for name in ("replace", "rename"):
    def wrapped(src, dst, real=getattr(os, name), **kw):
        real(src, dst, **kw)
        if os.path.abspath(dst) == slide:
            os.kill(os.getpid(), signal.SIGKILL)
    setattr(os, name, wrapped)
from nca_tiles_cli.main import cli
cli(sys.argv[2:])
"""


def test_demo_killed_just_after_the_slide_is_in_place_finishes_the_clean_up(tmp_path):
    out = tmp_path / "demo"
    slide = out / "synthetic.ome.tif"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SLIDE, str(slide), "demo", "--out", str(out), *ARGS],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert slide.exists() and (out / "synthetic.ome.tif.work").is_dir()  # the canvas, orphaned
    identity = os.stat(slide).st_ino
    result = run_cli("demo", "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    assert not (out / "synthetic.ome.tif.work").exists()
    assert os.stat(slide).st_ino == identity  # finished, not synthesized again
    assert (out / "real_vs_synthetic.png").exists()


def test_demo_interrupted_after_synthesis_reuses_the_slide(tmp_path):
    from nca_tiles.demo import run_demo

    out = tmp_path / "demo"
    run_demo(out, width=160, height=128, chunk=64, steps=3, progress=False)
    identity = os.stat(out / "synthetic.ome.tif").st_ino
    # As if stopped while drawing the figure: the slide is done and its work dir already gone.
    (out / "real_vs_synthetic.png").unlink()
    (out / "synthetic_thumbnail.png").unlink()
    lines = []
    result = run_demo(out, width=160, height=128, chunk=64, steps=3, progress=False, say=lines.append)
    assert os.stat(result.paths.slide).st_ino == identity
    assert result.paths.figure.exists() and result.paths.thumbnail.exists()
    assert lines[0].startswith("1/4") and lines[-1].startswith("4/4")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["patches.zarr", "synthetic.ome.tif", "real_vs_synthetic.png", "synthetic_thumbnail.png"])


def test_chunk_corner_crop_is_centred_on_a_corner():
    image = np.arange(300 * 400 * 3, dtype=np.uint8).reshape(300, 400, 3)
    crop, by, bx = chunk_corner_crop(image, chunk=128, crop=64)
    assert crop.shape == (64, 64, 3)
    assert (by, bx) == (32, 32)
    np.testing.assert_array_equal(crop[by, bx], image[128, 256])


@pytest.mark.parametrize("args, fragments", [
    (["--width", 0], ["--width", "between 2 and 8,192"]),
    (["--height", 10**6], ["--height", "8,192", "nca-tiles synthesize"]),
    (["--chunk", 39], ["--chunk", "between 40 and", "halo of 20 px"]),  # the bundled model's halo is 20
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


def test_the_command_draws_the_slide_run_demo_draws():
    defaults = {param.name: param.default for param in demo_command.params}
    assert defaults["width"] == defaults["height"] == DEMO_SIDE == 2 * defaults["chunk"]  # a corner at the centre
