"""Moves between the levels of a scale-space sampler, exact on any window (docs/design.md §7).

A level downsampled by ``f`` is a canvas of ``ceil(W / f) × ceil(H / f)`` cells. Going up one level
(coarse → fine, ratio ``r``) is bilinear interpolation at cell centres (half-pixel aligned, edge
cells repeated), then re-noising to the fine level's first timestep with counter-based noise keyed
by the fine level's global coordinates. Each fine pixel is computed from at most 2 × 2 coarse
cells by the same float32 operations in the same order whatever window it is computed in, so a
level moved window by window is bit for bit the level moved whole.
"""

from __future__ import annotations

import math

import torch

from nca_tiles.diffusion import rng


def level_size(size: int, factor: int) -> int:
    """Cells along one axis of a level downsampled by ``factor``."""
    return -(-size // factor)


def _source_rows(fine_rows: torch.Tensor, ratio: int, coarse_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For fine rows: the two coarse rows to blend (clamped to the level) and the weight of the second."""
    u = (fine_rows.to(torch.float64) + 0.5) / ratio - 0.5  # coarse coordinate of the fine cell centre
    i0 = torch.floor(u)
    weight = (u - i0).to(torch.float32)  # exact: ratio is a small power of two
    i0 = i0.to(torch.int64)
    return i0.clamp(0, coarse_size - 1), (i0 + 1).clamp(0, coarse_size - 1), weight


def coarse_window(f0: int, f1: int, ratio: int, coarse_size: int) -> tuple[int, int]:
    """The coarse cells [c0, c1) that fine cells [f0, f1) are interpolated from (one axis)."""
    a, _, _ = _source_rows(torch.tensor([f0]), ratio, coarse_size)
    _, b, _ = _source_rows(torch.tensor([f1 - 1]), ratio, coarse_size)
    return int(a), int(b) + 1


def upsample_window(coarse: torch.Tensor, c_origin: tuple[int, int], coarse_shape: tuple[int, int],
                    f_origin: tuple[int, int], f_shape: tuple[int, int], ratio: int) -> torch.Tensor:
    """Bilinear upsampling of a window of a coarse level.

    ``coarse`` (C, h, w) holds the coarse cells starting at global ``c_origin`` (it must cover
    ``coarse_window`` of the fine window); ``coarse_shape`` is the whole coarse level's (H, W).
    Returns the fine cells [f_origin, f_origin + f_shape) as (C, fh, fw).
    """
    out = coarse
    for axis, (c0, size, f0, n) in enumerate(zip(c_origin, coarse_shape, f_origin, f_shape)):
        rows = torch.arange(f0, f0 + n, device=coarse.device)
        a, b, w = _source_rows(rows, ratio, size)
        dim = 1 + axis
        shape = [1, 1, 1]
        shape[dim] = n
        w = w.to(coarse.device).view(shape)
        lo, hi = out.index_select(dim, (a - c0).to(coarse.device)), out.index_select(dim, (b - c0).to(coarse.device))
        out = lo + w * (hi - lo)
    return out


def relay_start(x0: torch.Tensor, factor: int) -> torch.Tensor:
    """What the sampler hands a level from one ``factor`` times coarser, made from real (B, C, H, W)
    patches: area-averaged by ``factor``, then upsampled back bilinearly at cell centres with edge
    cells repeated — ``upsample_window``'s operator (H and W multiples of ``factor``)."""
    coarse = torch.nn.functional.avg_pool2d(x0, factor)
    return torch.nn.functional.interpolate(coarse, scale_factor=factor, mode="bilinear", align_corners=False)


def renoise(x0: torch.Tensor, alpha_bar: float, seed: int, level: int, origin: tuple[int, int]) -> torch.Tensor:
    """x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε, with ε keyed by (seed, level, global y, x, channel):
    the forward process applied to the upsampled coarse result (SDEdit, Relay Diffusion)."""
    c, h, w = x0.shape
    eps = rng.normal(seed, rng.Stream.LEVEL_NOISE, level, origin[0], origin[1], h, w, c, device=x0.device)
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1.0 - alpha_bar) * eps
