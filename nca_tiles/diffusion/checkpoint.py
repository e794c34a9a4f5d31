"""Saving and loading models and training state.

Layout, diffusers-style: a *model directory* holds ``config.json`` (the frozen configs as JSON, the
training data's µm/px, a format version) beside ``weights.pt`` (the EMA weights used for
sampling). A training *run directory* holds ``model/`` (such a model directory) and
``checkpoint.pt`` (everything needed to resume: raw weights, EMA, optimizer, step). Every file is
written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.outputs import atomic_write_bytes, atomic_write_json  # noqa: F401 - re-exported for its callers

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.pt"
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_DIR_NAME = "model"
BUNDLED_MODELS_DIR = Path(__file__).parents[1] / "data" / "models"
DEFAULT_MODEL_DIR = BUNDLED_MODELS_DIR / "default"


def bundled_model_names() -> list[str]:
    """The models that ship with nca-tiles, by the name ``--model`` takes (``default``, ``fast``)."""
    return sorted(p.name for p in BUNDLED_MODELS_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def model_location(path: Path | str | None) -> Path:
    """Where a ``--model`` points: None is the bundled default; a path that exists is that path;
    else a bundled model's name is its folder. A path wins, so that a user's folder called ``fast``
    is never shadowed by a model added to a later release."""
    if path is None:
        return DEFAULT_MODEL_DIR
    path = Path(path)
    if not path.exists() and len(path.parts) == 1 and path.name in bundled_model_names():
        return BUNDLED_MODELS_DIR / path.name
    return path


def atomic_torch_save(path: Path, obj: Any) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def check_format_version(version: Any, path: Path) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise NcaTilesError(f"{path} has no format version: not an nca-tiles model")
    if version < 1:
        raise NcaTilesError(f"{path} has format version {version}, which no nca-tiles writes: the file is corrupt")
    if version > FORMAT_VERSION:
        raise NcaTilesError(
            f"{path} has format version {version}, newer than this nca-tiles reads ({FORMAT_VERSION}): upgrade nca-tiles"
        )


# --- validating a model's metadata ----------------------------------------------------------------
# Everything read from a config.json or a checkpoint is checked here, field by field, so that a
# corrupt or hand-edited file fails at once with the file and the field named, not later with a
# ValueError deep in sampling. The upper bounds are far beyond any model that could be sampled:
# above them a number is corruption, not ambition.

_MODEL_INTS = {  # field: (least, most)
    "channels": (6, 4096),
    "hidden": (1, 65536),
    "nca_steps": (1, 1000),
    "embedding_channels": (1, 1024),
    "embedding_hidden": (1, 65536),
    "encoding_dim": (2, 8192),
    "image_channels": (3, 3),  # sampling is RGB
}
_MAX_TIMESTEPS = 100_000
_MAX_MPP = 1000.0


class _Fields:
    """Reads one section of a model's metadata, raising a one-line error naming file and field."""

    def __init__(self, source: str, section: str, data: Any):
        self.source, self.section = source, section
        if data is None:
            self._missing(section)
        if not isinstance(data, dict):
            self.fail("", "a JSON object (a section of key: value pairs)", data)
        self.data = data

    def _missing(self, field: str) -> None:
        raise NcaTilesError(
            f"{self.source}: '{field}' is missing: the model's config is corrupt; "
            "restore it from the training run, or train again"
        )

    def fail(self, name: str, expected: str, value: Any) -> None:
        field = f"{self.section}.{name}" if name else self.section
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise NcaTilesError(
            f"{self.source}: '{field}' must be {expected}, got {shown}: the model's config is corrupt; "
            "restore it from the training run, or train again"
        )

    def get(self, name: str, required: bool = True) -> Any:
        if name not in self.data:
            if required:
                self._missing(f"{self.section}.{name}")
            return None
        return self.data[name]

    def whole(self, name: str, least: int, most: int, required: bool = True) -> None:
        value = self.get(name, required)
        if value is None and not required:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
            self.fail(name, f"a whole number in {least}..{most}", value)

    def number(self, name: str, expected: str, ok, required: bool = True) -> None:
        value = self.get(name, required)
        if value is None and not required:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            self.fail(name, expected, value)

    def unknown(self, known: set[str]) -> None:
        extra = sorted(set(self.data) - known)
        if extra:
            raise NcaTilesError(
                f"{self.source}: '{self.section}' has unknown fields {extra}: written by a newer nca-tiles? "
                "Upgrade nca-tiles"
            )


def validate_model_meta(meta: Any, source: str | Path) -> dict:
    """Check every field of a model's metadata (format version; model, schedule and data
    sections) for type and range; returns ``meta``. ``source`` names the file in errors."""
    from nca_tiles.diffusion.model import ModelConfig
    from nca_tiles.diffusion.schedule import ScheduleConfig

    source = str(source)
    if not isinstance(meta, dict):
        raise NcaTilesError(f"{source} is not an nca-tiles model config")
    check_format_version(meta.get("format_version"), Path(source))

    model = _Fields(source, "model", meta.get("model"))
    model.unknown({f.name for f in dataclasses.fields(ModelConfig)})
    for name, (least, most) in _MODEL_INTS.items():
        model.whole(name, least, most)
    if model.data["encoding_dim"] % 2:
        model.fail("encoding_dim", "an even number", model.data["encoding_dim"])
    model.number("fire_rate", "a number in (0, 1]", lambda v: 0 < v <= 1)

    schedule = _Fields(source, "schedule", meta.get("schedule"))
    schedule.unknown({f.name for f in dataclasses.fields(ScheduleConfig)})
    schedule.whole("timesteps", 2, _MAX_TIMESTEPS)
    if schedule.get("beta_schedule") not in ("linear", "cosine"):
        schedule.fail("beta_schedule", "'linear' or 'cosine'", schedule.data["beta_schedule"])
    schedule.number("beta_start", "a number in (0, 1)", lambda v: 0 < v < 1)
    schedule.number("beta_end", "a number in [beta_start, 1)", lambda v: schedule.data["beta_start"] <= v < 1)
    if not isinstance(schedule.get("clip_sample"), bool):
        schedule.fail("clip_sample", "true or false", schedule.data["clip_sample"])

    data = _Fields(source, "data", meta.get("data"))
    data.number("mpp", f"a positive number of µm per pixel (at most {_MAX_MPP:g})", lambda v: 0 < v <= _MAX_MPP)
    data.whole("patch_size", 1, 1 << 16, required=False)
    if "training" in meta:
        training = _Fields(source, "training", meta["training"])
        training.whole("max_timestep", 0, 1 << 20, required=False)
    return meta


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's config and sampling weights are."""

    config: Path
    weights: Path | None  # None: the weights are the EMA inside a training checkpoint
    checkpoint: Path | None = None


SCALE_SPACE_KIND = "scale-space"  # the "kind" of a scale-space model's config (diffusion.levels)


def read_scale_space_config(path: Path) -> dict | None:
    """The config of the scale-space model directory ``path``; None if it is not one."""
    config = path / CONFIG_NAME
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        d = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # not ours to judge here: the single-scale reader reports it
    return d if isinstance(d, dict) and d.get("kind") == SCALE_SPACE_KIND else None


def resolve_model_path(path: Path | None) -> ModelFiles:
    """Accept a model directory, a run directory, a checkpoint file, or a bundled model's name
    (None: the bundled default)."""
    path = model_location(path)
    if not path.exists():
        raise NcaTilesError(f"model {path} does not exist: give a run directory, model directory or checkpoint file, "
                            f"or a bundled model's name ({', '.join(bundled_model_names())})")
    if read_scale_space_config(path) is not None:
        raise NcaTilesError(f"{path} is a scale-space model (several levels): load it with "
                            "nca_tiles.load_model (diffusion.levels.load_synthesis_model), or give one of its level-N folders")
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
        raise NcaTilesError(f"cannot read model config {path}: {_first_line(exc)}") from None
    return validate_model_meta(meta, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def torch_load(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise NcaTilesError(f"cannot read {path}: {_first_line(exc)} (corrupt or truncated?)") from None
    if not isinstance(obj, dict):
        raise NcaTilesError(f"{path} is not an nca-tiles weights file")
    return obj


def _entry(obj: dict, key: str, path: Path, kind: str) -> Any:
    if key not in obj:
        raise NcaTilesError(f"{path} lacks '{key}': not an nca-tiles {kind}, or a corrupt one")
    return obj[key]


def load_model_files(files: ModelFiles) -> tuple[dict, dict]:
    """(config metadata, EMA state dict) of a model, every field of the metadata checked."""
    if files.checkpoint is not None:
        ckpt = torch_load(files.checkpoint)
        check_format_version(ckpt.get("format_version"), files.checkpoint)
        meta = validate_model_meta(_entry(ckpt, "meta", files.checkpoint, "checkpoint"), files.checkpoint)
        state = _entry(ckpt, "ema", files.checkpoint, "checkpoint")
        source = files.checkpoint
    else:
        meta = read_model_config(files.config)
        weights = torch_load(files.weights)
        check_format_version(weights.get("format_version"), files.weights)
        state = _entry(weights, "state_dict", files.weights, "weights file")
        source = files.weights
    if not isinstance(state, dict):
        raise NcaTilesError(f"{source} holds no state dict: not an nca-tiles model, or a corrupt one")
    return meta, state


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return f"{shown} and {len(names) - most} more" if len(names) > most else shown


def load_weights(module: Any, state_dict: dict, source: str | Path) -> None:
    """Load ``state_dict`` into ``module``, or say in one line which tensors are missing,
    unexpected, or of another shape than the config makes."""
    import torch

    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    not_tensors = [k for k in expected if k in state_dict and not isinstance(state_dict[k], torch.Tensor)]
    shapes = [
        f"{k} ({'x'.join(map(str, state_dict[k].shape))} in the file, "
        f"{'x'.join(map(str, expected[k].shape))} for the config)"
        for k in expected
        if k in state_dict and k not in not_tensors and state_dict[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} {_names(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("not tensors:", not_tensors),
                             ("shape differs:", shapes))
        if names
    ]
    if problems:
        raise NcaTilesError(
            f"the weights in {source} do not fit the model config: {'; '.join(problems)}: "
            "use the weights saved with this config, or train again"
        )
    module.load_state_dict(state_dict)


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
    from nca_tiles.diffusion.model import DiffNCA, ModelConfig

    files = resolve_model_path(path)
    meta, state = load_model_files(files)
    config = ModelConfig.from_dict(meta["model"])
    model = DiffNCA(config)
    load_weights(model, state, files.checkpoint or files.weights)  # a model that would not load is no model
    n_params = model.num_parameters()
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
