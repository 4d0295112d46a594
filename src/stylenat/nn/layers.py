"""Small building blocks of the generator and discriminator.

Filters (FIR blur, Haar wavelets) follow the convention of rosinality's ``upfirdn2d``: the kernel
is *convolved* (flipped), so a kernel and its 180-degree rotation differ. Fixed filters are
non-persistent buffers: they follow ``.to(device)`` but are not saved, because they are not learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "upfirdn2d",
    "fir_kernel",
    "EqualLinear",
    "BiasLeakyReLU",
    "AdaIN",
    "FIRUpsample",
    "FIRFilter",
    "HaarTransform",
    "InverseHaarTransform",
    "sinusoidal_table",
]

SQRT2 = math.sqrt(2.0)


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by zero insertion, pad, convolve each channel with ``kernel`` [kh, kw], subsample.

    ``pad`` = (before, after), the same on both axes; non-negative.
    """
    b, c, h, w = x.shape
    x = x.reshape(b * c, 1, h, w)
    if up > 1:
        x = F.pad(x.reshape(b * c, 1, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(b * c, 1, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    x = F.conv2d(x, kernel.flip([0, 1])[None, None].to(x.dtype), stride=down)
    return x.reshape(b, c, x.shape[-2], x.shape[-1])


def fir_kernel(taps=(1, 3, 3, 1), gain: float = 1.0) -> Tensor:
    """Separable 2-D FIR kernel: outer product of ``taps``, normalised to sum ``gain``."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum() * gain


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate (weights stored at unit scale, scaled at run time).

    Args:
        in_dim: input features.
        out_dim: output features.
        lr_mul: learning-rate multiplier; weights are stored divided by it, biases times it.
        activate: apply the biased leaky-ReLU(0.2) * sqrt(2) after the product.
    """

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: Tensor) -> Tensor:
        if self.activate:
            return F.leaky_relu(F.linear(x, self.weight * self.scale) + self.bias * self.lr_mul, 0.2) * SQRT2
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class BiasLeakyReLU(nn.Module):
    """x + bias (per channel, dim 1), then leaky-ReLU(0.2) * sqrt(2).

    Args:
        channels: size of dim 1 of the input.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.view(1, -1, *([1] * (x.ndim - 2)))
        return F.leaky_relu(x + bias, 0.2) * SQRT2


class AdaIN(nn.Module):
    """Instance norm over the tokens of [B, H, W, C] (no affine), then gamma * xhat + beta from w.

    Args:
        channels: C.
        style_dim: size of the latent w.
    """

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.style = EqualLinear(style_dim, 2 * channels)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        gamma, beta = self.style(w)[:, None, None, :].chunk(2, dim=-1)
        var, mean = torch.var_mean(x, dim=(1, 2), keepdim=True, correction=0)
        return gamma * ((x - mean) * torch.rsqrt(var + 1e-5)) + beta


class FIRUpsample(nn.Module):
    """x2 upsampling of [B, C, H, W] with the [1, 3, 3, 1] FIR filter (StyleGAN2's skip upsample)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", fir_kernel(gain=4.0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=2, pad=(2, 1))


class FIRFilter(nn.Module):
    """[1, 3, 3, 1] blur of [B, C, H, W] with the given padding, then subsampling by ``down``.

    Args:
        pad: (before, after) padding on both axes.
        down: subsampling factor after the blur.
    """

    def __init__(self, pad: tuple[int, int], down: int = 1):
        super().__init__()
        self.register_buffer("kernel", fir_kernel(), persistent=False)
        self.pad = pad
        self.down = down

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, down=self.down, pad=self.pad)


def _haar_filters() -> dict[str, Tensor]:
    low = torch.full((1, 2), 2 ** -0.5)
    high = low.clone()
    high[0, 0] = -high[0, 0]
    return {"ll": low.T * low, "lh": high.T * low, "hl": low.T * high, "hh": high.T * high}


class HaarTransform(nn.Module):
    """One-level Haar DWT: [B, C, H, W] -> [B, 4C, H/2, W/2], bands ordered ll, lh, hl, hh."""

    def __init__(self):
        super().__init__()
        for name, f in _haar_filters().items():
            self.register_buffer(name, f, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([upfirdn2d(x, getattr(self, n), down=2) for n in ("ll", "lh", "hl", "hh")], dim=1)


class InverseHaarTransform(nn.Module):
    """Inverse of :class:`HaarTransform`: [B, 4C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self):
        super().__init__()
        # The mixed bands change sign because upfirdn2d convolves (flips) the filter.
        signs = {"ll": 1.0, "lh": -1.0, "hl": -1.0, "hh": 1.0}
        for name, f in _haar_filters().items():
            self.register_buffer(name, f * signs[name], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        bands = x.chunk(4, dim=1)
        return sum(upfirdn2d(b, getattr(self, n), up=2, pad=(1, 0)) for b, n in zip(bands, ("ll", "lh", "hl", "hh")))


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """[length, dim] sinusoidal codes of positions 1..length: sin of dim/2 frequencies, then cos.

    Frequencies are 10000 ** (-i / (dim/2 - 1)), i = 0 .. dim/2 - 1 (the fairseq/tensor2tensor
    variant StyleSwin uses), computed in float32 like the official code so imported weights match.
    """
    half = dim // 2
    if dim % 2 or half < 2:
        raise ValueError(f"sinusoidal position codes need an even dim >= 4, got {dim}")
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(1, length + 1, dtype=torch.float32)[:, None] * freq[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
