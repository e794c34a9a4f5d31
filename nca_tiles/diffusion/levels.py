"""The model a slide is synthesized with: one level (single-scale) or several (scale space).

Scale-space sampling (docs/design.md §7) runs the noisy early denoising steps on a coarse level of
the canvas, where a cell is ``f`` output pixels (reach ``s·f`` px per step, ``1/f²`` of the cost),
upsamples the clean coarse result, re-noises it to ``t_start`` and finishes on the next finer
level (an SDEdit-style cascade). Each level has its own rule, trained on patches at its µm/px.

A scale-space model directory::

    config.json   {"format_version": 2, "kind": "scale-space",
                   "levels": [{"path": "level-0", "factor": 4},
                              {"path": "level-1", "factor": 1, "t_start": 99}]}
    level-0/      a model directory (config.json, weights.pt) of the coarsest level
    level-1/      ... the finest level (factor 1): its µm/px is the slide's

A level may also record its DDIM ``"eta"`` (format 3, ``build-model --eta``): the η it samples
with unless ``--eta`` says otherwise, chosen for that level's rule (docs/design.md §7); and, with
every other level, its DDIM ``"steps"`` (format 4, ``build-model --steps``): the steps it takes
unless ``--steps`` says otherwise, so that a level relay-started late still gets its share of the
compute (docs/design.md §7, "Steps per level").

Any other model path (run directory, model directory, checkpoint, None = bundled) is a
single-scale model: one level, factor 1, from pure noise — pixel for pixel what it always was.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nca_tiles.diffusion import rng
from nca_tiles.diffusion.checkpoint import (
    CONFIG_NAME,
    SCALE_SPACE_KIND,
    bundled_model_names,
    load_model_files,
    model_location,
    read_scale_space_config,
    resolve_model_path,
    save_model_dir,
)
from nca_tiles.diffusion.pipeline import (Pipeline, build_pipeline, denoise_patches, initial_noise, predict_noise,
                                         reverse_step, to_model_space, to_uint8)
from nca_tiles.diffusion.scale_space import level_size, relay_start, renoise, upsample_window
from nca_tiles.diffusion.schedule import DEFAULT_DDIM_STEPS
from nca_tiles.errors import NcaTilesError

# 3: a level may record its DDIM η; 4: the levels may record their DDIM steps. Each written only
# where used, so models without them stay readable by older versions.
SCALE_SPACE_FORMAT = 4
ETA_FORMAT = 3
STEPS_FORMAT = 4
LEVEL_SEED_KEY = 0x5CA1E  # derives each finer level's seed: no two levels share random numbers
# Re-noise to where noise of std √(1−ᾱ)/√ᾱ (relative to the image) is this many times the detail
# the coarse level cannot hold (the residual of down- then upsampling real patches).
T_START_NOISE_TO_DETAIL = 2.5


@dataclass(frozen=True)
class Level:
    pipeline: Pipeline
    factor: int  # one cell of this level is factor × factor output pixels
    t_start: int | None  # None: from pure noise at T − 1; else the upsampled coarser level re-noised to it
    eta: float | None = None  # the DDIM η the model records for this level; None: level_etas' default
    steps: int | None = None  # the DDIM steps the model records for this level; None: level_timesteps' share


@dataclass
class SynthesisModel:
    """Levels from coarsest to finest, and where the model came from (for dask workers)."""

    levels: list[Level]
    path: Path | None
    hash: str

    @classmethod
    def single(cls, pipeline: Pipeline, path: Path | None = None) -> "SynthesisModel":
        """A single-scale model: one level, factor 1, from pure noise (its hash is the pipeline's)."""
        return cls([Level(pipeline, 1, None)], path, pipeline.hash)

    @property
    def finest(self) -> Pipeline:
        return self.levels[-1].pipeline

    @property
    def mpp(self) -> float:
        return self.finest.mpp

    @property
    def device(self) -> torch.device:
        return self.finest.device

    @property
    def precision(self) -> str:
        return self.finest.precision

    @property
    def timesteps(self) -> int:
        return self.finest.schedule.timesteps

    @property
    def is_scale_space(self) -> bool:
        return len(self.levels) > 1

    @property
    def max_halo(self) -> int:
        return max(level.pipeline.halo for level in self.levels)

    def describe(self) -> str:
        if not self.is_scale_space:
            return "single-scale"
        def part(lv: Level) -> str:
            recorded = [*([] if lv.eta is None else [f"η {lv.eta:g}"]), *([] if lv.steps is None else [f"{lv.steps} steps"])]
            return (f"1/{lv.factor}" + ("" if lv.t_start is None else f" from t={lv.t_start}")
                    + (f" ({', '.join(recorded)})" if recorded else ""))

        return "scale space: " + ", ".join(part(lv) for lv in self.levels)

    @property
    def recorded_steps(self) -> list[int] | None:
        """Each level's DDIM steps as the model records them (build-model --steps), or None."""
        steps = [lv.steps for lv in self.levels]
        return None if None in steps else steps


def level_seed(seed: int, index: int) -> int:
    """Level 0 draws with the slide's seed (so a single-scale slide is what it always was)."""
    return seed if index == 0 else rng.derive_seed(seed, LEVEL_SEED_KEY, index)


def _check_levels(config: dict, path: Path) -> list[dict]:
    where = f"{path / CONFIG_NAME}"
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise NcaTilesError(f"{where} has no format version: not an nca-tiles model")
    if version > SCALE_SPACE_FORMAT:
        raise NcaTilesError(f"{where} has format version {version}, newer than this nca-tiles reads "
                            f"({SCALE_SPACE_FORMAT}): upgrade nca-tiles")
    levels = config.get("levels")
    if not isinstance(levels, list) or not levels:
        raise NcaTilesError(f"{where}: 'levels' must be a non-empty list: the model is corrupt; build it again")
    previous = None
    for i, level in enumerate(levels):
        if not isinstance(level, dict) or not isinstance(level.get("path"), str):
            raise NcaTilesError(f"{where}: level {i} needs a 'path': the model is corrupt; build it again")
        factor = level.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
            raise NcaTilesError(f"{where}: level {i} 'factor' must be a power of two, got {factor!r}")
        if previous is not None and not factor < previous:
            raise NcaTilesError(f"{where}: levels must go from coarse to fine (factors decreasing), got {previous} then {factor}")
        t_start = level.get("t_start")
        if (i == 0) != (t_start is None) or (t_start is not None and (isinstance(t_start, bool) or not isinstance(t_start, int))):
            raise NcaTilesError(f"{where}: level {i} 't_start' must be {'absent' if i == 0 else 'a timestep'}, got {t_start!r}")
        if "eta" in level:
            eta = level["eta"]
            if version < ETA_FORMAT or not is_eta(eta):
                raise NcaTilesError(f"{where}: level {i} 'eta' must be a DDIM η between 0 and 1 in a format "
                                    f"{ETA_FORMAT} model, got {eta!r}: the model is corrupt; build it again")
        if "steps" in level:
            steps = level["steps"]
            if version < STEPS_FORMAT or isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise NcaTilesError(f"{where}: level {i} 'steps' must be a positive number of DDIM steps in a format "
                                    f"{STEPS_FORMAT} model, got {steps!r}: the model is corrupt; build it again")
        previous = factor
    if len({"steps" in level for level in levels}) > 1:
        raise NcaTilesError(f"{where}: every level or none must record its 'steps': the model is corrupt; build it again")
    if levels[-1]["factor"] != 1:
        raise NcaTilesError(f"{where}: the last level must be the finest (factor 1)")
    return levels


def load_synthesis_model(path: Path | str | None = None, device: str = "auto", precision: str = "auto") -> SynthesisModel:
    """Load a single-scale or scale-space model for synthesis: a path, or a bundled model's name
    (None: the bundled default; checkpoint.model_location)."""
    path = model_location(path)
    config = read_scale_space_config(path)
    if config is None:
        files = resolve_model_path(path)
        meta, state = load_model_files(files)
        pipeline = build_pipeline(meta, state, device, precision, source=files.checkpoint or files.weights)
        return SynthesisModel.single(pipeline, path)
    levels = []
    for i, spec in enumerate(_check_levels(config, path)):
        files = resolve_model_path(path / spec["path"])
        meta, state = load_model_files(files)
        pipeline = build_pipeline(meta, state, device, precision, source=files.weights or files.checkpoint)
        eta = spec.get("eta")
        levels.append(Level(pipeline, spec["factor"], spec.get("t_start"), None if eta is None else float(eta),
                            spec.get("steps")))
    _check_consistent(levels, path)
    for i, level in enumerate(levels):
        if level.steps is not None and level.steps > _span(level):
            raise NcaTilesError(f"{path / CONFIG_NAME}: level {i} records {level.steps} DDIM steps, more than the "
                                f"{_span(level)} timesteps it covers: the model is corrupt; build it again")
    # A recorded η or step count changes the pixels, so it is part of the hash; models without keep theirs.
    digest = hashlib.sha256(json.dumps([[lv.pipeline.hash, lv.factor, lv.t_start, *([] if lv.eta is None else [lv.eta]),
                                         *([] if lv.steps is None else ["steps", lv.steps])]
                                        for lv in levels]).encode())
    return SynthesisModel(levels, path, digest.hexdigest()[:16])


def bundled_model_with_hash(model_hash: str) -> str | None:
    """The name of the bundled model whose hash this is, if any: a job started with one that is no
    longer the default resumes with ``--model NAME``."""
    for name in bundled_model_names():
        if load_synthesis_model(name, device="cpu").hash == model_hash:
            return name
    return None


def _check_consistent(levels: list[Level], where: Path | str) -> None:
    finest = levels[-1].pipeline
    for i, level in enumerate(levels):
        p = level.pipeline
        # Each level may have its own noise schedule: a coarser level runs to its clean x_0 and the
        # finer one re-noises with its own ᾱ (docs/design.md §7).
        expected = finest.mpp * level.factor
        if abs(p.mpp - expected) > 0.05 * expected:
            raise NcaTilesError(f"{where}: level {i} was trained at {p.mpp:g} µm/px, but factor {level.factor} over the "
                                f"finest level's {finest.mpp:g} µm/px needs {expected:g} µm/px")
        if level.t_start is not None and not 0 <= level.t_start < p.schedule.timesteps:
            raise NcaTilesError(f"{where}: level {i} t_start {level.t_start} is outside 0..{p.schedule.timesteps - 1}")
        relay = (p.meta.get("training") or {}).get("relay_factor")
        if relay is not None:
            ratio = None if i == 0 else levels[i - 1].factor // level.factor
            if ratio != relay:
                below = "it is the coarsest level" if ratio is None else f"the level below is {ratio}× coarser"
                raise NcaTilesError(f"{where}: level {i} was trained to take over from a level {relay}× coarser "
                                    f"(train --relay-factor), but {below}")
        trained_up_to = (p.meta.get("training") or {}).get("max_timestep")
        starts_at = p.schedule.timesteps - 1 if level.t_start is None else level.t_start
        if trained_up_to is not None and trained_up_to < starts_at:
            raise NcaTilesError(f"{where}: level {i} starts at t = {starts_at} but was trained only up to t = "
                                f"{trained_up_to} (train --max-timestep): train it further up, or start it later")


def choose_t_start(patches: np.ndarray, ratio: int, alpha_bars: np.ndarray) -> int:
    """The first timestep at which the finer level may take over from a coarser one ``ratio``
    times coarser: where the noise hides the detail the coarse level cannot hold.

    ``patches`` are real uint8 (N, H, W, 3) patches at the finer level's µm/px.
    """
    x = to_model_space(patches)
    h, w = x.shape[-2:]
    h, w = h - h % ratio, w - w % ratio
    x = x[..., :h, :w]
    detail = float((x - relay_start(x, ratio)).std())
    noise_to_signal = np.sqrt((1.0 - alpha_bars) / alpha_bars)
    above = np.flatnonzero(noise_to_signal >= T_START_NOISE_TO_DETAIL * detail)
    return int(above[0]) if len(above) else len(alpha_bars) - 1


def save_scale_space_model(out: Path, level_paths: list[Path], factors: list[int], t_starts: list[int | None],
                           etas: Sequence[float] | None = None, steps: Sequence[int] | None = None) -> Path:
    """Write a scale-space model directory from single-scale models (coarsest first); ``etas``: the
    DDIM η each level records (format 3), ``steps``: the DDIM steps each level records (format 4);
    None: none (the oldest format that holds the rest: 2 where neither is recorded)."""
    out = Path(out)
    if out.exists():
        raise NcaTilesError(f"{out} exists: choose another --out")
    from nca_tiles.runtime.outputs import temporary_path

    specs = []
    tmp = temporary_path(out, "new")
    try:
        tmp.mkdir(parents=True)
        for i, (source, factor, t_start) in enumerate(zip(level_paths, factors, t_starts, strict=True)):
            meta, state = load_model_files(resolve_model_path(Path(source)))
            save_model_dir(tmp / f"level-{i}", meta, state)
            specs.append({"path": f"level-{i}", "factor": factor, **({} if t_start is None else {"t_start": t_start}),
                          **({} if etas is None else {"eta": float(etas[i])}),
                          **({} if steps is None else {"steps": int(steps[i])})})
        version = STEPS_FORMAT if steps is not None else ETA_FORMAT if etas is not None else 2
        config = {"format_version": version, "kind": SCALE_SPACE_KIND, "levels": specs}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        load_synthesis_model(tmp, device="cpu")  # refuse to write what could not be loaded
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_scale_space_model(out: Path, level_paths: list[Path], t_starts: list[int] | None = None,
                            patch_stores: list[Path] | None = None,
                            eta: float | Sequence[float] | None = None,
                            steps: Sequence[int] | None = None) -> SynthesisModel:
    """``nca-tiles build-model``: factors from the models' µm/px, each finer level's t_start given
    or measured on real patches at its µm/px (``choose_t_start``); ``eta``: the DDIM η each level
    records (one number: every level's; None: none, so synthesis uses ``level_etas``' defaults);
    ``steps``: the DDIM steps each level records, coarse to fine (None: none, so synthesis shares
    its steps as ``level_timesteps`` does)."""
    if len(level_paths) < 2:
        raise NcaTilesError("a scale-space model needs at least two --level models, coarsest first")
    etas = None if eta is None else checked_etas(eta, len(level_paths))
    if steps is not None and (isinstance(steps, (int, str)) or len(steps) != len(level_paths)):
        raise NcaTilesError(f"--steps records each level's DDIM steps: give one number per level "
                            f"({len(level_paths)}), coarse to fine")
    metas = [load_model_files(resolve_model_path(Path(p)))[0] for p in level_paths]
    mpps = [float(meta["data"]["mpp"]) for meta in metas]
    factors = []
    for path, mpp in zip(level_paths, mpps):
        ratio = mpp / mpps[-1]
        factor = 2 ** round(math.log2(ratio)) if ratio > 0 else 0
        if factor < 1 or abs(ratio - factor) > 0.05 * factor:
            raise NcaTilesError(f"{path} was trained at {mpp:g} µm/px: every level's µm/px must be a power of two times "
                                f"the finest level's ({mpps[-1]:g} µm/px)")
        factors.append(factor)
    finer = len(level_paths) - 1
    if t_starts:
        if len(t_starts) != finer:
            raise NcaTilesError(f"give one --t-start per level after the first ({finer}), got {len(t_starts)}")
        chosen = list(t_starts)
    elif patch_stores:
        if len(patch_stores) != finer:
            raise NcaTilesError(f"give one --patches store per level after the first ({finer}), got {len(patch_stores)}")
        from nca_tiles.diffusion.schedule import NoiseSchedule, ScheduleConfig
        from nca_tiles.training.patches import open_patch_store

        chosen = []
        for k, store_path in enumerate(patch_stores, start=1):
            store = open_patch_store(store_path)
            if abs(store.mpp - mpps[k]) > 0.05 * mpps[k]:
                raise NcaTilesError(f"{store_path} holds {store.mpp:g} µm/px patches; level {k} needs {mpps[k]:g} µm/px")
            rows = store.indices("train")[:512]
            schedule = NoiseSchedule(ScheduleConfig.from_dict(metas[k]["schedule"]))
            chosen.append(choose_t_start(np.asarray(store.images[np.sort(rows)]), factors[k - 1] // factors[k],
                                         schedule.alphas_cumprod))
    else:
        raise NcaTilesError("give --t-start for each finer level, or --patches to measure it on real patches")
    if steps is not None:
        from nca_tiles.diffusion.schedule import ScheduleConfig

        spans = [ScheduleConfig.from_dict(metas[0]["schedule"]).timesteps, *(t + 1 for t in chosen)]
        for index, (n, span) in enumerate(zip(steps, spans)):
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= span:
                raise NcaTilesError(f"--steps: level {index} covers {span} timesteps, so it takes 1 to {span} DDIM "
                                    f"steps, got {n!r}")
    save_scale_space_model(out, level_paths, factors, [None, *chosen], etas, steps)
    return load_synthesis_model(out, device="cpu")


def is_scale_space_model(path: Path) -> bool:
    return read_scale_space_config(Path(path)) is not None


def describe_scale_space_model(path: Path) -> str:
    """``nca-tiles info`` of a scale-space model: each level's model, factor and t_start."""
    from nca_tiles.diffusion.checkpoint import describe_model

    model = load_synthesis_model(path, device="cpu")
    config = read_scale_space_config(Path(path))
    lines = [f"scale-space model: {path}", f"levels: {model.describe()} (output {model.mpp:g} µm/px)",
             f"hash: {model.hash}"]
    for k, (spec, level) in enumerate(zip(config["levels"], model.levels)):
        start = "from pure noise" if level.t_start is None else f"from the coarser level re-noised to t = {level.t_start}"
        sampled = ("" if level.eta is None else f", DDIM η {level.eta:g}") + (
            "" if level.steps is None else f", {level.steps} DDIM steps")
        lines.append(f"level {k}: factor {level.factor} ({level.pipeline.mpp:g} µm/px), {start}{sampled}")
        lines += ["  " + line for line in describe_model(Path(path) / spec["path"]).splitlines()]
    return "\n".join(lines)


# -- steps per level --------------------------------------------------------------------------------
# DDIM with long strides between timesteps drifts to the mean image; on a cheap level (below) more
# steps cost little (docs/design.md §7, "Steps per level"). The coarsest level starts from pure
# noise and decides the layout: 50 steps (a 16 µm/px layout drew ~5 % background at 17 steps and
# ~35 % at 50; 75 scored a worse FD, 3.34 against 3.01 on the test split).
COARSEST_MIN_STEPS = 50
# A relay-started level redraws detail from its coarser level's result: at stride 20 the 4 µm/px
# level handed the fine level a smoother image with a quarter fewer nuclei than at stride 4.
RELAY_MAX_STRIDE = 4
# A level is cheap when one of its steps costs at most this share of a finest-level step
# (MACs per cell ÷ f²): a 4× coarser level of the same preset, a 16× coarser one 16× wider.
CHEAP_STEP_COST = 1 / 16


# DDIM η of a cheap relay-started level, unless --eta or the model says otherwise. Deterministic DDIM
# walks to the conditional mean; fresh noise at each step lets the 4 µm/px level redraw cell-dense
# detail from its blurred start (docs/design.md §7, "Stochastic relay levels"). The coarsest level
# stays deterministic (η = 1 there scattered the layout: FD 2.06 against 0.88). Too much fresh noise
# stays as blobs: the bundled model records 0.5 for that level ("η by the power per scale"); this
# default stays 1 so that models without a recorded η keep their pixels.
RELAY_ETA = 1.0
# DDIM η of a scale-space model's finest level: a little fresh noise sharpens its nuclei (test
# split: nearest-nucleus W1 1.42 against 1.74 at η = 0); at η = 1 its few steps leave grain. A
# single-scale model stays deterministic: its slides are what they always were.
FINEST_ETA = 0.3


def level_etas(model: SynthesisModel, eta: float | Sequence[float] | None) -> list[float]:
    """DDIM η of each level, coarse to fine. None: the η the model records for a level, else
    RELAY_ETA on a cheap relay-started level, FINEST_ETA on a scale-space model's finest, 0
    (deterministic) elsewhere; one number: every level; a sequence: each level's."""
    levels = len(model.levels)
    if eta is None:
        def default(i: int, level: Level) -> float:
            if level.eta is not None:
                return level.eta
            if i == levels - 1:
                return FINEST_ETA if model.is_scale_space else 0.0
            cheap_relay = level.t_start is not None and step_cost(model, i) <= CHEAP_STEP_COST
            return RELAY_ETA if cheap_relay else 0.0

        return [default(i, level) for i, level in enumerate(model.levels)]
    return checked_etas(eta, levels)


def checked_etas(eta: float | Sequence[float], levels: int) -> list[float]:
    """``eta`` as one DDIM η per level of a ``levels``-level model; a one-line error if it is not."""
    etas = list(eta) if isinstance(eta, Sequence) else [eta] * levels
    if len(etas) != levels:
        raise NcaTilesError(f"--eta gives {len(etas)} values for a model of {levels} level(s): "
                            f"give one number (every level) or {levels}, coarse to fine")
    for value in etas:
        if not is_eta(value):
            raise NcaTilesError(f"--eta must be between 0 (deterministic DDIM) and 1, got {value!r}")
    return [float(value) for value in etas]


def is_eta(value: object) -> bool:
    """A DDIM η: a number (not a bool) in [0, 1]; NaN is not."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def step_cost(model: SynthesisModel, index: int) -> float:
    """One denoising step of level ``index`` per output pixel ÷ one of the finest level."""
    level = model.levels[index]
    return macs_per_denoising_step(level.pipeline) / macs_per_denoising_step(model.finest) / level.factor**2


def level_timesteps(model: SynthesisModel, sampler: str, steps: int | Sequence[int] | None) -> list[list[int]]:
    """The timesteps each level visits. DDPM: every timestep of each level's span. DDIM: ``steps``
    in all (default DEFAULT_DDIM_STEPS), shared in proportion to the span of t each level covers (the coarsest
    covers T; a finer one t_start + 1), at least one each — except that a cheap coarser level
    (``step_cost`` ≤ CHEAP_STEP_COST) takes more, on top of ``steps``, where its share is fewer:
    the coarsest COARSEST_MIN_STEPS, a relay-started one steps at most RELAY_MAX_STRIDE timesteps
    apart (at most its span); together they cost a few finest-level steps.
    ``steps`` as a sequence: each level's DDIM steps, coarse to fine, as given. ``steps`` None on
    a model that records its levels' steps (build-model --steps): those."""
    spans = [_span(lv) for lv in model.levels]
    starts = [span - 1 for span in spans]
    if steps is None and sampler == "ddim" and model.recorded_steps is not None:
        steps = model.recorded_steps
    if isinstance(steps, Sequence):
        return _timesteps_as_given(model, sampler, list(steps), starts)
    if sampler == "ddpm" or not model.is_scale_space:
        return [lv.pipeline.schedule.sampling_timesteps(sampler, steps, start)
                for lv, start in zip(model.levels, starts)]
    total = DEFAULT_DDIM_STEPS if steps is None else steps
    if total < len(spans):
        raise NcaTilesError(f"--steps {total} is fewer than the model's {len(spans)} levels: give at least one step a level")
    if total > sum(spans):
        raise NcaTilesError(f"--steps must be at most {sum(spans)} for this model's levels, got {total}")
    shares = [max(1, min(span, round(total * span / sum(spans)))) for span in spans]
    shares[0] += total - sum(shares)  # rounding goes to the (cheap) coarsest level
    if not 1 <= shares[0] <= spans[0]:
        raise NcaTilesError(f"cannot share --steps {total} among levels of spans {spans}: give another --steps")
    for i, span in enumerate(spans[:-1]):
        if step_cost(model, i) <= CHEAP_STEP_COST:
            least = COARSEST_MIN_STEPS if i == 0 else math.ceil(span / RELAY_MAX_STRIDE)
            shares[i] = max(shares[i], min(span, least))
    return [lv.pipeline.schedule.sampling_timesteps(sampler, n, start)
            for lv, n, start in zip(model.levels, shares, starts)]


def _span(level: Level) -> int:
    """How many timesteps a level covers: from t_start (or T − 1, from pure noise) down to 0."""
    return level.t_start + 1 if level.t_start is not None else level.pipeline.schedule.timesteps


def _timesteps_as_given(model: SynthesisModel, sampler: str, steps: list[int], starts: list[int]) -> list[list[int]]:
    levels = len(model.levels)
    if sampler == "ddpm":
        raise NcaTilesError("ddpm always takes every timestep of each level: drop --steps or use --sampler ddim")
    if len(steps) != levels:
        raise NcaTilesError(f"--steps gives {len(steps)} step counts for a model of {levels} level(s): "
                            f"give one number (shared by the levels) or {levels}, coarse to fine")
    timesteps = []
    for index, (level, n, start) in enumerate(zip(model.levels, steps, starts)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= start + 1:
            raise NcaTilesError(f"--steps: level {index} (1/{level.factor}) takes 1 to {start + 1} DDIM steps, got {n!r}")
        timesteps.append(level.pipeline.schedule.sampling_timesteps(sampler, n, start))
    return timesteps


def macs_per_denoising_step(pipeline: Pipeline) -> int:
    """Multiply-accumulates per cell of one denoising step (s NCA steps)."""
    config = pipeline.model.config
    return config.macs_per_pixel_step() * config.nca_steps


def macs_per_output_pixel(model: SynthesisModel, timesteps: list[list[int]]) -> float:
    """Multiply-accumulates per output pixel of the whole sampling run (coarse cells are f² pixels)."""
    return sum(macs_per_denoising_step(lv.pipeline) * len(ts) / lv.factor**2 for lv, ts in zip(model.levels, timesteps))


# -- the in-memory reference ------------------------------------------------------------------------
@torch.no_grad()
def generate_levels(model: SynthesisModel | Pipeline, height: int, width: int, seed: int = 0,
                    steps: int | Sequence[int] | None = None,
                    sampler: str = "ddim", eta: float | Sequence[float] | None = None) -> np.ndarray:
    """Synthesize a whole (height, width) canvas in memory, level by level: uint8 (H, W, 3).

    What tiled synthesis must equal, pixel for pixel up to float rounding, whatever its chunking.
    A single-scale pipeline is a model of one level (the same pixels as ``pipeline.generate_region``).
    """
    if isinstance(model, Pipeline):
        model = SynthesisModel.single(model)
    if height < 2 or width < 2:
        raise NcaTilesError("height and width must be at least 2 px")
    previous = None
    etas = level_etas(model, eta)
    for index, (level, ts) in enumerate(zip(model.levels, level_timesteps(model, sampler, steps))):
        p, s = level.pipeline, level_seed(seed, index)
        h, w = level_size(height, level.factor), level_size(width, level.factor)
        if previous is None:
            x = initial_noise(s, 0, 0, h, w, p.device)
        else:
            ratio = model.levels[index - 1].factor // level.factor
            up = upsample_window(previous, (0, 0), tuple(previous.shape[1:]), (0, 0), (h, w), ratio)
            x = renoise(up, p.schedule.alpha_bar(level.t_start), seed, index, (0, 0))
        for t, t_prev in zip(ts, [*ts[1:], -1]):
            eps = predict_noise(p, x[None], t, [(0, 0)], [s])[0]
            x = reverse_step(p, sampler, eps, x, t, t_prev, s, (0, 0), etas[index])
        previous = x
    return to_uint8(previous)


def hand_over(pipeline: Pipeline, x0: torch.Tensor, t_start: int, ratio: int | None, seeds: list[int],
              timesteps: list[int], sampler: str = "ddim", eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A finer level's work on real patches x0 (B, 3, H, W) in model space, handed over as a
    perfect coarser level ``ratio`` times coarser would hand them (area-averaged and upsampled:
    ``relay_start``; None: as they are), re-noised to ``t_start``: (the state handed over, the
    level's result after ``timesteps``). Patch i's noise keyed by ``seeds[i]``."""
    _, c, h, w = x0.shape
    handed = relay_start(x0, ratio) if ratio and ratio > 1 else x0
    noise = torch.stack([rng.normal(s, rng.Stream.LEVEL_NOISE, 0, 0, 0, h, w, c) for s in seeds])
    alpha_bar = pipeline.schedule.alpha_bar(t_start)
    x_t = (math.sqrt(alpha_bar) * handed + math.sqrt(1.0 - alpha_bar) * noise).to(pipeline.device)
    return x_t, denoise_patches(pipeline, x_t, seeds, sampler=sampler, eta=eta, timesteps=timesteps)


def hand_over_patches(model: SynthesisModel, index: int, real: np.ndarray, seed: int = 0,
                      steps: int | Sequence[int] | None = None, sampler: str = "ddim",
                      eta: float | Sequence[float] | None = None, batch: int = 64) -> np.ndarray:
    """What level ``index`` (≥ 1) of a scale-space model makes of ``real`` uint8 (N, H, W, 3)
    patches at its µm/px, handed over as a perfect coarser level would (:func:`hand_over`), with
    the DDIM steps and η synthesis gives it: the level's own errors, apart from those of the levels
    below it. uint8 (N, H, W, 3); patch i keyed by (seed, i)."""
    if not 1 <= index < len(model.levels):
        raise NcaTilesError(f"level {index}: a hand-over goes to a level above the coarsest, 1 to "
                            f"{len(model.levels) - 1} for this {len(model.levels)}-level model")
    level = model.levels[index]
    ratio = model.levels[index - 1].factor // level.factor
    if real.shape[1] % ratio or real.shape[2] % ratio:
        raise NcaTilesError(f"{real.shape[1]} px patches do not divide into level {index}'s {ratio}× coarser cells")
    timesteps = level_timesteps(model, sampler, steps)[index]
    level_eta = level_etas(model, eta)[index]
    x0 = to_model_space(real)
    out = np.empty_like(real)
    for start in range(0, len(real), batch):
        seeds = [rng.derive_seed(seed, i) for i in range(start, min(len(real), start + batch))]
        _, result = hand_over(level.pipeline, x0[start : start + len(seeds)], level.t_start, ratio, seeds, timesteps,
                              sampler, level_eta)
        out[start : start + len(seeds)] = to_uint8(result)
    return out


def generate_level_patches(model: SynthesisModel, n: int, size: int = 64, seed: int = 0,
                           steps: int | Sequence[int] | None = None,
                           sampler: str = "ddim", eta: float | Sequence[float] | None = None) -> np.ndarray:
    """n independent size × size samples, uint8 (n, size, size, 3); sample i uses seed (seed, i).
    A single-scale model samples them in batches (``generate_patches``)."""
    from nca_tiles.diffusion.pipeline import generate_patches

    if not model.is_scale_space:
        if isinstance(steps, Sequence):  # one count for the one level
            steps = len(level_timesteps(model, sampler, steps)[0])
        return generate_patches(model.finest, n, size=size, seed=seed, steps=steps, sampler=sampler,
                                eta=level_etas(model, eta)[0])
    return np.stack([generate_levels(model, size, size, rng.derive_seed(seed, i), steps, sampler, eta) for i in range(n)])


def cost_ratio_to_single_scale(model: SynthesisModel, timesteps: list[list[int]]) -> float:
    """FLOPs per output pixel of this run ÷ those of the finest level alone at the same step count."""
    single = macs_per_denoising_step(model.finest) * sum(len(ts) for ts in timesteps)
    return macs_per_output_pixel(model, timesteps) / single if single else math.nan
