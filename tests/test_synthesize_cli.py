"""``nca-tiles synthesize`` at the CLI: refused input, --dry-run, work dirs, export, OME-Zarr."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from nca_tiles.diffusion.checkpoint import DEFAULT_MODEL_DIR
from helpers import assert_ok, assert_one_line_error, run_cli, save_test_model

W, H = 70, 52  # not multiples of the chunk


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("model"))


def synth(model: Path, out: Path, *args):
    return run_cli("synthesize", "--model", model, "--width", W, "--height", H, "--out", out, "--chunk", 32,
                   "--steps", 2, "--device", "cpu", "--compression", "deflate", "--tile", 32, "--no-progress", *args)


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- refused input ------------------------------------------------------------------------------
@pytest.mark.parametrize("args,fragments", [
    (["--width", 0], ["--width", "positive"]),
    (["--height", -5], ["--height", "positive"]),
    (["--chunk", 5], ["--chunk 5", "halo"]),  # tiny model: halo 3, so chunks must be ≥ 6
    (["--workers", 2, "--scheduler", "tcp://127.0.0.1:1"], ["--workers", "--scheduler"]),
    (["--compression", "lzma9"], ["compression", "lzma9"]),
    (["--tile", 100], ["tile", "multiple of 16"]),
    (["--batch", 0], ["--batch"]),
    (["--eta", -1], ["--eta"]),
    (["--eta", "nan"], ["--eta"]),  # would silently write a NaN (black) slide
    # Absurd numbers are refused up front, not deep inside a run (or a hang building the chunk grid).
    (["--width", 10**15], ["--width", "between 2 and 1,000,000"]),
    (["--steps", 10**20], ["--steps", "between 1 and 300"]),
    (["--seed", -1], ["--seed", "4,294,967,295"]),
    (["--seed", 2**40], ["--seed"]),
    (["--chunk", 10**6], ["--chunk", "16,384"]),
    (["--chunk", 131], ["--chunk 131", "divisor"]),  # a prime: 1 px inner chunks
    (["--width", 1_000_000, "--chunk", 6], ["chunks", "use a larger --chunk"]),
    (["--batch", 10**6], ["--batch"]),
    (["--workers", 10**6], ["--workers"]),
    (["--tile", 2**20], ["tile", "8192"]),
    (["--device", "cpu", "--precision", "bf16"], ["bf16 on a CPU", "--precision fp32"]),  # had run silently as fp32
])
def test_refused_arguments(model, tmp_path, args, fragments):
    out = tmp_path / "slide.ome.tif"
    assert_one_line_error(synth(model, out, *args), *fragments)
    assert entries(tmp_path) == set()  # neither the output nor a work dir


def test_non_number_is_a_usage_error(model, tmp_path):
    result = run_cli("synthesize", "--model", model, "--width", "abc", "--height", 10, "--out", tmp_path / "s.ome.tif")
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "'abc' is not a valid integer" in result.output


def test_not_enough_disk(model, tmp_path):
    out = tmp_path / "huge.ome.tif"
    result = run_cli("synthesize", "--model", model, "--width", 400_000, "--height", 400_000, "--out", out,
                     "--device", "cpu", "--no-progress")
    assert_one_line_error(result, "not enough free disk", "--work-dir")
    assert entries(tmp_path) == set()


def test_missing_model(tmp_path):
    assert_one_line_error(synth(tmp_path / "nope", tmp_path / "s.ome.tif"), "nope", "does not exist")


def test_corrupt_weights(model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model / "config.json").read_text())
    (broken / "weights.pt").write_bytes(b"garbage, not a torch file" * 10)
    assert_one_line_error(synth(broken, tmp_path / "s.ome.tif"), "weights.pt", "corrupt")
    assert not (tmp_path / "s.ome.tif").exists()


def test_model_of_a_newer_format(model, tmp_path):
    newer = tmp_path / "newer"
    newer.mkdir()
    config = json.loads((model / "config.json").read_text())
    config["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    (newer / "weights.pt").write_bytes((model / "weights.pt").read_bytes())
    assert_one_line_error(synth(newer, tmp_path / "s.ome.tif"), "format version 99", "upgrade nca-tiles")
    assert_one_line_error(run_cli("info", newer), "format version 99")


def test_existing_output_needs_overwrite(model, tmp_path):
    out = tmp_path / "s.ome.tif"
    out.write_bytes(b"keep me")
    assert_one_line_error(synth(model, out), "exists", "--overwrite")
    assert out.read_bytes() == b"keep me"


# -- dry run ----------------------------------------------------------------------------------
def test_dry_run_of_a_gigapixel_slide(tmp_path):
    import shutil

    # The bundled model (scale-space, levels at 1/4 and 1/1 or more); its calibration's time is
    # benchmarks/bench_dry_run.py's business, not a test's.
    out = tmp_path / "big.ome.tif"
    result = run_cli("synthesize", "--model", DEFAULT_MODEL_DIR, "--width", 100_000, "--height", 100_000, "--out", out,
                     "--device", "cpu", "--dry-run")
    text = result.output
    assert "100000 × 100000 px" in text
    assert "chunk grid: 98 × 98 = 9,604 chunks of 1024 px" in text
    for fragment in ("halo overhead", "disk for the canvas", "GiB", "host memory", "time (estimate", "pre-flight:",
                     f"file system of {tmp_path}: the canvas ", "the output (estimate, jpeg)", "the export's scratch"):
        assert fragment in text, fragment
    # 100 000² px need ~273 GiB here: the dry run says whether this machine's disk would refuse it.
    if shutil.disk_usage(tmp_path).free < 270 * 2**30:
        assert_one_line_error(result, "the job would be refused", "not enough free disk")
        assert "would refuse the job: not enough free disk" in text
    else:
        assert_ok(result)
        assert "the job would run" in text
    assert entries(tmp_path) == set()  # no canvas, no work dir, no output


# -- work dirs, export, formats ----------------------------------------------------------------
def test_run_without_keep_canvas_leaves_no_work_dir(model, tmp_path):
    out = tmp_path / "s.ome.tif"
    result = synth(model, out)
    assert_ok(result)
    assert result.output == f"wrote {out}\n"  # --no-progress: no bars
    assert entries(tmp_path) == {"s.ome.tif"}
    image = tifffile.imread(out, level=0)
    assert image.shape == (H, W, 3) and image.std() > 5


def test_dry_run_counts_the_compiles_memory_where_it_compiles(model, tmp_path):
    """torch.compile's first compile adds ~180–220 MiB to a process, whatever the canvas: the host
    memory the dry run prints includes it under --compile, and leaves it out where the run stays
    eager (--no-compile, and --compile auto on a CPU)."""
    from nca_tiles.diffusion import compiled

    def host_line(*args) -> str:
        compiled.reset()  # nothing compiled in this process yet, as in a fresh `nca-tiles synthesize`
        result = synth(model, tmp_path / "x.ome.tif", "--dry-run", *args)
        assert_ok(result)
        (line,) = [line for line in result.output.splitlines() if line.startswith("host memory")]
        return line

    assert "of which torch.compile's 256.0 MiB once" in host_line("--compile")
    assert "compile" not in host_line("--no-compile")
    assert "compile" not in host_line()
    assert entries(tmp_path) == set()


@pytest.fixture(scope="module")
def kept(model, tmp_path_factory) -> tuple[Path, Path]:
    """A finished synthesis with --keep-canvas in a given --work-dir, seed 5."""
    root = tmp_path_factory.mktemp("kept")
    out, work = root / "s.ome.tif", root / "work"
    assert_ok(synth(model, out, "--seed", 5, "--work-dir", work, "--keep-canvas"))
    return out, work


def test_keep_canvas_then_export_gives_the_same_pixels(kept, tmp_path):
    out, work = kept
    assert {"rgb", "x0", "x1"} <= entries(work / "canvas.zarr")
    assert json.loads((work / "manifest.json").read_text())["finished"] is True
    rgb = zarr.open_array(work / "canvas.zarr" / "rgb", mode="r")[:]
    synthesized = tifffile.imread(out, level=0)
    assert np.array_equal(rgb, synthesized)

    again = tmp_path / "again.ome.tif"
    result = run_cli("export", work, "--out", again, "--compression", "deflate", "--tile", 32)
    assert_ok(result)
    assert np.array_equal(tifffile.imread(again, level=0), synthesized)


def test_rerun_of_a_finished_job_is_a_no_op(kept, model):
    out, work = kept
    before = (out.read_bytes(), (work / "manifest.json").read_text())
    assert_ok(synth(model, out, "--seed", 5, "--work-dir", work, "--keep-canvas"))  # its own output: no --overwrite
    assert (out.read_bytes(), (work / "manifest.json").read_text()) == before


def test_work_dir_of_another_job_is_refused(kept, model, tmp_path):
    _, work = kept
    manifest = (work / "manifest.json").read_text()
    out = tmp_path / "other.ome.tif"
    assert_one_line_error(synth(model, out, "--seed", 6, "--work-dir", work), "different job", "seed", "--work-dir")
    assert not out.exists()
    assert (work / "manifest.json").read_text() == manifest


def test_ome_zarr_end_to_end(kept, model, tmp_path):
    tiff, _ = kept
    out = tmp_path / "s.ome.zarr"
    result = synth(model, out, "--seed", 5, "--format", "ome-zarr")
    assert_ok(result)
    assert result.output == f"wrote {out}\n"  # --no-progress: no bars
    assert entries(tmp_path) == {"s.ome.zarr"}
    group = zarr.open_group(str(out), mode="r")
    (multiscale,) = group.attrs["multiscales"]
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0]  # 1 µm/px model
    level0 = np.asarray(group[multiscale["datasets"][0]["path"]][:])
    assert level0.shape == (3, H, W)
    assert np.array_equal(np.moveaxis(level0, 0, -1), tifffile.imread(tiff, level=0))


def test_output_clashes_are_refused_before_any_work(tmp_path):
    from nca_tiles.diffusion.levels import load_synthesis_model
    from nca_tiles.errors import NcaTilesError
    from nca_tiles.synthesis.slide_job import SlideRequest, check_request

    loaded = load_synthesis_model(save_test_model(tmp_path / "model"), "cpu")  # tiny: halo 3

    (tmp_path / "dir.ome.tif").mkdir()
    clashes = [
        SlideRequest(width=64, height=64, out=tmp_path / "dir.ome.tif"),
        SlideRequest(width=64, height=64, out=tmp_path / "a.ome.tif", work_dir=tmp_path / "a.ome.tif"),
        SlideRequest(width=64, height=64, out=tmp_path / "w" / "a.ome.tif", work_dir=tmp_path / "w"),
    ]
    for req in clashes:
        with pytest.raises(NcaTilesError):
            check_request(req, loaded)
    check_request(SlideRequest(width=64, height=64, out=tmp_path / "ok.ome.tif"), loaded)


# -- progress and help ----------------------------------------------------------------------------
def test_progress_shows_sweep_percentage_eta_and_the_total_time(model, tmp_path):
    out = tmp_path / "s.ome.tif"
    result = run_cli("synthesize", "--model", model, "--width", W, "--height", H, "--out", out, "--chunk", 32,
                     "--steps", 2, "--device", "cpu", "--compression", "deflate", "--tile", 32)
    assert_ok(result)
    err = result.stderr
    for fragment in ("sweep 1/3", "sweep 3/3", "100%|", "ETA", f"synthesized {W} × {H} px (3 sweeps) and wrote {out} in "):
        assert fragment in err, (fragment, err)
    assert "px/s" not in err and f"/{3 * W * H / 1e3:.1f}k" not in err  # no pixel × sweep counts, no rate


def test_one_list_of_compressions_for_both_commands():
    from nca_tiles.export.ometiff import COMPRESSIONS
    from nca_tiles_cli.export import COMPRESSION_NAMES

    assert COMPRESSION_NAMES == tuple(COMPRESSIONS)
    for command in ("synthesize", "export"):
        text = " ".join(run_cli(command, "--help").output.split())
        assert ", ".join(COMPRESSION_NAMES) in text, (command, text)


# -- bundled models by name -------------------------------------------------------------------
def test_a_bundled_model_is_chosen_by_name_and_a_folder_of_that_name_wins(tmp_path, monkeypatch):
    import shutil

    from nca_tiles.diffusion.checkpoint import BUNDLED_MODELS_DIR, bundled_model_names

    assert bundled_model_names() == ["default", "fast"]
    monkeypatch.chdir(tmp_path)  # no folder called "fast" here, yet

    def slide(name, *model):
        out = tmp_path / f"{name}.ome.tif"
        assert_ok(run_cli("synthesize", *model, "--width", 48, "--height", 48, "--chunk", 48, "--steps", 3,
                          "--out", out))
        return tifffile.imread(out, level=0)

    fast = slide("fast-by-name", "--model", "fast")
    np.testing.assert_array_equal(fast, slide("fast-by-path", "--model", BUNDLED_MODELS_DIR / "fast"))
    default = slide("default")
    np.testing.assert_array_equal(default, slide("default-by-name", "--model", "default"))
    assert not np.array_equal(fast, default)  # two models, not one under two names

    shutil.copytree(BUNDLED_MODELS_DIR / "default", tmp_path / "fast")  # the user's own folder "fast"
    np.testing.assert_array_equal(default, slide("folder", "--model", "fast"))

    assert_one_line_error(run_cli("synthesize", "--model", "fastest", "--width", 48, "--height", 48,
                                  "--out", tmp_path / "x.ome.tif"), "fastest", "bundled model", "default, fast")


def test_a_job_started_with_a_bundled_model_that_is_not_the_default_says_how_to_resume_it(tmp_path):
    """`default` changed on 2026-12-06: a job started with the model bundled before (now `fast`)
    must not be resumed with the new one, and the refusal names the model that resumes it."""
    work = tmp_path / "job.work"
    args = ("--width", 48, "--height", 48, "--chunk", 48, "--steps", 3, "--work-dir", work, "--keep-canvas",
            "--out", tmp_path / "slide.ome.tif")
    assert_ok(run_cli("synthesize", "--model", "fast", *args))
    assert_one_line_error(run_cli("synthesize", *args), "different job", "model_hash",
                          "bundled model 'fast'", "--model fast")
    assert_ok(run_cli("synthesize", "--model", "fast", *args))  # as it says
