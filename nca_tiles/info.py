"""``nca-tiles info``: say what a path is and describe it, with the describer of its stage."""

from __future__ import annotations

import os
from pathlib import Path

from nca_tiles.errors import NcaTilesError


def describe(path: str | os.PathLike[str] | None = None, preset: str | None = None) -> str:
    """A description of ``path`` (a scale-space model, a patch store, a patch encoder, a model —
    run directory, model directory or checkpoint — or else a slide), or of the model preset named ``preset``."""
    if preset is not None:
        from nca_tiles.diffusion.model import describe_preset

        return describe_preset(preset)
    if path is None:
        raise NcaTilesError("give a PATH to describe, or --preset NAME")
    from nca_tiles.diffusion.checkpoint import bundled_model_names, is_model_path, model_location

    path = model_location(path)  # a bundled model's name, too
    if not path.exists():
        raise NcaTilesError(f"{path} does not exist (a bundled model's name: {', '.join(bundled_model_names())})")

    from nca_tiles.diffusion.levels import describe_scale_space_model, is_scale_space_model
    from nca_tiles.training.patches import is_patch_store

    if is_scale_space_model(path):
        return describe_scale_space_model(path)
    if is_patch_store(path):
        from nca_tiles.training.patches import describe_store

        return describe_store(path)
    from nca_tiles.evaluation.encoder import describe_encoder, is_encoder_dir

    if is_encoder_dir(path):
        return describe_encoder(path)
    if is_model_path(path):
        from nca_tiles.diffusion.checkpoint import describe_model

        return describe_model(path)
    from nca_tiles.wsi.info import describe_slide

    return describe_slide(path)
