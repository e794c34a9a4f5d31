"""Training Diff-NCA with the paper's recipe (docs/design.md §1).

ε-prediction with loss MSE + L1; Adam (lr 1.6e-3, betas (0.9, 0.99), eps 1e-8); ExponentialLR
γ = 0.9999 per step; EMA of the weights with decay 0.99, used for sampling. Every random draw of
step n (batch, dihedral augmentation, t, ε, fire masks) comes from a generator seeded with
(seed, n), so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nca_tiles import __version__

from nca_tiles.diffusion import compiled, rng
from nca_tiles.bounds import check_int, check_positive_finite, check_seed
from nca_tiles.diffusion.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    MODEL_DIR_NAME,
    atomic_torch_save,
    atomic_write_bytes,
    check_format_version,
    model_hash,
    save_model_dir,
    torch_load,
)
from nca_tiles.errors import NcaTilesError, Stopped
from nca_tiles.runtime.locking import exclusive_lock
from nca_tiles.diffusion.model import DiffNCA, ModelConfig, TorchFireMask
from nca_tiles.diffusion.model import preset as get_preset
from nca_tiles.training.patches import open_patch_store
from nca_tiles.runtime.preflight import check_writable
from nca_tiles.runtime.threads import rebalance_threads
from nca_tiles.diffusion.pipeline import autocast, resolve_device, resolve_precision, to_model_space
from nca_tiles.diffusion.scale_space import relay_start
from nca_tiles.diffusion.schedule import NoiseSchedule, ScheduleConfig

METRICS_NAME = "metrics.jsonl"
SAMPLES_DIR = "samples"
MAX_IN_MEMORY_BYTES = 4 << 30  # larger patch stores would need a streaming loader
# 50× the paper's 200 000 steps; also keeps samples/step_NNNNNNN.png names in step order.
MAX_STEPS = 10_000_000
MAX_BATCH_SIZE = 4096  # 256× the paper's 16: beyond it a typo, not a plan
INIT_SEED_KEY = 0x1417  # derives the seed of the initial weights from --seed
# compile=None ("auto") compiles the training step of runs this long, from step COMPILE_FROM_STEP
# on (on compiled.AUTO_DEVICES): the compile costs ≈ 30–45 s on 2 CPU cores and the small preset's
# dense step got ≈ 1.1–2.8× faster there, so it pays after tens of steps (benchmarks/bench_compile.py
# measures it). Short runs, and runs stopped within their first steps (tests, smoke runs), never
# wait for a compile. Keyed by the step index, so a resumed run uses the kernels the uninterrupted
# one used at every step.
COMPILE_MIN_STEPS = 500
COMPILE_FROM_STEP = 50
MAX_RELAY_FACTOR = 64  # 1/64 of a 64 px patch is one pixel: beyond it nothing is left to relay


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200_000
    batch_size: int = 16
    lr: float = 1.6e-3
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    lr_gamma: float = 0.9999
    ema_decay: float = 0.99
    seed: int = 0
    val_every: int = 500
    val_batches: int = 8
    sample_every: int = 2000
    checkpoint_every: int = 500
    sample_steps: int = 50
    # Train only t ≤ max_timestep: a finer level of a scale-space model starts at its t_start, so
    # its capacity is better spent below it (docs/design.md §7). None: every t.
    max_timestep: int | None = None
    # Train on the states the sampler hands this level from one `relay_factor` times coarser: real
    # patches down- and upsampled, the lost detail treated as noise (relay_start, docs/design.md §7).
    # Needs max_timestep (the hand-over t). None: re-noised real patches only.
    relay_factor: int | None = None
    # Draw each batch patch from a slide chosen uniformly, then a patch of it uniformly: a slide
    # with many patches (a large low-magnification overview) otherwise decides what the model
    # learns to draw. False: every train patch equally likely.
    balance_slides: bool = False
    # With balance_slides: (pattern, weight) pairs giving the slides whose file name matches the
    # pattern (fnmatch; the first match counts) that weight in the draw, the others 1; 0: never.
    # Equal shares over-weight a small slide of unusual tissue (docs/model_history.md's layout runs).
    slide_weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        check_int("--steps", self.steps, 1, MAX_STEPS)
        check_int("--batch-size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_positive_finite("--lr", self.lr)
        check_seed("--seed", self.seed)
        check_int("--val-every", self.val_every, 1, MAX_STEPS)
        check_int("--checkpoint-every", self.checkpoint_every, 1, MAX_STEPS)
        check_int("--sample-every", self.sample_every, 0, MAX_STEPS, " (0: never)")
        if self.max_timestep is not None:
            check_int("--max-timestep", self.max_timestep, 0, MAX_STEPS)
        if self.relay_factor is not None:
            check_int("--relay-factor", self.relay_factor, 2, MAX_RELAY_FACTOR)
            if self.max_timestep is None:
                raise NcaTilesError("--relay-factor needs --max-timestep: the t at which the level takes over "
                                    "(build-model --t-start)")
        for pattern, weight in self.slide_weights:
            if not (math.isfinite(weight) and weight >= 0):
                raise NcaTilesError(f"--slide-weight {pattern}={weight}: a weight must be a finite number ≥ 0")
        if self.slide_weights and not self.balance_slides:
            raise NcaTilesError("--slide-weight weighs the slides of --balance-slides: give both")


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each sample rotated by a random multiple of 90° and randomly flipped (8 symmetries)."""
    b = x.shape[0]
    rotations = torch.randint(4, (b,), generator=generator).tolist()
    flips = torch.randint(2, (b,), generator=generator).tolist()
    out = []
    for sample, k, flip in zip(x, rotations, flips):
        sample = torch.rot90(sample, k, dims=(1, 2))
        out.append(torch.flip(sample, dims=(2,)) if flip else sample)
    return torch.stack(out)


@dataclass(frozen=True)
class SlideGroups:
    """The train patches grouped by slide: ``order[starts[k]:starts[k] + sizes[k]]`` are the
    patches of slide ``slides[k]`` (its index in the store)."""
    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    slides: np.ndarray

    @classmethod
    def of(cls, slide_of_patch: np.ndarray) -> "SlideGroups":
        order = np.argsort(slide_of_patch, kind="stable")
        slides, starts, sizes = np.unique(slide_of_patch[order], return_index=True, return_counts=True)
        return cls(order, starts, sizes, slides)


def balanced_draw(groups: SlideGroups, count: int, generator: torch.Generator) -> np.ndarray:
    """``count`` patch indices: a slide uniformly at random, then one of its patches uniformly."""
    slide = torch.randint(len(groups.sizes), (count,), generator=generator).numpy()
    return _patch_of_slide(groups, slide, generator)


def weighted_draw(groups: SlideGroups, shares: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
    """``count`` patch indices: slide k with probability ``shares[k]``, then one of its patches uniformly."""
    slide = torch.multinomial(torch.as_tensor(shares, dtype=torch.float64), count, replacement=True,
                              generator=generator).numpy()
    return _patch_of_slide(groups, slide, generator)


def _patch_of_slide(groups: SlideGroups, slide: np.ndarray, generator: torch.Generator) -> np.ndarray:
    u = torch.rand(len(slide), generator=generator, dtype=torch.float64).numpy()
    within = np.minimum((u * groups.sizes[slide]).astype(np.int64), groups.sizes[slide] - 1)
    return groups.order[groups.starts[slide] + within]


def slide_shares(names: list[str], groups: SlideGroups, weights: tuple[tuple[str, float], ...]) -> np.ndarray:
    """Each train slide's probability in a batch under ``--slide-weight``: its weight (the first
    pattern matching its file name, else 1) over the sum. ``names``: the store's slide file names."""
    for pattern, _ in weights:
        if not any(fnmatch.fnmatch(name, pattern) for name in names):
            raise NcaTilesError(f"--slide-weight {pattern!r} matches none of the store's slides "
                                f"({', '.join(names)}): give a file-name pattern of one")
    w = np.array([next((weight for pattern, weight in weights if fnmatch.fnmatch(names[k], pattern)), 1.0)
                  for k in groups.slides], dtype=np.float64)
    if not w.sum() > 0:
        raise NcaTilesError("--slide-weight: every slide with train patches has weight 0: give one a weight above 0")
    return w / w.sum()


def relay_target(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, factor: int,
                 t_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and the ε to predict for a level that takes over at ``t_start`` from a coarser one.

    The sampler starts the level at √ᾱ_s·(x_0 + d) + √(1−ᾱ_s)·ε with d = relay_start(x_0) − x_0, the
    detail the coarser level could not hold. Counting d as noise scaled like it — at t ≤ s,
    x_t / √ᾱ_t = x_0 + σ_t·(ε + d/σ_s), σ = √(1−ᾱ)/√ᾱ — makes the target ε + d/σ_s, whose x_0
    prediction is the sharp patch, and a deterministic DDIM step from t to t' lands exactly on the
    same family at t' (Relay Diffusion's blurring, Teng et al. 2023, in the ε-parameterisation).
    """
    ab_s = schedule.alpha_bar(t_start)
    target = noise + (relay_start(x0, factor) - x0) / math.sqrt((1.0 - ab_s) / ab_s)
    return schedule.add_noise(x0, target, t), target


def diffusion_loss(model: DiffNCA, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator,
                   device: torch.device, autocast, max_timestep: int | None = None,
                   relay_factor: int | None = None) -> tuple[torch.Tensor, dict]:
    """Draw t ≤ max_timestep (default T − 1) and ε, noise x_0, predict ε: loss = MSE + L1 (the paper's).
    With ``relay_factor``, x_0 is blurred as the sampler's hand-over at max_timestep blurs it
    (``relay_target``)."""
    b = x0.shape[0]
    t = torch.randint(schedule.timesteps if max_timestep is None else max_timestep + 1, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    if relay_factor is None:
        x_t = schedule.add_noise(x0, noise, t)
    else:
        x_t, noise = relay_target(schedule, x0, noise, t, relay_factor, max_timestep)
    fire = TorchFireMask(model.config.fire_rate, generator)
    with autocast():
        eps = model(x_t.to(device), t.to(device), fire).float()
    noise = noise.to(device)
    mse = F.mse_loss(eps, noise)
    l1 = F.l1_loss(eps, noise)
    return mse + l1, {"mse": mse.item(), "l1": l1.item()}


class Trainer:
    """One training run in a run directory; resumable at any checkpoint."""

    def __init__(self, store, out: Path, model_config: ModelConfig, schedule_config: ScheduleConfig,
                 train_config: TrainConfig, device: torch.device, precision: str = "fp32",
                 compile: bool | str | None = None, preset_name: str | None = None):
        self.store = store
        self.out = Path(out)
        self.cfg = train_config
        self.device = device
        self.precision = precision
        self.preset_name = preset_name
        self.schedule = NoiseSchedule(schedule_config)
        with torch.random.fork_rng(devices=[]):  # the same --seed, the same initial weights
            torch.manual_seed(rng.derive_seed(train_config.seed, INIT_SEED_KEY, 0))
            self.model = DiffNCA(model_config).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train_config.lr,
                                          betas=train_config.adam_betas, eps=train_config.adam_eps)
        self.lr_scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=train_config.lr_gamma)
        if train_config.max_timestep is not None and train_config.max_timestep >= self.schedule.timesteps:
            raise NcaTilesError(f"--max-timestep must be below the schedule's {self.schedule.timesteps} timesteps, "
                                f"got {train_config.max_timestep}")
        if train_config.relay_factor is not None and store.patch_size % train_config.relay_factor:
            raise NcaTilesError(f"--relay-factor {train_config.relay_factor} does not divide the store's "
                                f"{store.patch_size} px patches: give a divisor (the factor to the coarser level)")
        self.step = 0
        self.initialized_from: dict | None = None
        # The cell rule's forward and backward through torch.compile (nca_tiles.diffusion.compiled):
        # the same numbers as eager up to float rounding. The EMA model (validation) stays eager.
        self.compile_from = self._compile_from(compile)  # None: never
        self.ema.compiled = False
        self.forward = self.model
        self.train_images, self.val_images = self._load_splits("train", "val")
        self.train_slides = SlideGroups.of(store.slide_index[self._split_indices("train")])  # rows of train_images
        self.slide_shares = None if not train_config.slide_weights else slide_shares(
            [Path(slide["path"]).name for slide in store.slides], self.train_slides, train_config.slide_weights)
        if len(self.train_images) == 0:
            raise NcaTilesError(f"{store.path} has no patches in its train split: extract from more tissue")
        self._stop_signal: int | None = None  # the signal that asked the run to stop
        self.stopped_at_time_limit = False  # the last run() ended at its time limit
        self.saved_step: int | None = None  # step of the checkpoint on disk, if any

    def _compile_from(self, mode: bool | str | None) -> int | None:
        """The first step whose forward and backward run compiled (None: none)."""
        mode = compiled.resolve_mode(mode)
        if mode == "auto":
            if self.cfg.steps < COMPILE_MIN_STEPS or not compiled.auto_compiles(self.device):
                return None
            first = COMPILE_FROM_STEP
        else:
            first = 0
        return first if mode != "off" and compiled.available(self.device) else None

    # -- data ---------------------------------------------------------------------------------
    def _split_indices(self, split: str) -> np.ndarray:
        """The store rows of ``split``, in the order its patches are held in memory."""
        return np.sort(self.store.indices(split))

    def _load_splits(self, *splits: str) -> list[np.ndarray]:
        """The patches of each split, from one read of the store (small stores: one read is
        faster than many)."""
        p = self.store.patch_size
        indices = [self._split_indices(split) for split in splits]
        for split, idx in zip(splits, indices):
            if len(idx) * p * p * 3 > MAX_IN_MEMORY_BYTES:
                raise NcaTilesError(f"{split} split is larger than {MAX_IN_MEMORY_BYTES >> 30} GiB: use --max-per-slide when extracting")
        if not any(len(idx) for idx in indices):
            return [np.zeros((0, p, p, 3), np.uint8) for _ in splits]
        images = self.store.images[:]
        return [images[idx] for idx in indices]

    def _batch(self, generator: torch.Generator) -> torch.Tensor:
        if self.slide_shares is not None:
            idx = weighted_draw(self.train_slides, self.slide_shares, self.cfg.batch_size, generator)
        elif self.cfg.balance_slides:
            idx = balanced_draw(self.train_slides, self.cfg.batch_size, generator)
        else:
            idx = torch.randint(len(self.train_images), (self.cfg.batch_size,), generator=generator).numpy()
        return dihedral(to_model_space(self.train_images[idx]), generator)

    def _autocast(self):
        return autocast(self.device, self.precision)

    # -- state ----------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.config.to_dict(),
            "schedule": self.schedule.config.to_dict(),
            "data": {"mpp": self.store.mpp, "patch_size": self.store.patch_size, "patch_store": self.store.identity},
            "training": {"step": self.step, "preset": self.preset_name, "seed": self.cfg.seed,
                         **({} if self.cfg.max_timestep is None else {"max_timestep": self.cfg.max_timestep}),
                         **({} if self.cfg.relay_factor is None else {"relay_factor": self.cfg.relay_factor}),
                         **({"balance_slides": True} if self.cfg.balance_slides else {}),
                         **({"slide_weights": [[p, w] for p, w in self.cfg.slide_weights]}
                            if self.cfg.slide_weights else {}),
                         **({} if self.initialized_from is None else {"initialized_from": self.initialized_from})},
            "nca_tiles_version": __version__,
        }

    def save(self) -> None:
        """Checkpoint (raw weights for resuming) and model dir (EMA weights for sampling), atomically.

        Non-finite weights are never written: they would replace the last good checkpoint."""
        for module in (self.model, self.ema):
            if not all(torch.isfinite(p).all() for p in module.parameters()):
                raise self._diverged(f"the weights became non-finite (NaN or inf) at step {self.step}")
        state = {
            "format_version": FORMAT_VERSION,
            "meta": self.meta(),
            "step": self.step,
            "train_config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        atomic_torch_save(self.out / CHECKPOINT_NAME, state)
        save_model_dir(self.out / MODEL_DIR_NAME, self.meta(), {k: v.cpu() for k, v in self.ema.state_dict().items()})
        self.saved_step = self.step

    def _diverged(self, what: str) -> NcaTilesError:
        if self.saved_step is None:
            where = f"no checkpoint was written yet (one every {self.cfg.checkpoint_every} steps)"
        else:
            where = f"the last good checkpoint is {self.out / CHECKPOINT_NAME} (step {self.saved_step})"
        return NcaTilesError(f"{what}: stopped; {where} (try a lower --lr)")

    def initialize_from(self, model_path: Path) -> None:
        """Start from another model's sampling (EMA) weights instead of random ones — e.g. to carry a
        run over to a re-extracted patch store; the optimizer starts afresh. A narrower model of a
        compatible preset (``small`` for ``medium``) is widened so that it computes what it did
        (``diffusion.widen``): more capacity without starting from scratch."""
        from nca_tiles.diffusion.checkpoint import load_model_files, load_weights, resolve_model_path
        from nca_tiles.diffusion.widen import widen_state_dict, widening_problem

        files = resolve_model_path(Path(model_path))
        meta, state = load_model_files(files)
        if meta["schedule"] != self.schedule.config.to_dict():
            raise NcaTilesError(f"--init-from {model_path} has another noise schedule: "
                                f"use its --beta-schedule ({meta['schedule']['beta_schedule']})")
        source = {"model": model_hash(meta, state), "step": (meta.get("training") or {}).get("step")}
        if meta["model"] != self.model.config.to_dict():
            narrow = ModelConfig.from_dict(meta["model"])
            problem = widening_problem(narrow, self.model.config)
            if problem:
                raise NcaTilesError(f"--init-from {model_path} has another model config, and it cannot be widened to "
                                    f"this --preset ({problem}): use its --preset or a wider one")
            load_weights(DiffNCA(narrow), state, files.weights or files.checkpoint)  # its own shapes, checked
            state = widen_state_dict(state, narrow, self.model.config, seed=rng.derive_seed(self.cfg.seed, INIT_SEED_KEY, 1))
            source["widened_from"] = {"channels": narrow.channels, "hidden": narrow.hidden}
            if narrow.nca_steps != self.model.config.nca_steps:
                source["widened_from"]["nca_steps"] = narrow.nca_steps
        load_weights(self.model, state, files.weights or files.checkpoint)
        self.ema.load_state_dict(self.model.state_dict())
        self.initialized_from = source

    def resume(self) -> None:
        path = self.out / CHECKPOINT_NAME
        if not path.exists():
            raise NcaTilesError(f"--resume: {path} does not exist (drop --resume to start a new run)")
        state = torch_load(path)
        check_format_version(state.get("format_version"), path)
        saved = state["meta"]
        if saved["model"] != self.model.config.to_dict():
            raise NcaTilesError(f"--resume: {path} was trained with a different model config (use the same --preset)")
        if saved["schedule"] != self.schedule.config.to_dict():
            raise NcaTilesError(f"--resume: {path} was trained with a different noise schedule "
                                f"(use the same --beta-schedule: {saved['schedule']['beta_schedule']})")
        if not self.store.has_identity(saved["data"]["patch_store"]):
            raise NcaTilesError(f"--resume: {path} was trained on a different patch store (use the same --patches)")
        saved_max_t = (saved.get("training") or {}).get("max_timestep")
        if saved_max_t != self.cfg.max_timestep:
            raise NcaTilesError(f"--resume: {path} was trained with --max-timestep {saved_max_t}: give the same")
        saved_relay = (saved.get("training") or {}).get("relay_factor")
        if saved_relay != self.cfg.relay_factor:
            given = "without --relay-factor: drop it" if saved_relay is None else f"with --relay-factor {saved_relay}: give the same"
            raise NcaTilesError(f"--resume: {path} was trained {given}")
        if bool((saved.get("training") or {}).get("balance_slides")) != self.cfg.balance_slides:
            given = "without --balance-slides: drop it" if self.cfg.balance_slides else "with --balance-slides: give it"
            raise NcaTilesError(f"--resume: {path} was trained {given} (the batches it draws must not change)")
        saved_weights = [(p, float(w)) for p, w in (saved.get("training") or {}).get("slide_weights", [])]
        if saved_weights != list(self.cfg.slide_weights):
            given = ("without --slide-weight: drop it" if not saved_weights else "with " + " ".join(
                f"--slide-weight '{p}={w:g}'" for p, w in saved_weights) + ": give the same")
            raise NcaTilesError(f"--resume: {path} was trained {given} (the batches it draws must not change)")
        self.initialized_from = (saved.get("training") or {}).get("initialized_from")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = self.saved_step = int(state["step"])
        self._drop_metrics_after(self.step)

    def _drop_metrics_after(self, step: int) -> None:
        """Forget the metrics of steps past the checkpoint: the resumed run logs them again (after a
        kill -9 they would appear twice). A kill mid-write can also leave a torn last line."""
        path = self.out / METRICS_NAME
        if not path.exists():
            return
        text = path.read_text()
        kept = []
        for line in text.splitlines():
            logged = _logged_step(line)
            if logged is not None and logged <= step:
                kept.append(line + "\n")
        if "".join(kept) != text:
            atomic_write_bytes(path, "".join(kept).encode())  # a crash here keeps the old file whole

    # -- loop -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        generator = torch.Generator().manual_seed(rng.derive_seed(self.cfg.seed, self.step))
        self.model.train()
        self.model.compiled = self.compile_from is not None and self.step >= self.compile_from
        x0 = self._batch(generator)
        loss, parts = diffusion_loss(self.forward, self.schedule, x0, generator, self.device, self._autocast,
                                     self.cfg.max_timestep, self.cfg.relay_factor)
        if not math.isfinite(loss.item()):
            raise self._diverged(f"loss became {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lr_scheduler.step()
        self._update_ema()
        self.step += 1
        return {"loss": loss.item(), **parts, "lr": self.lr_scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.cfg.ema_decay
        for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
            ema_p.lerp_(p, 1.0 - d)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """EMA loss on the val split with fixed draws, so successive values are comparable."""
        if len(self.val_images) == 0:
            return None
        self.ema.eval()
        generator = torch.Generator().manual_seed(rng.derive_seed(self.cfg.seed, 0xFA11))
        losses = []
        for i in range(self.cfg.val_batches):
            start = (i * self.cfg.batch_size) % len(self.val_images)
            x0 = to_model_space(self.val_images[start : start + self.cfg.batch_size])
            loss, _ = diffusion_loss(self.ema, self.schedule, x0, generator, self.device, self._autocast,
                                     self.cfg.max_timestep, self.cfg.relay_factor)
            losses.append(loss.item())
        return float(np.mean(losses))

    def write_samples(self) -> Path:
        from nca_tiles.training.sample_grid import save_sample_grid
        from nca_tiles.diffusion.pipeline import build_pipeline

        pipeline = build_pipeline(self.meta(), self.ema.state_dict(), self.device, self.precision)
        path = self._sample_path()
        if self.cfg.max_timestep is None:
            save_sample_grid(pipeline, path, seed=self.cfg.seed, steps=self.cfg.sample_steps)
        else:  # a finer level: what it makes of the hand-over, not samples from noise
            from nca_tiles.training.sample_grid import handover_patches, save_handover_grid

            real = handover_patches(self.val_images if len(self.val_images) else self.train_images)
            save_handover_grid(pipeline, real, path, self.cfg.max_timestep, self.cfg.relay_factor,
                               seed=self.cfg.seed, steps=self.cfg.sample_steps)
        return path

    def _sample_path(self) -> Path:
        return self.out / SAMPLES_DIR / f"step_{self.step:07d}.png"

    def _log(self, record: dict) -> None:
        with open(self.out / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _request_stop(self, signum, frame) -> None:
        self._stop_signal = signum

    def run(self, progress: bool = True, time_limit: float | None = None) -> dict:
        """Train up to ``cfg.steps``, or until ``time_limit`` seconds have passed (then
        ``stopped_at_time_limit``); Ctrl-C or SIGTERM (a scheduler's or a lent machine's end)
        saves a checkpoint and stops cleanly."""
        from tqdm import tqdm

        if time_limit is not None:
            check_positive_finite("--time-limit (seconds)", time_limit)
        self.out.mkdir(parents=True, exist_ok=True)
        in_main_thread = threading.current_thread() is threading.main_thread()
        stop_signals = (signal.SIGINT, signal.SIGTERM)
        previous = [signal.signal(s, self._request_stop) for s in stop_signals] if in_main_thread else None
        last: dict = {}
        self.stopped_at_time_limit = False
        try:
            bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
            start, start_step = time.perf_counter(), self.step
            while self.step < self.cfg.steps and self._stop_signal is None:
                if time_limit is not None and time.perf_counter() - start >= time_limit:
                    self.stopped_at_time_limit = True
                    break
                last = self.train_step()
                rebalance_threads()  # a fair share of the cores, as other processes come and go
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                record = {"step": self.step, **last, "time": time.time()}
                if self.step % self.cfg.val_every == 0 or self.step == self.cfg.steps:
                    record["val_loss"] = self.validation_loss()
                    record["steps_per_s"] = (self.step - start_step) / (time.perf_counter() - start)
                self._log(record)
                if self.step % self.cfg.checkpoint_every == 0:
                    self.save()
                if self.cfg.sample_every and self.step % self.cfg.sample_every == 0:
                    self.write_samples()
            bar.close()
            self.save()
            if self.cfg.sample_every and self.step >= self.cfg.steps and not self._sample_path().exists():
                self.write_samples()  # a run shorter than --sample-every would end without one
        finally:
            if in_main_thread:
                for s, handler in zip(stop_signals, previous):
                    signal.signal(s, handler)
        if self._stop_signal is not None:
            raise Stopped(self._stop_signal)
        return last


def _logged_step(line: str) -> int | None:
    """The step of a metrics line; None for a torn or foreign line."""
    try:
        record = json.loads(line)
        return int(record["step"])
    except (ValueError, TypeError, KeyError):
        return None


def resolve_training_device(device: str | torch.device, precision: str) -> tuple[torch.device, str]:
    """The torch device and precision a run trains with; bf16 on a CPU is refused."""
    device = resolve_device(device) if isinstance(device, str) else device
    return device, resolve_precision(device, precision)


def run_training(patches: Path, out: Path, preset: str, config: TrainConfig, device: str | torch.device = "auto",
                 precision: str = "fp32", *, compile: bool | str | None = None, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, init_from: Path | None = None,
                 on_resume: Callable[[int], None] | None = None,
                 schedule: ScheduleConfig | None = None, time_limit: float | None = None) -> tuple[Trainer, dict]:
    """A whole training run: new, resumed (``resume``) or started afresh over an old one
    (``overwrite``). The run directory is locked from the first look at it to the last write, so a
    second process (another --resume, or an --overwrite that would delete it) is refused at once.

    ``device``: "auto" (CUDA if available), "cpu", "cuda" or a torch.device; ``precision``: "fp32",
    "bf16" (CUDA autocast; refused on a CPU, where it is hundreds of times slower) or "auto" (bf16
    on CUDA, fp32 on a CPU). ``schedule``: the noise schedule (default: the paper's linear one).
    ``time_limit``: stop, checkpointed, after this many seconds of training (``--resume`` goes on)."""
    if init_from is not None and resume:
        raise NcaTilesError("--init-from starts a new run: drop it with --resume")
    if time_limit is not None:
        check_positive_finite("--time-limit (seconds)", time_limit)
    device, precision = resolve_training_device(device, precision)
    out = Path(out)
    model_config = get_preset(preset)
    if out.exists() and not out.is_dir():
        raise NcaTilesError(f"--out {out} is a file: give a folder for the run")
    check_writable(out, "run directory")  # its parent: where it and its lock go
    if out.is_dir():
        check_writable(out / CHECKPOINT_NAME, "checkpoint")
    # Resolved: a relative path, `..` or a symlink to the same run must take the same lock.
    with exclusive_lock(out.resolve(), "run directory", "choose another --out"):
        replace = out.exists() and any(out.iterdir()) and not resume
        if replace and not overwrite:
            raise NcaTilesError(f"{out} is not empty: pass --resume to continue it or --overwrite to start afresh")
        store = open_patch_store(patches)
        trainer = Trainer(store, out, model_config, schedule or ScheduleConfig(), config, device, precision,
                          compile=compile, preset_name=preset)
        if replace:
            shutil.rmtree(out)  # only now that the new run is known to start
        if resume:
            trainer.resume()
            if on_resume is not None:
                on_resume(trainer.step)
        elif init_from is not None:
            trainer.initialize_from(init_from)
        last = trainer.run(progress=progress, time_limit=time_limit)
    return trainer, last
