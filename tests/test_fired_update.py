"""The fired cells' update with its hand-written backward (nca_tiles.diffusion.fired_update)
against torch's own gradients: gradcheck in float64, every input, onto the state or apart."""

import pytest
import torch

from nca_tiles.diffusion.fired_update import fired_update, pixel_mlp, spans


def inputs(counts_of, c=3, h=5, pixels=6, onto_channels=None, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    b = len(counts_of)
    fired = torch.cat([torch.randperm(pixels, generator=generator)[:n].sort().values + i * pixels
                       for i, n in enumerate(counts_of)])
    onto_c = c if onto_channels is None else onto_channels
    return dict(perceived_rows=rand(b * pixels, c), state_rows=rand(b * pixels, c),
                onto_rows=None if onto_channels is None else rand(b * pixels, onto_c), fired=fired,
                counts=list(counts_of), to_hidden=rand(b, 2 * c, h), hidden_bias=rand(b, 1, h),
                to_update=rand(b, h, onto_c), update_bias=rand(1, 1, onto_c), norm_weight=rand(h),
                norm_bias=rand(h), norm_eps=1e-5)


def by_torch_ops(perceived_rows, state_rows, onto_rows, fired, counts, to_hidden, hidden_bias, to_update,
                 update_bias, norm_weight, norm_bias, norm_eps):
    """The same update as plain differentiable torch ops: torch's autograd is the reference."""
    cells = torch.cat([perceived_rows, state_rows], 1)[fired]
    updates = [pixel_mlp(cells[lo:hi], to_hidden[i], hidden_bias[i], to_update[i], update_bias[0], norm_weight,
                         norm_bias, norm_eps)[0] for i, (lo, hi) in enumerate(spans(counts))]
    onto = state_rows if onto_rows is None else onto_rows
    return onto.index_add(0, fired, torch.cat(updates))


@pytest.mark.parametrize("counts", [(4, 2), (6,), (0, 3), (5, 0, 1)], ids=str)
@pytest.mark.parametrize("onto_channels", [None, 2, 4], ids=["onto-state", "onto-fewer", "onto-more"])
def test_the_hand_written_backward_is_the_gradient(counts, onto_channels):
    args = inputs(counts, onto_channels=onto_channels)
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad}

    def f(*values):
        return fired_update(**{**args, **dict(zip(tensors, values))})

    assert torch.autograd.gradcheck(f, tuple(tensors.values()))
    torch.testing.assert_close(f(*tensors.values()), by_torch_ops(**args))
    expected = torch.autograd.grad(by_torch_ops(**args).square().sum(), tuple(tensors.values()))
    got = torch.autograd.grad(f(*tensors.values()).square().sum(), tuple(tensors.values()))
    for name, e, g in zip(tensors, expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("onto_channels", [None, 4], ids=["onto-state", "onto-more"])
def test_inputs_without_gradients_get_none_and_the_rest_are_unchanged(onto_channels):
    # The first NCA step reads the image, which needs no gradient: only the weights' and the
    # perception's are computed.
    args = inputs((3, 2), onto_channels=onto_channels)
    args["state_rows"] = args["state_rows"].detach()
    out = fired_update(**args)
    out.square().sum().backward()
    assert args["state_rows"].grad is None and args["perceived_rows"].grad is not None
    reference = {k: v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
                 for k, v in args.items()}
    by_torch_ops(**reference).square().sum().backward()
    for name in ("perceived_rows", "to_hidden", "norm_weight", "update_bias") + (("onto_rows",) if onto_channels else ()):
        torch.testing.assert_close(args[name].grad, reference[name].grad, rtol=1e-10, atol=1e-12, msg=name)
