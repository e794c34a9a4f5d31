"""A small patch encoder trained self-supervised on real patches: features that see tissue structure.

The random-CNN features of ``metrics.random_features`` are dominated by colour (docs/design.md
§8): synthetic speckle of the right hue scores about as close to real tissue as another real
tissue does. This encoder is trained by SimCLR's contrastive objective (Chen et al., "A Simple
Framework for Contrastive Learning of Visual Representations", 2020): two augmented views of a
patch should map close together and away from the other patches of the batch. The augmentations
vary what must not matter: position (crops), orientation (flips and quarter turns) and colour
(stain gains, brightness, contrast, grey). So what the features keep is shape and texture: nuclei,
fibres, lumina. It trains in minutes on a CPU from the patch store alone (no downloads), and is
a pure function of (store, config): the same seed gives the same weights.

An encoder directory holds ``config.json`` (the architecture and training settings, the format
version, what it was trained on) and ``weights.pt`` (the encoder's weights only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nca_tiles.errors import NcaTilesError

FORMAT_VERSION = 1
KIND = "patch-encoder"
DEFAULT_ENCODER_DIR = Path(__file__).parents[1] / "data" / "encoder"


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder's architecture and how it is trained."""

    widths: tuple[int, ...] = (16, 32, 64, 128)  # 3×3 conv stages, 2× average pooling between
    projection: int = 64  # the contrastive head's output (used in training only)
    crop: int = 48  # side of the random crops the two views are cut as (≤ the patch side)
    temperature: float = 0.2  # of the NT-Xent loss
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise NcaTilesError(f"encoder widths must be positive, got {self.widths}")
        if self.steps < 1:
            raise NcaTilesError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 2:
            raise NcaTilesError(f"--batch-size must be at least 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if self.crop < 8:
            raise NcaTilesError(f"the crop must be at least 8 px, got {self.crop}")
        if not self.temperature > 0 or not self.lr > 0:
            raise NcaTilesError("the temperature and the learning rate must be positive")

    @property
    def features(self) -> int:
        return sum(self.widths)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> "EncoderConfig":
        try:
            return cls(**{**data, "widths": tuple(int(w) for w in data["widths"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise NcaTilesError(f"{source}: the encoder config is corrupt ({exc})") from None


def _encoder_module(config: EncoderConfig) -> "torch.nn.Module":
    import torch
    from torch import nn

    class PatchEncoder(nn.Module):
        """3×3 conv, batch norm and ReLU per stage, 2× average pooling between stages; every
        stage's global average is one part of the features (as the random CNN's), so they hold
        fine texture and coarser structure at once. ``head`` projects them for the loss only."""

        def __init__(self) -> None:
            super().__init__()
            chans = (3, *config.widths)
            self.stages = nn.ModuleList(
                nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                              nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True))
                for i in range(len(config.widths)))
            self.head = nn.Sequential(nn.Linear(config.features, config.features), nn.ReLU(inplace=True),
                                      nn.Linear(config.features, config.projection))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = []
            for i, stage in enumerate(self.stages):
                if i > 0:
                    x = nn.functional.avg_pool2d(x, 2, ceil_mode=True)
                x = stage(x)
                pooled.append(x.mean(dim=(2, 3)))
            return torch.cat(pooled, dim=1)

    return PatchEncoder()


FEATURE_MEMO_SETS = 8  # an evaluation asks for the features of at most a handful of sets


@dataclass
class Encoder:
    """A trained encoder: its config, module (eval mode) and what it was trained on."""

    config: EncoderConfig
    module: Any
    trained_on: dict[str, Any]
    # The features of the last few sets, by their content's digest: an evaluation's metrics and
    # its tissue mix ask for the same sets' features (seconds of encoder time each).
    _memo: dict[tuple, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def features(self, patches: np.ndarray, batch: int = 256) -> np.ndarray:
        """Features (N, sum(widths)) float64 of uint8 RGB patches (N, H, W, 3)."""
        from nca_tiles.evaluation.metrics import check_patches

        patches = np.ascontiguousarray(check_patches(patches))
        key = (patches.shape, hashlib.blake2b(patches.data, digest_size=16).digest())
        if key not in self._memo:
            if len(self._memo) >= FEATURE_MEMO_SETS:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = self._compute_features(patches, batch)
            self._memo[key].flags.writeable = False  # shared between callers
        return self._memo[key]

    def _compute_features(self, patches: np.ndarray, batch: int) -> np.ndarray:
        import torch

        from nca_tiles.diffusion.pipeline import to_model_space

        out = []
        with torch.inference_mode():
            for start in range(0, len(patches), batch):
                out.append(self.module(to_model_space(patches[start : start + batch])).double().numpy())
        return np.concatenate(out)


# --------------------------------------------------------------------------- training


def augment(x: "torch.Tensor", crop: int, generator: "torch.Generator") -> "torch.Tensor":
    """One random view of each patch of x (B, 3, H, W) in [-1, 1]: a crop of ``crop`` px, a flip
    and a quarter turn, per-channel gains (stain strength), brightness and contrast, and grey half
    the time. Every draw from ``generator``: the views are a function of its seed."""
    import torch

    b, _, h, w = x.shape
    ys = torch.randint(0, h - crop + 1, (b,), generator=generator).tolist()
    xs = torch.randint(0, w - crop + 1, (b,), generator=generator).tolist()
    turns = torch.randint(0, 4, (b,), generator=generator).tolist()
    flips = torch.rand(b, generator=generator).lt(0.5).tolist()
    views = []
    for i in range(b):
        view = x[i, :, ys[i] : ys[i] + crop, xs[i] : xs[i] + crop]
        view = view.flip(-1) if flips[i] else view
        views.append(torch.rot90(view, turns[i], dims=(1, 2)))
    v = torch.stack(views)
    # Colour: the metric must not reward a model for its colour alone (the stain W1 rows do that).
    gains = 1 + 0.2 * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)
    brightness = 0.2 * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    contrast = 1 + 0.3 * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = ((v * gains - mean) * contrast + mean + brightness).clamp(-1, 1)
    grey = torch.rand(b, 1, 1, 1, generator=generator).lt(0.5)
    luma = (v * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return torch.where(grey, luma.expand_as(v), v)


def nt_xent(z1: "torch.Tensor", z2: "torch.Tensor", temperature: float) -> "torch.Tensor":
    """SimCLR's normalised temperature-scaled cross entropy: each view's positive is the other
    view of its patch, its negatives the 2B − 2 views of the other patches."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(-math.inf)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, targets)


def train_encoder(images: np.ndarray, config: EncoderConfig, trained_on: dict[str, Any],
                  say: Callable[[str], None] | None = None) -> Encoder:
    """Train an encoder on uint8 RGB patches (N, H, W, 3) held in memory."""
    import torch

    from nca_tiles.diffusion.pipeline import to_model_space

    say = say or (lambda line: None)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise NcaTilesError(f"encoder training needs uint8 RGB patches (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise NcaTilesError(f"encoder training needs at least 2 patches, got {len(images)}")
    if config.crop > min(images.shape[1:3]):
        raise NcaTilesError(f"the crop ({config.crop} px) is larger than the patches ({images.shape[1]} px)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the initial weights: a function of the seed
        module = _encoder_module(config)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    data = to_model_space(images)
    batch = min(config.batch_size, len(images))
    module.train()
    for step in range(1, config.steps + 1):
        x = data[torch.randperm(len(data), generator=generator)[:batch]]
        z1 = module.head(module(augment(x, config.crop, generator)))
        z2 = module.head(module(augment(x, config.crop, generator)))
        loss = nt_xent(z1, z2, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step == 1 or step % 100 == 0 or step == config.steps:
            say(f"step {step}/{config.steps}: contrastive loss {loss.item():.4f}")
    module.eval()
    return Encoder(config, module, {**trained_on, "steps": config.steps, "final_loss": loss.item()})


# --------------------------------------------------------------------------- saving and loading


def save_encoder(encoder: Encoder, out: str | os.PathLike[str]) -> None:
    """Write the encoder directory atomically: it appears complete or not at all."""
    import io

    import torch

    from nca_tiles.runtime.outputs import atomic_output

    config = {"kind": KIND, "format_version": FORMAT_VERSION, "encoder": encoder.config.to_dict(),
              "trained_on": encoder.trained_on}
    weights = {k: v for k, v in encoder.module.state_dict().items() if not k.startswith("head.")}
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    with atomic_output(out) as new:
        new.mkdir()
        (new / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (new / "weights.pt").write_bytes(buffer.getvalue())


def load_encoder(path: str | os.PathLike[str] | None = None) -> Encoder:
    """The encoder in directory ``path`` (None: the bundled one), checked: one-line errors."""
    from nca_tiles.diffusion.checkpoint import _first_line, torch_load

    path = Path(DEFAULT_ENCODER_DIR if path is None else path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise NcaTilesError(f"{path} is not an encoder directory (no config.json): give one written by "
                            "nca-tiles train-encoder, or --encoder none")
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise NcaTilesError(f"cannot read {config_path}: {_first_line(exc)}") from None
    if not isinstance(saved, dict) or saved.get("kind") != KIND:
        raise NcaTilesError(f"{config_path} is not a patch encoder's config (kind {KIND!r})")
    version = saved.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise NcaTilesError(f"{config_path} has no valid format version: a corrupt encoder")
    if version > FORMAT_VERSION:
        raise NcaTilesError(f"{config_path} has format version {version}, newer than this nca-tiles reads "
                            f"({FORMAT_VERSION}): upgrade nca-tiles")
    if not isinstance(saved.get("encoder"), dict):
        raise NcaTilesError(f"{config_path} lacks the encoder's config: a corrupt encoder")
    config = EncoderConfig.from_dict(saved["encoder"], config_path)
    module = _encoder_module(config)
    if not (path / "weights.pt").is_file():
        raise NcaTilesError(f"{path} has no weights.pt: a partial copy of an encoder directory?")
    weights = torch_load(path / "weights.pt")
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    except RuntimeError:  # a tensor of another shape
        missing, unexpected = ["?"], []
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise NcaTilesError(f"{path / 'weights.pt'} does not fit its config.json "
                            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return Encoder(config, module.eval(), dict(saved.get("trained_on") or {}))


def train_encoder_on_store(patches: str | os.PathLike[str], out: str | os.PathLike[str], config: EncoderConfig,
                           say: Callable[[str], None] | None = None, overwrite: bool = False) -> Encoder:
    """Train an encoder on the training split of a patch store and write it to ``out`` (refused
    if it exists, unless ``overwrite`` and it is an encoder). Held under a lock beside ``out``:
    a second training to the same place is refused, not raced."""
    from nca_tiles.runtime.outputs import output_lock, remove_stale_temporaries
    from nca_tiles.runtime.preflight import check_writable
    from nca_tiles.training.patches import open_patch_store

    patches, out = Path(patches), Path(out)
    if not patches.exists():
        raise NcaTilesError(f"{patches} does not exist: give the patch store written by extract-patches")
    if not out.parent.is_dir():
        raise NcaTilesError(f"the folder of --out {out} does not exist: create it first")
    check_writable(out, "--out")
    with output_lock(out, "--out"):
        remove_stale_temporaries(out)  # of a training killed with -9
        if out.exists() and not overwrite:
            raise NcaTilesError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
        if out.exists() and not is_encoder_dir(out):
            raise NcaTilesError(f"{out} exists and is not an encoder: refusing to replace it; choose another --out")
        store = open_patch_store(patches)
        rows = np.asarray(store.indices("train"))
        if len(rows) < 2:
            raise NcaTilesError(f"{patches} has {len(rows)} patches in its 'train' split: an encoder needs at least 2")
        if config.crop > store.patch_size:
            raise NcaTilesError(f"the crop ({config.crop} px) is larger than the store's {store.patch_size} px patches")
        images = np.asarray(store.images.get_orthogonal_selection((rows,)))
        trained_on = {"patch_store": store.identity, "path": str(patches), "mpp": store.mpp,
                      "patch_size": store.patch_size, "patches": int(len(rows))}
        encoder = train_encoder(images, config, trained_on, say)
        save_encoder(encoder, out)
    return encoder


def is_encoder_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory whose config.json says it holds a patch encoder."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def describe_encoder(path: str | os.PathLike[str]) -> str:
    """``nca-tiles info`` of an encoder directory."""
    encoder = load_encoder(path)
    cfg, on = encoder.config, encoder.trained_on
    lines = [f"{path}: patch encoder (format {FORMAT_VERSION}) for evaluate's learned-feature FD",
             f"  {len(cfg.widths)} conv stages {list(cfg.widths)}: {cfg.features} features",
             f"  trained {on.get('steps', '?')} steps (batch {cfg.batch_size}, seed {cfg.seed}) on "
             f"{on.get('patches', '?')} patches at {on.get('mpp', '?')} µm/px, final contrastive loss "
             f"{on.get('final_loss', float('nan')):.4f}"]
    return "\n".join(lines)
