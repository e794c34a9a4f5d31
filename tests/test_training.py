"""``nca-tiles train`` on a real patch store from the bundled slide, with the tiny preset: exact
resume, what a run directory holds, metrics and samples, Ctrl-C, and refused input."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from nca_tiles.diffusion.checkpoint import FORMAT_VERSION
from nca_tiles.errors import NcaTilesError
from nca_tiles.diffusion.model import PRESETS, DiffNCA
from nca_tiles.training.patches import extract_patches, open_patch_store
from nca_tiles.diffusion.pipeline import load_model
from nca_tiles.diffusion.schedule import BETA_SCHEDULES, ScheduleConfig
from helpers import assert_ok, assert_one_line_error, read_only_dir, run_cli

REPO = Path(__file__).resolve().parents[1]

BASE = ["--preset", "tiny", "--batch-size", 4, "--device", "cpu", "--no-progress"]
FAST = [*BASE, "--sample-every", 0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_slide) -> Path:
    path = tmp_path_factory.mktemp("patches") / "p.zarr"
    extract_patches([sample_slide], path, stride=64, max_per_slide=200, progress=False)
    return path


def train(store: Path, out: Path, *args):
    return run_cli("train", "--patches", store, "--out", out, *FAST, *args)


def load_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_identical(a, b, where="checkpoint") -> None:
    """Bit-identical nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values())


@pytest.fixture(scope="module")
def run30(store, tmp_path_factory) -> Path:
    """A 30-step run with validation and checkpoints every 10 steps."""
    out = tmp_path_factory.mktemp("run30") / "run"
    assert_ok(train(store, out, "--steps", 30, "--val-every", 10, "--checkpoint-every", 10))
    return out


@pytest.fixture(scope="module")
def one_step(store, tmp_path_factory) -> Path:
    """A finished 1-step run: copy it before changing it."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert_ok(train(store, out, "--steps", 1))
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def train_command(store: Path, out: Path, *args) -> list[str]:
    """``nca-tiles train`` as a real process of its own."""
    return [sys.executable, "-m", "nca_tiles_cli.main", "train", "--patches", str(store), "--out", str(out),
            *map(str, FAST), *map(str, args)]


def start_endless_run(store: Path, out: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(train_command(store, out, "--steps", 100000, "--val-every", 100000, *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(run: Path) -> list[int]:
    """Steps of the complete lines of a live run's metrics (a line may be half written)."""
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.splitlines(keepends=True) if line.endswith("\n")]


def wait_until(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.01)
    assert proc.poll() is None and condition(), proc.communicate()


# -- resume ------------------------------------------------------------------------------------
def test_resume_continues_exactly(store, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--val-every", 3, "--checkpoint-every", 3]
    assert_ok(train(store, straight, "--steps", 8, *common))
    assert_ok(train(store, split, "--steps", 4, *common))
    assert load_checkpoint(split)["step"] == 4
    result = train(store, split, "--steps", 8, "--resume", *common)
    assert_ok(result)
    assert "resuming at step 4" in result.output

    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema", "optimizer", "lr_scheduler"):
        assert_identical(a[key], b[key], key)
    # The resumed half logged the same losses as the uninterrupted run, step for step.
    assert [(m["step"], m["loss"]) for m in metrics(straight)] == [(m["step"], m["loss"]) for m in metrics(split)]


# -- what a run holds ----------------------------------------------------------------------------
def test_checkpoint_and_model_dir(run30, store):
    ckpt = load_checkpoint(run30)
    patches = open_patch_store(store)
    assert ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["step"] == 30
    meta = ckpt["meta"]
    assert meta["model"] == PRESETS["tiny"].to_dict()
    assert meta["schedule"] == ScheduleConfig().to_dict()
    assert meta["data"]["mpp"] == patches.mpp == 1.0
    assert meta["data"]["patch_store"] == patches.identity
    assert meta["training"]["step"] == 30 and meta["training"]["preset"] == "tiny"
    assert ckpt["optimizer"]["state"] and ckpt["optimizer"]["param_groups"]
    assert set(ckpt["ema"]) == set(ckpt["model"]) == set(DiffNCA(PRESETS["tiny"]).state_dict())

    # model/ holds the EMA weights, not the raw ones, and they differ after some steps.
    config = json.loads((run30 / "model" / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["model"] == meta["model"] and config["data"] == meta["data"]
    weights = torch.load(run30 / "model" / "weights.pt", weights_only=True)["state_dict"]
    assert_identical(weights, ckpt["ema"], "weights.pt")
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])

    pipeline = load_model(run30, "cpu")
    assert pipeline.mpp == 1.0
    assert_identical(pipeline.model.state_dict(), ckpt["ema"], "loaded model")


def test_metrics_have_a_line_per_step(run30):
    lines = metrics(run30)
    assert [m["step"] for m in lines] == list(range(1, 31))
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert [m["step"] for m in lines if "val_loss" in m] == [10, 20, 30]
    assert all(m["val_loss"] > 0 for m in lines if "val_loss" in m)
    assert not (run30 / "samples").exists()  # --sample-every 0


def test_loss_goes_down_on_real_data(run30):
    # Seeded, so deterministic; over seeds 0-4 the last five losses were 72-77 % of the first five
    # and the validation loss fell at every evaluation.
    lines = metrics(run30)
    losses = [m["loss"] for m in lines]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    val = [m["val_loss"] for m in lines if "val_loss" in m]
    assert val[-1] < val[0]


def test_sample_png(store, tmp_path):
    out = tmp_path / "run"
    assert_ok(run_cli("train", "--patches", store, "--out", out, *BASE, "--steps", 2, "--sample-every", 2))
    assert [p.name for p in (out / "samples").iterdir()] == ["step_0000002.png"]
    with Image.open(out / "samples" / "step_0000002.png") as png:
        png.load()
        # Sixteen 64² samples in a 4×4 grid with 2 px gaps (262 px), 8 px, one 256² sample.
        assert png.size == (4 * 64 + 3 * 2 + 8 + 256, 4 * 64 + 3 * 2)
        assert png.mode == "RGB"
        pixels = np.asarray(png)
    assert pixels[:64, :64].std() > 0  # a sample, not a blank


def test_a_run_shorter_than_sample_every_ends_with_a_sample(store, tmp_path):
    out = tmp_path / "run"
    assert_ok(run_cli("train", "--patches", store, "--out", out, *BASE, "--steps", 2))  # --sample-every 2000
    assert [p.name for p in (out / "samples").iterdir()] == ["step_0000002.png"]


# -- Ctrl-C, SIGTERM, --time-limit -------------------------------------------------------------
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_and_resume_continues(store, tmp_path, stop):
    # SIGTERM is how a scheduler or a lent machine's end stops a job: it must not lose the steps
    # since the last checkpoint either.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nca_tiles_cli.main", "train", "--patches", str(store), "--out", str(out),
           *map(str, FAST), "--steps", "100000", "--checkpoint-every", "100000", "--val-every", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + stop, (stdout, stderr)  # 130, 143: as a shell reports the signal
    assert "Traceback" not in stdout + stderr
    assert "Interrupted" in stderr and "--resume" in stderr

    reached = metrics(out)[-1]["step"]
    assert reached >= 3
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == reached and all_finite(ckpt["model"])

    result = train(store, out, "--steps", reached + 2, "--resume")
    assert_ok(result)
    assert f"resuming at step {reached}" in result.output
    assert load_checkpoint(out)["step"] == reached + 2
    assert [m["step"] for m in metrics(out)] == list(range(1, reached + 3))


def test_time_limit_stops_checkpointed_and_resume_goes_on(store, tmp_path):
    out = tmp_path / "run"
    started = time.perf_counter()
    result = train(store, out, "--steps", 100000, "--val-every", 100000, "--checkpoint-every", 100000,
                   "--time-limit", "2s")
    assert_ok(result)  # a planned stop, not an error
    assert time.perf_counter() - started < 60
    reached = metrics(out)[-1]["step"]
    assert 1 <= reached < 100000
    assert f"stopped at the --time-limit of 2s at step {reached} of 100000" in result.output
    assert load_checkpoint(out)["step"] == reached
    assert (out / "model" / "weights.pt").is_file()

    result = train(store, out, "--steps", reached + 2, "--resume", "--time-limit", "1h")
    assert_ok(result)
    assert "time-limit" not in result.output
    assert [m["step"] for m in metrics(out)] == list(range(1, reached + 3))


@pytest.mark.parametrize("text, seconds", [("90", 90.0), ("90s", 90.0), ("9m", 540.0), ("2.5h", 9000.0),
                                           ("1d", 86400.0), (" 3M ", 180.0)])
def test_time_limit_durations(text, seconds):
    from nca_tiles_cli.train import parse_duration

    assert parse_duration("--time-limit", text) == seconds


# -- kill -9 and a second process -------------------------------------------------------------
def test_resume_after_kill_9_logs_every_step_once(store, tmp_path):
    out = tmp_path / "run"
    proc = start_endless_run(store, out, "--checkpoint-every", 4)
    try:
        # Stop between two checkpoints, so steps past the last one were logged.
        wait_until(proc, lambda: (steps := logged_steps(out)) and steps[-1] >= 5 and steps[-1] % 4 != 0)
    finally:
        proc.kill()
        proc.communicate()
    saved, logged = load_checkpoint(out)["step"], logged_steps(out)
    assert logged == list(range(1, logged[-1] + 1)) and logged[-1] > saved, (saved, logged)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": %d, "loss": 0.' % (logged[-1] + 1))  # a line torn by the kill
    stale_lock = (tmp_path / ".run.lock").exists()

    result = train(store, out, "--steps", logged[-1] + 2, "--resume")
    assert_ok(result)
    assert f"resuming at step {saved}" in result.output
    assert [m["step"] for m in metrics(out)] == list(range(1, logged[-1] + 3))
    assert stale_lock  # the killed process left its lock file, and it did not block the resume


def test_two_processes_never_share_a_run_dir(store, tmp_path):
    out = tmp_path / "run"
    first = start_endless_run(store, out, "--checkpoint-every", 1)
    try:
        wait_until(first, lambda: (out / "checkpoint.pt").exists())
        (tmp_path / "link").symlink_to(out)
        for where, how in ((out, "--resume"), (out, "--overwrite"), (tmp_path / "link", "--resume")):
            second = subprocess.run(train_command(store, where, "--steps", 3, how), capture_output=True, text=True,
                                    timeout=120)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 1 and len(lines) == 1, (where, how, second.stdout, second.stderr)
            assert lines[0].startswith("Error: run directory") and "in use by process" in lines[0]
            assert f"process {first.pid} " in lines[0] and "--out" in lines[0]
            assert "trained" not in second.stdout
        assert first.poll() is None and (out / "checkpoint.pt").exists()  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, (stdout, stderr)
    assert not (tmp_path / ".run.lock").exists()
    reached = load_checkpoint(out)["step"]
    assert_ok(train(store, out, "--steps", reached + 1, "--resume"))  # free again once the first ended
    assert [m["step"] for m in metrics(out)] == list(range(1, reached + 2))


# -- the patch store a run was trained on -----------------------------------------------------------
def legacy_identity(store: Path) -> str:
    """A patch store's identity as nca-tiles 0.1.0 recorded it in checkpoints (the slides' absolute
    paths included), pinned here: the runs in training_runs/ hold such records."""
    import hashlib

    patches = open_patch_store(store)
    digest = hashlib.sha256(json.dumps(patches.attrs, sort_keys=True).encode())
    n = len(patches)
    digest.update(str(n).encode())
    digest.update(patches.split.tobytes())
    for index in sorted({round(i) for i in np.linspace(0, n - 1, num=min(n, 4))}):
        digest.update(np.ascontiguousarray(patches.images[index]).tobytes())
    return digest.hexdigest()[:16]


def record_store_identity(run: Path, identity: str) -> None:
    ckpt = load_checkpoint(run)
    ckpt["meta"]["data"]["patch_store"] = identity
    torch.save(ckpt, run / "checkpoint.pt")


def test_resume_in_a_moved_checkout(one_step, sample_slide, tmp_path):
    # Another clone: the slides at another path, the store re-extracted into another folder (the
    # stores are not committed), the run directory copied. It resumes.
    checkout = tmp_path / "elsewhere"
    (checkout / "data").mkdir(parents=True)
    slide = shutil.copyfile(sample_slide, checkout / "data" / sample_slide.name)
    moved_store = checkout / "runs" / "p.zarr"
    moved_store.parent.mkdir()
    extract_patches([slide], moved_store, stride=64, max_per_slide=200, progress=False)
    run = Path(shutil.copytree(one_step, checkout / "run"))
    result = train(moved_store, run, "--steps", 2, "--resume")
    assert_ok(result)
    assert "resuming at step 1" in result.output
    assert load_checkpoint(run)["meta"]["data"]["patch_store"] == open_patch_store(moved_store).identity


def test_a_checkpoint_with_the_old_identity_still_resumes(one_step, store, tmp_path):
    # Runs started before the identity stopped depending on paths recorded the old one: they resume
    # from the same store, and their next checkpoint records the new identity.
    run = copy_run(one_step, tmp_path)
    record_store_identity(run, legacy_identity(store))
    assert legacy_identity(store) != open_patch_store(store).identity
    assert_ok(train(store, run, "--steps", 2, "--resume"))
    assert load_checkpoint(run)["meta"]["data"]["patch_store"] == open_patch_store(store).identity


def test_resume_on_another_patch_store_is_refused(one_step, tmp_path):
    other = tmp_path / "other.zarr"
    extract_patches([REPO / "nca_tiles" / "data" / "training" / "ovary_hgsc_stroma.jpg"], other, stride=64,
                    source_mpp=0.25, progress=False)
    run = copy_run(one_step, tmp_path)
    assert_one_line_error(train(other, run, "--steps", 2, "--resume"), "different patch store", "--patches")
    record_store_identity(run, legacy_identity(other)[::-1])  # an old record of yet another store
    assert_one_line_error(train(other, run, "--steps", 2, "--resume"), "different patch store", "--patches")
    assert load_checkpoint(run)["step"] == 1


# -- refused input ----------------------------------------------------------------------------
def test_missing_patch_store(tmp_path):
    result = train(tmp_path / "nope.zarr", tmp_path / "run", "--steps", 1)
    assert_one_line_error(result, "nope.zarr", "does not exist")
    assert not (tmp_path / "run").exists()


def test_not_a_patch_store(tmp_path):
    fake = tmp_path / "fake.zarr"
    fake.mkdir()
    (fake / "zarr.json").write_text("{ this is not json")
    assert_one_line_error(train(fake, tmp_path / "run", "--steps", 1), "not a patch store")


def test_corrupt_patch_store(store, tmp_path):
    broken = Path(shutil.copytree(store, tmp_path / "broken.zarr"))
    (broken / "images" / "zarr.json").write_text("garbage")
    assert_one_line_error(train(broken, tmp_path / "run", "--steps", 1), "corrupt patch store")


def test_empty_train_split(store, tmp_path):
    all_val = Path(shutil.copytree(store, tmp_path / "val_only.zarr"))
    split = zarr.open_array(all_val / "split", mode="r+")
    split[:] = 1
    assert_one_line_error(train(all_val, tmp_path / "run", "--steps", 1), "no patches in its train split")


def test_resume_with_another_preset(one_step, store, tmp_path):
    run = copy_run(one_step, tmp_path)
    result = run_cli("train", "--patches", store, "--out", run, "--preset", "small", "--batch-size", 4,
                     "--device", "cpu", "--sample-every", 0, "--no-progress", "--steps", 2, "--resume")
    assert_one_line_error(result, "different model config", "--preset")
    assert load_checkpoint(run)["step"] == 1


def test_resume_without_checkpoint(store, tmp_path):
    assert_one_line_error(train(store, tmp_path / "run", "--steps", 1, "--resume"), "does not exist", "--resume")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(train(store, tmp_path / "empty", "--steps", 1, "--resume"), "does not exist")


def test_checkpoint_of_a_newer_format(one_step, store, tmp_path):
    run = copy_run(one_step, tmp_path)
    ckpt = load_checkpoint(run)
    ckpt["format_version"] = 99
    torch.save(ckpt, run / "checkpoint.pt")
    result = train(store, run, "--steps", 2, "--resume")
    assert_one_line_error(result, "format version 99", "upgrade nca-tiles")
    assert_one_line_error(run_cli("info", run / "checkpoint.pt"), "format version 99", "upgrade nca-tiles")


def test_nan_loss_before_any_checkpoint(store, tmp_path):
    out = tmp_path / "run"
    message = assert_one_line_error(train(store, out, "--steps", 20, "--lr", 1e30), "loss became")
    # No checkpoint was due yet (every 500 steps): the message must not point to one.
    assert not (out / "checkpoint.pt").exists()
    assert "no checkpoint" in message


def test_nan_loss_names_the_last_good_checkpoint(store, tmp_path):
    out = tmp_path / "run"
    message = assert_one_line_error(train(store, out, "--steps", 20, "--lr", 1e30, "--checkpoint-every", 1),
                                    "loss became", str(out / "checkpoint.pt"))
    ckpt = load_checkpoint(out)
    assert f"step {ckpt['step']}" in message
    assert all_finite(ckpt["model"]) and all_finite(ckpt["ema"])


def test_non_finite_weights_are_never_checkpointed(one_step, store, tmp_path):
    # An update that turns the weights into NaN while the loss was still finite (here: a poisoned
    # Adam second moment, as an overflowing gradient would leave it) must not replace the last
    # good checkpoint.
    run = copy_run(one_step, tmp_path)
    ckpt = load_checkpoint(run)
    for state in ckpt["optimizer"]["state"].values():
        state["exp_avg_sq"].fill_(-1.0)
    torch.save(ckpt, run / "checkpoint.pt")
    result = train(store, run, "--steps", 10, "--resume", "--checkpoint-every", 1)
    assert result.exit_code != 0
    message = assert_one_line_error(result, str(run / "checkpoint.pt"), "step 1")
    assert "non-finite" in message or "nan" in message
    on_disk = load_checkpoint(run)
    assert on_disk["step"] == 1
    assert all_finite(on_disk["model"]) and all_finite(on_disk["ema"])
    weights = torch.load(run / "model" / "weights.pt", weights_only=True)["state_dict"]
    assert all_finite(weights)


def test_non_empty_out_is_refused(store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(train(store, out, "--steps", 1), "not empty", "--resume", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(one_step, tmp_path):
    run = copy_run(one_step, tmp_path)
    result = train(tmp_path / "missing.zarr", run, "--steps", 1, "--overwrite")
    assert_one_line_error(result, "missing.zarr")
    assert (run / "checkpoint.pt").exists()


def test_overwrite_starts_afresh(one_step, store, tmp_path):
    run = copy_run(one_step, tmp_path)
    (run / "notes.txt").write_text("old")
    assert_ok(train(store, run, "--steps", 2, "--overwrite"))
    assert not (run / "notes.txt").exists()
    assert [m["step"] for m in metrics(run)] == [1, 2]


def test_bf16_on_cpu_is_refused(store, tmp_path):
    result = train(store, tmp_path / "run", "--steps", 1, "--precision", "bf16")
    assert_one_line_error(result, "bf16", "--precision fp32")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--steps", 0], ["--steps", "between 1 and 10,000,000"]),
    (["--steps", 10**20], ["--steps", "between 1 and 10,000,000", str(10**20)]),
    (["--batch-size", 0], ["--batch-size", "between 1 and"]),
    (["--batch-size", 10**6], ["--batch-size", "between 1 and 4,096"]),
    (["--lr", -1], ["--lr", "positive finite"]),
    (["--lr", 0], ["--lr", "positive finite"]),
    (["--lr", "inf"], ["--lr", "positive finite"]),
    (["--lr", "nan"], ["--lr", "positive finite"]),
    (["--val-every", 0], ["--val-every", "between 1 and"]),
    (["--checkpoint-every", 0], ["--checkpoint-every", "between 1 and"]),
    (["--checkpoint-every", 10**9], ["--checkpoint-every", "10,000,000"]),
    (["--sample-every", -1], ["--sample-every", "between 0 and", "0: never"]),
    (["--seed", -1], ["--seed", "between 0 and 4,294,967,295"]),
    (["--seed", 2**32], ["--seed", "between 0 and 4,294,967,295"]),  # would repeat seed 1 (rng.py folds to 32 bits)
    *[(["--time-limit", bad], ["--time-limit", "positive duration", "9m"])
      for bad in ("0", "-5m", "abc", "5x", "inf", "nan", "m", "")],
])
def test_bad_numbers(store, tmp_path, args, fragments):
    # A missing patch store: the numbers must be refused before anything is read or written.
    result = train(tmp_path / "missing.zarr", tmp_path / "run", "--steps", 1, *args)
    assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset_and_the_presets_in_help(store, tmp_path):
    from nca_tiles_cli.train import PRESETS as LISTED
    from nca_tiles_cli.train import train as command

    assert LISTED == tuple(PRESETS)
    result = run_cli("train", "--help")
    assert_ok(result)
    assert "--preset [paper|small|medium|wide|deep|tiny]" in result.output and "TEXT" not in result.output
    assert all(param.help for param in command.params), [p.name for p in command.params if not p.help]
    result = run_cli("train", "--patches", store, "--out", tmp_path / "run", "--preset", "huge", "--steps", 1)
    assert_one_line_error(result, "unknown preset 'huge'", "paper, small, medium, wide, deep, tiny")
    assert list(tmp_path.iterdir()) == []


def test_out_in_a_read_only_folder(store, tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        result = train(store, ro / "run", "--steps", 1)
        assert_one_line_error(result, "run directory", str(ro / "run"), "not writable")


def test_out_is_a_file(store, tmp_path):
    (tmp_path / "run").write_text("mine")
    assert_one_line_error(train(store, tmp_path / "run", "--steps", 1), "is a file")
    assert (tmp_path / "run").read_text() == "mine"


def test_max_timestep_draws_only_early_timesteps():
    from nca_tiles.diffusion.model import PRESETS, DiffNCA
    from nca_tiles.diffusion.schedule import NoiseSchedule
    from nca_tiles.training.trainer import diffusion_loss

    seen = []

    class Spy(DiffNCA):
        def forward(self, x, t, fire):
            seen.extend(t.tolist())
            return super().forward(x, t, fire)

    model, schedule = Spy(PRESETS["tiny"]), NoiseSchedule()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.zeros(64, 3, 8, 8)
    diffusion_loss(model, schedule, x0, generator, torch.device("cpu"), contextlib.nullcontext, max_timestep=20)
    assert max(seen) <= 20 and min(seen) >= 0 and len(set(seen)) > 10


def test_max_timestep_is_recorded_and_must_be_kept_on_resume(store, tmp_path):
    out = tmp_path / "run"
    assert_ok(train(store, out, "--steps", 2, "--max-timestep", 40))
    assert load_checkpoint(out)["meta"]["training"]["max_timestep"] == 40
    assert json.loads((out / "model" / "config.json").read_text())["training"]["max_timestep"] == 40
    assert_one_line_error(train(store, out, "--steps", 3, "--resume"), "--max-timestep 40")
    assert_ok(train(store, out, "--steps", 3, "--resume", "--max-timestep", 40))
    assert_one_line_error(train(store, tmp_path / "r2", "--steps", 2, "--max-timestep", 300), "--max-timestep")


def test_beta_schedule_is_recorded_and_must_be_kept_on_resume_and_init_from(store, tmp_path):
    out = tmp_path / "run"
    assert_ok(train(store, out, "--steps", 1, "--beta-schedule", "cosine"))
    assert load_checkpoint(out)["meta"]["schedule"]["beta_schedule"] == "cosine"
    assert json.loads((out / "model" / "config.json").read_text())["schedule"]["beta_schedule"] == "cosine"
    assert_one_line_error(train(store, out, "--steps", 2, "--resume"), "--beta-schedule: cosine")
    assert_ok(train(store, out, "--steps", 2, "--resume", "--beta-schedule", "cosine"))
    assert load_checkpoint(out)["step"] == 2
    assert_one_line_error(train(store, tmp_path / "warm", "--steps", 1, "--init-from", out),
                          "another noise schedule", "--beta-schedule (cosine)")
    result = train(store, tmp_path / "r2", "--steps", 1, "--beta-schedule", "quadratic")
    assert result.exit_code != 0 and "quadratic" in result.output
    from nca_tiles_cli.train import BETA_SCHEDULES as LISTED

    assert LISTED == BETA_SCHEDULES


def test_a_level_trained_below_its_t_start_is_refused(store, tmp_path):
    from helpers import save_test_model

    from nca_tiles.diffusion.levels import save_scale_space_model

    fine = tmp_path / "fine"
    assert_ok(train(store, fine, "--steps", 1, "--max-timestep", 40, "--preset", "tiny"))
    coarse = save_test_model(tmp_path / "coarse", mpp=2.0)
    with pytest.raises(NcaTilesError, match="trained only up to t = 40"):
        save_scale_space_model(tmp_path / "m", [coarse, fine], [2, 1], [None, 99])
    save_scale_space_model(tmp_path / "ok", [coarse, fine], [2, 1], [None, 40])


def test_init_from_starts_from_another_models_weights(one_step, store, tmp_path):
    out = tmp_path / "warm"
    assert_ok(train(store, out, "--steps", 1, "--init-from", one_step, "--lr", "1e-30"))
    start = load_checkpoint(one_step)
    warm = load_checkpoint(out)
    # With a vanishing learning rate one step leaves the weights where they started: the EMA of
    # the model they were taken from.
    for name, tensor in start["ema"].items():
        torch.testing.assert_close(warm["model"][name], tensor)
    assert warm["meta"]["training"]["initialized_from"]["step"] == start["step"]
    assert_one_line_error(train(store, out, "--steps", 2, "--resume", "--init-from", one_step), "--init-from")
    assert_one_line_error(train(store, tmp_path / "w2", "--steps", 1, "--init-from", one_step, "--preset", "small"),
                          "another model config", "--preset")


def test_the_library_resolves_device_and_precision(store, tmp_path):
    # nca_tiles.train takes the CLI's words ("auto", "cpu", "bf16") and refuses what the CLI refuses.
    from nca_tiles.training.trainer import TrainConfig, run_training

    config = TrainConfig(steps=1, batch_size=4, sample_every=0)
    trainer, _ = run_training(store, tmp_path / "auto", "tiny", config, "auto", "auto", progress=False)
    assert trainer.precision == "fp32" and trainer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(NcaTilesError, match="bf16 on a CPU.*--precision fp32"):
        run_training(store, tmp_path / "bf16", "tiny", config, "cpu", "bf16", progress=False)
    assert not (tmp_path / "bf16").exists()
    with pytest.raises(NcaTilesError, match="--init-from starts a new run"):
        run_training(store, tmp_path / "auto", "tiny", config, "cpu", resume=True, init_from=tmp_path / "auto")


# -- relay training: a finer level learns the states the sampler hands it ----------------------------
def test_relay_start_is_the_samplers_upsampling_of_an_area_average():
    from nca_tiles.diffusion.scale_space import upsample_window
    from nca_tiles.diffusion.scale_space import relay_start

    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    coarse = torch.nn.functional.avg_pool2d(x0, 4)
    sampler = torch.stack([upsample_window(c, (0, 0), (8, 8), (0, 0), (32, 32), 4) for c in coarse])
    torch.testing.assert_close(relay_start(x0, 4), sampler)
    assert not torch.allclose(relay_start(x0, 4), x0, atol=0.1)  # the detail is gone


def test_relay_state_at_t_start_is_the_hand_over_and_ddim_stays_on_it():
    from nca_tiles.diffusion.schedule import NoiseSchedule
    from nca_tiles.diffusion.scale_space import relay_start
    from nca_tiles.training.trainer import relay_target

    schedule = NoiseSchedule()
    x0 = (torch.rand(1, 3, 32, 32) * 1.6 - 0.8)
    eps = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    s = 120
    x_s, target_s = relay_target(schedule, x0, eps, torch.tensor([s]), 4, s)
    ab = schedule.alpha_bar(s)
    # At t_start: the upsampled coarse image re-noised, as scale_space.renoise makes it.
    torch.testing.assert_close(x_s, math.sqrt(ab) * relay_start(x0, 4) + math.sqrt(1 - ab) * eps)
    # The target's x_0 is the sharp patch, and a DDIM step with it lands on the state of the same
    # family at the earlier t: what the level sees in sampling is what it was trained on.
    torch.testing.assert_close(schedule.predict_x0(x_s, target_s, s), x0, atol=1e-5, rtol=0)
    for t_prev in (90, 40, 0):
        x_prev, _ = relay_target(schedule, x0, eps, torch.tensor([t_prev]), 4, s)
        torch.testing.assert_close(schedule.ddim_step(target_s, s, t_prev, x_s), x_prev, atol=1e-5, rtol=0)


def test_relay_factor_trains_is_recorded_and_must_be_kept_on_resume(store, tmp_path):
    out = tmp_path / "relay"
    assert_ok(train(store, out, "--steps", 2, "--max-timestep", 60, "--relay-factor", 4))
    assert load_checkpoint(out)["meta"]["training"]["relay_factor"] == 4
    assert json.loads((out / "model" / "config.json").read_text())["training"]["relay_factor"] == 4
    assert_one_line_error(train(store, out, "--steps", 3, "--resume", "--max-timestep", 60), "--relay-factor 4")
    assert_ok(train(store, out, "--steps", 3, "--resume", "--max-timestep", 60, "--relay-factor", 4))
    plain = tmp_path / "plain"
    assert_ok(train(store, plain, "--steps", 1, "--max-timestep", 60))
    assert "relay_factor" not in load_checkpoint(plain)["meta"]["training"]
    assert_one_line_error(train(store, plain, "--steps", 2, "--resume", "--max-timestep", 60, "--relay-factor", 4),
                          "without --relay-factor")


@pytest.mark.parametrize("args, words", [
    (["--relay-factor", 4], ["--relay-factor needs --max-timestep"]),
    (["--relay-factor", 1, "--max-timestep", 60], ["--relay-factor", "2"]),
    (["--relay-factor", 3, "--max-timestep", 60], ["--relay-factor 3 does not divide", "64 px"]),
])
def test_bad_relay_factors_are_refused(store, tmp_path, args, words):
    assert_one_line_error(train(store, tmp_path / "run", "--steps", 1, *args), *words)
    assert not (tmp_path / "run").exists()


def test_build_model_refuses_a_relay_level_at_another_ratio(store, tmp_path):
    from helpers import save_test_model

    from nca_tiles.diffusion.levels import save_scale_space_model

    fine = tmp_path / "fine"
    assert_ok(train(store, fine, "--steps", 1, "--max-timestep", 40, "--relay-factor", 2))
    coarse2, coarse4 = save_test_model(tmp_path / "c2", mpp=2.0), save_test_model(tmp_path / "c4", mpp=4.0)
    save_scale_space_model(tmp_path / "ok", [coarse2, fine], [2, 1], [None, 40])
    with pytest.raises(NcaTilesError, match="from a level 2× coarser.*the level below is 4× coarser"):
        save_scale_space_model(tmp_path / "m", [coarse4, fine], [4, 1], [None, 40])
    with pytest.raises(NcaTilesError, match="it is the coarsest level"):
        save_scale_space_model(tmp_path / "m2", [fine], [1], [None])


# -- --balance-slides: each slide equally likely, whatever its patch count ---------------------------
def test_balanced_draw_gives_every_slide_an_equal_share():
    from nca_tiles.training.trainer import SlideGroups, balanced_draw

    slide_of_patch = np.array([2] * 5 + [0] * 90 + [1] * 4 + [0] * 1)  # grouped or not, any labels
    groups = SlideGroups.of(slide_of_patch)
    drawn = balanced_draw(groups, 30_000, torch.Generator().manual_seed(0))
    shares = np.bincount(slide_of_patch[drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.015)
    # Within a slide, every patch alike: slide 0's 91 patches, the lone last one included.
    of_slide_0 = np.bincount(drawn[slide_of_patch[drawn] == 0], minlength=100)[np.flatnonzero(slide_of_patch == 0)]
    assert of_slide_0.min() > 0.6 * of_slide_0.mean() and of_slide_0.max() < 1.4 * of_slide_0.mean()
    again = balanced_draw(groups, 30_000, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(drawn, again)  # a function of the generator's state


@pytest.fixture(scope="module")
def two_slide_store(tmp_path_factory, sample_slide) -> Path:
    """The sample slide (up to 200 patches) and a small ovary region (a few dozen): unbalanced."""
    path = tmp_path_factory.mktemp("two") / "p.zarr"
    ovary = REPO / "nca_tiles" / "data" / "training" / "ovary_hgsc_stroma.jpg"
    extract_patches([sample_slide, ovary], path, stride=64, max_per_slide=200, progress=False,
                    source_mpp={"ovary_*": 0.25})
    return path


def test_balance_slides_draws_the_small_slide_as_often_as_the_large(two_slide_store, tmp_path):
    from nca_tiles.diffusion.model import preset
    from nca_tiles.training.trainer import TrainConfig, Trainer, balanced_draw

    store = open_patch_store(two_slide_store)
    slide_of_train = store.slide_index[np.sort(store.indices("train"))]
    counts = np.bincount(slide_of_train)
    assert len(counts) == 2 and counts.max() > 3 * counts.min()  # the fixture is unbalanced
    trainer = Trainer(store, tmp_path / "run", preset("tiny"), ScheduleConfig(), TrainConfig(balance_slides=True),
                      torch.device("cpu"), compile=False)
    drawn = slide_of_train[balanced_draw(trainer.train_slides, 4000, torch.Generator().manual_seed(1))]
    np.testing.assert_allclose(np.bincount(drawn) / len(drawn), 0.5, atol=0.03)


def test_balance_slides_is_recorded_resumes_exactly_and_must_be_kept(two_slide_store, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(train(two_slide_store, straight, "--steps", 4, "--balance-slides"))
    assert load_checkpoint(straight)["meta"]["training"]["balance_slides"] is True
    assert_ok(train(two_slide_store, resumed, "--steps", 2, "--balance-slides"))
    assert_one_line_error(train(two_slide_store, resumed, "--steps", 4, "--resume"), "with --balance-slides")
    assert_ok(train(two_slide_store, resumed, "--steps", 4, "--resume", "--balance-slides"))
    assert_identical(load_checkpoint(straight)["model"], load_checkpoint(resumed)["model"])
    plain = tmp_path / "plain"
    assert_ok(train(two_slide_store, plain, "--steps", 1))
    assert "balance_slides" not in load_checkpoint(plain)["meta"]["training"]
    assert_one_line_error(train(two_slide_store, plain, "--steps", 2, "--resume", "--balance-slides"),
                          "without --balance-slides")
    # Balanced batches are other batches: the weights differ from the plain run's after one step.
    assert_ok(train(two_slide_store, tmp_path / "one", "--steps", 1, "--balance-slides"))
    a, b = load_checkpoint(plain)["model"], load_checkpoint(tmp_path / "one")["model"]
    assert any(not torch.equal(a[key], b[key]) for key in a)


# -- --slide-weight: balanced batches, some slides weighted ----------------------------------------
def test_weighted_draw_gives_each_slide_its_share():
    from nca_tiles.training.trainer import SlideGroups, slide_shares, weighted_draw

    slide_of_patch = np.array([2] * 5 + [0] * 90 + [1] * 4 + [0] * 1)
    groups = SlideGroups.of(slide_of_patch)
    names = ["big.svs", "ovary_a.jpg", "ovary_b.jpg"]  # the store's slides 0, 1, 2
    shares = slide_shares(names, groups, (("ovary_a*", 0.0), ("ovary_*", 2.0)))  # the first match counts
    np.testing.assert_allclose(shares, [1 / 3, 0, 2 / 3])
    drawn = weighted_draw(groups, shares, 30_000, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(np.bincount(slide_of_patch[drawn], minlength=3) / len(drawn), shares, atol=0.015)
    np.testing.assert_array_equal(drawn, weighted_draw(groups, shares, 30_000, torch.Generator().manual_seed(0)))
    with pytest.raises(NcaTilesError, match="'skin_\\*' matches none of the store's slides .*big.svs"):
        slide_shares(names, groups, (("skin_*", 2.0),))
    with pytest.raises(NcaTilesError, match="every slide with train patches has weight 0"):
        slide_shares(names, groups, (("*", 0.0),))


def test_slide_weight_shifts_the_batches_is_recorded_and_must_be_kept(two_slide_store, tmp_path):
    from nca_tiles.diffusion.model import preset
    from nca_tiles.training.trainer import TrainConfig, Trainer, weighted_draw

    store = open_patch_store(two_slide_store)
    slide_of_train = store.slide_index[np.sort(store.indices("train"))]
    config = TrainConfig(balance_slides=True, slide_weights=(("ovary_*", 3.0),))
    trainer = Trainer(store, tmp_path / "run", preset("tiny"), ScheduleConfig(), config, torch.device("cpu"),
                      compile=False)
    drawn = slide_of_train[weighted_draw(trainer.train_slides, trainer.slide_shares, 4000,
                                         torch.Generator().manual_seed(1))]
    ovary = [i for i, s in enumerate(store.slides) if Path(s["path"]).name.startswith("ovary_")]
    assert np.mean(drawn == ovary[0]) == pytest.approx(0.75, abs=0.03)  # 3 : 1

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    weighted = ("--balance-slides", "--slide-weight", "ovary_*=3")
    assert_ok(train(two_slide_store, straight, "--steps", 4, *weighted))
    assert load_checkpoint(straight)["meta"]["training"]["slide_weights"] == [["ovary_*", 3.0]]
    assert_ok(train(two_slide_store, resumed, "--steps", 2, *weighted))
    assert_one_line_error(train(two_slide_store, resumed, "--steps", 4, "--resume", "--balance-slides"),
                          "--slide-weight 'ovary_*=3'", "give the same")
    assert_ok(train(two_slide_store, resumed, "--steps", 4, "--resume", *weighted))
    assert_identical(load_checkpoint(straight)["model"], load_checkpoint(resumed)["model"])
    balanced = tmp_path / "balanced"
    assert_ok(train(two_slide_store, balanced, "--steps", 1, "--balance-slides"))
    assert "slide_weights" not in load_checkpoint(balanced)["meta"]["training"]
    assert_one_line_error(train(two_slide_store, balanced, "--steps", 2, "--resume", *weighted),
                          "without --slide-weight")


@pytest.mark.parametrize("args, fragments", [
    (["--slide-weight", "ovary_*=3"], ["--slide-weight", "--balance-slides: give both"]),
    (["--balance-slides", "--slide-weight", "ovary_*"], ["PATTERN=weight", "'ovary_*'"]),
    (["--balance-slides", "--slide-weight", "=2"], ["PATTERN=weight"]),
    (["--balance-slides", "--slide-weight", "ovary_*=lots"], ["PATTERN=weight"]),
    (["--balance-slides", "--slide-weight", "ovary_*=-1"], ["ovary_*=-1.0", "finite number ≥ 0"]),
    (["--balance-slides", "--slide-weight", "ovary_*=nan"], ["finite number ≥ 0"]),
    (["--balance-slides", "--slide-weight", "skin_*=2"], ["'skin_*' matches none", "ovary_hgsc_stroma.jpg"]),
])
def test_bad_slide_weights_are_refused_in_one_line(two_slide_store, tmp_path, args, fragments):
    assert_one_line_error(train(two_slide_store, tmp_path / "run", "--steps", 1, *args), *fragments)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_finer_levels_sample_grid_shows_what_it_makes_of_the_hand_over(store, tmp_path):
    # A level trained only up to --max-timestep never starts from pure noise: samples from noise
    # showed nothing it learned. Its grid: real validation patches, the hand-over, the result.
    from nca_tiles.diffusion.scale_space import relay_start
    from nca_tiles.training.sample_grid import handover_patches

    out = tmp_path / "relay"
    assert_ok(run_cli("train", "--patches", store, "--out", out, *BASE, "--steps", 2, "--sample-every", 2,
                      "--max-timestep", 60, "--relay-factor", 4))
    opened = open_patch_store(store)
    real = handover_patches(opened.images[:][np.sort(opened.indices("val"))])
    assert len(real) == 8
    with Image.open(out / "samples" / "step_0000002.png") as png:
        grid = np.asarray(png.convert("RGB"))
    assert grid.shape == (3 * 64 + 2 * 2, 8 * 64 + 7 * 2, 3)
    rows = [np.stack([grid[r * 66 : r * 66 + 64, c * 66 : c * 66 + 64] for c in range(8)]) for r in range(3)]
    np.testing.assert_array_equal(rows[0], real)
    # The hand-over is the blurred patch re-noised to t = 60 (ᾱ ≈ 0.96): near the blur, not the patch.
    blurred = relay_start(torch.from_numpy(real).permute(0, 3, 1, 2).float(), 4).permute(0, 2, 3, 1).numpy()
    handed = rows[1].astype(np.float32)
    assert np.abs(handed - blurred).mean() < np.abs(handed - real).mean()
    assert not np.array_equal(rows[2], rows[1])  # the level's result
