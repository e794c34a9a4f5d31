"""The Diff-NCA rule is local (radius s) and translation-equivariant: the core of exact tiling."""

import pytest
import torch

from nca_tiles.errors import NcaTilesError
from nca_tiles.diffusion.model import (PRESETS, CounterFireMask, DiffNCA, ModelConfig, band_rows, describe_preset, preset,
                                      reflect_pad_rows)
from helpers import needs_proc, run_measuring

CONFIG = ModelConfig(channels=12, hidden=24, nca_steps=5, embedding_hidden=16, encoding_dim=8)
S = CONFIG.nca_steps


def trained_like(config: ModelConfig = CONFIG, seed: int = 0) -> DiffNCA:
    """A model with non-zero update weights (a fresh one has a zero last layer: trivially local)."""
    torch.manual_seed(seed)
    model = DiffNCA(config).double().eval()
    for p in model.to_update.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def predict(model, x, t=123, origin=(0, 0), seed=11):
    fire = CounterFireMask(model.config.fire_rate, [seed] * x.shape[0], [t] * x.shape[0], [origin] * x.shape[0])
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), t), fire)


def test_paper_preset_parameter_count_matches_paper():
    n = DiffNCA(PRESETS["paper"]).num_parameters()
    assert abs(n - 331_000) / 331_000 < 0.03, n


def test_prediction_depends_on_input():
    model = trained_like()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    eps = predict(model, x)
    assert eps.shape == x.shape
    assert eps.abs().mean() > 1e-3
    assert not torch.allclose(eps, predict(model, x + 0.5))


def test_one_pixel_changes_noise_only_within_radius_s():
    model = trained_like()
    x = torch.randn(1, 3, 41, 41, dtype=torch.float64)
    y, x0 = 20, 20
    bumped = x.clone()
    bumped[0, :, y, x0] += 1.0
    diff = (predict(model, bumped) - predict(model, x)).abs().amax(dim=(0, 1))
    changed = (diff > 0).nonzero()
    assert len(changed) > 0
    radius = (changed - torch.tensor([y, x0])).abs().amax()
    assert radius == S, f"dependency radius {radius}, expected {S}"


@pytest.mark.parametrize("box", [(10, 18, 7, 30), (0, 12, 0, 12), (25, 40, 33, 50), (5, 6, 40, 50)])
def test_crop_with_halo_equals_crop_of_whole(box):
    model = trained_like()
    h, w = 40, 50
    x = torch.randn(1, 3, h, w, dtype=torch.float64)
    whole = predict(model, x)
    y0, y1, x0, x1 = box
    # The window: the crop ± s, clipped to the canvas; fire masks keyed by its global origin.
    wy0, wy1, wx0, wx1 = max(0, y0 - S), min(h, y1 + S), max(0, x0 - S), min(w, x1 + S)
    window = predict(model, x[:, :, wy0:wy1, wx0:wx1], origin=(wy0, wx0))
    crop = window[:, :, y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
    torch.testing.assert_close(crop, whole[:, :, y0:y1, x0:x1], rtol=1e-9, atol=1e-9)


def test_halo_smaller_than_s_is_not_enough():
    # The halo arithmetic is tight: with s − 1 pixels of halo the border of the crop is wrong.
    model = trained_like()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    whole = predict(model, x)
    y0, y1 = 15, 25
    halo = S - 1
    window = predict(model, x[:, :, y0 - halo : y1 + halo, y0 - halo : y1 + halo], origin=(y0 - halo, y0 - halo))
    crop = window[:, :, halo:-halo, halo:-halo]
    assert not torch.allclose(crop, whole[:, :, y0:y1, y0:y1])


def test_shifted_input_gives_shifted_output():
    model = trained_like()
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    dy, dx = 3, 5
    # The fire mask is keyed by global coordinates, so a content shift is a shift of the origin too.
    base = predict(model, x[:, :, :40, :40], origin=(0, 0))
    shifted = predict(model, x[:, :, dy : dy + 40, dx : dx + 40], origin=(dy, dx))
    # Pixels at least s from both windows' edges (global dy+i must be interior in base too).
    interior = slice(S, 40 - S - max(dy, dx))
    torch.testing.assert_close(
        shifted[:, :, interior, interior],
        base[:, :, dy + interior.start : dy + interior.stop, dx + interior.start : dx + interior.stop],
        rtol=1e-9, atol=1e-9,
    )


def test_image_channels_are_never_written():
    model = trained_like()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    state = torch.cat([x, torch.zeros(2, model.config.channels - 3, 16, 16, dtype=torch.float64)], 1)
    e = model.embedding(torch.tensor([5, 6]))[0].double()
    after = model.nca_step(state, e, torch.ones(2, 1, 16, 16, dtype=torch.float64))
    assert torch.equal(after[:, :3], x)
    assert not torch.equal(after[:, 3:], state[:, 3:])


def test_embedding_as_bias_equals_explicit_concatenation():
    # The e channels are folded into biases; check against the paper's literal concat formulation.
    model = trained_like()
    c = model.config.channels
    b, h, w = 2, 9, 11
    state = torch.randn(b, c, h, w, dtype=torch.float64)
    e = torch.randn(b, model.config.embedding_channels, dtype=torch.float64)
    fire = torch.ones(b, 1, h, w, dtype=torch.float64)
    eb = e[:, :, None, None].expand(-1, -1, h, w)
    inp = torch.cat([state, eb], 1)
    perceived = model.perceive(torch.nn.functional.pad(inp, (1, 1, 1, 1), mode="reflect"))
    z = torch.cat([perceived, state, eb], 1) * model.mul_cond0(e)[:, :, None, None]
    hidden = torch.nn.functional.leaky_relu(model.norm(model.to_hidden(z))) * model.mul_cond1(e)[:, :, None, None]
    expected = state + model.to_update(hidden) * model.writable
    torch.testing.assert_close(model.nca_step(state, e, fire), expected, rtol=1e-9, atol=1e-9)


def test_presets_and_bad_configs():
    assert preset("tiny").nca_steps == PRESETS["tiny"].halo
    assert "parameters" in describe_preset("paper")
    with pytest.raises(NcaTilesError):
        preset("huge")
    with pytest.raises(NcaTilesError):
        ModelConfig(channels=4)
    with pytest.raises(NcaTilesError):
        ModelConfig(fire_rate=0)
    with pytest.raises(NcaTilesError):
        ModelConfig.from_dict({**CONFIG.to_dict(), "future_field": 1})


def test_banded_inference_equals_unbanded():
    # Inference runs the cell rule in bands of rows; training (autograd on) in one piece.
    model = trained_like()
    x = torch.randn(2, 3, 250, 300, dtype=torch.float64)  # 300 px wide: bands of 109 rows on a CPU
    assert DiffNCA.band_pixels(x.device) // 300 < 250 // 2
    banded = predict(model, x)
    fire = CounterFireMask(model.config.fire_rate, [11, 11], [123, 123], [(0, 0), (0, 0)])
    with torch.enable_grad():
        whole = model(x, torch.full((2,), 123), fire).detach()
    torch.testing.assert_close(banded, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("height,rows", [(70, 27), (55, 27), (28, 27), (2, 1), (5, 1), (100, 8192)])
def test_bands_cover_the_rows_once_none_one_row_high(height, rows):
    # A one-row band would cost the compiled rule another graph (torch specialises sizes of 1).
    bands = band_rows(height, rows)
    assert bands[0][0] == 0 and bands[-1][1] == height
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    assert all(r1 - r0 >= 2 for r0, r1 in bands)


@pytest.mark.parametrize("height", [2, 3, 7])
def test_reflect_padded_bands_are_rows_of_the_padded_image(height):
    state = torch.randn(2, 4, height, 5, dtype=torch.float64)
    padded = torch.nn.functional.pad(state, (1, 1, 1, 1), mode="reflect")
    for rows in range(1, height + 1):
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            assert torch.equal(reflect_pad_rows(state, r0, r1), padded[:, :, r0 : r1 + 2]), (rows, r0)


INFERENCE_PEAK = """
import sys, torch
from nca_tiles.diffusion.model import CounterFireMask, DiffNCA, ModelConfig
model = DiffNCA(ModelConfig(channels=32, hidden=16, nca_steps=2, embedding_hidden=32, encoding_dim=16)).eval()
def run(side):
    with torch.no_grad():
        return model(torch.randn(1, 3, side, side), torch.tensor([100]), CounterFireMask(0.5, [0], [100], [(0, 0)]))
run(64)  # libraries loaded, thread pools up
before = peak_kib()
eps = run(int(sys.argv[1]))
print(before, peak_kib())
"""


class ZeroForFirstSample:
    """A fire mask that fires no cell of sample 0 (and the counter mask's cells elsewhere)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, nca_step, shape, device, row0=0):
        mask = self.inner(nca_step, shape, device, row0).clone()
        mask[0] = 0
        return mask


@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
@pytest.mark.parametrize("none_fire", [False, True], ids=["", "a-sample-fires-no-cell"])
def test_the_rule_on_fired_cells_only_equals_the_dense_rule(fire_rate, none_fire):
    # On a CPU the eager rule computes the MLP of fired cells only, on channels-last states
    # (fired_cell_rule); the dense rule computes every cell's and masks. Inference (banded, with
    # per-sample t and windows) and training (whole tensors, gradients) must agree.
    config = ModelConfig(channels=12, hidden=24, nca_steps=5, embedding_hidden=16, encoding_dim=8, fire_rate=fire_rate)
    model = trained_like(config)
    x = torch.randn(3, 3, 250, 300, dtype=torch.float64)  # three bands at inference
    assert DiffNCA.band_pixels(x.device) // 300 < 250 // 2
    t = torch.tensor([123, 5, 260])
    fire = CounterFireMask(fire_rate, [11, 12, 13], t.tolist(), [(0, 0), (40, 7), (3, 900)])
    fire = ZeroForFirstSample(fire) if none_fire else fire
    results = {}
    for gather in (True, False):
        model.gather_fired = gather
        assert model.gathers_fired(x.device) is gather
        with torch.no_grad():
            banded = model(x, t, fire)
        model.zero_grad()
        whole = model(x, t, fire)
        whole.square().sum().backward()
        results[gather] = banded, whole.detach(), [p.grad.clone() for p in model.parameters()]
        assert banded.is_contiguous() and banded.shape == x.shape
    (banded, whole, grads), (dense_banded, dense_whole, dense_grads) = results[True], results[False]
    torch.testing.assert_close(banded, dense_banded, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole, dense_whole, rtol=1e-12, atol=1e-12)
    for g, dense_g in zip(grads, dense_grads):
        torch.testing.assert_close(g, dense_g, rtol=1e-10, atol=1e-12)
    if none_fire:  # nothing fired in sample 0: its hidden channels stay zero, so ε̂ does too
        assert banded[0].abs().max() == 0


@pytest.mark.parametrize("nca_steps", [5, 1])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_the_first_nca_step_reads_the_image_only_and_the_last_writes_eps_only(monkeypatch, nca_steps, grad):
    # A model call starts from (image, zeros) and returns the ε̂ channels only, so the first NCA
    # step need not read the zero channels and the last need not write the others
    # (DiffNCA.narrowed): the same numbers and gradients as every channel's, for exactly the
    # convolution and GEMM work those channels cost (every cell fires here, so the count is exact).
    from torch.utils.flop_counter import FlopCounterMode

    from nca_tiles.diffusion.model import fold_step

    config = ModelConfig(channels=12, hidden=24, nca_steps=nca_steps, embedding_hidden=16, encoding_dim=8,
                         fire_rate=1.0)
    model = trained_like(config)
    x = torch.randn(2, 3, 20, 30, dtype=torch.float64)
    t = torch.tensor([123, 7])
    fire = CounterFireMask(1.0, [11, 12], t.tolist(), [(0, 0), (3, 5)])

    def call():
        model.zero_grad()
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as flops:
            eps = model(x, t, fire)
        if eps.shape[1] != 3:  # unnarrowed, the training call returns its whole state
            eps = eps[:, 3:6]
        if grad:
            eps.square().sum().backward()
        return eps.detach(), [p.grad.clone() if grad else None for p in model.parameters()], flops.get_total_flops()

    narrowed, narrowed_grads, narrowed_flops = call()
    monkeypatch.setattr(DiffNCA, "narrowed",
                        lambda self, k, state, w, e: (state, state, fold_step(w, *self.conditioning(e).tensors())))
    every, every_grads, every_flops = call()
    torch.testing.assert_close(narrowed, every, rtol=1e-12, atol=1e-12)
    for g, every_g in zip(narrowed_grads, every_grads):
        if grad:
            torch.testing.assert_close(g, every_g, rtol=1e-10, atol=1e-12)
    c, ic, h, pixels = config.channels, config.image_channels, config.hidden, x.shape[0] * 20 * 30
    first = pixels * (c * (c - ic) * 9 + (c - ic) * h)  # MACs: the zero channels' perception and hidden inputs
    last = pixels * h * (c - ic)  # the update of channels nobody reads
    assert every_flops - narrowed_flops == 2 * (first + last)


def test_the_fired_cells_rule_is_for_eager_cpu_runs():
    model = trained_like()
    assert model.gathers_fired(torch.device("cpu"))
    assert not model.gathers_fired(torch.device("cuda"))  # a device type, nothing allocated
    model.compiled = True
    assert not model.gathers_fired(torch.device("cpu"))
    model.compiled = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model.gathers_fired(torch.device("cpu"))


@needs_proc
def test_inference_holds_two_states_whatever_the_number_of_nca_steps():
    # Banded inference: a window costs one state (the fired-cells rule on a CPU adds its updates
    # in place; the dense rule swaps two buffers) plus one band's work, ≤ 2.6 states here.
    # (Whole-tensor temporaries, as in training, cost about five states.)
    side = 512
    before, peak = run_measuring(INFERENCE_PEAK, side)
    state_kib = 32 * side * side * 4 // 1024
    assert peak - before < 2.6 * state_kib, f"{(peak - before) / state_kib:.2f} states"


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_the_rule_runs_under_bf16_autocast(grad):
    """The pipeline's default on CUDA is bf16 autocast: the eager rule's in-place accumulation
    (bmm(...).baddbmm_(...)) mixed an autocast bf16 product with fp32 operands and raised — every
    `synthesize --device cuda` failed (found on an H100 by benchmarks/check_cuda.py). CPU autocast
    casts the same ops, so it stands in for CUDA here (never for speed: bf16 is slow on CPUs)."""
    model = trained_like().float()
    x = torch.randn(2, 3, 24, 20)
    fire = CounterFireMask(model.config.fire_rate, [11, 12], [123, 123], [(0, 0), (5, 3)])
    t = torch.full((2,), 123)
    with torch.set_grad_enabled(grad):
        reference = model(x, t, fire)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps = model(x, t, fire)
    assert eps.shape == x.shape and eps.dtype in (torch.float32, torch.bfloat16)
    # bf16 keeps 8 bits of mantissa: near the fp32 result, not equal to it.
    assert (eps.float() - reference).abs().max() < 0.05 * reference.abs().max() + 0.05
    if grad:
        eps.float().square().mean().backward()
        assert model.to_update.weight.grad is not None
