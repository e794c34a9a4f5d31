"""The self-supervised patch encoder: training, saving, loading, and what its features see."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import lock_held_elsewhere

from nca_tiles.errors import NcaTilesError
from nca_tiles.evaluation.encoder import (
    DEFAULT_ENCODER_DIR, FEATURE_MEMO_SETS, FORMAT_VERSION, EncoderConfig, augment, load_encoder, nt_xent, save_encoder,
    train_encoder)
from nca_tiles_cli.main import cli

TINY = EncoderConfig(widths=(4, 8), projection=8, crop=32, steps=12, batch_size=16, seed=3)


def weights(encoder) -> dict:
    return {k: v.clone() for k, v in encoder.module.state_dict().items()}


def test_training_is_a_pure_function_of_the_seed_and_learns(real_crops):
    lines: list[str] = []
    first = train_encoder(real_crops[:64], TINY, {"what": "crops"}, say=lines.append)
    again = train_encoder(real_crops[:64], TINY, {"what": "crops"})
    other = train_encoder(real_crops[:64], EncoderConfig(**{**TINY.to_dict(), "widths": TINY.widths, "seed": 4}), {})
    for key, value in weights(first).items():
        assert torch.equal(value, weights(again)[key]), key
    assert any(not torch.equal(v, weights(other)[k]) for k, v in weights(first).items())
    losses = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert lines[0].startswith("step 1/12") and lines[-1].startswith("step 12/12")
    assert losses[-1] < losses[0]
    assert first.trained_on == {"what": "crops", "steps": 12, "final_loss": pytest.approx(losses[-1], abs=1e-4)}
    assert first.features(real_crops[:5]).shape == (5, sum(TINY.widths))


def test_views_are_crops_turns_and_recolourings_drawn_from_the_generator():
    x = torch.rand(6, 3, 40, 40) * 2 - 1
    a = augment(x, 24, torch.Generator().manual_seed(1))
    b = augment(x, 24, torch.Generator().manual_seed(1))
    c = augment(x, 24, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_the_contrastive_loss_is_low_when_views_agree_and_high_when_they_do_not():
    z = torch.randn(32, 16)
    assert nt_xent(z, z, 0.1) < 0.1
    assert nt_xent(z, torch.randn(32, 16), 0.1) > np.log(32)


def test_features_are_computed_once_per_content(real_crops):
    encoder = train_encoder(real_crops[:32], TINY, {})
    batches = []
    encoder.module.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    patches = real_crops[:6].copy()
    first = encoder.features(patches)
    assert batches == [6]
    np.testing.assert_array_equal(encoder.features(patches.copy()), first)  # same pixels, other array
    assert batches == [6] and not first.flags.writeable  # shared with later callers: read-only
    patches[0, 0, 0] ^= 0xFF  # same array, other pixels: its own features
    changed = encoder.features(patches)
    assert batches == [6, 6] and not np.array_equal(changed[0], first[0])
    np.testing.assert_array_equal(changed[1:], first[1:])
    for k in range(FEATURE_MEMO_SETS):  # older sets make way for newer ones
        encoder.features(real_crops[8 + k : 9 + k])
    encoder.features(patches)
    assert len(batches) == 3 + FEATURE_MEMO_SETS


def test_save_and_load_round_trip(tmp_path, real_crops):
    encoder = train_encoder(real_crops[:32], TINY, {"patch_store": "abc"})
    save_encoder(encoder, tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "weights.pt"]
    saved = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert saved["kind"] == "patch-encoder" and saved["format_version"] == FORMAT_VERSION
    assert saved["encoder"]["widths"] == [4, 8] and saved["trained_on"]["patch_store"] == "abc"
    assert not any(k.startswith("head.") for k in torch.load(tmp_path / "enc" / "weights.pt"))  # features only
    loaded = load_encoder(tmp_path / "enc")
    assert loaded.config == TINY
    np.testing.assert_array_equal(loaded.features(real_crops[:8]), encoder.features(real_crops[:8]))
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "enc")])
    assert info.exit_code == 0, info.output
    assert "patch encoder" in info.output and "2 conv stages [4, 8]: 12 features" in info.output


def corrupt(enc, how: str) -> None:
    config = json.loads((enc / "config.json").read_text())
    if how == "kind":
        config["kind"] = "model"
    elif how == "newer":
        config["format_version"] = FORMAT_VERSION + 1
    elif how == "widths":
        config["encoder"]["widths"] = [4, 16]
    elif how == "no-weights":
        (enc / "weights.pt").unlink()
    elif how == "truncated":
        (enc / "weights.pt").write_bytes((enc / "weights.pt").read_bytes()[:100])
    elif how == "not-json":
        (enc / "config.json").write_text("{")
        return
    (enc / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("how, message", [
    ("kind", "not a patch encoder"),
    ("newer", "upgrade nca-tiles"),
    ("widths", "does not fit its config.json"),
    ("no-weights", "no weights.pt"),
    ("truncated", "corrupt or truncated"),
    ("not-json", "cannot read"),
])
def test_load_refuses_a_bad_encoder_directory(tmp_path, real_crops, how, message):
    save_encoder(train_encoder(real_crops[:32], EncoderConfig(**{**TINY.to_dict(), "widths": TINY.widths, "steps": 1}),
                               {}), tmp_path / "enc")
    corrupt(tmp_path / "enc", how)
    with pytest.raises(NcaTilesError, match=message):
        load_encoder(tmp_path / "enc")


def test_load_refuses_a_folder_that_is_no_encoder(tmp_path):
    with pytest.raises(NcaTilesError, match="not an encoder directory"):
        load_encoder(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "--steps"), ({"batch_size": 1}, "--batch-size"), ({"crop": 4}, "crop"),
    ({"widths": ()}, "widths"), ({"temperature": 0.0}, "positive"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(NcaTilesError, match=message):
        EncoderConfig(**change)


def test_a_crop_larger_than_the_patches_is_refused(real_crops):
    with pytest.raises(NcaTilesError, match="larger than the patches"):
        train_encoder(real_crops[:4, :16, :16], TINY, {})


def test_the_bundled_encoder_sees_blur_more_than_colour(real_crops):
    """What the encoder is for: the random-CNN FD scores paler real tissue four times as far from
    real as blurred tissue; in the learned features it is the other way round, and even a blur of
    σ = 1 px lands far above the floor (measured 2026-12-06: 5.9× the floor for pale, 27× for σ = 2,
    22× for σ = 1; random features 38×, 9.2× and 3.6×)."""
    from skimage.filters import gaussian

    from nca_tiles.evaluation.metrics import feature_frechet_distance, random_features

    encoder = load_encoder()
    assert encoder.trained_on["mpp"] == 1.0 and encoder.trained_on["patches"] > 1000
    reference, real = real_crops[:96], real_crops[192:288]
    pale = np.clip(real.astype(np.float32) * 0.7 + 70, 0, 255).round().astype(np.uint8)
    blurred = {sigma: np.rint(gaussian(real, sigma=(0, sigma, sigma, 0), channel_axis=-1) * 255).astype(np.uint8)
               for sigma in (1, 2)}

    def times_floor(features, patches) -> float:
        return (feature_frechet_distance(features(reference), features(patches))
                / feature_frechet_distance(features(reference), features(real)))

    learned = {"pale": times_floor(encoder.features, pale), 1: times_floor(encoder.features, blurred[1]),
               2: times_floor(encoder.features, blurred[2])}
    random = {"pale": times_floor(random_features, pale), 2: times_floor(random_features, blurred[2])}
    assert learned[2] > 3 * learned["pale"] and random[2] < random["pale"], (learned, random)
    assert learned[2] / learned["pale"] > 5 * random[2] / random["pale"], (learned, random)
    assert learned[1] > 10, learned


@pytest.fixture(scope="module")
def store(sample_slide, tmp_path_factory):
    from nca_tiles.training.patches import extract_patches

    path = tmp_path_factory.mktemp("encoder") / "patches.zarr"
    extract_patches([sample_slide], path, target_mpp=0.5, progress=False)
    return path


def test_cli_trains_an_encoder_on_a_store(tmp_path, store):
    out = tmp_path / "encoder"
    result = CliRunner().invoke(cli, ["train-encoder", "--patches", str(store), "--out", str(out),
                                      "--steps", "3", "--batch-size", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 240 features, trained 3 steps on" in result.output and "at 0.5 µm/px" in result.output
    assert load_encoder(out).trained_on["mpp"] == 0.5
    again = ["train-encoder", "--patches", str(store), "--out", str(out), "--steps", "1",
             "--batch-size", "4", "--threads", "1"]
    refused = CliRunner().invoke(cli, again)
    assert refused.exit_code != 0 and "exists: pass --overwrite" in refused.output
    assert load_encoder(out).trained_on["steps"] == 3  # untouched
    assert CliRunner().invoke(cli, [*again, "--overwrite"]).exit_code == 0
    assert load_encoder(out).trained_on["steps"] == 1
    not_an_encoder = tmp_path / "folder"
    not_an_encoder.mkdir()
    refused = CliRunner().invoke(cli, [*again[:4], str(not_an_encoder), *again[5:], "--overwrite"])
    assert refused.exit_code != 0 and "is not an encoder: refusing to replace it" in refused.output


def test_a_second_training_to_the_same_out_is_refused_while_the_first_runs(tmp_path, store):
    out = tmp_path / "encoder"
    with lock_held_elsewhere(out) as holder:
        result = CliRunner().invoke(cli, ["train-encoder", "--patches", str(store), "--out", str(out),
                                          "--steps", "1", "--batch-size", "4"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"in use by process {holder.pid}" in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--patches", "{tmp}/missing.zarr", "--out", "{tmp}/e"], "does not exist"),
    (["--patches", "{tmp}", "--out", "{tmp}/e", "--steps", "0"], "--steps must be at least 1"),
])
def test_train_encoder_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["train-encoder", *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "Error:" in result.output and message in result.output, result.output


def test_the_bundled_encoder_is_in_the_package():
    assert (DEFAULT_ENCODER_DIR / "config.json").is_file() and (DEFAULT_ENCODER_DIR / "weights.pt").is_file()
