"""Counter-based randomness: statistics, independence, and windows equal to the whole."""

import numpy as np
import pytest
import torch

from nca_tiles.diffusion import rng
from nca_tiles.diffusion.rng import Stream


def test_normal_moments():
    z = rng.normal(7, Stream.STEP_NOISE, 3, 0, 0, 256, 256, 3).numpy().ravel()
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1) < 0.01
    assert abs(np.mean(z**3)) < 0.03  # skewness of a normal: 0
    assert abs(np.mean(z**4) - 3) < 0.06  # kurtosis of a normal: 3


def test_uniform_and_bernoulli_moments():
    u = rng.uniform(1, Stream.FIRE_MASK, 0, 0, 0, 300, 300).numpy()
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.002
    m = rng.bernoulli(0.3, 1, Stream.FIRE_MASK, 0, 0, 0, 300, 300).numpy()
    assert set(np.unique(m)) == {0.0, 1.0}
    assert abs(m.mean() - 0.3) < 0.01


def test_neighbours_uncorrelated():
    z = rng.normal(0, Stream.INITIAL_NOISE, 0, 0, 0, 256, 256, 3).numpy()
    pairs = {
        "x": (z[:, :, :-1], z[:, :, 1:]),
        "y": (z[:, :-1, :], z[:, 1:, :]),
        "diagonal": (z[:, :-1, :-1], z[:, 1:, 1:]),
        "channel": (z[:-1], z[1:]),
    }
    for name, (a, b) in pairs.items():
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 0.01, (name, r)


def test_keys_give_independent_streams():
    base = rng.normal(0, Stream.STEP_NOISE, 5, 0, 0, 128, 128, 3).numpy().ravel()
    others = [
        rng.normal(1, Stream.STEP_NOISE, 5, 0, 0, 128, 128, 3),  # seed
        rng.normal(0, Stream.INITIAL_NOISE, 5, 0, 0, 128, 128, 3),  # stream
        rng.normal(0, Stream.STEP_NOISE, 6, 0, 0, 128, 128, 3),  # step
        rng.normal(0, Stream.STEP_NOISE, 5, 0, 0, 128, 128, 3, substep=1),  # substep
        rng.normal(0, Stream.STEP_NOISE, 5, 0, 1, 128, 128, 3),  # shifted window
    ]
    for other in others:
        other = other.numpy().ravel()
        assert not np.allclose(base, other)
        assert abs(np.corrcoef(base, other)[0, 1]) < 0.02


def test_window_equals_window_of_whole():
    whole = rng.normal(3, Stream.STEP_NOISE, 9, 0, 0, 100, 120, 3)
    window = rng.normal(3, Stream.STEP_NOISE, 9, 37, 51, 20, 30, 3)
    assert torch.equal(window, whole[:, 37:57, 51:81])
    whole_mask = rng.bernoulli(0.5, 3, Stream.FIRE_MASK, 9, 0, 0, 100, 120, substep=4)
    assert torch.equal(rng.bernoulli(0.5, 3, Stream.FIRE_MASK, 9, 99, 5, 1, 7, substep=4), whole_mask[:, 99:, 5:12])


def test_far_coordinates_and_large_seeds():
    # A 100 000 px canvas and a 64-bit seed must work and stay deterministic.
    a = rng.normal(2**40 + 5, Stream.INITIAL_NOISE, 0, 99_990, 99_990, 10, 10, 3)
    b = rng.normal(2**40 + 5, Stream.INITIAL_NOISE, 0, 99_990, 99_990, 10, 10, 3)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_derive_seed_is_deterministic_and_spreads():
    seeds = {rng.derive_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert rng.derive_seed(5, 1, 2) == rng.derive_seed(5, 1, 2) != rng.derive_seed(5, 2, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_same_on_gpu():
    cpu = rng.normal(1, Stream.STEP_NOISE, 2, 10, 20, 64, 64, 3)
    gpu = rng.normal(1, Stream.STEP_NOISE, 2, 10, 20, 64, 64, 3, device="cuda").cpu()
    assert torch.equal(rng.hash_grid(1, Stream.STEP_NOISE, 2, 10, 20, 64, 64, 3),
                       rng.hash_grid(1, Stream.STEP_NOISE, 2, 10, 20, 64, 64, 3, device="cuda").cpu())
    torch.testing.assert_close(cpu, gpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("origins", [[(0, 0)], [(5, 7), (1000, 3), (2**31 + 9, 17)]])
def test_window_bernoulli_bits_are_the_per_window_masks(origins):
    """The fire masks of a batch of windows in one hash (the model's inference path) draw bit for
    bit what ``bernoulli`` draws for each window alone."""
    seeds, steps, substep, h, w, p = [3, 2**40 + 1, 7][: len(origins)], [299, 0, 42][: len(origins)], 4, 6, 9, 0.5
    keys = rng.window_keys(seeds, Stream.FIRE_MASK, steps, substep)
    ys = torch.stack([torch.arange(y, y + h) for y, _ in origins]).view(-1, 1, h, 1)
    xs = torch.stack([torch.arange(x, x + w) for _, x in origins]).view(-1, 1, 1, w)
    batched = rng.window_bernoulli_bits(keys, ys, xs, p)
    each = torch.stack([rng.bernoulli(p, seed, Stream.FIRE_MASK, step, y, x, h, w, substep=substep)
                        for seed, step, (y, x) in zip(seeds, steps, origins)])
    assert batched.shape == (len(origins), 1, h, w) and batched.dtype == torch.float32
    assert torch.equal(batched, each)


@pytest.mark.parametrize("p", [0.5, 0.3, 1 / 3, 0.9999999, 1.0])
def test_the_numpy_fire_masks_are_the_torch_ones(p):
    """On a CPU the fire masks are hashed in numpy uint32 arithmetic (a third of the time of
    torch's int64): bit for bit the same masks, at far and negative coordinates and large seeds
    too, and the same float32 comparison with p (0.9999999 rounds up as a float32)."""
    from nca_tiles.diffusion.model import CounterFireMask

    mask = CounterFireMask(p, [3, 2**40 + 1, 7], [299, 0, 42], [(0, 0), (-5, 2**32 + 3), (2**31 + 9, 99_990)])
    masks = []
    for nca_step, row0, shape in [(0, 0, (3, 1, 40, 300)), (9, 17, (3, 1, 2, 5)), (4, 3, (3, 1, 1, 1))]:
        from_numpy = mask(nca_step, shape, torch.device("cpu"), row0)
        from_torch = rng.window_bernoulli_bits(*mask.coordinates(nca_step, shape, torch.device("cpu"), row0), p)
        assert from_numpy.dtype == torch.float32 and from_numpy.shape == shape
        assert torch.equal(from_numpy, from_torch)
        masks.append(from_numpy)
    assert abs(masks[0].mean().item() - p) < 0.01  # 36 000 cells


def test_the_numbers_a_seed_draws_do_not_change_between_versions():
    """A slide is a pure function of (model, seed, size) across nca-tiles versions too: these
    values were drawn by the hash as released; a change to it would silently change every slide."""
    uniforms = rng.uniform(3, rng.Stream.INITIAL_NOISE, 0, -4, 2**33, 1, 4, 1).flatten().tolist()
    assert uniforms == [float.fromhex(v) for v in ("0x1.37029cp-1", "0x1.739a02p-2", "0x1.a5a784p-1",
                                                   "0x1.fd924ap-2")]  # exact: 24-bit integers scaled
    normals = rng.normal(3, rng.Stream.STEP_NOISE, 7, 5, 9, 2, 3, 2).flatten().tolist()
    expected = ["0x1.ff430ap-3", "-0x1.051a76p-2", "0x1.c1b222p+0", "0x1.6cb886p+0", "-0x1.c713fcp-1",
                "-0x1.2884e0p-1", "0x1.da3e8cp-4", "-0x1.3695d8p-1", "-0x1.15d65ep+0", "0x1.90a17cp-1",
                "0x1.2290dcp+1", "-0x1.285b8ep-1"]
    # log, sqrt and cos may differ in the last bit between CPUs' vector units
    assert normals == pytest.approx([float.fromhex(v) for v in expected], rel=1e-6)
