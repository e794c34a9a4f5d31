"""Widening a trained Diff-NCA (``diffusion.widen``): the wider model computes what the narrow one
did, at inference (exact tiling's counter-based fire masks) and in training, and can still learn."""

from __future__ import annotations

import json

import pytest
import torch

from nca_tiles.diffusion.model import PRESETS, CounterFireMask, DiffNCA, ModelConfig, TorchFireMask
from nca_tiles.diffusion.widen import widen_state_dict, widening_problem
from nca_tiles.errors import NcaTilesError
from helpers import assert_ok, assert_one_line_error, run_cli

NARROW = ModelConfig(channels=8, hidden=16, nca_steps=3, embedding_hidden=16, encoding_dim=8)


def trained_like(config: ModelConfig, seed: int = 0) -> DiffNCA:
    """A model whose weights are all non-zero, as after training (a fresh one writes nothing)."""
    torch.manual_seed(seed)
    model = DiffNCA(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def widened(narrow: DiffNCA, config: ModelConfig) -> DiffNCA:
    wide = DiffNCA(config)
    wide.load_state_dict(widen_state_dict(narrow.state_dict(), narrow.config, config))
    return wide


@pytest.mark.parametrize("channels, hidden", [(8, 32), (12, 16), (13, 48)])
def test_a_widened_model_predicts_the_same_noise(channels, hidden):
    narrow = trained_like(NARROW)
    wide = widened(narrow, ModelConfig(**{**NARROW.to_dict(), "channels": channels, "hidden": hidden}))
    x_t, t = torch.randn(2, 3, 24, 31), torch.tensor([5, 280])

    def masks():
        return CounterFireMask(0.5, seeds=[1, 2], timesteps=[5, 280], origins=[(0, 0), (40, 17)])

    with torch.no_grad():
        expected = narrow(x_t, t, masks())
        assert expected.abs().max() > 0.1  # the narrow model does write its readout
        torch.testing.assert_close(wide(x_t, t, masks()), expected, rtol=1e-4, atol=1e-4)
    # Training's path (whole tensors, autograd) too: the fire masks depend on the shape only.
    trained = wide(x_t, t, TorchFireMask(0.5, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(trained, narrow(x_t, t, TorchFireMask(0.5, torch.Generator().manual_seed(3))),
                               rtol=1e-4, atol=1e-4)


def test_what_widening_adds_can_learn():
    narrow = trained_like(NARROW)
    wide = widened(narrow, ModelConfig(**{**NARROW.to_dict(), "channels": 12, "hidden": 32}))
    out = wide(torch.randn(2, 3, 16, 16), torch.tensor([5, 100]), TorchFireMask(0.5, torch.Generator().manual_seed(0)))
    out.square().mean().backward()
    # Nothing writes the new channels yet, and the hidden layer ignores their perception: both
    # must still receive a gradient, or they would stay unused forever.
    assert wide.to_update.weight.grad[8:].abs().max() > 0
    assert wide.to_hidden.weight.grad[:, 8:12].abs().max() > 0
    # The copies of a hidden unit start equal but must not stay so: their gradients differ.
    g = wide.to_hidden.weight.grad[:, :, 0, 0]
    assert not torch.allclose(g[:16], g[16:])


def test_widening_is_a_pure_function_of_the_seed():
    narrow = trained_like(NARROW).state_dict()
    wide = ModelConfig(**{**NARROW.to_dict(), "channels": 12, "hidden": 32})
    first = widen_state_dict(narrow, NARROW, wide, seed=5)
    torch.manual_seed(123)  # the global generator's state must not matter
    again = widen_state_dict(narrow, NARROW, wide, seed=5)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = widen_state_dict(narrow, NARROW, wide, seed=6)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_the_bundled_presets_widen_small_to_wide_and_medium_and_deepen_it_to_deep():
    assert widening_problem(PRESETS["small"], PRESETS["wide"]) is None
    assert widening_problem(PRESETS["small"], PRESETS["medium"]) is None
    assert widening_problem(PRESETS["small"], PRESETS["deep"]) is None
    assert PRESETS["deep"].nca_steps == 2 * PRESETS["small"].nca_steps


def test_a_deepened_model_starts_from_the_same_weights_and_runs_every_step():
    # One rule serves every NCA step, so a deeper model takes the weights as they are (and its
    # halo grows with its steps); its first s steps are the narrow model's, the rest extrapolate.
    narrow = trained_like(NARROW)
    deep_config = ModelConfig(**{**NARROW.to_dict(), "nca_steps": 5})
    deep = widened(narrow, deep_config)
    assert deep_config.halo == 5
    for name, tensor in narrow.state_dict().items():
        assert torch.equal(deep.state_dict()[name], tensor), name
    x_t, t = torch.randn(1, 3, 20, 20), torch.tensor([40])
    with torch.no_grad():
        shallow = narrow(x_t, t, CounterFireMask(0.5, [1], [40], [(0, 0)]))
        deeper = deep(x_t, t, CounterFireMask(0.5, [1], [40], [(0, 0)]))
    assert not torch.allclose(shallow, deeper)  # two more steps of the rule: not the same function


@pytest.mark.parametrize("change, message", [
    ({"channels": 6}, "fewer"),
    ({"hidden": 24}, "not a multiple"),
    ({"nca_steps": 2}, "fewer than 3"),
    ({"embedding_hidden": 32}, "embedding_hidden"),
])
def test_widening_refuses_what_it_cannot_preserve(change, message):
    with pytest.raises(NcaTilesError, match=message):
        widen_state_dict(DiffNCA(NARROW).state_dict(), NARROW, ModelConfig(**{**NARROW.to_dict(), **change}))


def test_train_init_from_a_narrower_preset_widens_it(sample_slide, tmp_path):
    from nca_tiles.training.patches import extract_patches

    store = tmp_path / "p.zarr"
    extract_patches([sample_slide], store, stride=64, max_per_slide=40, progress=False)
    common = ["--patches", store, "--batch-size", 2, "--device", "cpu", "--no-progress", "--sample-every", 0,
              "--val-every", 1000, "--no-compile"]
    small = tmp_path / "small"
    assert_ok(run_cli("train", "--out", small, "--preset", "small", "--steps", 1, *common))
    wide = tmp_path / "wide"
    # A vanishing learning rate: one step leaves the widened weights where widening put them.
    assert_ok(run_cli("train", "--out", wide, "--preset", "wide", "--steps", 1, "--lr", "1e-30",
                      "--init-from", small, *common))
    source = json.loads((wide / "model" / "config.json").read_text())["training"]["initialized_from"]
    assert source["widened_from"] == {"channels": 24, "hidden": 96} and source["step"] == 1

    from nca_tiles.diffusion.pipeline import load_model

    narrow_model, wide_model = load_model(small, "cpu").model, load_model(wide, "cpu").model
    x_t, t = torch.randn(1, 3, 32, 32), torch.tensor([150])
    with torch.no_grad():
        torch.testing.assert_close(wide_model(x_t, t, CounterFireMask(0.5, [0], [150], [(0, 0)])),
                                   narrow_model(x_t, t, CounterFireMask(0.5, [0], [150], [(0, 0)])),
                                   rtol=1e-4, atol=1e-4)
    # A deeper preset takes the same weights and says from how many NCA steps.
    deep = tmp_path / "deep"
    assert_ok(run_cli("train", "--out", deep, "--preset", "deep", "--steps", 1, "--lr", "1e-30",
                      "--init-from", small, *common))
    source = json.loads((deep / "model" / "config.json").read_text())["training"]["initialized_from"]
    assert source["widened_from"] == {"channels": 24, "hidden": 96, "nca_steps": 10}
    assert load_model(deep, "cpu").model.config.halo == 20
    # A narrower preset, or another embedding, cannot take those weights.
    assert_one_line_error(run_cli("train", "--out", tmp_path / "x", "--preset", "tiny", "--steps", 1,
                                  "--init-from", small, *common), "cannot be widened", "--preset")
