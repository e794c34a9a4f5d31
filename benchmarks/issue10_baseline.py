"""The eager training step issue 10 timed (2026-11-24, commit ec609a6): the yardstick of its
"training steps/hour ≥ 2.5× the eager figure", kept so that bench_compile.py can time it in the
same run as today's rule.

The cell rule as it was then: channels-first state, the conditioning applied as broadcast
products, the 1×1 convolutions as convolutions, the per-pixel norm in two passes, every cell's
update computed and then masked. Same parameters as :class:`DiffNCA`, so the same weights give the
same loss up to float rounding (bench_compile.py prints both first losses beside its ratio).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nca_tiles.diffusion.model import DiffNCA, pixel_norm


class Issue10BaselineNCA(DiffNCA):
    """:class:`DiffNCA` whose training forward runs the eager rule of 2026-11-24."""

    def __init__(self, config):
        super().__init__(config)
        self.gather_fired = False  # a channels-first state, as then

    def nca_step(self, state: torch.Tensor, e: torch.Tensor, fire: torch.Tensor, weights=None) -> torch.Tensor:
        c = self.config.channels
        cond = self.conditioning(e)
        padded = F.pad(state, (1, 1, 1, 1), mode="reflect")
        perceived = F.conv2d(padded, self.perceive.weight[:, :c]) + cond.perceive_bias[:, :, None, None]
        z = torch.cat([perceived, state], dim=1) * cond.scale0[:, :, None, None]
        hidden = F.conv2d(z, self.to_hidden.weight[:, : 2 * c]) + cond.hidden_bias[:, :, None, None]
        hidden = F.leaky_relu(pixel_norm(hidden, self.norm.weight, self.norm.bias, self.norm.eps))
        hidden = hidden * cond.scale1[:, :, None, None]
        return state + self.to_update(hidden) * (fire * self.writable)
