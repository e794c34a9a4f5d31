"""Level moves of the scale-space sampler: exact on any window, right at the edges."""

from __future__ import annotations

import pytest
import torch

from nca_tiles.diffusion.scale_space import coarse_window, level_size, renoise, upsample_window


def _up_whole(coarse, ratio, fine_shape):
    return upsample_window(coarse, (0, 0), coarse.shape[1:], (0, 0), fine_shape, ratio)


@pytest.mark.parametrize("ratio", [2, 4])
def test_matches_torch_bilinear_inside(ratio):
    coarse = torch.randn(3, 9, 7)
    fine = _up_whole(coarse, ratio, (9 * ratio, 7 * ratio))
    reference = torch.nn.functional.interpolate(coarse[None], scale_factor=ratio, mode="bilinear",
                                                align_corners=False)[0]
    torch.testing.assert_close(fine, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ratio", [2, 4])
@pytest.mark.parametrize("chunk", [5, 8, 13])
def test_windows_equal_the_whole_bit_for_bit(ratio, chunk):
    fine_h, fine_w = 37, 29  # not multiples of the ratio: the last coarse cell is partial
    ch, cw = level_size(fine_h, ratio), level_size(fine_w, ratio)
    coarse = torch.randn(3, ch, cw)
    whole = _up_whole(coarse, ratio, (fine_h, fine_w))
    tiled = torch.empty_like(whole)
    for y0 in range(0, fine_h, chunk):
        for x0 in range(0, fine_w, chunk):
            y1, x1 = min(y0 + chunk, fine_h), min(x0 + chunk, fine_w)
            cy0, cy1 = coarse_window(y0, y1, ratio, ch)
            cx0, cx1 = coarse_window(x0, x1, ratio, cw)
            assert cy1 - cy0 <= -(-(y1 - y0) // ratio) + 2  # halo: one coarse cell a side
            window = coarse[:, cy0:cy1, cx0:cx1].clone()
            tiled[:, y0:y1, x0:x1] = upsample_window(window, (cy0, cx0), (ch, cw), (y0, x0), (y1 - y0, x1 - x0), ratio)
    assert torch.equal(tiled, whole)


def test_a_constant_stays_constant_and_edges_repeat():
    coarse = torch.full((3, 4, 4), 0.25)
    assert torch.equal(_up_whole(coarse, 4, (16, 16)), torch.full((3, 16, 16), 0.25))
    ramp = torch.arange(4.0).view(1, 1, 4).expand(1, 2, 4)
    row = _up_whole(ramp, 2, (4, 8))[0, 0]
    assert row.tolist() == [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]


def test_renoise_is_keyed_by_global_coordinates():
    x0 = torch.zeros(3, 10, 12)
    whole = renoise(x0, 0.5, seed=3, level=1, origin=(0, 0))
    part = renoise(x0[:, 4:9, 5:12], 0.5, seed=3, level=1, origin=(4, 5))
    assert torch.equal(part, whole[:, 4:9, 5:12])
    assert not torch.equal(renoise(x0, 0.5, seed=3, level=2, origin=(0, 0)), whole)
    assert whole.std().item() == pytest.approx(0.5**0.5, rel=0.15)
    assert torch.equal(renoise(torch.ones(3, 2, 2), 1.0, 0, 1, (0, 0)), torch.ones(3, 2, 2))
