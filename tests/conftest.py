"""Shared fixtures: paths to real sample data and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "nca_tiles" / "data" / "sample" / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    assert SAMPLE_SLIDE.exists(), SAMPLE_SLIDE
    return SAMPLE_SLIDE
