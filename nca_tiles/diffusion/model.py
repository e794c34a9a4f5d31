"""Diff-NCA: the denoiser of "Frequency-Time Diffusion with Neural Cellular Automata"
(Kalkhof et al., 2024), made local and translation-equivariant so it tiles exactly.

One cell rule is applied at every pixel and iterated ``s`` times per denoising step. The state has
``c`` channels: 0–2 hold the noisy image x_t and are never written, 3–5 are read out as the
predicted noise ε̂, the rest start at zero. The state is rebuilt from x_t at every denoising step.

Deviations from the paper (docs/design.md §2), each needed for exact tiling:

1. A per-pixel norm over the hidden channels instead of ``GroupNorm(1, h)``, which normalises over
   the whole image and so makes every output depend on the whole canvas.
2. No absolute pixel position in the embedding (meaningless on a 100 000 px canvas): it depends
   only on (t, NCA step), so the conditioning is one vector per step, broadcast over pixels.
3. The stochastic "fire" mask is a pure function of (seed, t, NCA step, global y, x) at inference
   (:class:`CounterFireMask`), so a window draws what the whole canvas draws there.

Because the embedding is spatially constant and reflect padding keeps a constant constant, its
contribution to each convolution is exactly a per-sample bias: computed as such, not by
concatenating a broadcast tensor to every pixel.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nca_tiles.diffusion import compiled, rng
from nca_tiles.diffusion.fired_update import fired_update, pixel_mlp
from nca_tiles.errors import NcaTilesError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Diff-NCA. Saved as JSON beside the weights."""

    channels: int = 96  # c: state channels per pixel
    hidden: int = 512  # h: hidden width of the per-pixel MLP
    nca_steps: int = 20  # s: NCA steps per denoising step = halo in pixels
    embedding_channels: int = 2  # channels of the conditioning vector e
    embedding_hidden: int = 256
    # Sinusoidal features per conditioning scalar (t and the NCA step). Sized so the paper preset
    # has the paper's parameter count (331 k).
    encoding_dim: int = 176
    fire_rate: float = 0.5
    image_channels: int = 3

    def __post_init__(self) -> None:
        if self.channels < 2 * self.image_channels:
            raise NcaTilesError(f"channels must be at least {2 * self.image_channels} (image + noise readout)")
        for name in ("hidden", "nca_steps", "embedding_channels", "embedding_hidden"):
            if getattr(self, name) < 1:
                raise NcaTilesError(f"model config: {name} must be ≥ 1")
        if self.encoding_dim < 2 or self.encoding_dim % 2:
            raise NcaTilesError("model config: encoding_dim must be an even number ≥ 2")
        if not 0.0 < self.fire_rate <= 1.0:
            raise NcaTilesError("model config: fire_rate must be in (0, 1]")

    @property
    def halo(self) -> int:
        """Dependency radius of one denoising step: one pixel per NCA step (3×3 perception)."""
        return self.nca_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise NcaTilesError(f"model config has unknown fields {sorted(unknown)}: written by a newer nca-tiles?")
        return cls(**data)

    def macs_per_pixel_step(self) -> int:
        """Multiply-accumulates per pixel per NCA step (the convolutions; docs/design.md §4)."""
        c, h = self.channels, self.hidden
        return 9 * c * c + 2 * c * h + h * c


# Presets. `paper` is the paper's model, a GPU model (≈ 85 s per training step on 2 CPU cores).
# `small` is sized by measurement (benchmarks/bench_presets.py) to take ~1–2 k training steps an
# hour on a 2-core CPU: the bundled model's finer levels. `medium` (3× its parameters, 4× its MACs) is for
# a coarse level, whose cells cost 1/f² of a full-resolution pixel: a 16 µm/px layout level of it
# costs less per output pixel than one more 1 µm/px step of `small`. `wide` is `small` with twice its
# hidden units (1.6× its MACs): capacity for a finest level, widened from a trained `small` one
# (`train --init-from`, diffusion/widen.py). `deep` is `small` iterated 20 NCA steps, the paper's s:
# its rule sees 20 px per denoising step (twice small's reach and cost), started from a trained
# `small` one by `train --init-from`. `tiny` is for tests.
PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(channels=96, hidden=512, nca_steps=20),
    "small": ModelConfig(channels=24, hidden=96, nca_steps=10, embedding_hidden=64, encoding_dim=32),
    "medium": ModelConfig(channels=48, hidden=192, nca_steps=10, embedding_hidden=64, encoding_dim=32),
    "wide": ModelConfig(channels=24, hidden=192, nca_steps=10, embedding_hidden=64, encoding_dim=32),
    "deep": ModelConfig(channels=24, hidden=96, nca_steps=20, embedding_hidden=64, encoding_dim=32),
    "tiny": ModelConfig(channels=8, hidden=16, nca_steps=3, embedding_hidden=16, encoding_dim=8),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise NcaTilesError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


def describe_preset(name: str) -> str:
    config = preset(name)
    model = DiffNCA(config)
    return (
        f"preset {name}\n"
        f"{json.dumps(config.to_dict(), indent=2)}\n"
        f"parameters: {model.num_parameters():,}\n"
        f"halo per denoising step: {config.halo} px\n"
        f"MAC per pixel per denoising step: {config.macs_per_pixel_step() * config.nca_steps:,}"
    )


def sinusoidal_encoding(values: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer sinusoidal encoding (Vaswani et al., 2017) of scalars: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class FireMask(Protocol):
    """Source of the stochastic update masks, one per NCA step: (B, 1, H, W) float 0/1.

    At inference the model asks for one band of rows at a time: ``shape`` is the band's and
    ``row0`` its first row in the window.
    """

    def __call__(self, nca_step: int, shape: tuple[int, int, int, int], device: torch.device,
                 row0: int = 0) -> torch.Tensor: ...


@dataclass
class TorchFireMask:
    """Masks from a torch generator: for training, where tiling does not matter."""

    rate: float
    generator: torch.Generator | None = None

    def __call__(self, nca_step: int, shape: tuple[int, int, int, int], device: torch.device,
                 row0: int = 0) -> torch.Tensor:
        b, _, h, w = shape
        draw = torch.rand((b, 1, h, w), generator=self.generator, device=self.generator.device if self.generator else device)
        return (draw < self.rate).to(device=device, dtype=torch.float32)


@dataclass
class CounterFireMask:
    """Masks keyed by global canvas coordinates (deviation 3): for inference.

    ``origins[i]`` is the global (y, x) of window i's top-left pixel; ``seeds[i]`` and
    ``timesteps[i]`` its sampling seed and diffusion timestep.
    """

    rate: float
    seeds: list[int]
    timesteps: list[int]
    origins: list[tuple[int, int]]
    compiled: bool = False  # hash through torch.compile: one fused kernel instead of ~30 passes

    def __call__(self, nca_step: int, shape: tuple[int, int, int, int], device: torch.device,
                 row0: int = 0) -> torch.Tensor:
        if device.type == "cpu" and not self.compiled:
            return torch.from_numpy(rng.window_bernoulli_bits_numpy(*self.numpy_coordinates(nca_step, shape, row0),
                                                                    self.rate))
        keys, ys, xs = self.coordinates(nca_step, shape, device, row0)
        return compiled.run(rng.window_bernoulli_bits, keys, ys, xs, self.rate, enabled=self.compiled, dynamic=True)

    def numpy_coordinates(self, nca_step: int, shape: tuple[int, int, int, int],
                          row0: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`coordinates` as uint32 numpy arrays (``rng.window_bernoulli_bits_numpy``)."""
        _, _, h, w = shape
        keys = np.array(rng.window_key_states(self.seeds, rng.Stream.FIRE_MASK, self.timesteps, nca_step),
                        dtype=np.uint32).reshape(-1, 1, 1, 1)
        origins = np.array(self.origins, dtype=np.int64).reshape(-1, 2)
        ys = ((origins[:, :1] + row0 + np.arange(h)) & 0xFFFFFFFF).astype(np.uint32).reshape(-1, 1, h, 1)
        xs = ((origins[:, 1:] + np.arange(w)) & 0xFFFFFFFF).astype(np.uint32).reshape(-1, 1, 1, w)
        return keys, ys, xs

    def coordinates(self, nca_step: int, shape: tuple[int, int, int, int], device: torch.device,
                    row0: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the masks are hashed from (``rng.window_bernoulli_bits``): each window's key for
        this NCA step (B, 1, 1, 1), and the band's global rows (B, 1, H, 1) and columns (B, 1, 1, W)."""
        _, _, h, w = shape
        keys = rng.window_keys(self.seeds, rng.Stream.FIRE_MASK, self.timesteps, nca_step, device)
        ys = torch.stack([torch.arange(y0 + row0, y0 + row0 + h, dtype=torch.int64, device=device)
                          for y0, _ in self.origins]).view(-1, 1, h, 1)
        xs = torch.stack([torch.arange(x0, x0 + w, dtype=torch.int64, device=device)
                          for _, x0 in self.origins]).view(-1, 1, 1, w)
        return keys, ys, xs


class PixelNorm(nn.Module):
    """Layer norm over channels at each pixel (deviation 1): local, unlike GroupNorm(1, h).

    Holds the norm's parameters; the cell rule applies the same norm as ``F.layer_norm`` over its
    pixels-by-channels rows (:func:`cell_rule`)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_norm(x, self.weight, self.bias, self.eps)


def pixel_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    centered = x - x.mean(dim=1, keepdim=True)
    # Two-pass variance: the same as x.var(unbiased=False), whose CPU kernel over the channel
    # dimension took half of all inference time.
    var = centered.square().mean(dim=1, keepdim=True)
    x = centered * torch.rsqrt(var + eps)
    return x * weight[None, :, None, None] + bias[None, :, None, None]


class RuleWeights(NamedTuple):
    """The weights the cell rule reads, sliced out of the modules once per forward."""

    perceive: torch.Tensor  # (c, c, 3, 3): the state part of the 3×3 kernel
    to_hidden: torch.Tensor  # (h, 2c, 1, 1)
    to_update: torch.Tensor
    update_bias: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    writable: torch.Tensor
    norm_eps: float


class StepWeights(NamedTuple):
    """The rule's weights for one NCA step with that step's conditioning folded in, per sample b.

    The multiplicative conditioning scales the inputs of the two 1×1 convolutions, so it scales
    their weight columns instead: exact up to rounding, and a pixel's hidden layer becomes plain
    GEMMs on the state's pixels (docs/design.md §4, "the CPU formulation").
    """

    perceive: torch.Tensor  # (c, c, 3, 3), shared
    to_hidden: torch.Tensor  # (B, 2c, h): to_hidden × scale0
    hidden_bias: torch.Tensor  # (B, 1, h): incl. the perception's bias through to_hidden
    to_update: torch.Tensor  # (B, h, c): to_update × scale1, columns of unwritable channels zero
    update_bias: torch.Tensor  # (1, 1, c), zero on unwritable channels
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    norm_eps: float


def fold_step(w: RuleWeights, perceive_bias: torch.Tensor, scale0: torch.Tensor, hidden_bias: torch.Tensor,
              scale1: torch.Tensor) -> StepWeights:
    """The weights of one NCA step (its :class:`StepConditioning` tensors folded in): (B, ·) each."""
    c = w.perceive.shape[0]
    to_hidden = w.to_hidden[None, :, :, 0, 0] * scale0[:, None, :]  # (B, h, 2c)
    writable = w.writable[:, :, 0]  # (1, c, 1)
    return StepWeights(
        perceive=w.perceive,
        to_hidden=to_hidden.mT,
        hidden_bias=(hidden_bias + (to_hidden[:, :, :c] @ perceive_bias[:, :, None])[:, :, 0])[:, None, :],
        to_update=(w.to_update[None, :, :, 0, 0] * scale1[:, None, :] * writable).mT,
        update_bias=(w.update_bias[None, :, None] * writable).mT,
        norm_weight=w.norm_weight,
        norm_bias=w.norm_bias,
        norm_eps=w.norm_eps,
    )


def cell_rule(padded: torch.Tensor, state: torch.Tensor, fire: torch.Tensor, w: StepWeights,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The cell rule on a region of H × W pixels, as a pure function of tensors (one compiled copy
    serves every model in the process): ``padded`` is the region's state with a one-pixel border
    of its neighbours (B, c, H + 2, W + 2), ``state`` the region itself (B, c, H, W), ``fire``
    (B, 1, H, W). Returns the region's next state, written into ``out`` if given (eager only:
    the band's rows of the spare state buffer, so no copy of the band follows).

    The state stays channels-first, where the 3×3 perception is one oneDNN convolution; the
    per-pixel MLP runs on pixels × channels, reading the channels-first tensors as transposed
    matrices (no copies): its 1×1 convolutions are batched GEMMs with the pixels as rows and the
    per-pixel norm is ``layer_norm`` over contiguous rows (docs/design.md §4).
    """
    b, c, h, width = state.shape
    pixels = h * width
    perceived = F.conv2d(padded, w.perceive).view(b, c, pixels).mT  # (B, pixels, c)
    state_rows = state.reshape(b, c, pixels).mT
    from_perceived, from_state = w.to_hidden[:, :c], w.to_hidden[:, c:]
    if torch.compiler.is_compiling():  # inductor adds the two products and the bias in the norm's loop
        hidden = torch.bmm(perceived, from_perceived) + torch.bmm(state_rows, from_state) + w.hidden_bias
    elif torch.is_autocast_enabled(state.device.type):  # in-place ops are not autocast: bf16 += fp32 @ fp32 fails
        hidden = torch.baddbmm(torch.bmm(perceived, from_perceived), state_rows, from_state) + w.hidden_bias
    else:  # eager fp32: accumulate in place (no concatenated copy, no extra pass)
        hidden = torch.bmm(perceived, from_perceived).baddbmm_(state_rows, from_state).add_(w.hidden_bias)
    hidden = F.leaky_relu(F.layer_norm(hidden, hidden.shape[-1:], w.norm_weight, w.norm_bias, w.norm_eps), inplace=True)
    return torch.addcmul(state, update_channels_first(hidden, w, state.shape), fire, out=out)


def fired_cell_rule(padded: torch.Tensor, state: torch.Tensor, fire: torch.Tensor, w: StepWeights,
                    in_place: bool = False, onto: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`cell_rule` with the per-pixel MLP computed only where ``fire`` is set: the mask
    discards the update everywhere else, so at the fire rate of 0.5 half of the hidden layer's work
    was thrown away (docs/design.md §4, "Only the fired cells"). The same numbers up to float
    rounding, gradients included.

    The state is channels-last, so a pixel's channels are one contiguous row: the perception
    and the state are gathered as rows of fired pixels, and the update is added back onto those
    rows. ``fire`` must hold 0 or 1. Out of place (training): :func:`fired_update`, whose
    backward is written by hand. ``in_place`` (no autograd): the updates are added into ``state``
    itself, which is returned. ``onto``: the updates are added to it (in place too) instead of to
    ``state``, for an NCA step that reads fewer channels than it writes or writes fewer than it
    reads (:meth:`DiffNCA.narrowed`).
    """
    b, c, h, width = state.shape
    pixels = h * width
    perceived = F.conv2d(padded, w.perceive)
    fired = fire.reshape(b * pixels).nonzero().squeeze(1)  # ascending: sample 0's cells first
    counts = fire.reshape(b, pixels).count_nonzero(1).tolist()
    if not in_place:
        c = state.shape[1] if onto is None else onto.shape[1]
        new = fired_update(pixel_rows(perceived), pixel_rows(state), None if onto is None else pixel_rows(onto), fired,
                           counts, w.to_hidden, w.hidden_bias, w.to_update, w.update_bias, w.norm_weight, w.norm_bias,
                           w.norm_eps)
        return new.view(b, h, width, c).permute(0, 3, 1, 2)
    # One gather for the whole band; the MLP per sample, each with its folded weights.
    cells = torch.cat([perceived, state], dim=1).permute(0, 2, 3, 1).reshape(b * pixels, -1)
    weights = zip(w.to_hidden.unbind(0), w.hidden_bias.unbind(0), w.to_update.unbind(0))
    updates = [pixel_mlp(rows, *sample, w.update_bias[0], w.norm_weight, w.norm_bias, w.norm_eps)[0]
               for rows, sample in zip(cells.index_select(0, fired).split(counts), weights)]
    onto = state if onto is None else onto
    c = onto.shape[1]
    for i, (fired_i, update_i) in enumerate(zip(fired.split(counts), updates)):
        rows = onto[i].permute(1, 2, 0).view(pixels, c)  # a channels-last band (or its channels): rows of pixels
        rows.index_add_(0, fired_i - i * pixels, update_i)
    return onto


def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last (B, C, H, W) tensor as rows of pixels (B·H·W, C), without a copy."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def reading_only(w: StepWeights, channels: int) -> StepWeights:
    """``w`` for a state whose channels from ``channels`` on are zero (an NCA step's first: the
    image and zeros): the perception and the hidden layer read the first ``channels`` only, for the
    same numbers at a fraction of the convolution (docs/design.md §4, "The first and last NCA
    steps")."""
    c = w.perceive.shape[0]
    return w._replace(perceive=w.perceive[:, :channels],
                      to_hidden=torch.cat([w.to_hidden[:, :c], w.to_hidden[:, c : c + channels]], dim=1))


def writing_only(w: StepWeights, channels: slice) -> StepWeights:
    """``w`` computing the update of ``channels`` only (the last NCA step's: ε̂ is all it returns)."""
    return w._replace(to_update=w.to_update[:, :, channels], update_bias=w.update_bias[:, :, channels])


def hashed_fire_cell_rule(padded: torch.Tensor, state: torch.Tensor, keys: torch.Tensor, ys: torch.Tensor,
                          xs: torch.Tensor, rate: float, w: StepWeights) -> torch.Tensor:
    """:func:`cell_rule` with its fire mask hashed from coordinates (:class:`CounterFireMask`) in
    the same function: compiled, the hash fuses into the update's kernel — one compiled call per
    band instead of two, and no mask written and read back."""
    return cell_rule(padded, state, rng.window_bernoulli_bits(keys, ys, xs, rate), w)


def rule_is_warm() -> bool:
    """Whether this process has run the compiled cell rule already (compiling another model's is
    then almost free: the compiled copy is shared)."""
    return compiled.is_warm(hashed_fire_cell_rule) or compiled.is_warm(cell_rule)


def update_channels_first(hidden: torch.Tensor, w: StepWeights, shape: torch.Size) -> torch.Tensor:
    """The update (B, c, H, W) from the hidden layer (B, pixels, h), by the faster GEMM orientation."""
    to_update, bias = w.to_update, w.update_bias  # (B, h, c), (1, 1, c)
    if torch.is_grad_enabled():  # pixels as rows: backward's gradient of the hidden layer stays contiguous
        update = (torch.bmm(hidden, to_update) + bias).mT
    else:  # channels as rows: the faster GEMM here, its output added straight onto the state
        update = torch.baddbmm(bias.mT, to_update.mT, hidden.mT)
    return update.view(shape)


def padded_cell_rule(state: torch.Tensor, fire: torch.Tensor, weights: RuleWeights, *cond: torch.Tensor) -> torch.Tensor:
    """The cell rule on a whole image, reflect-padded: the training step's unit of compilation."""
    return cell_rule(F.pad(state, (1, 1, 1, 1), mode="reflect"), state, fire, fold_step(weights, *cond))


def padded_fired_cell_rule(state: torch.Tensor, fire: torch.Tensor, weights: RuleWeights,
                           *cond: torch.Tensor) -> torch.Tensor:
    """:func:`padded_cell_rule` by :func:`fired_cell_rule`: eager training on a CPU."""
    return fired_cell_rule(F.pad(state, (1, 1, 1, 1), mode="reflect"), state, fire, fold_step(weights, *cond))


class DiffNCA(nn.Module):
    """The Diff-NCA noise predictor ε_θ(x_t, t): weights only, no schedule, no sampling loop."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, h, e = config.channels, config.hidden, config.embedding_channels
        # Embedding: sinusoidal(t) ++ sinusoidal(NCA step) -> 256 -> SiLU -> e channels.
        self.embed = nn.Sequential(
            nn.Linear(2 * config.encoding_dim, config.embedding_hidden),
            nn.SiLU(),
            nn.Linear(config.embedding_hidden, e),
        )
        self.perceive = nn.Conv2d(c + e, c, kernel_size=3)  # padded by reflection in forward
        self.mul_cond0 = nn.Linear(e, 2 * c + e)
        self.to_hidden = nn.Conv2d(2 * c + e, h, kernel_size=1)
        self.norm = PixelNorm(h)
        self.mul_cond1 = nn.Linear(e, h)
        self.to_update = nn.Conv2d(h, c, kernel_size=1)
        # Multiplicative conditioning starts as the identity; the update starts at zero
        # (as in Growing NCA, Mordvintsev et al., 2020), so early training is stable.
        for cond in (self.mul_cond0, self.mul_cond1):
            nn.init.normal_(cond.weight, std=0.02)
            nn.init.ones_(cond.bias)
        nn.init.zeros_(self.to_update.weight)
        nn.init.zeros_(self.to_update.bias)
        # Channels the rule may write: not the image (0–2).
        writable = torch.ones(1, c, 1, 1)
        writable[:, : config.image_channels] = 0
        self.register_buffer("writable", writable, persistent=False)
        # Run the rule through torch.compile (nca_tiles.diffusion.compiled); numbers equal the
        # eager ones up to float rounding. Not saved: a property of this process, not the model.
        self.compiled = False
        # The eager rule on a CPU computes the MLP of fired cells only (fired_cell_rule); off, it
        # computes every cell's (cell_rule): the same numbers up to float rounding. A process
        # property too, for the benchmarks and tests that compare the two.
        self.gather_fired = True

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Conditioning vectors e for every (NCA step, sample): (s, B, embedding_channels)."""
        cfg = self.config
        steps = torch.arange(cfg.nca_steps, device=timesteps.device)
        enc_t = sinusoidal_encoding(timesteps, cfg.encoding_dim)  # (B, D)
        enc_k = sinusoidal_encoding(steps, cfg.encoding_dim)  # (s, D)
        b, s = enc_t.shape[0], enc_k.shape[0]
        pairs = torch.cat([enc_t[None].expand(s, b, -1), enc_k[:, None].expand(s, b, -1)], dim=2)
        return self.embed(pairs.to(self.embed[0].weight.dtype))

    def conditioning(self, e: torch.Tensor) -> "StepConditioning":
        """What the conditioning vector e (B, E) of one NCA step contributes to the cell rule."""
        c = self.config.channels
        w3 = self.perceive.weight
        m0 = self.mul_cond0(e)  # (B, 2c + E)
        w1 = self.to_hidden.weight[:, :, 0, 0]
        return StepConditioning(
            # 3×3 perception of (state, e): the e part of the kernel acts on a constant -> a bias.
            perceive_bias=self.perceive.bias + torch.einsum("oekl,be->bo", w3[:, c:], e),
            scale0=m0[:, : 2 * c],
            hidden_bias=self.to_hidden.bias + (e * m0[:, 2 * c :]) @ w1[:, 2 * c :].T,
            scale1=self.mul_cond1(e),
        )

    def rule_weights(self) -> RuleWeights:
        c = self.config.channels
        return RuleWeights(
            perceive=self.perceive.weight[:, :c].contiguous(),
            to_hidden=self.to_hidden.weight[:, : 2 * c].contiguous(),
            to_update=self.to_update.weight,
            update_bias=self.to_update.bias,
            norm_weight=self.norm.weight,
            norm_bias=self.norm.bias,
            writable=self.writable,
            norm_eps=self.norm.eps,
        )

    def gathers_fired(self, device: torch.device) -> bool:
        """Whether the rule runs as :func:`fired_cell_rule` on channels-last states: eager on a CPU
        (compiled, or on a GPU, the dense rule: unmeasured there, and inductor wants fixed shapes)."""
        return (self.gather_fired and not self.compiled and device.type == "cpu"
                and not torch.is_autocast_enabled(device.type))

    def rule(self, padded: torch.Tensor, state: torch.Tensor, fire: torch.Tensor, weights: StepWeights,
             out: torch.Tensor) -> None:
        """The cell rule on a region (see :func:`cell_rule`) with one NCA step's weights, into ``out``."""
        if not self.compiled:
            cell_rule(padded, state, fire, weights, out=out)
            return
        # Symbolic sizes: every window and band shares one compiled rule (a pure function: out=
        # stays outside it).
        out.copy_(compiled.run(cell_rule, padded, state, fire, weights, enabled=True, dynamic=True))

    def nca_step(self, state: torch.Tensor, e: torch.Tensor, fire: torch.Tensor,
                 weights: RuleWeights | None = None) -> torch.Tensor:
        """One application of the cell rule to a whole image. state (B, c, H, W), e (B, E), fire (B, 1, H, W)."""
        args = (state, fire, weights if weights is not None else self.rule_weights(), *self.conditioning(e).tensors())
        if self.gathers_fired(state.device):
            return padded_fired_cell_rule(*args)
        # Training: one batch shape per run, compiled for it (forward and backward).
        return compiled.run(padded_cell_rule, *args, enabled=self.compiled)

    def fired_training_steps(self, state: torch.Tensor, embeddings: torch.Tensor, fire: FireMask,
                             weights: RuleWeights) -> torch.Tensor:
        """The NCA steps of a training forward by :func:`fired_cell_rule` on whole tensors, from the
        channels-last state (image, zeros) to ε̂: the first step reads the image channels only (the
        rest are zero) and the last writes ε̂'s only — the same numbers for less work
        (docs/design.md §4, "The first and last NCA steps")."""
        b, _, h, w = state.shape
        for k in range(self.config.nca_steps):
            reads, onto, step_weights = self.narrowed(k, state, weights, embeddings[k])
            state = fired_cell_rule(F.pad(reads, (1, 1, 1, 1), mode="reflect"), reads,
                                    fire(k, (b, 1, h, w), state.device), step_weights, onto=onto)
        return state

    def narrowed(self, k: int, state: torch.Tensor, weights: RuleWeights,
                 e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, StepWeights]:
        """What NCA step k of a model call reads of the channels-last ``state``, what it writes,
        and its weights (conditioning ``e`` folded in): the first step reads the image channels
        only (a call starts from the image and zeros), the last writes ε̂'s only (all a call
        returns). The same numbers as every channel's, for about 8 % less work at s = 10
        (docs/design.md §4, "The first and last NCA steps")."""
        ic = self.config.image_channels
        reads, onto = state, state
        step_weights = fold_step(weights, *self.conditioning(e).tensors())
        if k == 0:
            reads = state[:, :ic].contiguous(memory_format=torch.channels_last)
            step_weights = reading_only(step_weights, ic)
        if k == self.config.nca_steps - 1:
            onto = state[:, ic : 2 * ic]
            step_weights = writing_only(step_weights, slice(ic, 2 * ic))
        return reads, onto, step_weights

    @staticmethod
    def band_pixels(device: torch.device) -> int:
        """Pixels per band at inference: on a CPU large enough that per-band fixed costs stay small
        (docs/design.md §4, "Bands"), on a GPU large enough to fill it."""
        return 32768 if device.type == "cpu" else 1 << 21

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, fire: FireMask) -> torch.Tensor:
        """Predict the noise ε̂ in x_t (B, 3, H, W) at diffusion timesteps (B,)."""
        cfg = self.config
        b, _, h, w = x_t.shape
        state = torch.cat([x_t, x_t.new_zeros(b, cfg.channels - cfg.image_channels, h, w)], dim=1)
        gathered = self.gathers_fired(x_t.device)
        if gathered:  # a pixel's channels contiguous: fired_cell_rule gathers rows
            state = state.contiguous(memory_format=torch.channels_last)
        embeddings = self.embedding(timesteps.to(x_t.device))
        ic = cfg.image_channels
        weights = self.rule_weights()
        if torch.is_grad_enabled() and gathered:
            return self.fired_training_steps(state, embeddings, fire, weights)
        if torch.is_grad_enabled():  # training: whole tensors, which autograd keeps anyway
            for k in range(cfg.nca_steps):
                state = self.nca_step(state, embeddings[k], fire(k, (b, 1, h, w), x_t.device), weights)
            return state[:, ic : 2 * ic]
        # Inference: the rule runs on bands of rows, so its temporaries are one band's. The only
        # window-sized allocations are the state buffers, whatever s (one for the fired-cells rule,
        # two that swap roles every NCA step for the dense one), and the allocator sees the same few
        # sizes on every window (no heap fragmentation). Same numbers as the whole-tensor path, up
        # to float rounding.
        bands = band_rows(h, max(1, self.band_pixels(x_t.device) // w))
        if gathered:
            # Fired cells only (fired_cell_rule) add their updates in place, so one state buffer
            # serves: each band is padded with the row above it as it was before that row's update.
            for k in range(cfg.nca_steps):
                reads, onto, step_weights = self.narrowed(k, state, weights, embeddings[k])
                above = None
                for r0, r1 in bands:
                    padded = reflect_pad_rows(reads, r0, r1)
                    if above is not None:
                        padded[:, :, :1] = F.pad(above, (1, 1, 0, 0), mode="reflect")
                    above = reads[:, :, r1 - 1 : r1].clone()
                    fired_cell_rule(padded, reads[:, :, r0:r1], fire(k, (b, 1, r1 - r0, w), x_t.device, row0=r0),
                                    step_weights, in_place=True, onto=onto[:, :, r0:r1])
            return state[:, ic : 2 * ic].clone(memory_format=torch.contiguous_format)
        spare = torch.empty_like(state)
        hashed = self.compiled and isinstance(fire, CounterFireMask)  # the mask hashed inside the rule
        for k in range(cfg.nca_steps):
            step_weights = fold_step(weights, *self.conditioning(embeddings[k]).tensors())
            for r0, r1 in bands:
                band = (b, 1, r1 - r0, w)
                padded = reflect_pad_rows(state, r0, r1)
                if hashed:
                    spare[:, :, r0:r1] = compiled.run(
                        hashed_fire_cell_rule, padded, state[:, :, r0:r1],
                        *fire.coordinates(k, band, x_t.device, r0), fire.rate, step_weights, enabled=True, dynamic=True)
                else:
                    self.rule(padded, state[:, :, r0:r1], fire(k, band, x_t.device, row0=r0), step_weights,
                              out=spare[:, :, r0:r1])
            state, spare = spare, state
        return state[:, ic : 2 * ic].clone(memory_format=torch.contiguous_format)  # not a view: the buffers can go


def band_rows(height: int, rows: int) -> list[tuple[int, int]]:
    """Bands [r0, r1) of about ``rows`` rows covering ``height``, none of one row where height ≥ 2:
    the compiled rule treats sizes symbolically except 1, which would cost another compile."""
    rows = max(rows, 2)
    bands = [(r0, min(height, r0 + rows)) for r0 in range(0, height, rows)]
    if len(bands) > 1 and bands[-1][1] - bands[-1][0] == 1:
        bands[-2:] = [(bands[-2][0], height)]
    return bands


@dataclass(frozen=True)
class StepConditioning:
    """Per-sample vectors by which one NCA step's conditioning e enters the rule (all (B, ·))."""

    perceive_bias: torch.Tensor
    scale0: torch.Tensor
    hidden_bias: torch.Tensor
    scale1: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.perceive_bias, self.scale0, self.hidden_bias, self.scale1


def reflect_pad_rows(state: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of ``state`` (B, c, H, W) with a one-pixel border, exactly as those rows of
    ``F.pad(state, (1, 1, 1, 1), mode="reflect")``: (B, c, r1 − r0 + 2, W + 2)."""
    h = state.shape[2]
    parts = [state[:, :, 1:2]] if r0 == 0 else []  # row −1 reflects row 1
    parts.append(state[:, :, max(0, r0 - 1) : min(h, r1 + 1)])
    if r1 == h:
        parts.append(state[:, :, h - 2 : h - 1])  # row H reflects row H − 2
    rows = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return F.pad(rows, (1, 1, 0, 0), mode="reflect")
