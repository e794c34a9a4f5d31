"""The fired cells' update under autograd, with a hand-written backward (docs/design.md §4,
"The fired cells' backward").

Under autograd, the fired-cells rule as a chain of torch ops (gather, one small MLP per sample,
scatter-add) cost a training step memory passes its math does not need (4–6 % of its time): the
gather's backward zero-filled and scattered a gradient of every pixel's perception *and* state,
the per-sample split's backward concatenated the cells' gradients again, the state's two
gradients (through the cells and around them) were added in one more pass, and every op of every
sample was a node of the autograd graph. This Function runs the same forward and writes each
gradient once, where it ends up.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F

LEAKY_SLOPE = 0.01  # F.leaky_relu's default, the cell rule's non-linearity


def fired_update(perceived_rows: torch.Tensor, state_rows: torch.Tensor, onto_rows: torch.Tensor | None,
                 fired: torch.Tensor, counts: list[int], to_hidden: torch.Tensor, hidden_bias: torch.Tensor,
                 to_update: torch.Tensor, update_bias: torch.Tensor, norm_weight: torch.Tensor,
                 norm_bias: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """``onto_rows`` with the MLP update of the fired cells added: the rows (B·pixels, ·) of the
    perception, the state and what the update is added onto; ``fired`` the fired rows, ascending,
    ``counts`` how many of them each sample has; the weights folded per sample (StepWeights).
    ``onto_rows`` None: the update is added onto the state (whose two gradients, around the cells
    and through them, are then summed in one pass)."""
    onto_is_state = onto_rows is None
    return FiredUpdate.apply(perceived_rows, state_rows, state_rows if onto_is_state else onto_rows, to_hidden,
                             hidden_bias, to_update, update_bias, norm_weight, norm_bias, fired, counts, norm_eps,
                             onto_is_state)


class FiredUpdate(torch.autograd.Function):
    """new = onto + scatter(fired, MLP_b(gather(fired, [perceived, state]))), per sample b
    (:func:`pixel_mlp`)."""

    @staticmethod
    def forward(ctx, perceived, state, onto, to_hidden, hidden_bias, to_update, update_bias, norm_weight, norm_bias,
                fired, counts, eps, onto_is_state):
        cells = torch.cat([perceived.index_select(0, fired), state.index_select(0, fired)], dim=1)
        updates, ctx.saved = [], []  # each sample's update, and what its backward reads
        for i, (lo, hi) in enumerate(spans(counts)):
            update, saved = pixel_mlp(cells[lo:hi], to_hidden[i], hidden_bias[i], to_update[i], update_bias[0],
                                      norm_weight, norm_bias, eps)
            updates.append(update)
            ctx.saved.append(saved)
        ctx.save_for_backward(cells, fired, to_hidden, to_update, norm_weight, norm_bias)
        ctx.counts, ctx.onto_is_state = counts, onto_is_state
        ctx.perceived_shape, ctx.state_shape = perceived.shape, state.shape
        return onto.index_add(0, fired, torch.cat(updates))

    @staticmethod
    def backward(ctx, grad_new):
        cells, fired, to_hidden, to_update, norm_weight, norm_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_update = grad_new.index_select(0, fired)  # (n, c_out)
        g_cells = torch.empty_like(cells)
        g_to_hidden, g_to_update = torch.zeros_like(to_hidden), torch.zeros_like(to_update)
        g_hidden_bias = torch.zeros(to_hidden.shape[0], 1, to_hidden.shape[-1], dtype=cells.dtype)
        g_norm_weight, g_norm_bias = torch.zeros_like(norm_weight), torch.zeros_like(norm_bias)
        for i, (lo, hi) in enumerate(spans(ctx.counts)):
            if lo == hi:
                continue
            hidden, mean, rstd, activated = ctx.saved[i]
            g_u = grad_update[lo:hi]
            torch.mm(activated.mT, g_u, out=g_to_update[i])
            g_a = torch.ops.aten.leaky_relu_backward(g_u @ to_update[i].mT, activated, LEAKY_SLOPE, True)
            g_h, g_w, g_b = torch.ops.aten.native_layer_norm_backward(
                g_a, hidden, hidden.shape[-1:], mean, rstd, norm_weight, norm_bias, [True, True, True])
            g_norm_weight += g_w
            g_norm_bias += g_b
            torch.mm(cells[lo:hi].mT, g_h, out=g_to_hidden[i])
            torch.sum(g_h, 0, out=g_hidden_bias[i, 0])
            torch.mm(g_h, to_hidden[i].mT, out=g_cells[lo:hi])
        c = ctx.perceived_shape[1]
        g_perceived = scattered(ctx.perceived_shape, fired, g_cells[:, :c]) if needs[0] else None
        g_state = g_onto = None
        if ctx.onto_is_state:  # one gradient: around the cells (grad_new) and through them
            g_state = grad_new.index_add(0, fired, g_cells[:, c:]) if needs[1] else None
        else:
            g_state = scattered(ctx.state_shape, fired, g_cells[:, c:]) if needs[1] else None
            g_onto = grad_new if needs[2] else None
        g_update_bias = grad_update.sum(0)[None, None] if needs[6] else None
        return (g_perceived, g_state, g_onto, g_to_hidden, g_hidden_bias, g_to_update, g_update_bias,
                g_norm_weight, g_norm_bias, None, None, None, None)


def pixel_mlp(cells: torch.Tensor, to_hidden: torch.Tensor, hidden_bias: torch.Tensor, to_update: torch.Tensor,
              update_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The update (n, c) of n cells (n, 2c: perception, state) of one sample, whose folded weights
    are ``to_hidden`` (2c, h), ``hidden_bias`` (1, h), ``to_update`` (h, c): LeakyReLU(LayerNorm(
    cells·W_h + b_h))·W_u + b_u. Also what the backward reads: the hidden layer before the norm,
    the norm's mean and 1/std, the activations."""
    hidden = torch.addmm(hidden_bias, cells, to_hidden)
    normed, mean, rstd = torch.native_layer_norm(hidden, hidden.shape[-1:], norm_weight, norm_bias, eps)
    activated = F.leaky_relu(normed, LEAKY_SLOPE, inplace=True)
    return torch.addmm(update_bias, activated, to_update), (hidden, mean, rstd, activated)


def spans(counts: list[int]) -> list[tuple[int, int]]:
    """Each sample's rows [lo, hi) of the fired cells, from their counts."""
    return [(end - n, end) for n, end in zip(counts, accumulate(counts))]


def scattered(shape: torch.Size, fired: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Zeros of ``shape`` (pixels, channels) with ``rows`` at the fired pixels: a gather's gradient."""
    return rows.new_zeros(shape).index_copy_(0, fired, rows)

