"""``nca-tiles info`` on presets, training runs, checkpoints and model directories."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nca_tiles.errors import NcaTilesError
from nca_tiles.diffusion.model import PRESETS, DiffNCA
from nca_tiles.training.patches import extract_patches
from nca_tiles.diffusion.pipeline import load_model
from nca_tiles.diffusion.levels import load_synthesis_model
from helpers import assert_ok, assert_one_line_error, run_cli, save_test_model


def parameters(text: str) -> int:
    (count,) = re.findall(r"^parameters: ([\d,]+)$", text, flags=re.MULTILINE)
    return int(count.replace(",", ""))


def line(text: str, label: str) -> str:
    (value,) = re.findall(rf"^{label}: (.*)$", text, flags=re.MULTILINE)
    return value


def test_paper_preset():
    result = run_cli("info", "--preset", "paper")
    assert_ok(result)
    assert "preset paper" in result.output
    config = json.loads(result.output[result.output.index("{") : result.output.index("}") + 1])
    assert config == PRESETS["paper"].to_dict()
    assert abs(parameters(result.output) - 331_000) <= 0.03 * 331_000  # the paper's 331 k
    assert "halo per denoising step: 20 px" in result.output


def test_unknown_preset():
    assert_one_line_error(run_cli("info", "--preset", "nope"), "unknown preset 'nope'", "paper", "small", "tiny")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_slide) -> Path:
    root = tmp_path_factory.mktemp("info")
    store = root / "p.zarr"
    extract_patches([sample_slide], store, stride=64, max_per_slide=60, progress=False)
    out = root / "run"
    assert_ok(run_cli("train", "--patches", store, "--out", out, "--preset", "tiny", "--batch-size", 2,
                      "--steps", 2, "--device", "cpu", "--sample-every", 0, "--no-progress"))
    return out


def assert_describes(text: str, mpp: float, hash_: str) -> None:
    assert json.loads(line(text, "architecture")) == PRESETS["tiny"].to_dict()
    assert parameters(text) == DiffNCA(PRESETS["tiny"]).num_parameters()
    assert json.loads(line(text, "training data"))["mpp"] == mpp
    assert f"hash: {hash_}" in text


@pytest.mark.parametrize("where", ["run", "checkpoint", "model dir"])
def test_trained_model(run_dir, where):
    path = {"run": run_dir, "checkpoint": run_dir / "checkpoint.pt", "model dir": run_dir / "model"}[where]
    result = run_cli("info", path)
    assert_ok(result)
    # The same EMA weights, so the same hash, whichever way the model is named.
    assert_describes(result.output, 1.0, load_model(run_dir, "cpu").hash)
    assert '"step": 2' in result.output


def test_model_directory(tmp_path):
    model = save_test_model(tmp_path / "model", mpp=0.5)
    result = run_cli("info", model)
    assert_ok(result)
    assert_describes(result.output, 0.5, load_model(model, "cpu").hash)


def test_missing_path(tmp_path):
    assert_one_line_error(run_cli("info", tmp_path / "nope"), "does not exist")


# --- corrupt models: one line naming the file and the field -------------------------------------


def _edit_config(model_dir: Path, edit) -> Path:
    config = model_dir / "config.json"
    meta = json.loads(config.read_text())
    edit(meta)
    config.write_text(json.dumps(meta))
    return config


def _set(section: str | None, field: str, value):
    def edit(meta):
        (meta if section is None else meta[section])[field] = value
    return edit


def _delete(section: str, field: str):
    def edit(meta):
        del meta[section][field]
    return edit


CORRUPT_CONFIGS = {
    "mpp not a number": (_set("data", "mpp", "abc"), "'data.mpp' must be a positive number"),
    "mpp zero": (_set("data", "mpp", 0), "'data.mpp' must be a positive number"),
    "mpp NaN": (_set("data", "mpp", float("nan")), "'data.mpp' must be a positive number"),
    "mpp missing": (_delete("data", "mpp"), "'data.mpp' is missing"),
    "patch size a string": (_set("data", "patch_size", "64"), "'data.patch_size' must be a whole number"),
    "channels a string": (_set("model", "channels", "8"), "'model.channels' must be a whole number in 6..4096"),
    "channels fractional": (_set("model", "channels", 8.5), "'model.channels' must be a whole number"),
    "channels a boolean": (_set("model", "channels", True), "'model.channels' must be a whole number"),
    "channels too few": (_set("model", "channels", 4), "'model.channels' must be a whole number in 6..4096"),
    "hidden huge": (_set("model", "hidden", 10**9), "'model.hidden' must be a whole number in 1..65536"),
    "hidden missing": (_delete("model", "hidden"), "'model.hidden' is missing"),
    "odd encoding": (_set("model", "encoding_dim", 7), "'model.encoding_dim' must be an even number"),
    "grey image": (_set("model", "image_channels", 1), "'model.image_channels' must be a whole number in 3..3"),
    "fire rate above 1": (_set("model", "fire_rate", 2), "'model.fire_rate' must be a number in (0, 1]"),
    "fire rate null": (_set("model", "fire_rate", None), "'model.fire_rate' must be a number in (0, 1], got None"),
    "unknown model field": (_set("model", "wings", 2), "'model' has unknown fields ['wings']"),
    "model a list": (_set(None, "model", [8, 16]), "'model' must be a JSON object"),
    "one timestep": (_set("schedule", "timesteps", 1), "'schedule.timesteps' must be a whole number in 2..100000"),
    "timesteps a string": (_set("schedule", "timesteps", "300"), "'schedule.timesteps' must be a whole number"),
    "unknown beta schedule": (_set("schedule", "beta_schedule", "quadratic"), "'schedule.beta_schedule' must be"),
    "beta end below start": (_set("schedule", "beta_end", 1e-5), "'schedule.beta_end' must be a number in [beta_start"),
    "beta start negative": (_set("schedule", "beta_start", -0.1), "'schedule.beta_start' must be a number in (0, 1)"),
    "clip sample a string": (_set("schedule", "clip_sample", "yes"), "'schedule.clip_sample' must be true or false"),
    "unknown schedule field": (_set("schedule", "offset", 1), "'schedule' has unknown fields ['offset']"),
    "data missing": (lambda meta: meta.pop("data"), "'data' is missing"),
    "training a string": (_set(None, "training", "long"), "'training' must be a JSON object"),
    "format version a string": (_set(None, "format_version", "1"), "has no format version"),
    "format version zero": (_set(None, "format_version", 0), "format version 0, which no nca-tiles writes"),
    "format version newer": (_set(None, "format_version", 99), "upgrade nca-tiles"),
}


@pytest.mark.parametrize("case", CORRUPT_CONFIGS)
def test_corrupt_model_config_is_refused_naming_file_and_field(tmp_path, case):
    edit, message = CORRUPT_CONFIGS[case]
    model = save_test_model(tmp_path / "model")
    config = _edit_config(model, edit)
    with pytest.raises(NcaTilesError, match=re.escape(message)) as raised:
        load_model(model, "cpu")
    assert str(config) in str(raised.value) and "\n" not in str(raised.value)
    assert_one_line_error(run_cli("info", model), str(config), message)


def test_corrupt_model_config_fails_synthesize_in_one_line(tmp_path):
    model = save_test_model(tmp_path / "model")
    config = _edit_config(model, _set("data", "mpp", "abc"))
    result = run_cli("synthesize", "--model", model, "--width", 64, "--height", 64, "--out", tmp_path / "s.ome.tif",
                     "--dry-run")
    assert_one_line_error(result, str(config), "'data.mpp'")


def test_config_that_is_not_json(tmp_path):
    model = save_test_model(tmp_path / "model")
    (model / "config.json").write_text('{"model": {')
    assert_one_line_error(run_cli("info", model), "cannot read model config", "config.json")


def test_every_model_field_is_validated():
    import dataclasses

    from nca_tiles.diffusion.checkpoint import _MODEL_INTS
    from nca_tiles.diffusion.model import ModelConfig

    assert set(_MODEL_INTS) | {"fire_rate"} == {f.name for f in dataclasses.fields(ModelConfig)}


def test_valid_models_round_trip(tmp_path):
    """Write every preset and read it back: the validation passes what training writes."""
    for name, config in PRESETS.items():
        model = save_test_model(tmp_path / name, config=config, mpp=0.25)
        pipeline = load_model(model, "cpu")
        assert pipeline.model.config == config and pipeline.mpp == 0.25
    assert load_synthesis_model(None, "cpu").mpp == 1.0  # the bundled model


def _edit_weights(model_dir: Path, edit) -> Path:
    path = model_dir / "weights.pt"
    saved = torch.load(path, weights_only=True)
    edit(saved["state_dict"])
    torch.save(saved, path)
    return path


WEIGHT_PROBLEMS = {
    "a tensor missing": (lambda sd: sd.pop("to_update.bias"), "missing to_update.bias"),
    "an unexpected tensor": (lambda sd: sd.update({"extra.weight": torch.zeros(2)}), "unexpected extra.weight"),
    "another shape": (lambda sd: sd.update({"to_update.bias": torch.zeros(5)}),
                      "shape differs: to_update.bias (5 in the file, 8 for the config)"),
    "everything missing": (lambda sd: sd.clear(), "missing embed.0.weight, embed.0.bias, embed.2.weight and 13 more"),
}


@pytest.mark.parametrize("case", WEIGHT_PROBLEMS)
def test_weights_that_do_not_fit_say_which_tensors(tmp_path, case):
    edit, message = WEIGHT_PROBLEMS[case]
    model = save_test_model(tmp_path / "model")
    weights = _edit_weights(model, edit)
    with pytest.raises(NcaTilesError, match=re.escape(message)) as raised:
        load_model(model, "cpu")
    assert str(weights) in str(raised.value) and "\n" not in str(raised.value)
    assert_one_line_error(run_cli("info", model), str(weights), message)


def test_weights_of_another_config(tmp_path):
    model = save_test_model(tmp_path / "model")
    other = save_test_model(tmp_path / "other", config=PRESETS["small"])
    (other / "weights.pt").replace(model / "weights.pt")
    message = assert_one_line_error(run_cli("info", model), "do not fit the model config", "shape differs: ")
    assert len(message) < 600  # shortened: a few names, then how many more


def test_corrupt_checkpoint(tmp_path):
    model = save_test_model(tmp_path / "model")
    meta = json.loads((model / "config.json").read_text())
    state = torch.load(model / "weights.pt", weights_only=True)["state_dict"]
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"format_version": 1, "meta": {**meta, "data": {"mpp": "abc"}}, "ema": state}, checkpoint)
    with pytest.raises(NcaTilesError, match=re.escape(f"{checkpoint}: 'data.mpp' must be a positive number")):
        load_model(checkpoint, "cpu")
    torch.save({"format_version": 1, "meta": meta}, checkpoint)
    assert_one_line_error(run_cli("info", checkpoint), str(checkpoint), "lacks 'ema'")


def test_info_describes_a_bundled_model_by_name(tmp_path, monkeypatch):
    from nca_tiles.diffusion.checkpoint import BUNDLED_MODELS_DIR

    monkeypatch.chdir(tmp_path)
    for name in ("default", "fast"):
        by_name, by_path = run_cli("info", name), run_cli("info", BUNDLED_MODELS_DIR / name)
        assert_ok(by_name)
        assert by_name.output == by_path.output and "scale-space model" in by_name.output
    assert run_cli("info", "default").output != run_cli("info", "fast").output
    assert_one_line_error(run_cli("info", "fastest"), "fastest", "does not exist", "default, fast")
