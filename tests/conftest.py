"""Shared fixtures: paths to real sample data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "nca_tiles" / "data" / "sample" / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    assert SAMPLE_SLIDE.exists(), SAMPLE_SLIDE
    return SAMPLE_SLIDE


@pytest.fixture(scope="session")
def real_crops(sample_slide: Path) -> np.ndarray:
    """64 x 64 tissue crops (>= 60 % tissue) of the real H&E sample slide, in random order."""
    import openslide

    with openslide.OpenSlide(str(sample_slide)) as slide:
        image = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    crops = [
        image[y : y + 64, x : x + 64]
        for y in range(0, image.shape[0] - 63, 32)
        for x in range(0, image.shape[1] - 63, 32)
        if (image[y : y + 64, x : x + 64].min(axis=-1) < 200).mean() > 0.6
    ]
    return np.stack(crops)[np.random.default_rng(0).permutation(len(crops))]


@pytest.fixture(autouse=True)
def own_compile_settings(tmp_path_factory, monkeypatch):
    """Each test its own nca-tiles cache (compile verdicts): none from the user's runs or from
    another test; the subprocesses a test starts inherit it. And the compile mode of the processes
    it starts back as it was after it: a --compile auto trial that finds compiling no faster (more
    likely on a loaded machine) sets it off for the rest of the process."""
    from nca_tiles.diffusion import compiled

    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    # As the session started, before and after: a module's fixture may have run a trial too, and
    # a trial's "not faster" also turns compiling off in this process (a test of the compiled path
    # would then skip as if there were no compiler).
    _set_compile_mode(SESSION_COMPILE_MODE)
    compiled.forget_decisions()
    yield
    _set_compile_mode(SESSION_COMPILE_MODE)
    compiled.forget_decisions()


def _set_compile_mode(mode: str | None) -> None:
    from nca_tiles.diffusion import compiled

    if mode is None:  # (monkeypatch.delenv of an unset variable would restore nothing)
        os.environ.pop(compiled.MODE_ENV, None)
    else:
        os.environ[compiled.MODE_ENV] = mode


SESSION_COMPILE_MODE = os.environ.get("NCA_TILES_COMPILE")  # nca_tiles.diffusion.compiled.MODE_ENV


# Test models are tiny: extra OpenMP threads only add synchronisation, and on a loaded machine
# spinning threads make small convolutions ~100× slower. Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
