"""Counter-based randomness: random numbers as pure functions of their coordinates.

A stateful generator gives each chunk of a tiled canvas different numbers depending on the order
in which chunks are visited. Here every random value is a hash of
``(seed, stream, step, y, x, channel)`` in *global* canvas coordinates, so any window of the canvas
draws exactly the numbers the whole canvas would draw there (docs/design.md §2, item 3). The hash is 32-bit
integer arithmetic done in int64 tensors, so it gives the same bits on CPU and GPU.

The mixer is ``lowbias32`` (C. Wellons, "Prospecting for hash functions", 2018): a bijective
32-bit integer hash with very low avalanche bias; keys are folded in one at a time.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch

from nca_tiles.diffusion import compiled as compiling

_MASK32 = 0xFFFFFFFF


class Stream(enum.IntEnum):
    """Independent random streams: one per use, so no two uses ever share numbers."""

    INITIAL_NOISE = 1  # x_T
    STEP_NOISE = 2  # the ancestral-sampling noise of each denoising step
    FIRE_MASK = 3  # the NCA's stochastic cell update
    LEVEL_NOISE = 4  # re-noising an upsampled coarse level (scale-space sampling)


def _lowbias32(h: torch.Tensor | int) -> torch.Tensor | int:
    # int64 holds the 32-bit products exactly modulo 2**64; masking keeps the low 32 bits.
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _MASK32
    return h ^ (h >> 16)


def _fold(h: torch.Tensor | int, key: torch.Tensor | int) -> torch.Tensor | int:
    """Mix one more key into the hash state."""
    return _lowbias32((h + key + 0x9E3779B9) & _MASK32)


def _key32(value: int) -> int:
    # Seeds may be any Python int; fold them into 32 bits without losing the high part.
    value &= (1 << 64) - 1
    return (value ^ (value >> 32)) & _MASK32


def hash_grid(
    seed: int,
    stream: Stream,
    step: int,
    y0: int,
    x0: int,
    height: int,
    width: int,
    channels: int = 1,
    *,
    substep: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """32-bit hashes of every (channel, y, x) of a window, as an int64 tensor (channels, H, W).

    ``(y0, x0)`` is the window's origin in global canvas coordinates; ``step`` and ``substep``
    (e.g. the denoising step and the NCA step inside it) select independent draws.
    """
    return _coordinate_hash(*_window_keys(seed, stream, step, y0, x0, height, width, channels, substep, device))


def _window_keys(seed: int, stream: Stream, step: int, y0: int, x0: int, height: int, width: int, channels: int,
                 substep: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """The hash state after (seed, stream, step, substep) (1, 1, 1), and the window's global rows
    (1, H, 1), columns (1, 1, W) and channels (C, 1, 1), as int64 tensors."""
    key = torch.full((1, 1, 1), _key_state(seed, stream, step, substep), dtype=torch.int64, device=device)
    ys = torch.arange(y0, y0 + height, dtype=torch.int64, device=device).view(1, -1, 1)
    xs = torch.arange(x0, x0 + width, dtype=torch.int64, device=device).view(1, 1, -1)
    cs = torch.arange(channels, dtype=torch.int64, device=device).view(-1, 1, 1)
    return key, ys, xs, cs


def _coordinate_hash(key: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """The hash of every (channel, y, x): the key state with the coordinates folded in."""
    return _fold(_fold(_fold(key, ys & _MASK32), xs & _MASK32), cs)


def _to_unit_interval(h: torch.Tensor) -> torch.Tensor:
    """Map 32-bit hashes to float32 uniforms in the open interval (0, 1)."""
    # The top 24 bits fill a float32 mantissa exactly; the half-step offset keeps 0 out (log(0)).
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def uniform(seed: int, stream: Stream, step: int, y0: int, x0: int, height: int, width: int,
            channels: int = 1, *, substep: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform(0, 1) float32 values, shape (channels, H, W), a pure function of their coordinates."""
    return _to_unit_interval(
        hash_grid(seed, stream, step, y0, x0, height, width, channels, substep=substep, device=device)
    )


def normal(seed: int, stream: Stream, step: int, y0: int, x0: int, height: int, width: int,
           channels: int = 1, *, substep: int = 0, device: torch.device | str = "cpu",
           compiled: bool = False) -> torch.Tensor:
    """Standard normal float32 values, shape (channels, H, W), by the Box–Muller transform.

    The two uniforms come from two hashes of the same coordinates that differ in the last key.
    ``compiled``: hash through torch.compile (one fused kernel instead of ~40 int64 passes; the
    same bits, as integer arithmetic and the exact int → float map are not rounded).
    """
    keys = _window_keys(seed, stream, step, y0, x0, height, width, channels, substep, device)
    u1, u2 = compiling.run(normal_uniforms, *keys, enabled=compiled, dynamic=True)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def normal_uniforms(key: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                    cs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two uniforms :func:`normal` transforms at each (channel, y, x) of a window
    (:func:`_window_keys`). Tensors only, so one compiled copy serves every window, step and seed."""
    h = _coordinate_hash(key, ys, xs, cs)
    return _to_unit_interval(h), _to_unit_interval(_fold(h, 0x5BD1E995))


def bernoulli(p: float, seed: int, stream: Stream, step: int, y0: int, x0: int, height: int, width: int,
              channels: int = 1, *, substep: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bernoulli(p) masks as float32 0/1, shape (channels, H, W)."""
    h = hash_grid(seed, stream, step, y0, x0, height, width, channels, substep=substep, device=device)
    return (_to_unit_interval(h) < p).to(torch.float32)


def window_bernoulli_bits(keys: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, p: float) -> torch.Tensor:
    """Bernoulli(p) masks (B, 1, H, W) of several windows at once, bit for bit what
    :func:`bernoulli` draws for each (one channel): ``keys`` (B, 1, 1, 1) each window's hash of
    (seed, stream, step, substep), ``ys`` (B, 1, H, 1) and ``xs`` (B, 1, 1, W) its global rows and
    columns. Tensors only, so one compiled copy serves every window, step and seed."""
    h = _fold(_fold(keys, ys & _MASK32), xs & _MASK32)
    return (_to_unit_interval(_fold(h, 0)) < p).to(torch.float32)


def window_bernoulli_bits_numpy(keys: np.ndarray, ys: np.ndarray, xs: np.ndarray, p: float) -> np.ndarray:
    """:func:`window_bernoulli_bits` in numpy uint32 arithmetic, for a CPU: the same bits in a third
    of the time (bands of 8 192 or 32 768 pixels, one thread or two: torch's int64 passes gain
    nothing from a second thread at these sizes). uint32 products wrap and shifts are logical, so
    no masking is needed. ``keys`` (B, 1, 1, 1), ``ys``
    (B, 1, H, 1), ``xs`` (B, 1, 1, W), uint32 (coordinates taken mod 2³², as ``& _MASK32``)."""
    with np.errstate(over="ignore"):
        h = _fold_uint32(_fold_uint32(_fold_uint32(keys, ys), xs), np.uint32(0))
    # _to_unit_interval in float32, and p as float32: what torch compares a float32 tensor with.
    u = ((h >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / (1 << 24))
    return (u < np.float32(p)).astype(np.float32)


def _fold_uint32(h: np.ndarray, key: np.ndarray | np.uint32) -> np.ndarray:
    """:func:`_fold` on uint32 arrays."""
    h = h + key + np.uint32(0x9E3779B9)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return h


def window_key_states(seeds: list[int], stream: Stream, steps: list[int], substep: int) -> list[int]:
    """Each window's hash state before its coordinates, as in :func:`hash_grid`."""
    return [_key_state(seed, stream, step, substep) for seed, step in zip(seeds, steps)]


def window_keys(seeds: list[int], stream: Stream, steps: list[int], substep: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 1, 1, 1) int64: each window's hash state before its coordinates, as in :func:`hash_grid`."""
    keys = window_key_states(seeds, stream, steps, substep)
    return torch.tensor(keys, dtype=torch.int64, device=device).view(-1, 1, 1, 1)


def _key_state(seed: int, stream: Stream, step: int, substep: int) -> int:
    """The hash state after (seed, stream, step, substep): Python ints (the mixer is plain integer
    arithmetic, so :func:`_fold` runs on them as on tensors, with the same bits)."""
    h = 0
    for key in (_key32(seed), int(stream), _key32(step), _key32(substep)):
        h = _fold(h, key)
    return h


def derive_seed(seed: int, *keys: int) -> int:
    """A new 32-bit seed from a seed and integer keys (e.g. sample index, training step)."""
    h = torch.tensor([0], dtype=torch.int64)
    for key in (_key32(seed), *(_key32(k) for k in keys)):
        h = _fold(h, key)
    return int(h.item())
