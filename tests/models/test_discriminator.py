"""The discriminator's parts against independent oracles: minibatch stddev by brute-force loops,
the wavelet from-RGB path of later scales by composing the closed-form Haar / blur oracles of
tests/nn/test_layers.py (not the modules under test), spectral norm against a weight with a
known SVD and torch.linalg.svdvals, and the input check's message."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stylenat.models.config import DiscriminatorConfig
from stylenat.models.discriminator import ConvLayer, Discriminator, FromRGB

from ..nn.test_layers import blur_kernel_np, haar_np, inverse_haar_np, upfirdn_batch

FILTER_ATOL = 1e-6  # the fixed filters are float32 buffers; see tests/nn/test_layers.py


def _disc(resolution: int = 16, stddev_group: int = 4, ch: int = 8) -> Discriminator:
    torch.manual_seed(0)
    n = int(math.log2(resolution)) - 1  # resolutions 4 .. resolution
    return Discriminator(DiscriminatorConfig(resolution=resolution, channels=(ch,) * n, stddev_group=stddev_group))


# ---- minibatch stddev -------------------------------------------------------------------------


def stddev_loops(x: np.ndarray, group_size: int) -> np.ndarray:
    """Brute force: G = min(B, group_size) samples per group, sample b in group b mod (B/G);
    per group, the population std over its G members (+1e-8 inside the sqrt) at every (c, h, w),
    averaged over C, H, W; each sample gets its group's value as one [H, W] channel."""
    b, c, h, w = x.shape
    g = min(b, group_size)
    n_groups = b // g
    out = np.zeros((b, 1, h, w))
    for s in range(b):
        members = [m for m in range(b) if m % n_groups == s % n_groups]
        assert len(members) == g
        total = 0.0
        for ci in range(c):
            for hi in range(h):
                for wi in range(w):
                    vals = [x[m, ci, hi, wi] for m in members]
                    mean = sum(vals) / g
                    var = sum((v - mean) ** 2 for v in vals) / g
                    total += math.sqrt(var + 1e-8)
        out[s, 0] = total / (c * h * w)
    return out


@pytest.mark.parametrize(
    "batch, group",
    [
        (4, 4),  # one group, the whole batch
        (8, 4),  # two groups: {0, 2, 4, 6} and {1, 3, 5, 7}
        (2, 4),  # batch smaller than the group: G = B
        (6, 3),  # three members in each of two groups
        (6, 2),  # two members in each of three groups
        (1, 4),  # a single sample: std 0, sqrt(1e-8) = 1e-4
    ],
)
def test_minibatch_stddev_matches_loops(batch, group):
    d = _disc(stddev_group=group)
    rng = np.random.default_rng(batch * 10 + group)
    x = rng.standard_normal((batch, 3, 4, 4)) * rng.uniform(0.5, 2.0, (batch, 1, 1, 1))  # samples differ in scale
    got = d._minibatch_stddev(torch.from_numpy(x))
    assert got.shape == (batch, 1, 4, 4)
    np.testing.assert_allclose(got.numpy(), stddev_loops(x, group), rtol=1e-12, atol=1e-14)
    if batch == 1:
        assert torch.allclose(got, torch.full_like(got, 1e-4))


def test_minibatch_stddev_groups_are_strided_not_contiguous():
    # Samples 0 and 1 equal, 2 and 3 equal: contiguous pairs would give std 0; the strided groups
    # {0, 2} and {1, 3} of the documented convention give |x0 - x2| / 2 per element.
    d = _disc(stddev_group=2)
    x = torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64).view(4, 1, 1, 1).expand(4, 2, 4, 4).contiguous()
    got = d._minibatch_stddev(x)
    assert torch.allclose(got, torch.full_like(got, math.sqrt(1.0 + 1e-8)), rtol=1e-12)


def test_minibatch_stddev_rejects_indivisible_batch():
    d = _disc(stddev_group=4)
    with pytest.raises(ValueError, match=r"discriminator batch 6 must be divisible by the stddev group 4"):
        d._minibatch_stddev(torch.randn(6, 8, 4, 4))
    with pytest.raises(ValueError, match=r"batch 6 must be divisible"):
        d(torch.randn(6, 3, 16, 16))  # the whole forward too


# ---- wavelet from-RGB of a later scale ----------------------------------------------------------


def test_from_rgb_downsample_is_haar_of_blurred_inverse_haar():
    torch.manual_seed(0)
    frgb = FromRGB(8, downsample=True).double().eval()  # eval: spectral norm does not iterate between calls
    wav = np.random.default_rng(7).standard_normal((2, 12, 8, 6))  # bands of a 3-channel 16x12 image
    image = inverse_haar_np(wav)  # [2, 3, 16, 12]
    small = upfirdn_batch(image, blur_kernel_np(), down=2, pad=(1, 1))  # [2, 3, 8, 6]
    want = haar_np(small)  # [2, 12, 4, 3]
    got_wav, out = frgb(torch.from_numpy(wav), None)
    assert got_wav.shape == want.shape == (2, 12, 4, 3)
    np.testing.assert_allclose(got_wav.detach().numpy(), want, rtol=0, atol=FILTER_ATOL)
    # the features are added to the main path's skip
    skip = torch.randn(2, 8, 4, 3, dtype=torch.float64)
    _, out_skip = frgb(torch.from_numpy(wav), skip)
    assert out.shape == (2, 8, 4, 3) and torch.allclose(out_skip, out + skip, rtol=0, atol=1e-12)


def test_first_from_rgb_keeps_the_wavelets():
    torch.manual_seed(0)
    frgb = FromRGB(8, downsample=False).double()
    wav = torch.randn(2, 12, 4, 4, dtype=torch.float64)
    got, _ = frgb(wav, None)
    assert torch.equal(got, wav)


# ---- input check ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 4, 16, 16), (3, 16, 16), (2, 3, 16, 8)])
def test_discriminator_input_check_message(shape):
    d = _disc(16)
    want = f"discriminator input must have shape [batch, 3, 16, 16], got {tuple(shape)}"
    with pytest.raises(ValueError) as err:
        d(torch.randn(*shape))
    assert str(err.value) == want


def test_discriminator_output_shape():
    d = _disc(16)
    assert d(torch.randn(4, 3, 16, 16)).shape == (4, 1)


# ---- spectral norm ----------------------------------------------------------------------------


def _weight_with_singular_values(out_ch: int, fan_in: int, sv: list[float], seed: int) -> torch.Tensor:
    """A [out_ch, fan_in] matrix U diag(sv) V^T with random orthonormal U, V: its SVD is known."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_ch, out_ch, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(fan_in, out_ch, generator=g, dtype=torch.float64))
    return (u * torch.tensor(sv, dtype=torch.float64)) @ v.T


def test_spectral_norm_weight_has_unit_largest_singular_value():
    # A 3x3 conv 4 -> 6 whose flattened weight [6, 36] has singular values 3, 2, 1.5, 1, 0.5, 0.1.
    # Each train-mode forward does one power iteration; the estimate error shrinks like
    # (2/3) ** (2k), negligible after 60 forwards. Then weight = original / 3, sigma_max = 1.
    layer = ConvLayer(4, 6, 3).double()
    sn_conv = layer[0]
    target = _weight_with_singular_values(6, 36, [3.0, 2.0, 1.5, 1.0, 0.5, 0.1], seed=0)
    with torch.no_grad():
        sn_conv.parametrizations.weight.original.copy_(target.view(6, 4, 3, 3))
    layer.train()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    for _ in range(60):
        layer(x)
    layer.eval()  # eval: the stored u, v, no further iteration
    w = sn_conv.weight.detach().reshape(6, -1)
    assert abs(torch.linalg.svdvals(w)[0].item() - 1) < 1e-6
    assert torch.allclose(w, target / 3.0, rtol=0, atol=1e-6)


def test_spectral_norm_eval_uses_stored_vectors():
    # eval mode: weight = original / (u^T W v) with the stored u, v, and u, v do not move.
    d = _disc(16)
    lin = d.final_linear[0]
    d.train()
    for _ in range(3):
        d(torch.randn(4, 3, 16, 16))
    d.eval()
    p = lin.parametrizations.weight
    u, v = p[0]._u.clone(), p[0]._v.clone()
    w0 = p.original.detach()
    sigma = torch.dot(u, w0 @ v)
    assert torch.allclose(lin.weight, w0 / sigma, rtol=1e-6, atol=0)
    d(torch.randn(4, 3, 16, 16))
    assert torch.equal(p[0]._u, u) and torch.equal(p[0]._v, v)
