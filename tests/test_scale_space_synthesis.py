"""Scale-space synthesis: every invariant of tiled synthesis holds across levels."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from nca_tiles.diffusion.levels import (
    generate_level_patches,
    generate_levels,
    level_timesteps,
    load_synthesis_model,
    save_scale_space_model,
)
from nca_tiles.diffusion.pipeline import generate_region
from nca_tiles.errors import NcaTilesError
from nca_tiles.synthesis.slide_job import SlideRequest, plan_job, synthesize_slide
from helpers import assert_one_line_error, assert_same_image, run_cli, save_test_model, synthesize_test_slide
from helpers import save_test_scale_space_model as scale_space_model

W, H = 150, 230  # not multiples of the chunks, nor of the level factor


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return scale_space_model(tmp_path_factory.mktemp("ss"))


@pytest.fixture(scope="module")
def ddpm_model_dir(tmp_path_factory) -> Path:
    return scale_space_model(tmp_path_factory.mktemp("ss_ddpm"), timesteps=12, t_start=5)


def synthesize(model_dir: Path, out: Path, chunk: int, sampler="ddim", steps=6, **kw) -> np.ndarray:
    return synthesize_test_slide(model_dir, out, W, H, chunk, sampler, steps, **kw)


def test_a_scale_space_model_loads_as_levels(model_dir, tmp_path):
    model = load_synthesis_model(model_dir, "cpu")
    assert [lv.factor for lv in model.levels] == [2, 1] and [lv.t_start for lv in model.levels] == [None, 120]
    assert model.mpp == 1.0 and model.is_scale_space and "1/2" in model.describe()
    single = load_synthesis_model(save_test_model(tmp_path / "single"), "cpu")
    assert [lv.factor for lv in single.levels] == [1] and not single.is_scale_space
    assert single.hash == single.finest.hash  # single-scale jobs keep their identity


def test_steps_are_shared_between_levels(model_dir):
    model = load_synthesis_model(model_dir, "cpu")
    coarse, fine = level_timesteps(model, "ddim", 20)
    assert len(coarse) + len(fine) == 20 and coarse[0] == 299 and fine[0] == 120
    assert len(coarse) == round(20 * 300 / 421) and min(coarse) >= 0 and min(fine) >= 0
    with pytest.raises(NcaTilesError, match="fewer than the model's 2 levels"):
        level_timesteps(model, "ddim", 1)


def test_a_cheap_coarsest_level_takes_at_least_its_minimum_of_steps(tmp_path):
    """A level whose step costs at most CHEAP_STEP_COST of a finest one (16× coarser: 1/256; 4×
    coarser, same width: 1/16) takes at least COARSEST_MIN_STEPS when it is the coarsest, on top of
    --steps (DDIM with few steps drifts to the mean: no background in the layout); a 2× coarser
    level, or a 16× coarser one 42× wider, keeps its share."""
    from nca_tiles.diffusion.levels import COARSEST_MIN_STEPS, step_cost
    from nca_tiles.diffusion.model import PRESETS

    far = load_synthesis_model(scale_space_model(tmp_path / "f16", factor=16), "cpu")
    coarse, fine = level_timesteps(far, "ddim", 20)
    assert step_cost(far, 0) == 1 / 256 and coarse[0] == 299
    assert len(coarse) == COARSEST_MIN_STEPS and len(fine) == 20 - round(20 * 300 / 421)
    assert len(level_timesteps(far, "ddim", 400)[0]) == round(400 * 300 / 421)  # its share, when larger
    four = load_synthesis_model(scale_space_model(tmp_path / "f4", factor=4), "cpu")
    assert step_cost(four, 0) == 1 / 16 and len(level_timesteps(four, "ddim", 20)[0]) == COARSEST_MIN_STEPS
    two = load_synthesis_model(scale_space_model(tmp_path / "f2", factor=2), "cpu")
    assert step_cost(two, 0) == 1 / 4 and len(level_timesteps(two, "ddim", 20)[0]) == round(20 * 300 / 421)
    wide = save_test_model(tmp_path / "wide", PRESETS["small"], mpp=16.0)
    fine_dir = save_test_model(tmp_path / "fine", mpp=1.0)
    heavy = load_synthesis_model(save_scale_space_model(tmp_path / "heavy", [wide, fine_dir], [16, 1], [None, 120]), "cpu")
    assert step_cost(heavy, 0) > 1 / 16 and len(level_timesteps(heavy, "ddim", 20)[0]) == round(20 * 300 / 421)


def test_a_cheap_relay_level_takes_short_ddim_strides(three_level_dir):
    """The middle level of a 16, 4, 1 model, relay-started at t = 100, is cheap too: steps at most
    RELAY_MAX_STRIDE apart (26 of its 101 timesteps), where its share of --steps 30 would be 5
    (stride 20: a smoother image, fewer nuclei); the coarsest takes its 50, the finest its share."""
    from nca_tiles.diffusion.levels import COARSEST_MIN_STEPS, RELAY_MAX_STRIDE

    model = load_synthesis_model(three_level_dir, "cpu")
    layout, coarse, fine = level_timesteps(model, "ddim", 30)
    assert len(layout) == COARSEST_MIN_STEPS and len(fine) == round(30 * 201 / 602)
    assert len(coarse) == 26 and coarse[0] == 100 and max(np.diff([*coarse, -1]) * -1) <= RELAY_MAX_STRIDE
    assert [len(ts) for ts in level_timesteps(model, "ddim", 500)] == [249, 84, 167]  # shares, when larger
    assert [len(ts) for ts in level_timesteps(model, "ddpm", None)] == [300, 101, 201]  # DDPM: every timestep


def test_steps_can_be_given_per_level(model_dir, tmp_path):
    """``--steps 5,3``: each level's DDIM steps as given, coarse to fine; a tiled slide drawn so is
    the in-memory canvas drawn so; wrong counts are one-line errors."""
    model = load_synthesis_model(model_dir, "cpu")
    coarse, fine = level_timesteps(model, "ddim", (5, 3))
    assert coarse == [299, 239, 179, 119, 59] and fine == [120, 80, 39]
    for bad, words in [((5,), "1 step counts for a model of 2 level(s)"), ((5, 3, 2), "3 step counts"),
                       ((0, 3), "level 0 (1/2) takes 1 to 300"), ((5, 122), "level 1 (1/1) takes 1 to 121")]:
        with pytest.raises(NcaTilesError, match=rf"{words.replace('(', '[(]').replace(')', '[)]')}"):
            level_timesteps(model, "ddim", bad)
    with pytest.raises(NcaTilesError, match="ddpm always takes every timestep"):
        level_timesteps(model, "ddpm", (5, 3))

    tiled = synthesize(model_dir, tmp_path / "tiled.ome.tif", chunk=64, steps=(5, 3))
    assert_same_image(tiled, generate_levels(model, H, W, seed=7, steps=(5, 3)))
    assert not np.array_equal(tiled, synthesize(model_dir, tmp_path / "shared.ome.tif", chunk=64, steps=8))
    out = tmp_path / "cli.ome.tif"
    assert_one_line_error(run_cli("synthesize", "--model", model_dir, "--width", 64, "--height", 64, "--out", out,
                                  "--steps", "5,3,2"), "--steps gives 3 step counts for a model of 2 level(s)")
    assert not out.exists()
    bad = run_cli("synthesize", "--model", model_dir, "--width", 64, "--height", 64, "--out", out, "--steps", "5,x")
    assert bad.exit_code == 2 and "comma-separated list" in bad.output and not out.exists()
    single = load_synthesis_model(save_test_model(tmp_path / "single"), "cpu")  # one level: one count
    np.testing.assert_array_equal(generate_level_patches(single, 2, 16, steps=(4,)), generate_level_patches(single, 2, 16, steps=4))


@pytest.fixture(scope="module")
def three_level_dir(tmp_path_factory) -> Path:
    """Layout 1/16, a relay-started 1/4 level (cheap: stochastic by default), fine 1/1."""
    root = tmp_path_factory.mktemp("three")
    dirs = [save_test_model(root / name, seed=seed, mpp=mpp)
            for name, seed, mpp in (("c16", 3, 16.0), ("c4", 5, 4.0), ("f1", 4, 1.0))]
    return save_scale_space_model(root / "m", dirs, [16, 4, 1], [None, 100, 200])


def test_a_cheap_relay_level_is_stochastic_by_default(three_level_dir, model_dir, tmp_path):
    from nca_tiles.diffusion.levels import FINEST_ETA, RELAY_ETA, level_etas

    three = load_synthesis_model(three_level_dir, "cpu")
    assert level_etas(three, None) == [0.0, RELAY_ETA, FINEST_ETA] and 0 < FINEST_ETA < RELAY_ETA
    assert level_etas(three, 0.5) == [0.5] * 3 and level_etas(three, (0, 0.25, 1)) == [0.0, 0.25, 1.0]
    assert level_etas(load_synthesis_model(model_dir, "cpu"), None) == [0.0, FINEST_ETA]  # 2× coarser: not cheap
    # A single-scale model stays deterministic: its slides are what they always were.
    assert level_etas(load_synthesis_model(save_test_model(tmp_path / "single"), "cpu"), None) == [0.0]
    for bad, words in [((0, 1), "2 values for a model of 3 level"), ((0, 1.5, 0), "between 0"),
                       (float("nan"), "between 0"), (-0.1, "between 0")]:
        with pytest.raises(NcaTilesError, match=words):
            level_etas(three, bad)


@pytest.mark.parametrize("eta", [None, (0.0, 0.5, 1.0)])
def test_stochastic_levels_tile_exactly(three_level_dir, tmp_path, eta):
    """Per-level η draws its noise from counters keyed by level and global position: tiled equals
    whole equals in memory, and the noise is really drawn (η = 0 everywhere gives another image)."""
    model = load_synthesis_model(three_level_dir, "cpu")
    steps = (4, 3, 3)
    whole = synthesize(three_level_dir, tmp_path / "whole.ome.tif", chunk=max(W, H), steps=steps, eta=eta)
    assert_same_image(generate_levels(model, H, W, seed=7, steps=steps, eta=eta), whole)
    for chunk in (32, 64):
        assert_same_image(synthesize(three_level_dir, tmp_path / f"t{chunk}.ome.tif", chunk=chunk, steps=steps, eta=eta),
                          whole)
    deterministic = generate_levels(model, H, W, seed=7, steps=steps, eta=0.0)
    assert np.abs(deterministic.astype(int) - whole.astype(int)).max() > 10


def test_a_job_manifest_from_before_per_level_eta_reads_as_one_eta_for_all(three_level_dir):
    from nca_tiles.synthesis.job import Job, make_job

    model = load_synthesis_model(three_level_dir, "cpu")
    job = make_job(model, 7, W, H, 64, "ddim", (4, 3, 3), 0.3)
    old = job.to_dict()
    for level in old["levels"]:
        del level["eta"]
    old["eta"] = 0.3
    assert Job.from_dict(old) == job and Job.from_dict(job.to_dict()) == job
    assert [lv.eta for lv in make_job(model, 7, W, H, 64, "ddim", (4, 3, 3)).levels] == [0.0, 1.0, 0.3]


def test_eta_per_level_on_the_command_line(three_level_dir, tmp_path):
    out = tmp_path / "s.ome.tif"
    args = ["synthesize", "--model", three_level_dir, "--width", 64, "--height", 64, "--out", out, "--steps", "3,2,2"]
    assert_one_line_error(run_cli(*args, "--eta", "0,1"), "--eta gives 2 values for a model of 3 level(s)")
    assert_one_line_error(run_cli(*args, "--eta", "0,2,0"), "--eta must be between 0")
    bad = run_cli(*args, "--eta", "0,x,0")
    assert bad.exit_code == 2 and "comma-separated list" in bad.output and not out.exists()
    assert run_cli(*args, "--eta", "0,0.5,0").exit_code == 0
    from nca_tiles.wsi.slide import open_slide

    with open_slide(out) as slide:  # the slide records each level's η
        assert slide.metadata.generator["eta"] == [0.0, 0.5, 0.0]


def test_a_model_records_its_levels_eta_and_synthesizes_with_it(three_level_dir, tmp_path):
    """build-model --eta writes each level's η into the model (format 3): synthesis uses it unless
    --eta says otherwise, and it is part of the model's hash, since it changes the pixels. A model
    without one keeps format 2, its hash and its defaults."""
    from click.testing import CliRunner

    from nca_tiles.diffusion.levels import level_etas
    from nca_tiles_cli.main import cli

    config = json.loads((three_level_dir / "config.json").read_text())
    assert config["format_version"] == 2 and all("eta" not in level for level in config["levels"])
    levels = [str(three_level_dir / level["path"]) for level in config["levels"]]
    result = CliRunner().invoke(cli, ["build-model", *(a for path in levels for a in ("--level", path)), "--t-start", "100",
                                      "--t-start", "200", "--eta", "0,0.5,0.25", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0 and "1/4 from t=100 (η 0.5)" in result.output, result.output
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["format_version"] == 3 and [level["eta"] for level in saved["levels"]] == [0.0, 0.5, 0.25]
    recorded, plain = load_synthesis_model(tmp_path / "m", "cpu"), load_synthesis_model(three_level_dir, "cpu")
    assert level_etas(recorded, None) == [0.0, 0.5, 0.25] and level_etas(recorded, 1.0) == [1.0] * 3
    assert recorded.hash != plain.hash and [lv.eta for lv in plain.levels] == [None] * 3
    steps = (4, 3, 3)
    np.testing.assert_array_equal(generate_levels(recorded, H, W, seed=7, steps=steps),
                                  generate_levels(plain, H, W, seed=7, steps=steps, eta=(0.0, 0.5, 0.25)))
    assert_same_image(synthesize(tmp_path / "m", tmp_path / "s.ome.tif", chunk=32, steps=steps),
                      generate_levels(plain, H, W, seed=7, steps=steps, eta=(0.0, 0.5, 0.25)))
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "m")])
    assert info.exit_code == 0 and "re-noised to t = 100, DDIM η 0.5" in info.output, info.output
    for eta, message in [("0,1", "--eta gives 2 values for a model of 3 level(s)"), ("0,2,0", "between 0 (deterministic")]:
        result = CliRunner().invoke(cli, ["build-model", *(a for path in levels for a in ("--level", path)),
                                          "--t-start", "100", "--t-start", "200", "--eta", eta, "--out", str(tmp_path / "x")])
        assert result.exit_code != 0 and message in result.output and result.output.count("\n") == 1, result.output
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("version,eta", [(2, 0.5), (3, 1.5), (3, "0.5"), (3, True)])
def test_a_recorded_eta_must_be_a_number_in_a_format_3_model(three_level_dir, tmp_path, version, eta):
    import shutil

    copy = shutil.copytree(three_level_dir, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["format_version"], config["levels"][1]["eta"] = version, eta
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(NcaTilesError, match="level 1 'eta' must be a DDIM η between 0 and 1 in a format 3 model"):
        load_synthesis_model(copy, "cpu")


def test_a_model_records_its_levels_steps_and_synthesizes_with_them(three_level_dir, tmp_path):
    """build-model --steps writes each level's DDIM steps into the model (format 4): synthesis,
    tiled as whole, takes them unless --steps says otherwise, and they are part of the model's hash,
    since they change the pixels. A model without them keeps its format, hash and shared steps."""
    from click.testing import CliRunner

    from nca_tiles.diffusion.levels import level_timesteps
    from nca_tiles_cli.main import cli

    levels = [str(three_level_dir / level["path"])
              for level in json.loads((three_level_dir / "config.json").read_text())["levels"]]
    build = ["build-model", *(a for path in levels for a in ("--level", path)), "--t-start", "100", "--t-start", "200"]
    result = CliRunner().invoke(cli, [*build, "--steps", "4,3,5", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0 and "1/1 from t=200 (5 steps)" in result.output, result.output
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["format_version"] == 4 and [level["steps"] for level in saved["levels"]] == [4, 3, 5]
    recorded, plain = load_synthesis_model(tmp_path / "m", "cpu"), load_synthesis_model(three_level_dir, "cpu")
    assert recorded.hash != plain.hash and plain.recorded_steps is None
    assert [len(ts) for ts in level_timesteps(recorded, "ddim", None)] == [4, 3, 5]
    assert level_timesteps(recorded, "ddim", 60) == level_timesteps(plain, "ddim", 60)  # --steps N: shared as before
    assert level_timesteps(recorded, "ddpm", None) == level_timesteps(plain, "ddpm", None)  # ddpm takes them all
    as_recorded = generate_levels(plain, H, W, seed=7, steps=(4, 3, 5))
    np.testing.assert_array_equal(generate_levels(recorded, H, W, seed=7), as_recorded)
    assert_same_image(synthesize(tmp_path / "m", tmp_path / "s.ome.tif", chunk=32, steps=None), as_recorded)
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "m")])
    assert info.exit_code == 0 and "re-noised to t = 200, 5 DDIM steps" in info.output, info.output
    for steps, message in [("4,3", "give one number per level (3), coarse to fine"), ("12", "one number per level"),
                           ("4,3,202", "level 2 covers 201 timesteps, so it takes 1 to 201 DDIM steps, got 202"),
                           ("0,3,5", "level 0 covers 300 timesteps")]:
        result = CliRunner().invoke(cli, [*build, "--steps", steps, "--out", str(tmp_path / "x")])
        assert result.exit_code != 0 and message in result.output and result.output.count("\n") == 1, result.output
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("version,steps,message", [
    (3, [50, 26, 17], "level 0 'steps' must be a positive number of DDIM steps in a format 4 model"),
    (4, [50, 0, 17], "level 1 'steps' must be a positive number"),
    (4, [50, 26, True], "level 2 'steps' must be a positive number"),
    (4, [50, 26, None], "every level or none must record its 'steps'"),
    (4, [50, 102, 17], "level 1 records 102 DDIM steps, more than the 101 timesteps it covers"),
])
def test_recorded_steps_must_be_counts_each_level_can_take(three_level_dir, tmp_path, version, steps, message):
    import shutil

    copy = shutil.copytree(three_level_dir, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["format_version"] = version
    for level, n in zip(config["levels"], steps):
        if n is not None:
            level["steps"] = n
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(NcaTilesError, match=re.escape(message)):
        load_synthesis_model(copy, "cpu")


def test_single_scale_levels_are_the_old_sampler(tmp_path):
    model = load_synthesis_model(save_test_model(tmp_path / "m"), "cpu")
    np.testing.assert_array_equal(generate_levels(model, 40, 30, seed=5, steps=3),
                                  generate_region(model.finest, 40, 30, seed=5, steps=3))


@pytest.mark.parametrize("sampler,steps", [("ddim", 6), ("ddpm", None)])
def test_tiled_equals_whole_across_levels(model_dir, ddpm_model_dir, tmp_path, sampler, steps):
    model = model_dir if sampler == "ddim" else ddpm_model_dir
    whole = synthesize(model, tmp_path / "whole.ome.tif", chunk=max(W, H), sampler=sampler, steps=steps)
    assert whole.std() > 5
    in_memory = generate_levels(load_synthesis_model(model, "cpu"), H, W, seed=7, steps=steps, sampler=sampler)
    assert_same_image(in_memory, whole)
    for chunk in (32, 48, 100):
        tiled = synthesize(model, tmp_path / f"tiled{chunk}.ome.tif", chunk=chunk, sampler=sampler, steps=steps)
        assert_same_image(tiled, whole)


def test_a_coarsest_level_with_its_own_schedule_tiles_exactly(tmp_path):
    """A cosine coarsest level (it starts from pure noise) under a linear finer one: each level
    samples with its own schedule, and tiled still equals whole."""
    model_dir = scale_space_model(tmp_path / "m", coarse_schedule="cosine")
    model = load_synthesis_model(model_dir, "cpu")
    assert [lv.pipeline.schedule.config.beta_schedule for lv in model.levels] == ["cosine", "linear"]
    whole = synthesize(model_dir, tmp_path / "whole.ome.tif", chunk=max(W, H))
    assert_same_image(generate_levels(model, H, W, seed=7, steps=6), whole)
    assert_same_image(synthesize(model_dir, tmp_path / "tiled.ome.tif", chunk=48), whole)
    linear = generate_levels(load_synthesis_model(scale_space_model(tmp_path / "lin"), "cpu"), H, W, seed=7, steps=6)
    assert abs(linear.astype(int) - whole.astype(int)).max() > 10  # the schedule is used, not ignored


def test_levels_of_different_architectures_tile_exactly(tmp_path):
    """A wider coarse rule with a longer reach (a `medium` layout level over a `small` fine one, in
    miniature): each level's halo is its own rule's, and tiled still equals whole."""
    from nca_tiles.diffusion.model import ModelConfig

    wide = ModelConfig(channels=12, hidden=24, nca_steps=5, embedding_hidden=16, encoding_dim=8)
    coarse = save_test_model(tmp_path / "coarse", config=wide, seed=3, mpp=2.0)
    fine = save_test_model(tmp_path / "fine", seed=4, mpp=1.0)
    model_dir = save_scale_space_model(tmp_path / "m", [coarse, fine], [2, 1], [None, 120])
    model = load_synthesis_model(model_dir, "cpu")
    assert [lv.pipeline.halo for lv in model.levels] == [5, 3]
    whole = synthesize(model_dir, tmp_path / "whole.ome.tif", chunk=max(W, H))
    assert whole.std() > 5
    assert_same_image(generate_levels(model, H, W, seed=7, steps=6), whole)
    for chunk in (32, 48):
        assert_same_image(synthesize(model_dir, tmp_path / f"tiled{chunk}.ome.tif", chunk=chunk), whole)


@pytest.mark.parametrize("name", ["default", "fast"])
def test_the_bundled_models_tile_exactly(name, tmp_path):
    """The bundled models as shipped: `default`'s finest level has the longest reach (halo 20 over
    the coarser levels' 10), the case the miniature above does not build."""
    model = load_synthesis_model(name, "cpu")
    assert [lv.pipeline.halo for lv in model.levels] == ([10, 10, 20] if name == "default" else [10, 10, 10])
    whole = synthesize(name, tmp_path / "whole.ome.tif", chunk=max(W, H), steps=3)
    assert whole.std() > 5
    for chunk in (40, 64):
        assert_same_image(synthesize(name, tmp_path / f"tiled{chunk}.ome.tif", chunk=chunk, steps=3), whole)


def test_each_level_tiled_equals_whole(model_dir, tmp_path):
    """The coarse level's result (kept with the canvas) is the same whatever the chunking."""
    levels = {}
    for chunk in (32, 230):
        work = tmp_path / f"work{chunk}"
        synthesize(model_dir, tmp_path / f"s{chunk}.ome.tif", chunk=chunk, work_dir=work, keep_canvas=True)
        manifest = json.loads((work / "manifest.json").read_text())
        coarse = manifest["job"]["levels"][0]
        assert (coarse["width"], coarse["height"]) == (75, 115)
        buffer = "x0" if (1 + len(coarse["timesteps"])) % 2 else "x1"  # written by the level's last sweep
        levels[chunk] = zarr.open_array(work / "canvas.zarr" / "level0" / buffer, mode="r")[:]
    np.testing.assert_allclose(levels[32], levels[230], atol=1e-5)
    assert levels[32].std() > 0.05


def test_scale_space_changes_the_picture(model_dir, tmp_path):
    """The coarse level matters: the fine level alone from the same seed draws another slide."""
    model = load_synthesis_model(model_dir, "cpu")
    both = generate_levels(model, 64, 64, seed=1, steps=6)
    fine_only = generate_region(model.finest, 64, 64, seed=1, steps=6)
    assert np.abs(both.astype(int) - fine_only.astype(int)).mean() > 5


def test_dask_cluster_equals_in_process_across_levels(model_dir, tmp_path):
    in_process = synthesize(model_dir, tmp_path / "local.ome.tif", chunk=64)
    distributed = synthesize(model_dir, tmp_path / "dask.ome.tif", chunk=64, workers=2)
    assert_same_image(distributed, in_process)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nca_tiles_cli.main", "synthesize", *args]


@pytest.mark.parametrize("kill_after_sweeps", [2, 6])  # in the coarse level (4 sweeps), in the fine one
def test_kill_9_at_any_level_then_rerun_resumes_to_the_same_slide(model_dir, tmp_path, kill_after_sweeps):
    args = ["--model", str(model_dir), "--width", "128", "--height", "96", "--chunk", "32", "--steps", "10",
            "--seed", "3", "--compression", "none", "--tile", "64", "--no-progress"]
    work, out = tmp_path / "work", tmp_path / "resumed.ome.tif"
    proc = subprocess.Popen(cli(*args, "--out", str(out), "--work-dir", str(work)))
    manifest = work / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["sweeps_done"] >= kill_after_sweeps:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    coarse_sweeps = 1 + len(state["job"]["levels"][0]["timesteps"])
    done = state["sweeps_done"]
    assert (done < coarse_sweeps) == (kill_after_sweeps < coarse_sweeps) and not out.exists()
    subprocess.run(cli(*args, "--out", str(out), "--work-dir", str(work)), check=True)
    straight = tmp_path / "straight.ome.tif"
    subprocess.run(cli(*args, "--out", str(straight)), check=True)
    assert np.array_equal(tifffile.imread(out, level=0), tifffile.imread(straight, level=0))


def test_dry_run_shows_each_level_and_the_flop_saving(tmp_path):
    model = load_synthesis_model(scale_space_model(tmp_path, factor=4, t_start=99), "cpu")
    req = SlideRequest(width=4096, height=4096, out=tmp_path / "big.ome.tif", chunk=1024, steps=50)
    text, problems = plan_job(req, model, calibrate=False)
    assert "level 0 (1/4): 1024 × 1024 cells of 4 µm" in text and "level 1 (1/1): 4096 × 4096 cells" in text
    # --steps 50 shared 38 + 12; the cheap 4× coarser (and coarsest) level takes COARSEST_MIN_STEPS.
    ratio = float(text.split("single-scale sampling at the same 62 steps: ")[1].split()[0])
    assert ratio <= 0.5  # at least 2× fewer FLOPs per output pixel
    assert not problems


def write_config(folder: Path, levels: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"format_version": 2, "kind": "scale-space", "levels": levels}))
    return folder


@pytest.mark.parametrize("levels,message", [
    ([{"path": "a", "factor": 3}, {"path": "b", "factor": 1, "t_start": 9}], "power of two"),
    ([{"path": "a", "factor": 1}, {"path": "b", "factor": 2, "t_start": 9}], "coarse to fine"),
    ([{"path": "a", "factor": 2}, {"path": "b", "factor": 1}], "'t_start' must be a timestep"),
    ([{"path": "a", "factor": 2, "t_start": 5}, {"path": "b", "factor": 1, "t_start": 9}], "must be absent"),
    ([{"path": "a", "factor": 4}, {"path": "b", "factor": 2, "t_start": 9}], "finest"),
    ([], "non-empty"),
])
def test_bad_scale_space_configs_are_refused(tmp_path, levels, message):
    with pytest.raises(NcaTilesError, match=message):
        load_synthesis_model(write_config(tmp_path / "m", levels), "cpu")


def test_levels_must_be_trained_at_their_resolution(tmp_path):
    coarse = save_test_model(tmp_path / "coarse", mpp=1.0)  # should be 2 µm/px for factor 2
    fine = save_test_model(tmp_path / "fine", mpp=1.0)
    with pytest.raises(NcaTilesError, match="needs 2 µm/px"):
        save_scale_space_model(tmp_path / "m", [coarse, fine], [2, 1], [None, 50])
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_a_newer_scale_space_format_is_refused(model_dir, tmp_path):
    import shutil

    copy = shutil.copytree(model_dir, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(NcaTilesError, match="upgrade nca-tiles"):
        load_synthesis_model(copy, "cpu")


def test_build_model_cli_and_info(tmp_path, sample_slide):
    from click.testing import CliRunner

    from nca_tiles.training.patches import extract_patches
    from nca_tiles_cli.main import cli

    coarse = save_test_model(tmp_path / "coarse", seed=3, mpp=4.0)
    fine = save_test_model(tmp_path / "fine", seed=4, mpp=1.0)
    run = CliRunner().invoke
    result = run(cli, ["build-model", "--level", str(coarse), "--level", str(fine), "--t-start", "80",
                       "--out", str(tmp_path / "given")])
    assert result.exit_code == 0 and "scale space: 1/4, 1/1 from t=80" in result.output, result.output
    info = run(cli, ["info", str(tmp_path / "given")])
    assert info.exit_code == 0 and "level 0: factor 4 (4 µm/px)" in info.output and "re-noised to t = 80" in info.output
    # t_start measured on real patches at the fine level's µm/px: between the first steps and the middle
    extract_patches([sample_slide], tmp_path / "p.zarr", target_mpp=1.0, max_per_slide=64)
    result = run(cli, ["build-model", "--level", str(coarse), "--level", str(fine), "--patches",
                       str(tmp_path / "p.zarr"), "--out", str(tmp_path / "measured")])
    assert result.exit_code == 0, result.output
    t_start = load_synthesis_model(tmp_path / "measured", "cpu").levels[1].t_start
    assert 30 <= t_start <= 200
    for args, message in [
        (["--level", str(fine), "--t-start", "5"], "at least two --level"),
        (["--level", str(coarse), "--level", str(fine)], "give --t-start"),
        (["--level", str(coarse), "--level", str(fine), "--t-start", "5", "--t-start", "6"], "one --t-start per level"),
        (["--level", str(save_test_model(tmp_path / "odd", mpp=3.0)), "--level", str(fine), "--t-start", "5"],
         "power of two"),
        (["--level", str(coarse), "--level", str(fine), "--t-start", "5", "--out", str(tmp_path / "given")], "exists"),
    ]:
        out = [] if "--out" in args else ["--out", str(tmp_path / "x")]
        result = run(cli, ["build-model", *args, *out])
        assert result.exit_code != 0 and message in result.output and result.output.count("\n") == 1, result.output


def test_dry_run_beyond_a_day_on_a_cpu_points_to_a_gpu_or_cluster(tmp_path):
    from dataclasses import replace

    from nca_tiles.synthesis.job import make_job
    from nca_tiles.synthesis.plan import describe_plan, make_plan

    model = load_synthesis_model(save_test_model(tmp_path / "m"), "cpu")
    job = make_job(model, 0, 100_000, 100_000, 1024, "ddim", 50)
    plan = make_plan(model, job, 1, calibrate=False)

    def at(seconds_per_mp: float) -> str:
        timed = replace(plan, levels=[replace(level, seconds_per_megapixel_step=seconds_per_mp) for level in plan.levels])
        return describe_plan(timed, model, job, 1, tmp_path)

    slow = at(1.0)  # 1e4 MP × 50 steps: about 6 days
    assert "days" in slow and "--device cuda" in slow and "--workers" in slow
    assert "--device cuda" not in at(1e-4)


def test_evaluate_scores_a_scale_space_model(model_dir, tmp_path, sample_slide):
    from nca_tiles.diffusion.levels import generate_level_patches
    from nca_tiles.evaluation.protocol import evaluate_model
    from nca_tiles.training.patches import extract_patches

    model = load_synthesis_model(model_dir, "cpu")
    patches = generate_level_patches(model, 3, size=32, seed=2, steps=4)
    assert patches.shape == (3, 32, 32, 3)
    assert np.array_equal(patches[1], generate_levels(model, 32, 32, seed=rng_seed(2, 1), steps=4))
    extract_patches([sample_slide], tmp_path / "p.zarr", target_mpp=1.0, max_per_slide=40, patch_size=32)
    results = evaluate_model(model_dir, tmp_path / "p.zarr", split="test", n=8, seed=0, steps=4, sampler="ddim",
                             device="cpu")
    assert set(results["results"]) == {"floor", "synthetic", "ceiling"} and "nuclei_area_um2" in results["results"]["synthetic"]


def rng_seed(seed: int, i: int) -> int:
    from nca_tiles.diffusion.rng import derive_seed

    return derive_seed(seed, i)


def test_public_api_loads_and_generates_either_kind(model_dir, tmp_path):
    """nca_tiles.load_model/generate_region take single- and scale-space models alike (the bundled
    default is a scale-space model)."""
    import nca_tiles
    from nca_tiles.diffusion.pipeline import load_model as load_pipeline

    model = nca_tiles.load_model(model_dir, device="cpu")
    assert model.is_scale_space
    assert np.array_equal(nca_tiles.generate_region(model, 20, 24, seed=3, steps=4),
                          generate_levels(model, 20, 24, seed=3, steps=4))
    pipeline = load_pipeline(save_test_model(tmp_path / "single"), "cpu")
    assert np.array_equal(nca_tiles.generate_region(pipeline, 20, 24, seed=3, steps=4),
                          generate_region(pipeline, 20, 24, seed=3, steps=4))


def test_a_scale_space_model_is_not_a_single_pipeline(model_dir):
    from nca_tiles.diffusion.pipeline import load_model as load_pipeline

    with pytest.raises(NcaTilesError, match="scale-space model .*nca_tiles.load_model"):
        load_pipeline(model_dir, "cpu")
