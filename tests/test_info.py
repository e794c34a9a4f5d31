"""``nca-tiles info`` on presets, training runs, checkpoints and model directories."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nca_tiles.model import PRESETS, DiffNCA
from nca_tiles.patches import extract_patches
from nca_tiles.sampling import load_model
from tests.cli_support import assert_ok, assert_one_line_error, run_cli
from tests.helpers import save_test_model


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
