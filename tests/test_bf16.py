"""bf16 autocast, the default precision on CUDA, exercised on the CPU: the same autocast code
path (users get bf16 on CUDA only; a CPU is far too slow for it), so that a dtype clash in it fails
here instead of on the first GPU (the eager rule's in-place accumulation once did)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import assert_same_image, save_test_model, save_test_scale_space_model, synthesize_test_slide


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return {"single-scale": save_test_model(tmp_path_factory.mktemp("model")),
            "scale-space": save_test_scale_space_model(tmp_path_factory.mktemp("scale_space"))}


@pytest.mark.parametrize("kind", ["single-scale", "scale-space"])
def test_tiled_equals_whole_under_bf16_autocast(models, tmp_path, kind):
    whole = synthesize_test_slide(models[kind], tmp_path / "whole.ome.tif", 120, 96, chunk=128, precision="bf16")
    assert whole.std() > 5
    tiled = synthesize_test_slide(models[kind], tmp_path / "tiled.ome.tif", 120, 96, chunk=32, precision="bf16")
    assert_same_image(tiled, whole)


def test_training_steps_under_bf16_autocast(tmp_path, sample_slide):
    import torch

    from nca_tiles.diffusion.model import preset
    from nca_tiles.diffusion.schedule import ScheduleConfig
    from nca_tiles.training.patches import extract_patches, open_patch_store
    from nca_tiles.training.trainer import TrainConfig, Trainer

    extract_patches([sample_slide], tmp_path / "p.zarr", stride=64, max_per_slide=50, progress=False)
    trainer = Trainer(open_patch_store(tmp_path / "p.zarr"), tmp_path / "run", preset("tiny"), ScheduleConfig(),
                      TrainConfig(batch_size=4, sample_every=0), torch.device("cpu"), compile=False)
    trainer.precision = "bf16"
    before = [p.detach().clone() for p in trainer.model.parameters()]
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    assert all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
