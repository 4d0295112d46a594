"""bCR augmentations: exact geometry, value ranges, seeding and differentiability."""

from __future__ import annotations

import torch

from stylenat.train import augment


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_translation_moves_pixels_by_whole_steps_and_fills_zeros():
    x = torch.arange(1, 2 * 3 * 16 * 16 + 1, dtype=torch.float64).view(2, 3, 16, 16)
    out = augment.translation(x, _gen(3), ratio=0.125)
    for b in range(2):
        # Recover the shift from where pixel (8, 8) of the input landed.
        (ys, xs) = (out[b, 0] == x[b, 0, 8, 8]).nonzero(as_tuple=True)
        dy, dx = int(ys[0]) - 8, int(xs[0]) - 8
        assert abs(dy) <= 2 and abs(dx) <= 2
        expected = torch.zeros_like(x[b])
        src = x[b][:, max(0, -dy) : 16 - max(0, dy), max(0, -dx) : 16 - max(0, dx)]
        expected[:, max(0, dy) : 16 - max(0, -dy), max(0, dx) : 16 - max(0, -dx)] = src
        torch.testing.assert_close(out[b], expected, rtol=0, atol=0)


def test_cutout_zeroes_one_square_of_half_the_side():
    x = torch.ones(64, 3, 16, 16)
    out = augment.cutout(x, _gen(1), ratio=0.5)
    zeros = (out[:, 0] == 0)
    assert torch.equal(zeros, (out == 0).all(1))  # same mask on every channel
    counts = zeros.flatten(1).sum(1)
    assert counts.max() == 64 and counts.min() >= 16  # 8x8 when inside, clipped at borders
    for b in range(64):  # the zeroed region is an axis-aligned rectangle
        ys, xs = zeros[b].nonzero(as_tuple=True)
        assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_color_ranges():
    x = torch.randn(256, 3, 4, 4, dtype=torch.float64)
    shift = (augment.brightness(x, _gen()) - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift)) and shift.min() >= -0.5 and shift.max() < 0.5
    contrast = augment.contrast(x, _gen())
    mean = x.mean((1, 2, 3), keepdim=True)
    factor = ((contrast - mean) / (x - mean)).flatten(1)
    assert factor.min() >= 0.5 - 1e-9 and factor.max() < 1.5 + 1e-9
    sat = augment.saturation(x, _gen())
    torch.testing.assert_close(sat.mean(1), x.mean(1))  # the per-pixel channel mean is kept


def test_policy_is_seeded_and_differentiable():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    a = augment.bcr_augment(x, _gen(5))
    b = augment.bcr_augment(x, _gen(5))
    assert torch.equal(a, b) and not torch.equal(a, augment.bcr_augment(x, _gen(6)))
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_flip_mirrors_about_half():
    x = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 1, 1, 4)
    out = augment.flip(x, _gen())
    flipped = (out != x).any(-1).flatten()
    assert torch.equal(out[flipped], x[flipped].flip(-1))
    assert 400 < int(flipped.sum()) < 600
