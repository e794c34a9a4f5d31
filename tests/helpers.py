"""Small real models for tests: the tiny preset with non-zero weights, saved as a model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from nca_tiles.checkpoint import save_model_dir
from nca_tiles.model import PRESETS, DiffNCA, ModelConfig
from nca_tiles.schedule import ScheduleConfig


def save_test_model(directory: Path, config: ModelConfig = PRESETS["tiny"], timesteps: int = 300,
                    seed: int = 0, mpp: float = 1.0) -> Path:
    """An untrained but non-trivial model (a fresh model's last layer is zero: its ε̂ would be 0)."""
    torch.manual_seed(seed)
    model = DiffNCA(config)
    for p in model.to_update.parameters():
        torch.nn.init.normal_(p, std=0.2)
    meta = {
        "model": config.to_dict(),
        "schedule": ScheduleConfig(timesteps=timesteps).to_dict(),
        "data": {"mpp": mpp, "patch_size": 64, "patch_store": "test"},
        "training": {"preset": "tiny", "step": 0},
    }
    save_model_dir(directory, meta, model.state_dict())
    return directory
