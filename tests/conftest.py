"""Shared fixtures: paths to real sample data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "nca_tiles" / "data" / "sample" / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    assert SAMPLE_SLIDE.exists(), SAMPLE_SLIDE
    return SAMPLE_SLIDE


# Test models are tiny: extra OpenMP threads only add synchronisation, and on a loaded machine
# spinning threads make small convolutions ~100× slower. Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
