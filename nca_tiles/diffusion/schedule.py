"""The noise schedule: no weights, only the arithmetic of the forward and reverse processes.

DDPM (Ho et al., 2020) and DDIM (Song et al., 2021). Every operation is per pixel, so a schedule
step applied to a chunk equals the same step applied to the whole canvas, cropped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from nca_tiles.errors import NcaTilesError

SAMPLERS = ("ddim", "ddpm")
# DDIM steps when none are given, for synthesize, evaluate and the demo alike (a scale-space model
# shares them among its levels: levels.level_timesteps).
DEFAULT_DDIM_STEPS = 50
BETA_SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class ScheduleConfig:
    """The paper's pathology recipe: T = 300, linear β from 1e-4 to 0.02."""

    timesteps: int = 300
    beta_schedule: str = "linear"  # "linear" | "cosine"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_sample: bool = True  # clip the predicted x_0 to the data range [-1, 1]

    def __post_init__(self) -> None:
        if self.timesteps < 2:
            raise NcaTilesError("schedule: timesteps must be ≥ 2")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise NcaTilesError(f"schedule: unknown beta_schedule {self.beta_schedule!r} (linear or cosine)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ScheduleConfig":
        return cls(**data)


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021), eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2)."""
    t = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, max_beta)


class NoiseSchedule:
    """β_t, α_t = 1 − β_t, ᾱ_t = Π α_s, and the steps that use them. Timesteps are 0-based."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        cfg = self.config
        if cfg.beta_schedule == "linear":
            betas = linear_betas(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        else:
            betas = cosine_betas(cfg.timesteps)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)

    @property
    def timesteps(self) -> int:
        return self.config.timesteps

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t, with ᾱ_{-1} = 1 (the clean image)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def sampling_timesteps(self, sampler: str, steps: int | None = None, start: int | None = None) -> list[int]:
        """Timesteps visited by a sampler, from ``start`` (default T−1: pure noise) down to 0.

        DDPM visits every one. DDIM visits ``steps`` of them, evenly spaced ("trailing" spacing, so
        the first step starts at ``start`` itself: Lin et al., 2024). A level of a scale-space
        sampler starts part-way, from its upsampled and re-noised coarser level.
        """
        if sampler not in SAMPLERS:
            raise NcaTilesError(f"unknown sampler {sampler!r}: choose {' or '.join(SAMPLERS)}")
        T = self.timesteps
        first = T - 1 if start is None else start
        if not 0 <= first < T:
            raise NcaTilesError(f"a sampler must start between timestep 0 and {T - 1}, got {first}")
        span = first + 1
        if sampler == "ddpm":
            if steps not in (None, span):
                raise NcaTilesError(f"ddpm always takes all {span} steps: drop --steps or use --sampler ddim")
            return list(range(first, -1, -1))
        if steps is None:
            steps = min(DEFAULT_DDIM_STEPS, span)
        if not 1 <= steps <= span:
            raise NcaTilesError(f"--steps must be between 1 and {span} for ddim")
        # Built from the step index, not by np.arange with a float stride: that sometimes yields one
        # element too many (300 / 14 · 14 < 300), a step at t = −1.
        ts = np.round(span - np.arange(steps) * (span / steps)).astype(int) - 1
        return [int(t) for t in ts]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Ho et al., eq. 4). t has shape (B,)."""
        ab = torch.as_tensor(self.alphas_cumprod, dtype=torch.float32, device=x0.device)[t]
        ab = ab.view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        ab = self.alpha_bar(t)
        x0 = (x_t - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        return x0.clamp(-1.0, 1.0) if self.config.clip_sample else x0

    def ddpm_step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Ancestral step x_t -> x_{t−1}: the posterior q(x_{t−1} | x_t, x̂_0) (Ho et al., eq. 6–7).

        Its mean written through x̂_0 equals 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε̂) when x̂_0 is not clipped;
        the variance is β̃_t = β_t (1−ᾱ_{t−1})/(1−ᾱ_t). No noise is added at t = 0.
        """
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(t - 1)
        beta_t = float(self.betas[t])
        x0 = self.predict_x0(x_t, eps, t)
        coef_x0 = math.sqrt(ab_prev) * beta_t / (1.0 - ab_t)
        coef_xt = math.sqrt(float(self.alphas[t])) * (1.0 - ab_prev) / (1.0 - ab_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        if t == 0:
            return mean
        if noise is None:
            raise ValueError("ddpm_step needs noise for t > 0")
        variance = beta_t * (1.0 - ab_prev) / (1.0 - ab_t)
        return mean + math.sqrt(variance) * noise

    def ddim_step(self, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
                  noise: torch.Tensor | None = None, eta: float = 0.0) -> torch.Tensor:
        """DDIM step x_t -> x_{t_prev} (Song et al., eq. 12); η = 0 is deterministic."""
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        x0 = self.predict_x0(x_t, eps, t)
        sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * math.sqrt(1.0 - ab_t / ab_prev)
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            x_prev = x_prev + sigma * noise
        return x_prev

    def needs_noise(self, sampler: str, t: int, eta: float) -> bool:
        return (sampler == "ddpm" and t > 0) or (sampler == "ddim" and eta > 0 and t > 0)

    def step(self, sampler: str, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
             noise: torch.Tensor | None = None, eta: float = 0.0) -> torch.Tensor:
        """One reverse step of the named sampler."""
        if sampler == "ddpm":
            return self.ddpm_step(eps, t, x_t, noise)
        return self.ddim_step(eps, t, t_prev, x_t, noise, eta)
