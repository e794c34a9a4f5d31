"""Saving and loading models and training state.

Layout, diffusers-style: a *model directory* holds ``config.json`` (the frozen configs as JSON, the
training data's µm/px, a format version) beside ``weights.pt`` (the EMA weights used for
sampling). A training *run directory* holds ``model/`` (such a model directory) and
``checkpoint.pt`` (everything needed to resume: raw weights, EMA, optimizer, step). Every file is
written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nca_tiles.errors import NcaTilesError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.pt"
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_DIR_NAME = "model"
DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "models" / "default"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def check_format_version(version: Any, path: Path) -> None:
    if not isinstance(version, int):
        raise NcaTilesError(f"{path} has no format version: not an nca-tiles model")
    if version > FORMAT_VERSION:
        raise NcaTilesError(
            f"{path} has format version {version}, newer than this nca-tiles reads ({FORMAT_VERSION}): upgrade nca-tiles"
        )


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's config and sampling weights are."""

    config: Path
    weights: Path | None  # None: the weights are the EMA inside a training checkpoint
    checkpoint: Path | None = None


def resolve_model_path(path: Path | None) -> ModelFiles:
    """Accept a model directory, a run directory, or a checkpoint file (None: the bundled model)."""
    path = DEFAULT_MODEL_DIR if path is None else Path(path)
    if not path.exists():
        raise NcaTilesError(f"model {path} does not exist: give a run directory, model directory or checkpoint file")
    if path.is_file():
        if path.suffix == ".json":
            path = path.parent
        elif path.name == WEIGHTS_NAME:
            return ModelFiles(path.parent / CONFIG_NAME, path)
        elif path.suffix == ".pt":
            return ModelFiles(path.parent / MODEL_DIR_NAME / CONFIG_NAME, None, checkpoint=path)
        else:
            raise NcaTilesError(f"{path} is not a model: give a run directory, model directory or .pt checkpoint")
    if (path / MODEL_DIR_NAME / CONFIG_NAME).exists():
        path = path / MODEL_DIR_NAME
    if (path / CONFIG_NAME).exists() and (path / WEIGHTS_NAME).exists():
        return ModelFiles(path / CONFIG_NAME, path / WEIGHTS_NAME)
    if (path / CHECKPOINT_NAME).exists():
        return ModelFiles(path / MODEL_DIR_NAME / CONFIG_NAME, None, checkpoint=path / CHECKPOINT_NAME)
    raise NcaTilesError(f"{path} holds no model ({CONFIG_NAME} + {WEIGHTS_NAME}, or {CHECKPOINT_NAME})")


def is_model_path(path: Path) -> bool:
    try:
        resolve_model_path(path)
        return True
    except NcaTilesError:
        return False


def read_model_config(path: Path) -> dict:
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise NcaTilesError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise NcaTilesError(f"{path} is not an nca-tiles model config")
    check_format_version(meta.get("format_version"), path)
    for key in ("model", "schedule", "data"):
        if key not in meta:
            raise NcaTilesError(f"model config {path} lacks '{key}': corrupt or not an nca-tiles model")
    return meta


def torch_load(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise NcaTilesError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} (corrupt or truncated?)") from None
    if not isinstance(obj, dict):
        raise NcaTilesError(f"{path} is not an nca-tiles weights file")
    return obj


def load_model_files(files: ModelFiles) -> tuple[dict, dict]:
    """(config metadata, EMA state dict) of a model."""
    if files.checkpoint is not None:
        ckpt = torch_load(files.checkpoint)
        check_format_version(ckpt.get("format_version"), files.checkpoint)
        return ckpt["meta"], ckpt["ema"]
    meta = read_model_config(files.config)
    state = torch_load(files.weights)
    check_format_version(state.get("format_version"), files.weights)
    return meta, state["state_dict"]


def model_hash(meta: dict, state_dict: dict) -> str:
    """Identity of a model for resume checks: its architecture, schedule and weights."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": meta["model"], "schedule": meta["schedule"]}, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def save_model_dir(directory: Path, meta: dict, state_dict: dict) -> None:
    """Write a model directory: config.json + weights.pt (EMA weights)."""
    meta = {**meta, "format_version": FORMAT_VERSION}
    atomic_torch_save(directory / WEIGHTS_NAME, {"format_version": FORMAT_VERSION, "state_dict": state_dict})
    atomic_write_json(directory / CONFIG_NAME, meta)


def describe_model(path: Path) -> str:
    from nca_tiles.model import DiffNCA, ModelConfig

    files = resolve_model_path(path)
    meta, state = load_model_files(files)
    config = ModelConfig.from_dict(meta["model"])
    n_params = DiffNCA(config).num_parameters()
    lines = [
        f"model: {path}",
        f"architecture: {json.dumps(meta['model'])}",
        f"parameters: {n_params:,}",
        f"halo per denoising step: {config.halo} px",
        f"schedule: {json.dumps(meta['schedule'])}",
        f"training data: {json.dumps(meta['data'])}",
        f"training: {json.dumps(meta.get('training', {}))}",
        f"hash: {model_hash(meta, state)}",
    ]
    return "\n".join(lines)
