"""Function-preserving widening of a Diff-NCA (Net2WiderNet, Chen et al. 2016, "Net2Net").

A wider rule (more state channels c, more hidden units h) starts from a trained narrower one and
computes exactly what it computed, so a run with more capacity continues where the narrow run's
validation loss flattened instead of starting from scratch (docs/design.md §7, "Widening a level").

- Hidden units are copied ``h′ / h`` times. A per-pixel layer norm over the copies sees the same
  mean and variance as over the originals, and the copies' update weights sum to the original's.
  The copies' update weights differ by a small zero-sum perturbation, so their gradients differ
  and training can pull them apart (identical copies would stay identical forever).
- New state channels are appended after the old ones; they start at zero, as every non-image
  channel does, and nothing writes them yet (zero update rows), so they stay zero until training
  uses them. What reads them (the perception's columns) is random, so their gradient is not zero.
- The hidden layer ignores the new channels' perceptions (zero columns) until training opens them.

A deeper rule (more NCA steps s per denoising step: it sees s px) takes the same weights as they
are, since one rule serves every step. That is *not* function-preserving: the steps beyond the
narrow model's run its rule at step indices it never saw, so training adapts from there
(docs/design.md §7, "Deepening a level").
"""

from __future__ import annotations

import torch

from nca_tiles.diffusion.model import DiffNCA, ModelConfig
from nca_tiles.errors import NcaTilesError

# Fields a widening keeps: the conditioning network is not widened. (The NCA steps may grow.)
KEPT_FIELDS = ("embedding_channels", "embedding_hidden", "encoding_dim", "fire_rate", "image_channels")


def widening_problem(narrow: ModelConfig, wide: ModelConfig) -> str | None:
    """Why ``narrow`` cannot be widened to ``wide``, or None if it can."""
    differs = [name for name in KEPT_FIELDS if getattr(narrow, name) != getattr(wide, name)]
    if differs:
        return f"they differ in {', '.join(differs)}, which widening keeps"
    if wide.nca_steps < narrow.nca_steps:
        return f"{wide.nca_steps} NCA steps are fewer than {narrow.nca_steps}"
    if wide.channels < narrow.channels:
        return f"{wide.channels} channels are fewer than {narrow.channels}"
    if wide.hidden % narrow.hidden:
        return f"{wide.hidden} hidden units are not a multiple of {narrow.hidden}"
    return None


def _split_columns(weight: torch.Tensor, copies: int, jitter: float, generator: torch.Generator) -> torch.Tensor:
    """(out, h) → (out, copies·h): each column split into ``copies`` parts that sum to it exactly
    up to rounding, the parts perturbed by zero-sum noise of relative size ``jitter``."""
    parts = weight.unsqueeze(0).repeat(copies, 1, 1) / copies  # (copies, out, h)
    if copies > 1 and jitter > 0:
        noise = torch.randn(parts.shape, generator=generator, dtype=parts.dtype) * jitter * weight.abs().mean()
        parts = parts + (noise - noise.mean(dim=0, keepdim=True))
    return torch.cat(list(parts), dim=1)


def widen_state_dict(state: dict[str, torch.Tensor], narrow: ModelConfig, wide: ModelConfig, seed: int = 0,
                     jitter: float = 1e-2) -> dict[str, torch.Tensor]:
    """The weights of a ``wide`` Diff-NCA that computes what ``state`` (a ``narrow`` one's) does
    (with as many NCA steps; with more, it starts from those weights: see the module's notes)."""
    problem = widening_problem(narrow, wide)
    if problem:
        raise NcaTilesError(f"cannot widen a c = {narrow.channels}, h = {narrow.hidden} model to "
                            f"c = {wide.channels}, h = {wide.hidden}: {problem}")
    generator = torch.Generator().manual_seed(seed)
    c, h, c2, h2, e = narrow.channels, narrow.hidden, wide.channels, wide.hidden, narrow.embedding_channels
    copies = h2 // h
    with torch.random.fork_rng(devices=[]):  # the same seed, the same new weights
        torch.manual_seed(seed)
        fresh = DiffNCA(wide).state_dict()  # default initialisation for everything new
    out = {name: tensor.clone() for name, tensor in fresh.items()}
    for name in ("embed.0.weight", "embed.0.bias", "embed.2.weight", "embed.2.bias"):
        out[name] = state[name].clone()

    # Perception: inputs are (state c | e), outputs c. Old outputs keep their kernels; what they read
    # from the new (zero) channels is random, so those channels get a gradient.
    perceive = out["perceive.weight"]  # (c2, c2 + e, 3, 3), randomly initialised
    perceive[:c, :c] = state["perceive.weight"][:, :c]
    perceive[:c, c2:] = state["perceive.weight"][:, c:]
    out["perceive.bias"][:c] = state["perceive.bias"]
    out["perceive.bias"][c:] = 0.0

    # The hidden layer's inputs are (perceived c | state c | e): where each old input now sits.
    old_inputs = torch.cat([torch.arange(c), c2 + torch.arange(c), 2 * c2 + torch.arange(e)])
    out["mul_cond0.weight"][old_inputs] = state["mul_cond0.weight"]
    out["mul_cond0.bias"][old_inputs] = state["mul_cond0.bias"]
    to_hidden = torch.zeros(h2, 2 * c2 + e, 1, 1)
    to_hidden[:, old_inputs] = state["to_hidden.weight"].repeat(copies, 1, 1, 1)
    out["to_hidden.weight"] = to_hidden
    out["to_hidden.bias"] = state["to_hidden.bias"].repeat(copies)
    for name in ("norm.weight", "norm.bias", "mul_cond1.bias"):
        out[name] = state[name].repeat(copies)
    out["mul_cond1.weight"] = state["mul_cond1.weight"].repeat(copies, 1)

    # The update: old channels get the old update, split over the copies; new channels none yet.
    to_update = torch.zeros(c2, h2, 1, 1)
    to_update[:c, :, 0, 0] = _split_columns(state["to_update.weight"][:, :, 0, 0], copies, jitter, generator)
    out["to_update.weight"] = to_update
    out["to_update.bias"] = torch.cat([state["to_update.bias"], torch.zeros(c2 - c)])
    return out
