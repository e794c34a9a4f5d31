"""The sampling pipeline: model + schedule, and the reverse-diffusion loop written out.

The pieces every executor shares:

- :func:`initial_noise` — x_T of any window, keyed by global coordinates;
- :func:`predict_noise` — ε̂ on windows whose origins are known (fire masks keyed globally);
- :func:`reverse_step` — x_t -> x_{t_prev} on a region, its noise keyed globally.

:func:`generate_region` runs them over one whole canvas in memory: the reference that tiled
synthesis must equal, and the API for small images (e.g. to feed a data loader).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nca_tiles.diffusion import compiled, rng
from nca_tiles.diffusion.checkpoint import load_model_files, load_weights, model_hash, resolve_model_path, validate_model_meta
from nca_tiles.errors import NcaTilesError
from nca_tiles.diffusion.model import CounterFireMask, DiffNCA, ModelConfig, rule_is_warm
from nca_tiles.diffusion.schedule import NoiseSchedule, ScheduleConfig


@dataclass
class Pipeline:
    """A loaded model ready to sample: EMA weights in eval mode, its schedule and metadata."""

    model: DiffNCA
    schedule: NoiseSchedule
    mpp: float
    hash: str
    meta: dict
    device: torch.device
    precision: str = "fp32"  # "fp32" | "bf16" (CUDA autocast)
    # torch.compile of the cell rule: "on", "off", or "auto" — eager until this pipeline's model
    # calls have taken about as long as compiling would (COMPILE_PAYS_AFTER_S), then compiled.
    compile: str = "off"
    eager_seconds: float = 0.0  # model time spent eager so far, while compile is "auto"
    eager_pixels: float = 0.0  # window pixels of those calls: eager seconds per pixel, for the trial
    # compile "trial": compiled, kept only if faster than eager was (TRIAL_CALLS timed calls)
    trial_calls: int = 0
    trial_seconds: float = 0.0
    trial_pixels: float = 0.0

    @property
    def halo(self) -> int:
        return self.model.config.halo

    def autocast(self):
        return autocast(self.device, self.precision)


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for; otherwise plain fp32. Users get bf16 on CUDA only
    (``resolve_precision``); the tests run the same autocast path on a CPU."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(device: torch.device, precision: str) -> str:
    """"auto" is bf16 on CUDA and fp32 on a CPU, where bf16 is very slow (docs/design.md §4):
    there it is refused."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cpu":
        raise NcaTilesError("bf16 on a CPU is hundreds of times slower than fp32: use --precision fp32")
    return precision


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise NcaTilesError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise NcaTilesError(f"unknown device {device!r}: choose auto, cpu or cuda")
    return torch.device(device)


def build_pipeline(meta: dict, state_dict: dict, device: str | torch.device = "cpu", precision: str = "auto",
                   source: str | Path = "the model", compile: str | bool | None = None) -> Pipeline:
    """A pipeline from a model's metadata and weights; ``source`` names where they came from in errors.

    ``compile``: True/"on", False/"off", "auto", or None for the process default
    (nca_tiles.diffusion.compiled.default_mode: "auto" unless set)."""
    device = resolve_device(device) if isinstance(device, str) else device
    validate_model_meta(meta, source)  # cheap, and callers may build meta themselves
    config = ModelConfig.from_dict(meta["model"])
    model = DiffNCA(config)
    load_weights(model, state_dict, source)
    model.eval().requires_grad_(False).to(device)
    precision = resolve_precision(device, precision)
    mode = compiled.resolve_mode(compile)
    if mode == "auto" and (not compiled.auto_compiles(device)  # a CPU: the eager rule is the faster
                           or compiled.skip_remembered(device)):  # an earlier trial here: not faster
        mode = "off"
    if mode == "on":
        model.compiled = compiled.available(device)
        mode = "on" if model.compiled else "off"
    return Pipeline(
        model=model,
        schedule=NoiseSchedule(ScheduleConfig.from_dict(meta["schedule"])),
        mpp=float(meta["data"]["mpp"]),
        hash=model_hash(meta, state_dict),
        meta=meta,
        device=device,
        precision=precision,
        compile=mode,
    )


def load_model(path: Path | str | None = None, device: str = "auto", precision: str = "auto",
               compile: str | bool | None = None) -> Pipeline:
    """Load a model for sampling: a run directory, model directory or checkpoint file; None = bundled.

    ``compile`` as for :func:`build_pipeline`; dask workers load with the default, which a CLI's
    --compile/--no-compile sets for the workers it starts (compiled.set_default_mode)."""
    files = resolve_model_path(None if path is None else Path(path))
    meta, state = load_model_files(files)
    return build_pipeline(meta, state, device, precision, source=files.checkpoint or files.weights, compile=compile)


def initial_noise(seed: int, y0: int, x0: int, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T on a window, (3, H, W), a pure function of (seed, global coordinates)."""
    return rng.normal(seed, rng.Stream.INITIAL_NOISE, 0, y0, x0, height, width, 3, device=device)


@torch.no_grad()
def predict_noise(pipeline: Pipeline, x_t: torch.Tensor, t: int, origins: list[tuple[int, int]], seeds: list[int]) -> torch.Tensor:
    """ε̂ for a batch of windows (B, 3, H, W) whose top-left global coordinates are ``origins``."""
    b = x_t.shape[0]
    fire = CounterFireMask(pipeline.model.config.fire_rate, seeds, [t] * b, origins, compiled=pipeline.model.compiled)
    timesteps = torch.full((b,), t, dtype=torch.long, device=pipeline.device)
    with pipeline.autocast():
        eps = run_model(pipeline, x_t.to(pipeline.device), timesteps, fire)
    return eps.float()


# Seconds of eager model calls after which compile="auto" compiles: about what compiling the rule
# costs (≈ 5–10 s on 2 CPU cores, measured; Triton on CUDA is slower to compile, an estimate), so
# a job never spends more than about twice the better choice's time.
COMPILE_PAYS_AFTER_S = {"cpu": 10.0, "cuda": 30.0}
# Compiled calls timed after the compiling one before compile="auto" keeps the compiled rule: it
# keeps it only if it ran faster per pixel than the eager calls did. The inductor kernels do not
# win on every CPU: on the development machine of 2026-12-05 (AMD EPYC, 62 GFLOP/s matmul) a
# compiled 512² step took 3.17 s against 2.68 s eager, after a 49 s compile, and the demo took
# 327 s compiled against about 3 min eager (README § Compiled vs eager).
TRIAL_CALLS = 3


def run_model(pipeline: Pipeline, *args) -> torch.Tensor:
    """The pipeline's model on ``args``, compiling its rule once compile="auto" finds it pays, and
    keeping it compiled only if it runs faster than eager did (``TRIAL_CALLS``)."""
    model = pipeline.model
    if pipeline.compile not in ("auto", "trial"):
        return model(*args)
    start = time.perf_counter()
    out = model(*args)
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize(pipeline.device)  # only while deciding: queued kernels are time too
    seconds = time.perf_counter() - start
    x_t = args[0]
    pixels = float(x_t.shape[0] * x_t.shape[2] * x_t.shape[3])
    if pipeline.compile == "trial":
        _judge_compiled(pipeline, seconds, pixels)
        return out
    pipeline.eager_seconds += seconds
    pipeline.eager_pixels += pixels
    # Compiled already in this process (another pipeline, another job): new models reuse it.
    if rule_is_warm() or pipeline.eager_seconds >= COMPILE_PAYS_AFTER_S.get(pipeline.device.type, 30.0):
        model.compiled = compiled.available(pipeline.device)
        if not model.compiled:
            pipeline.compile = "off"
        else:
            pipeline.compile = "on" if compiled.kept() else "trial"
    return out


def _judge_compiled(pipeline: Pipeline, seconds: float, pixels: float) -> None:
    """One compiled call of compile="auto"'s trial: after ``TRIAL_CALLS`` (the first, which may
    compile, not counted) keep the compiled rule if it was faster per pixel than eager, else run
    eager from now on, in this process (every level, every job)."""
    pipeline.trial_calls += 1
    if pipeline.trial_calls == 1:
        return
    pipeline.trial_seconds += seconds
    pipeline.trial_pixels += pixels
    if pipeline.trial_calls <= TRIAL_CALLS:
        return
    compiled_rate = pipeline.trial_seconds / pipeline.trial_pixels
    eager_rate = pipeline.eager_seconds / pipeline.eager_pixels if pipeline.eager_pixels else math.inf
    if compiled_rate < eager_rate:
        compiled.keep()
        pipeline.compile = "on"
        return
    pipeline.model.compiled = False
    pipeline.compile = "off"
    detail = (f"{compiled_rate * 1e6:.2f} against {eager_rate * 1e6:.2f} s per megapixel of window per "
              "denoising step")
    compiled.remember_not_faster(pipeline.device, detail)  # later processes here skip the compile
    compiled.not_faster(f"ran no faster than eager here ({detail})")


def reverse_step(pipeline: Pipeline, sampler: str, eps: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
                 seed: int, origin: tuple[int, int], eta: float = 0.0) -> torch.Tensor:
    """x_t -> x_{t_prev} on one region (3, H, W) at global ``origin``; its noise keyed globally."""
    schedule = pipeline.schedule
    noise = None
    if schedule.needs_noise(sampler, t, eta):
        _, h, w = x_t.shape
        noise = rng.normal(seed, rng.Stream.STEP_NOISE, t, origin[0], origin[1], h, w, 3, device=x_t.device,
                           compiled=pipeline.model.compiled)
    return schedule.step(sampler, eps, t, t_prev, x_t, noise, eta)


def sampling_plan(pipeline: Pipeline, sampler: str, steps: int | None) -> list[tuple[int, int]]:
    """The (t, t_prev) pairs of a sampling run, in order."""
    ts = pipeline.schedule.sampling_timesteps(sampler, steps)
    return list(zip(ts, ts[1:] + [-1]))


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]: the inverse of :func:`to_uint8`."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model space [-1, 1] (C, H, W) or (B, C, H, W) -> uint8 channel-last."""
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.movedim(-3, -1).cpu().numpy()


@torch.no_grad()
def generate_region(pipeline: Pipeline, height: int, width: int, seed: int = 0, steps: int | None = 50,
                    sampler: str = "ddim", eta: float = 0.0) -> np.ndarray:
    """Synthesize a whole (height, width) canvas in memory: uint8 (H, W, 3).

    Pixel for pixel what ``nca-tiles synthesize`` writes for the same model, seed and size
    (up to float rounding), whatever its chunking.
    """
    if height < 2 or width < 2:
        raise NcaTilesError("height and width must be at least 2 px")
    x = initial_noise(seed, 0, 0, height, width, pipeline.device)
    for t, t_prev in sampling_plan(pipeline, sampler, steps):
        eps = predict_noise(pipeline, x[None], t, [(0, 0)], [seed])[0]
        x = reverse_step(pipeline, sampler, eps, x, t, t_prev, seed, (0, 0), eta)
    return to_uint8(x)


@torch.no_grad()
def generate_patches(pipeline: Pipeline, n: int, size: int = 64, seed: int = 0, steps: int | None = 50,
                     sampler: str = "ddim", batch: int = 64, eta: float = 0.0) -> np.ndarray:
    """n independent size × size samples, uint8 (n, size, size, 3); sample i uses seed (seed, i)."""
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, batch):
        seeds = [rng.derive_seed(seed, i) for i in range(start, min(n, start + batch))]
        x = torch.stack([initial_noise(s, 0, 0, size, size, pipeline.device) for s in seeds])
        out[start : start + len(seeds)] = to_uint8(denoise_patches(pipeline, x, seeds, steps, sampler, eta))
    return out


@torch.no_grad()
def denoise_patches(pipeline: Pipeline, x: torch.Tensor, seeds: list[int], steps: int | None = 50,
                    sampler: str = "ddim", eta: float = 0.0, start: int | None = None,
                    timesteps: list[int] | None = None) -> torch.Tensor:
    """Run the reverse process on independent patches x (B, 3, H, W) from timestep ``start``
    (default T − 1: x is pure noise) down to 0, or through ``timesteps`` when given; patch i's
    masks and noise keyed by ``seeds[i]``."""
    origins = [(0, 0)] * len(seeds)
    ts = pipeline.schedule.sampling_timesteps(sampler, steps, start) if timesteps is None else timesteps
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        eps = predict_noise(pipeline, x, t, origins, seeds)
        x = torch.stack([reverse_step(pipeline, sampler, eps[i], x[i], t, t_prev, s, (0, 0), eta)
                         for i, s in enumerate(seeds)])
    return x
