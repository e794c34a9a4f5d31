"""torch.compile of the cell rule: the same numbers as eager (inference and a training step), tiled
still equals whole, windows of any shape share a few compiled graphs, and without a compiler the
rule runs eager after one warning line."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from nca_tiles.diffusion import compiled
from nca_tiles.diffusion.model import PRESETS, CounterFireMask, DiffNCA, rule_is_warm
from nca_tiles.diffusion.pipeline import COMPILE_PAYS_AFTER_S, TRIAL_CALLS, generate_region, load_model
from nca_tiles.diffusion.schedule import NoiseSchedule
from nca_tiles.synthesis.job import chunk_grid
from nca_tiles.training.trainer import COMPILE_FROM_STEP, COMPILE_MIN_STEPS, Trainer, TrainConfig, diffusion_loss
from helpers import assert_ok, save_test_model
from test_synthesis import H, W, assert_same_image, synthesize
from test_training import metrics, store, train  # noqa: F401 (store: a fixture)

TINY = PRESETS["tiny"]
pytestmark = pytest.mark.skipif(not compiled.available("cpu"), reason="no C++ compiler for torch.compile")


@pytest.fixture(autouse=True, scope="module")
def forget_compiled():
    # Pipelines in later test modules compile as soon as the rule is warm in the process: start
    # and leave them as if this module had not run.
    compiled.reset()
    yield
    compiled.reset()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def auto_compiles_on_cpu(monkeypatch):
    """--compile auto as on a GPU, where it compiles (on a CPU it runs eager): the trial, its
    verdicts and their memory are the same code on either device, so the CPU stands in here."""
    monkeypatch.setattr(compiled, "AUTO_DEVICES", ("cpu", "cuda"))


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def tiny_model(seed: int = 0) -> DiffNCA:
    torch.manual_seed(seed)
    model = DiffNCA(TINY)
    for p in model.to_update.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def predict(model: DiffNCA, x: torch.Tensor, origin=(0, 0)) -> torch.Tensor:
    b = x.shape[0]
    fire = CounterFireMask(TINY.fire_rate, [5] * b, [77] * b, [origin] * b)
    with torch.no_grad():
        return model(x, torch.full((b,), 77), fire)


def test_compiled_inference_equals_eager():
    model = tiny_model().eval()
    # One band; several bands (300 px wide: 27-row bands); a last band of one row merged away.
    for shape in [(1, 3, 40, 50), (1, 3, 70, 300), (2, 3, 55, 300)]:
        x = torch.randn(shape)
        model.compiled = False
        eager = predict(model, x)
        model.compiled = True
        torch.testing.assert_close(predict(model, x), eager, rtol=1e-4, atol=1e-5)


def test_compiled_inference_hashes_its_fire_masks_inside_the_rule(model_dir, auto_compiles_on_cpu):
    """One compiled call per band, the mask's hash fused into the rule's kernel; a later
    --compile auto pipeline in the process sees the rule compiled and reuses it at once."""
    from nca_tiles.diffusion import rng
    from nca_tiles.diffusion.model import hashed_fire_cell_rule

    compiled.reset()
    model = tiny_model().eval()
    model.compiled = True
    predict(model, torch.randn(1, 3, 40, 50))
    assert compiled.is_warm(hashed_fire_cell_rule) and not compiled.is_warm(rng.window_bernoulli_bits)
    pipeline = load_model(model_dir, "cpu", compile="auto")
    generate_region(pipeline, 16, 16, steps=1)
    assert pipeline.compile == "trial" and pipeline.model.compiled  # compiled from its next call


def test_compiled_fire_masks_are_the_eager_ones_bit_for_bit():
    """Inference hashes its fire masks through the compiled kernel when the rule is compiled: the
    same integer arithmetic, so the same bits (or tiled == whole would hold only per mode)."""
    origins, seeds, steps = [(3, 11), (2**31 - 5, 2**32 + 7)], [0, 2**45 + 3], [299, 1]
    for shape in [(2, 1, 7, 13), (2, 1, 16, 16), (2, 1, 5, 300)]:
        for step in range(3):
            eager = CounterFireMask(TINY.fire_rate, seeds, steps, origins)(step, shape, torch.device("cpu"), row0=2)
            fast = CounterFireMask(TINY.fire_rate, seeds, steps, origins, compiled=True)(
                step, shape, torch.device("cpu"), row0=2)
            assert torch.equal(eager, fast), (shape, step)
            assert 0.2 < eager.mean() < 0.8


def test_compiled_step_noise_is_the_eager_noise_bit_for_bit():
    """A stochastic step's noise is hashed through a compiled kernel when the rule is compiled:
    integer arithmetic and an exact int → float map, so the same bits in either mode."""
    from nca_tiles.diffusion import rng

    for seed, step, (y0, x0), (h, w) in [(0, 299, (3, 11), (7, 13)), (2**45 + 3, 1, (2**31 - 5, -7), (16, 16)),
                                         (5, 40, (-20, 2**32 + 7), (5, 300))]:
        eager = rng.normal(seed, rng.Stream.STEP_NOISE, step, y0, x0, h, w, 3)
        fast = rng.normal(seed, rng.Stream.STEP_NOISE, step, y0, x0, h, w, 3, compiled=True)
        assert torch.equal(eager, fast), (seed, step, y0, x0)
        assert abs(float(eager.mean())) < 0.5 and 0.5 < float(eager.std()) < 1.5


def test_compiled_training_step_equals_eager():
    eager = tiny_model(1).train()
    comp = copy.deepcopy(eager)
    comp.compiled = True
    schedule = NoiseSchedule()
    x0 = torch.rand(2, 3, 24, 24) * 2 - 1
    results = []
    for model in (eager, comp):
        generator = torch.Generator().manual_seed(3)  # the same t, ε and fire masks for both
        loss, _ = diffusion_loss(model, schedule, x0, generator, torch.device("cpu"), contextlib.nullcontext)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        assert grads_e[name].abs().max() > 0, name
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_tiled_equals_whole_compiled(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(compiled.MODE_ENV, "on")  # every pipeline the job loads compiles
    eager = generate_region(load_model(model_dir, "cpu", compile=False), H, W, seed=7, steps=4)
    pipeline = load_model(model_dir, "cpu")
    assert pipeline.compile == "on" and pipeline.model.compiled
    assert_same_image(generate_region(pipeline, H, W, seed=7, steps=4), eager)
    whole = synthesize(model_dir, tmp_path / "whole.ome.tif", chunk=max(W, H))
    assert_same_image(whole, eager)
    for chunk in (32, 64):
        assert_same_image(synthesize(model_dir, tmp_path / f"tiled{chunk}.ome.tif", chunk=chunk), whole)


def test_windows_of_many_shapes_share_a_few_graphs(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(compiled.MODE_ENV, "on")
    halo = TINY.halo
    chunks = (24, 40, 48, 100)
    shapes = {c.window_shape for chunk in chunks for c in chunk_grid(H, W, chunk, halo)}
    assert len(shapes) >= 15
    before = graphs()
    for chunk in chunks:
        synthesize(model_dir, tmp_path / f"c{chunk}.ome.tif", chunk=chunk, steps=1)
    # Never one per window or shape: torch picks a convolution kernel by the input's size, so
    # bands below a few thousand values get their own graphs, at most one per such size class.
    assert graphs() - before <= 3, graphs() - before
    before = graphs()
    synthesize(model_dir, tmp_path / "c56.ome.tif", chunk=56, steps=1)  # new shapes again
    assert graphs() == before


def test_inference_on_a_cpu_runs_eager_unless_told_to_compile(model_dir, monkeypatch, capfd):
    """On a CPU the eager rule computes the MLP of fired cells only and the compiled rule cannot:
    before, --compile auto spent a compile and a trial (a minute of the demo) on every new machine
    to find that out."""
    compiled.reset()
    monkeypatch.setitem(COMPILE_PAYS_AFTER_S, "cpu", 0.0)
    pipeline = load_model(model_dir, "cpu", compile="auto")
    assert pipeline.compile == "off" and not pipeline.model.compiled
    pipeline.eager_seconds = 1e9  # however long eager takes
    generate_region(pipeline, 16, 16, steps=TRIAL_CALLS + 2)
    assert pipeline.compile == "off" and not pipeline.model.compiled and not rule_is_warm()
    assert not (compiled.cache_dir() / compiled.VERDICTS_FILE).exists()  # no trial, no verdict
    assert "torch.compile" not in capfd.readouterr().err  # nothing to say: the default
    forced = load_model(model_dir, "cpu", compile="on")
    assert forced.compile == "on" and forced.model.compiled
    compiled.reset()


def test_auto_compiles_once_eager_time_would_pay(model_dir, monkeypatch, auto_compiles_on_cpu):
    compiled.reset()  # not warm from the tests above: those would make compiling free
    pipeline = load_model(model_dir, "cpu", compile="auto")
    assert pipeline.compile == "auto" and not pipeline.model.compiled
    generate_region(pipeline, 16, 16, steps=2)
    assert not pipeline.model.compiled  # tiny work: compiling would not pay
    monkeypatch.setitem(COMPILE_PAYS_AFTER_S, "cpu", 0.0)
    pipeline.eager_seconds = 1e9  # eager was very slow: the trial keeps the compiled rule
    generate_region(pipeline, 16, 16, steps=TRIAL_CALLS + 2)
    assert pipeline.compile == "on" and pipeline.model.compiled and compiled.kept()
    assert not load_model(model_dir, "cpu", compile=False).model.compiled
    later = load_model(model_dir, "cpu", compile="auto")  # kept in this process: no trial of its own
    generate_region(later, 16, 16, steps=1)
    assert later.compile == "on" and later.model.compiled


def test_auto_goes_back_to_eager_where_compiled_is_not_faster(model_dir, monkeypatch, capfd, auto_compiles_on_cpu):
    compiled.reset()
    monkeypatch.setenv(compiled.MODE_ENV, "auto")  # the verdict sets it off for child processes
    monkeypatch.setitem(COMPILE_PAYS_AFTER_S, "cpu", 0.0)
    expected = generate_region(load_model(model_dir, "cpu", compile=False), 16, 16, seed=3, steps=TRIAL_CALLS + 3)
    pipeline = load_model(model_dir, "cpu", compile="auto")
    pipeline.eager_pixels = 1e15  # eager was very fast per pixel: compiled cannot beat it
    got = generate_region(pipeline, 16, 16, seed=3, steps=TRIAL_CALLS + 3)
    assert pipeline.compile == "off" and not pipeline.model.compiled
    assert_same_image(got, expected)
    assert capfd.readouterr().err.count("ran no faster than eager") == 1
    # The verdict holds for the process: a later pipeline stays eager without compiling again.
    later = load_model(model_dir, "cpu", compile="auto")
    generate_region(later, 16, 16, steps=2)
    assert later.compile == "off" and not later.model.compiled
    compiled.reset()


LATER_PROCESS = """
import sys
from nca_tiles.diffusion import compiled
from nca_tiles.diffusion.model import rule_is_warm
from nca_tiles.diffusion.pipeline import generate_region, load_model
compiled.AUTO_DEVICES = ("cpu", "cuda")  # as the auto_compiles_on_cpu fixture
pipeline = load_model(sys.argv[1], "cpu", compile=sys.argv[2])
generate_region(pipeline, 16, 16, steps=2)
print(pipeline.compile, pipeline.model.compiled, rule_is_warm())  # rule_is_warm: it compiled
"""


def later_process(model_dir, mode: str = "auto") -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", LATER_PROCESS, str(model_dir), mode], capture_output=True,
                            text=True, timeout=300, env={**os.environ, compiled.MODE_ENV: "auto"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_machine_remembers_that_compiled_was_not_faster(model_dir, monkeypatch, auto_compiles_on_cpu):
    compiled.reset()
    monkeypatch.setenv(compiled.MODE_ENV, "auto")  # the verdict sets it off: restored after the test
    monkeypatch.setitem(COMPILE_PAYS_AFTER_S, "cpu", 0.0)
    assert compiled.remembered_not_faster("cpu") is None  # this test's own, empty cache
    pipeline = load_model(model_dir, "cpu", compile="auto")
    pipeline.eager_pixels = 1e15  # the trial finds compiled slower
    generate_region(pipeline, 16, 16, steps=TRIAL_CALLS + 3)
    assert pipeline.compile == "off"
    verdicts = json.loads((compiled.cache_dir() / compiled.VERDICTS_FILE).read_text())
    assert list(verdicts) == [compiled.machine_key("cpu")] and verdicts[compiled.machine_key("cpu")]["faster"] is False
    compiled.reset()
    # A later process on this machine runs eager from the start: no compile, one note line.
    result = later_process(model_dir)
    assert result.stdout.split() == ["off", "False", "False"], result.stdout
    notes = [line for line in result.stderr.splitlines() if "torch.compile" in line]
    assert len(notes) == 1 and notes[0].startswith("note: torch.compile skipped"), result.stderr
    assert compiled.VERDICTS_FILE in notes[0] and "--compile forces it" in notes[0]
    # --compile (on) still compiles.
    compiled.reset()
    forced = load_model(model_dir, "cpu", compile="on")
    assert forced.compile == "on" and forced.model.compiled
    compiled.reset()


def test_a_compile_verdict_is_forgotten_when_old_damaged_or_from_another_machine(model_dir, monkeypatch,
                                                                                   auto_compiles_on_cpu):
    compiled.reset()
    path = compiled.cache_dir() / compiled.VERDICTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write(key, days_ago):
        when = (now - datetime.timedelta(days=days_ago)).isoformat()
        path.write_text(json.dumps({key: {"faster": False, "measured": when, "detail": ""}}))

    write(compiled.machine_key("cpu"), 1)
    assert compiled.remembered_not_faster("cpu") == (now - datetime.timedelta(days=1)).date().isoformat()
    write(compiled.machine_key("cpu"), compiled.VERDICT_DAYS + 1)
    assert compiled.remembered_not_faster("cpu") is None
    write(compiled.machine_key("cpu").replace("torch ", "torch 0.0+"), 1)  # another torch, CPU or thread count
    assert compiled.remembered_not_faster("cpu") is None
    for damaged in ("{", "[]", '{"%s": 3}' % compiled.machine_key("cpu"), ""):
        path.write_text(damaged)
        assert compiled.remembered_not_faster("cpu") is None
        assert load_model(model_dir, "cpu", compile="auto").compile == "auto"
    # A damaged file is replaced by the next verdict.
    compiled.remember_not_faster("cpu", "test")
    assert compiled.remembered_not_faster("cpu") == now.date().isoformat()
    compiled.reset()


def test_a_test_that_turns_compiling_off_leaves_the_next_test_its_mode():
    # The first half: a trial's verdict in the middle of a test, without monkeypatch (as in a
    # synthesis test whose real trial found the compiled rule slower on a loaded machine).
    before = os.environ.get(compiled.MODE_ENV)
    compiled.not_faster("was slower in this test")
    assert os.environ[compiled.MODE_ENV] == "off"
    compiled.reset()
    test_a_test_that_turns_compiling_off_leaves_the_next_test_its_mode.before = before


def test_the_mode_is_back_after_a_test_turned_compiling_off():
    # The second half (conftest.own_compile_settings): a later test's `nca-tiles synthesize --dry-run`
    # once planned no compile because of it (test_dry_run_counts_the_compiles_memory_unless_no_compile).
    assert os.environ.get(compiled.MODE_ENV) == test_a_test_that_turns_compiling_off_leaves_the_next_test_its_mode.before


class Run:  # the attributes Trainer._compile_from reads
    device = torch.device("cpu")

    def __init__(self, steps):
        self.cfg = TrainConfig(steps=steps)


def test_training_on_a_cpu_runs_eager_unless_told_to_compile():
    """On a CPU the eager step computes the MLP of fired cells only and beat the compiled (dense)
    step by 1.35×: before, every run of 500 steps or more compiled at step 50 and then ran slower."""
    first = Trainer._compile_from
    assert first(Run(10**6), None) is None and first(Run(10**6), "auto") is None
    assert first(Run(10**6), True) == first(Run(10**6), "on") == 0


def test_training_compiles_long_runs_after_their_first_steps(auto_compiles_on_cpu):
    first = Trainer._compile_from
    assert first(Run(COMPILE_MIN_STEPS), None) == first(Run(10**6), "auto") == COMPILE_FROM_STEP
    assert first(Run(COMPILE_MIN_STEPS - 1), None) is None  # tests, smoke runs
    assert first(Run(10), True) == 0 and first(Run(10**6), False) is None


def test_train_compile_flag_matches_eager(store, tmp_path):
    # nca-tiles train --compile: every step compiled, from the first; the losses are eager's.
    assert_ok(train(store, tmp_path / "eager", "--steps", 2, "--no-compile"))
    before, default = graphs(), os.environ.get(compiled.MODE_ENV)
    assert_ok(train(store, tmp_path / "compiled", "--steps", 2, "--compile"))
    assert graphs() > before  # this batch shape was new: it compiled
    assert os.environ.get(compiled.MODE_ENV) == default  # the flag held for the command only
    eager, comp = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [m["step"] for m in comp] == [1, 2]
    for a, b in zip(eager, comp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


NO_COMPILER = """
import sys
import numpy as np
from nca_tiles.diffusion.pipeline import generate_region, load_model
compiled_pipeline = load_model(sys.argv[1], "cpu", compile=True)
eager = generate_region(load_model(sys.argv[1], "cpu", compile=False), 24, 24, steps=2)
assert not compiled_pipeline.model.compiled
assert np.array_equal(generate_region(compiled_pipeline, 24, 24, steps=2), eager)
load_model(sys.argv[1], "cpu", compile=True)  # a second model: no second warning
"""


def test_no_compiler_runs_eager_after_one_warning_line(model_dir, tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    result = subprocess.run([sys.executable, "-c", NO_COMPILER, str(model_dir)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: torch.compile unavailable"), result.stderr
    assert "C++ compiler" in lines[0] and "--no-compile" in lines[0]


def test_cli_compile_flag_without_compiler_warns_once(model_dir, tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    out = tmp_path / "slide.ome.tif"
    args = [sys.executable, "-m", "nca_tiles_cli.main", "synthesize", "--model", str(model_dir), "--width", "40",
            "--height", "30", "--chunk", "32", "--steps", "1", "--compression", "none", "--tile", "64",
            "--device", "cpu", "--no-progress", "--compile", "--out", str(out)]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "torch.compile unavailable" in warnings[0], result.stderr
    assert out.exists()


def test_forget_decisions_turns_a_trials_verdict_back_but_keeps_compiled_copies(model_dir, monkeypatch,
                                                                                 auto_compiles_on_cpu):
    """The test fixture's reset between tests: a trial's "not faster" had left compiling off in
    the test process, so a later test of the compiled path skipped as if there were no compiler."""
    if compiled._missing_toolchain("cpu") is not None:
        pytest.skip("no C++ compiler for torch.compile")
    compiled.reset()
    monkeypatch.setenv(compiled.MODE_ENV, "auto")
    monkeypatch.setitem(COMPILE_PAYS_AFTER_S, "cpu", 0.0)
    pipeline = load_model(model_dir, "cpu", compile="auto")
    pipeline.eager_pixels = 1e15  # the trial finds compiled slower: off for the rest of the process
    generate_region(pipeline, 16, 16, steps=TRIAL_CALLS + 3)
    assert not compiled.available("cpu")
    copies = dict(compiled._compiled)
    compiled.forget_decisions()
    assert compiled.available("cpu") and not compiled.kept()
    assert not rule_is_warm()  # a later --compile auto run starts eager, as a fresh process would
    assert compiled._compiled == copies and copies
    compiled.reset()
