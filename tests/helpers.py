"""Small real models for tests: the tiny preset with non-zero weights, saved as a model directory."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from nca_tiles.diffusion.checkpoint import save_model_dir
from nca_tiles.diffusion.model import PRESETS, DiffNCA, ModelConfig
from nca_tiles.diffusion.schedule import ScheduleConfig


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


@contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """A folder nobody can write to, root included: a read-only tmpfs mounted there (root), or
    mode 0555 (other users). Skips the test where neither is possible."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
