"""Noise schedule against closed forms."""

import math

import numpy as np
import pytest
import torch

from nca_tiles.errors import NcaTilesError
from nca_tiles.diffusion.schedule import NoiseSchedule, ScheduleConfig


def test_linear_betas_match_the_paper():
    s = NoiseSchedule()
    assert len(s.betas) == 300
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 300)))


def test_cosine_alpha_bar_closed_form():
    s = NoiseSchedule(ScheduleConfig(timesteps=1000, beta_schedule="cosine"))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):
        assert s.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-6)


def test_add_noise_closed_form():
    s = NoiseSchedule()
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 150, 299])
    x_t = s.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        ab = s.alphas_cumprod[ti]
        torch.testing.assert_close(x_t[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i])


def test_ddpm_step_equals_eps_form_of_posterior_mean():
    # Ho et al. eq. 11: μ = 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε); σ² = β̃_t.
    s = NoiseSchedule(ScheduleConfig(clip_sample=False))
    x_t, eps, z = (torch.randn(3, 16, 16, dtype=torch.float64) for _ in range(3))
    for t in (1, 50, 299):
        a, b, ab, ab_prev = s.alphas[t], s.betas[t], s.alphas_cumprod[t], s.alphas_cumprod[t - 1]
        mean = (x_t - b / math.sqrt(1 - ab) * eps) / math.sqrt(a)
        var = b * (1 - ab_prev) / (1 - ab)
        torch.testing.assert_close(s.ddpm_step(eps, t, x_t, z), mean + math.sqrt(var) * z)
    torch.testing.assert_close(s.ddpm_step(eps, 0, x_t, None), (x_t - math.sqrt(1 - s.alphas_cumprod[0]) * eps) / math.sqrt(s.alphas_cumprod[0]))


def test_ddim_recovers_x0_from_exact_noise():
    # With the true ε, one DDIM step from t to −1 returns x_0 exactly (η = 0).
    s = NoiseSchedule(ScheduleConfig(clip_sample=False))
    x0, eps = torch.rand(3, 8, 8, dtype=torch.float64) * 2 - 1, torch.randn(3, 8, 8, dtype=torch.float64)
    x_t = s.add_noise(x0[None], eps[None], torch.tensor([200]))[0]
    torch.testing.assert_close(s.ddim_step(eps, 200, -1, x_t), x0)
    # ... and a step to t_prev lands on the forward process at t_prev with the same ε.
    x_prev = s.ddim_step(eps, 200, 100, x_t)
    torch.testing.assert_close(x_prev, s.add_noise(x0[None], eps[None], torch.tensor([100]))[0])


def test_ddim_eta_one_has_ddpm_variance():
    s = NoiseSchedule(ScheduleConfig(clip_sample=False))
    x_t, eps = torch.zeros(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, dtype=torch.float64)
    t = 120
    out = s.ddim_step(eps, t, t - 1, x_t, noise=torch.ones(1, 1, 1, dtype=torch.float64), eta=1.0)
    beta_tilde = s.betas[t] * (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t])
    assert out.item() == pytest.approx(math.sqrt(beta_tilde))


def test_clipping_keeps_x0_in_range():
    s = NoiseSchedule()
    x0 = s.predict_x0(torch.full((3, 4, 4), 5.0), torch.zeros(3, 4, 4), 10)
    assert x0.max() == 1.0


def test_sampling_timesteps():
    s = NoiseSchedule()
    assert s.sampling_timesteps("ddpm") == list(range(299, -1, -1))
    ts = s.sampling_timesteps("ddim", 50)
    assert len(ts) == 50 and ts[0] == 299 and ts == sorted(ts, reverse=True) and ts[-1] >= 0
    assert s.sampling_timesteps("ddim", 300) == list(range(299, -1, -1))
    for bad in (lambda: s.sampling_timesteps("euler"), lambda: s.sampling_timesteps("ddim", 0),
                lambda: s.sampling_timesteps("ddim", 301), lambda: s.sampling_timesteps("ddpm", 10),
                lambda: ScheduleConfig(beta_schedule="sigmoid"), lambda: ScheduleConfig(timesteps=1)):
        with pytest.raises(NcaTilesError):
            bad()


@pytest.mark.parametrize("steps", range(1, 301))
def test_ddim_visits_exactly_the_steps_asked_for(steps):
    """np.arange with a float stride gave 15 timesteps (the last t = −1) for --steps 14, and
    likewise for 7, 28, 55, …"""
    ts = NoiseSchedule().sampling_timesteps("ddim", steps)
    assert len(ts) == steps and ts[0] == 299 and min(ts) >= 0 and ts == sorted(set(ts), reverse=True)


@pytest.mark.parametrize("start,steps", [(120, 6), (120, 121), (5, 3), (0, 1)])
def test_ddim_from_a_later_start(start, steps):
    ts = NoiseSchedule().sampling_timesteps("ddim", steps, start=start)
    assert len(ts) == steps and ts[0] == start and ts[-1] >= 0
    assert NoiseSchedule().sampling_timesteps("ddpm", None, start=start) == list(range(start, -1, -1))
