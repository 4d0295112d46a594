"""stylenat.nn.layers against independent oracles: numpy loops written from the definitions
(zero insertion, padding, flipped-kernel correlation, subsampling), hand-computed Haar bands and
known inverses, closed forms computed in float64.

Tolerances: float64 inputs through float64 arithmetic are held to ~1e-12. The fixed filters are
float32 buffers (e.g. the Haar taps are float32(2 ** -0.5) ** 2 = 0.49999997, not 0.5) cast to the
input's dtype, so results involving them are held to a few float32 ulps (1e-6 on unit-scale data).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stylenat.models.generator import StageUpsample
from stylenat.nn.layers import (
    AdaIN,
    BiasLeakyReLU,
    EqualLinear,
    FIRFilter,
    FIRUpsample,
    HaarTransform,
    InverseHaarTransform,
    fir_kernel,
    sinusoidal_table,
    upfirdn2d,
)

FILTER_ATOL = 1e-6  # float32 filter taps applied to unit-scale float64 data


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- oracles ----------------------------------------------------------------------------------


def upfirdn_loops(x: np.ndarray, k: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> np.ndarray:
    """One channel [H, W]: insert up-1 zeros after every sample, zero-pad (before, after) on both
    axes, *convolve* with k (out[i, j] = sum_uv p[i*down + u, j*down + v] * k[kh-1-u, kw-1-v]:
    correlation with the flipped kernel), keeping every down-th output. Plain python loops."""
    h, w = x.shape
    z = np.zeros((h * up, w * up))
    for i in range(h):
        for j in range(w):
            z[i * up, j * up] = x[i, j]
    p = np.zeros((h * up + pad[0] + pad[1], w * up + pad[0] + pad[1]))
    p[pad[0]:pad[0] + h * up, pad[0]:pad[0] + w * up] = z
    kh, kw = k.shape
    oh, ow = (p.shape[0] - kh) // down + 1, (p.shape[1] - kw) // down + 1
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            acc = 0.0
            for u in range(kh):
                for v in range(kw):
                    acc += p[i * down + u, j * down + v] * k[kh - 1 - u, kw - 1 - v]
            out[i, j] = acc
    return out


def upfirdn_batch(x: np.ndarray, k: np.ndarray, up: int = 1, down: int = 1, pad=(0, 0)) -> np.ndarray:
    """upfirdn_loops over every image and channel of [B, C, H, W]."""
    return np.stack([np.stack([upfirdn_loops(c, k, up, down, pad) for c in img]) for img in x])


def blur_kernel_np(gain: float = 1.0) -> np.ndarray:
    """[1, 3, 3, 1] outer [1, 3, 3, 1] normalised to sum ``gain``, written out independently."""
    t = np.array([1.0, 3.0, 3.0, 1.0])
    return np.outer(t, t) / 64.0 * gain


def haar_np(x: np.ndarray) -> np.ndarray:
    """Haar bands of [B, C, H, W] from the 2x2 blocks [[a, b], [c, d]] (a top-left):
    ll = (a+b+c+d)/2, lh = (a+b-c-d)/2 (top minus bottom), hl = (a-b+c-d)/2 (left minus right),
    hh = (a-b-c+d)/2. These signs are what the documented convention (low = [1, 1]/sqrt2,
    high = [-1, 1]/sqrt2, *convolved* so flipped) gives; output band-major [B, 4C, H/2, W/2]."""
    a, b, c, d = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
    return np.concatenate([(a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2], axis=1)


def inverse_haar_np(y: np.ndarray) -> np.ndarray:
    """The inverse of haar_np: the 4x4 band matrix is symmetric and orthogonal, so it is its own inverse."""
    ll, lh, hl, hh = np.split(y, 4, axis=1)
    b, c, h, w = ll.shape
    x = np.zeros((b, c, 2 * h, 2 * w))
    x[:, :, 0::2, 0::2] = (ll + lh + hl + hh) / 2
    x[:, :, 0::2, 1::2] = (ll + lh - hl - hh) / 2
    x[:, :, 1::2, 0::2] = (ll - lh + hl - hh) / 2
    x[:, :, 1::2, 1::2] = (ll - lh - hl + hh) / 2
    return x


def leaky_np(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, x, 0.2 * x) * math.sqrt(2.0)


# ---- upfirdn2d and the FIR modules -------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kshape, up, down, pad",
    [
        ((5, 7), (4, 4), 1, 1, (0, 0)),
        ((5, 7), (3, 2), 1, 1, (2, 1)),  # non-square, asymmetric kernel: the flip matters
        ((6, 4), (4, 4), 2, 1, (2, 1)),
        ((4, 5), (3, 3), 3, 1, (1, 2)),
        ((8, 9), (4, 4), 1, 2, (1, 1)),
        ((7, 6), (2, 3), 1, 2, (3, 0)),
        ((5, 5), (4, 4), 2, 2, (1, 2)),
    ],
)
def test_upfirdn2d_matches_direct_loops(shape, kshape, up, down, pad):
    rng = _rng(100 * shape[0] + 10 * shape[1] + 3 * up + down)
    x = rng.standard_normal((2, 3, *shape))
    k = rng.standard_normal(kshape)  # no symmetry, so a missing or extra flip shows
    got = upfirdn2d(torch.from_numpy(x), torch.from_numpy(k), up=up, down=down, pad=pad)
    want = upfirdn_batch(x, k, up, down, pad)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_upfirdn2d_convolves_rather_than_correlates():
    # A unit impulse through a kernel reproduces the kernel itself (convolution), not its rotation.
    k = torch.arange(1.0, 7.0, dtype=torch.float64).view(2, 3)
    x = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    x[0, 0, 1, 1] = 1
    out = upfirdn2d(x, k, pad=(2, 2))[0, 0]  # padded enough for the whole response to show
    rows, cols = out.ne(0).any(1).nonzero().flatten(), out.ne(0).any(0).nonzero().flatten()
    assert torch.equal(out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], k)


@pytest.mark.parametrize("taps, gain", [((1, 3, 3, 1), 1.0), ((1, 3, 3, 1), 4.0), ((1, 2, 1), 2.5), ((2, 7, 1, 5, 3), 1.0)])
def test_fir_kernel_is_separable_and_sums_to_gain(taps, gain):
    k = fir_kernel(taps, gain).double()
    t = np.asarray(taps, dtype=np.float64)
    np.testing.assert_allclose(k.numpy(), np.outer(t, t) / t.sum() ** 2 * gain, rtol=1e-6)
    assert abs(k.sum().item() - gain) < 1e-5 * gain


@pytest.mark.parametrize("h, w", [(4, 4), (5, 7), (8, 3)])
def test_fir_upsample_matches_loops(h, w):
    x = _rng(h * 10 + w).standard_normal((2, 2, h, w))
    got = FIRUpsample()(torch.from_numpy(x))
    want = upfirdn_batch(x, blur_kernel_np(gain=4.0), up=2, pad=(2, 1))
    assert got.shape == (2, 2, 2 * h, 2 * w)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=FILTER_ATOL)


def test_fir_upsample_of_a_constant_is_the_constant_inside():
    # Zero insertion keeps 1 sample in 4; the gain of 4 restores the level: each output phase
    # meets taps summing to (1+3)/8 * (3+1)/8 * 4 = 1/4 * 4 = 1 of the kernel.
    x = torch.full((1, 1, 6, 6), 2.5, dtype=torch.float64)
    out = FIRUpsample()(x)[0, 0]
    inner = out[2:-2, 2:-2]  # the padding zeros reach 2 pixels in
    assert torch.allclose(inner, torch.full_like(inner, 2.5), rtol=0, atol=FILTER_ATOL)
    assert (out[0, 0] - 2.5).abs() > 0.5  # the border does see the zero padding


@pytest.mark.parametrize("pad, down, size", [((1, 1), 2, (8, 8)), ((2, 1), 1, (5, 6)), ((2, 2), 2, (9, 7)), ((1, 1), 1, (4, 4))])
def test_fir_filter_blur_and_blur_downsample_match_loops(pad, down, size):
    x = _rng(sum(size) + down).standard_normal((2, 3, *size))
    got = FIRFilter(pad=pad, down=down)(torch.from_numpy(x))
    want = upfirdn_batch(x, blur_kernel_np(), 1, down, pad)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=FILTER_ATOL)
    const = FIRFilter(pad=pad, down=down)(torch.ones(1, 1, 12, 12, dtype=torch.float64))[0, 0]
    assert torch.allclose(const[2:-2, 2:-2], torch.ones(()).double(), atol=FILTER_ATOL)  # gain 1


# ---- Haar -------------------------------------------------------------------------------------


def test_haar_bands_of_known_blocks():
    # Two 2x2 blocks [[1, 2], [3, 4]] and [[5, 0], [-1, 2]] side by side, one channel:
    # ll = sum/2, lh = (top - bottom)/2, hl = (left - right)/2, hh = (diagonal - antidiagonal)/2.
    x = torch.tensor([[[[1.0, 2.0, 5.0, 0.0], [3.0, 4.0, -1.0, 2.0]]]], dtype=torch.float64)
    bands = HaarTransform()(x)
    want = torch.tensor([[[[5.0, 3.0]], [[-2.0, 2.0]], [[-1.0, 1.0]], [[0.0, 4.0]]]], dtype=torch.float64)
    assert bands.shape == (1, 4, 1, 2)
    assert torch.allclose(bands, want, rtol=0, atol=FILTER_ATOL)


def test_haar_matches_block_formula_band_major():
    x = _rng(1).standard_normal((2, 3, 6, 8))
    got = HaarTransform()(torch.from_numpy(x))
    assert got.shape == (2, 12, 3, 4)  # bands ll, lh, hl, hh, each holding the 3 channels
    np.testing.assert_allclose(got.numpy(), haar_np(x), rtol=0, atol=FILTER_ATOL)


def test_inverse_haar_matches_block_formula():
    y = _rng(2).standard_normal((2, 12, 3, 5))
    got = InverseHaarTransform()(torch.from_numpy(y))
    np.testing.assert_allclose(got.numpy(), inverse_haar_np(y), rtol=0, atol=FILTER_ATOL)


def test_inverse_haar_undoes_haar_both_ways():
    x = torch.from_numpy(_rng(3).standard_normal((2, 3, 8, 10)))
    dwt, iwt = HaarTransform(), InverseHaarTransform()
    assert torch.allclose(iwt(dwt(x)), x, rtol=0, atol=FILTER_ATOL)
    y = torch.from_numpy(_rng(4).standard_normal((2, 8, 4, 3)))
    assert torch.allclose(dwt(iwt(y)), y, rtol=0, atol=FILTER_ATOL)


def test_haar_is_orthonormal_energy_preserved():
    x = torch.from_numpy(_rng(5).standard_normal((3, 2, 16, 12)))
    bands = HaarTransform()(x)
    assert abs(bands.square().sum().item() / x.square().sum().item() - 1) < 1e-6


# ---- position codes and StageUpsample ---------------------------------------------------------


@pytest.mark.parametrize("length, dim", [(4, 4), (16, 8), (64, 32), (7, 10)])
def test_sinusoidal_table_formula(length, dim):
    half = dim // 2
    pos = np.arange(1, length + 1, dtype=np.float64)[:, None]
    freq = 10000.0 ** (-np.arange(half, dtype=np.float64) / (half - 1))
    want = np.concatenate([np.sin(pos * freq), np.cos(pos * freq)], axis=1)
    got = sinusoidal_table(length, dim)
    assert got.dtype == torch.float32 and got.shape == (length, dim)
    # float32 angles carry ~2 ulps of relative error, i.e. up to ~2.4e-7 * position in absolute terms
    tol = 4 * np.finfo(np.float32).eps * pos + np.finfo(np.float32).eps
    assert np.all(np.abs(got.double().numpy() - want) <= tol)


@pytest.mark.parametrize("dim", [3, 2, 0])
def test_sinusoidal_table_rejects_bad_dims(dim):
    with pytest.raises(ValueError, match="even dim >= 4"):
        sinusoidal_table(4, dim)


def test_stage_upsample_adds_x_codes_then_y_codes():
    # Zero input: bilinear -> 0, LayerNorm(0) -> its bias (set to 0), linear -> 0, so the output is
    # alpha * codes. Channel j < half must follow the column x, channel half + j the row y.
    in_dim, out_dim, n = 6, 16, 8
    up = StageUpsample(in_dim, out_dim, n)
    with torch.no_grad():
        up.norm.bias.zero_()
        up.alpha.fill_(1.5)
    with torch.no_grad():
        out = up(torch.zeros(2, n // 2, n // 2, in_dim))
    half = out_dim // 2
    pos = np.arange(1, n + 1, dtype=np.float64)[:, None]
    freq = 10000.0 ** (-np.arange(half // 2) / (half // 2 - 1))
    table = np.concatenate([np.sin(pos * freq), np.cos(pos * freq)], axis=1)  # [n, half]
    want = np.zeros((n, n, out_dim))
    for y in range(n):
        for x in range(n):
            want[y, x, :half] = table[x]
            want[y, x, half:] = table[y]
    assert out.shape == (2, n, n, out_dim)
    np.testing.assert_allclose(out[0].double().numpy(), 1.5 * want, rtol=0, atol=1e-5)
    assert torch.equal(out[0], out[1])


# ---- EqualLinear, AdaIN, BiasLeakyReLU --------------------------------------------------------


@pytest.mark.parametrize("lr_mul", [1.0, 0.01])
@pytest.mark.parametrize("activate", [False, True])
def test_equal_linear_closed_form(lr_mul, activate):
    torch.manual_seed(0)
    layer = EqualLinear(12, 5, lr_mul=lr_mul, activate=activate).double()
    with torch.no_grad():
        layer.bias.normal_()  # zero at init; make the bias term visible
    x = torch.randn(4, 12, dtype=torch.float64)
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    want = x.numpy() @ (w * lr_mul / math.sqrt(12)).T + b * lr_mul
    if activate:
        want = leaky_np(want)
    np.testing.assert_allclose(layer(x).detach().numpy(), want, rtol=1e-12, atol=1e-12)


def test_equal_linear_init_gives_unit_scale_effective_weights():
    # Stored weights are N(0, 1/lr_mul^2), so the run-time weight w * lr_mul / sqrt(in) is
    # N(0, 1/in): std within 3 % over 256 * 512 samples (the sample std's spread is ~0.2 %).
    torch.manual_seed(0)
    layer = EqualLinear(512, 256, lr_mul=0.01)
    eff = layer.weight.detach() * 0.01 / math.sqrt(512)
    assert abs(eff.std().item() * math.sqrt(512) - 1) < 0.03
    assert torch.equal(layer.bias, torch.zeros(256))


def test_adain_closed_form_per_image_and_channel():
    torch.manual_seed(1)
    c, style_dim = 5, 7
    ada = AdaIN(c, style_dim).double()
    with torch.no_grad():
        ada.style.bias.normal_()
    x = torch.randn(3, 4, 6, c, dtype=torch.float64) * 3 + 2
    w = torch.randn(3, style_dim, dtype=torch.float64)
    s = w.numpy() @ (ada.style.weight.detach().numpy() / math.sqrt(style_dim)).T + ada.style.bias.detach().numpy()
    gamma, beta = s[:, :c], s[:, c:]
    xn = x.numpy()
    want = np.zeros_like(xn)
    for b in range(3):
        for ch in range(c):
            tokens = xn[b, :, :, ch]
            mean = tokens.mean()
            var = ((tokens - mean) ** 2).mean()  # population variance over the H*W tokens
            want[b, :, :, ch] = gamma[b, ch] * (tokens - mean) / math.sqrt(var + 1e-5) + beta[b, ch]
    np.testing.assert_allclose(ada(x, w).detach().numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 5, 3)])
def test_bias_leaky_relu_closed_form(shape):
    act = BiasLeakyReLU(4).double()
    with torch.no_grad():
        act.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    x = torch.from_numpy(_rng(6).standard_normal(shape))
    bias = np.array([0.5, -1.0, 0.0, 2.0]).reshape(1, 4, *([1] * (len(shape) - 2)))
    np.testing.assert_allclose(act(x).detach().numpy(), leaky_np(x.numpy() + bias), rtol=1e-12, atol=1e-12)
    # leaky_relu(0.2) * sqrt(2): 1 -> sqrt 2, -1 -> -0.2 sqrt 2 (bias 0 channel)
    probe = torch.zeros(2, 4, dtype=torch.float64)
    probe[:, 2] = torch.tensor([1.0, -1.0])
    assert torch.allclose(act(probe)[:, 2], torch.tensor([math.sqrt(2), -0.2 * math.sqrt(2)], dtype=torch.float64))


def test_equal_linear_matches_f_linear_with_scaled_weight():
    # float32 path, stated with torch's own F.linear: weight * lr_mul / sqrt(in), bias * lr_mul.
    torch.manual_seed(2)
    layer = EqualLinear(9, 3, lr_mul=0.1)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(5, 9)
    want = F.linear(x, layer.weight * 0.1 / 3.0, layer.bias * 0.1)
    assert torch.allclose(layer(x), want, rtol=1e-6, atol=1e-6)
