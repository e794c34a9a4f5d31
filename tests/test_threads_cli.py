"""``--threads`` on train, synthesize, demo and evaluate: bounded with a one-line error before any
work, and a real run uses exactly that many torch threads (read back inside the model's calls)
and gives the process's count back when it ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nca_tiles.runtime.threads import claims_dir
from nca_tiles.training.patches import extract_patches
from helpers import assert_ok, assert_one_line_error, run_cli, save_test_model

COMMANDS = {  # each command with its required options, all pointing at nothing that exists
    "train": ["--patches", "missing.zarr", "--out", "{out}"],
    "synthesize": ["--width", 64, "--height", 64, "--out", "{out}"],
    "demo": ["--out", "{out}"],
    "evaluate": ["--slide", "{out}", "--chunk", 32],
    "train-encoder": ["--patches", "missing.zarr", "--out", "{out}"],
}


@pytest.fixture
def threads_seen(monkeypatch):
    """The torch thread counts in effect at every module call, and torch's count restored after."""
    before = torch.get_num_threads()
    seen: set[int] = set()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: seen.add(torch.get_num_threads()))
    yield seen
    handle.remove()
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_threads(command):
    result = run_cli(command, "--help")
    assert_ok(result)
    text = " ".join(result.output.split())  # help text is wrapped
    assert "--threads N" in text and "fair share of the usable cores" in text


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("threads", [0, -3, 1025, 10**9])
def test_bad_thread_counts_are_one_line_before_any_work(command, threads, tmp_path):
    out = tmp_path / "out"
    args = [str(a).format(out=out) for a in COMMANDS[command]]
    assert_one_line_error(run_cli(command, *args, "--threads", threads), "--threads must be between 1 and 1024", str(threads))
    assert list(tmp_path.iterdir()) == []


def test_train_with_threads_1_runs_on_one_thread(tmp_path, sample_slide, threads_seen):
    store = tmp_path / "p.zarr"
    extract_patches([sample_slide], store, stride=64, max_per_slide=40, progress=False)
    torch.set_num_threads(3)
    result = run_cli("train", "--patches", store, "--out", tmp_path / "run", "--preset", "tiny", "--steps", 2,
                     "--batch-size", 2, "--device", "cpu", "--sample-every", 0, "--no-progress", "--threads", 1)
    assert_ok(result)
    assert threads_seen == {1}
    assert torch.get_num_threads() == 3  # given back
    assert not (claims_dir() / str(os.getpid())).exists()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("model"))


def synthesize(model: Path, out: Path, *args):
    return run_cli("synthesize", "--model", model, "--width", 48, "--height", 40, "--out", out, "--chunk", 32,
                   "--steps", 1, "--device", "cpu", "--compression", "deflate", "--tile", 32, "--no-progress", *args)


def test_synthesize_and_evaluate_with_threads_2_run_on_two_threads(model, tmp_path, threads_seen):
    torch.set_num_threads(1)
    slide = tmp_path / "slide.ome.tif"
    assert_ok(synthesize(model, slide, "--threads", 2))
    assert threads_seen == {2}
    assert torch.get_num_threads() == 1
    assert_ok(run_cli("evaluate", "--slide", slide, "--chunk", 32, "--threads", 2))


def test_the_default_is_capped_by_omp_num_threads(model, tmp_path, threads_seen, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the test suite runs with (conftest)
    torch.set_num_threads(3)
    assert_ok(synthesize(model, tmp_path / "slide.ome.tif"))
    assert threads_seen == {1}
    assert torch.get_num_threads() == 3


def test_the_pixels_do_not_depend_on_threads(model, tmp_path):
    import tifffile

    slides = []
    for threads in (1, 2):
        slide = tmp_path / f"slide{threads}.ome.tif"
        assert_ok(synthesize(model, slide, "--threads", threads))
        slides.append(tifffile.imread(slide, level=0))
    assert (slides[0] == slides[1]).all()
