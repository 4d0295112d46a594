"""StyleSwin's wavelet discriminator with spectral normalisation, as used by StyleNAT.

A class-conditional discriminator (``num_classes > 0``) adds the projection of Miyato & Koyama
(2018): logits += <embed(c), phi(x)>, phi the features before the last linear layer and embed a
spectrally normalized class embedding. It fits this discriminator as it stands (spectral norm
throughout, the setting the projection was made for) at the cost of one table of
num_classes x C parameters; StyleGAN2-ADA's "mapped" conditioning is the same projection after
an extra MLP on the label.

The input (model output space) is Haar-transformed to 12 channels at half resolution. Each scale
has a from-RGB 1x1 conv on the wavelet image (later scales first rebuild the image with the inverse
transform, blur-downsample it and transform again) added to the main path, then a conv block that
halves the resolution. On the base map (4x4 for a square of a power of two; bh x bw in general):
minibatch stddev, 3x3 conv, two spectral-normed linear layers, the first sized to the base map.

Spectral norm is ``torch.nn.utils.parametrizations.spectral_norm``: one power iteration per
forward in training mode, the stored u, v in eval mode (as in the official code).
"""

from __future__ import annotations


import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from stylenat.models.config import DiscriminatorConfig
from stylenat.nn.layers import BiasLeakyReLU, FIRFilter, HaarTransform, InverseHaarTransform

__all__ = ["Discriminator"]


class ConvLayer(nn.Sequential):
    """[blur] -> spectral-normed conv (no bias) -> biased leaky ReLU.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel: conv kernel edge.
        downsample: blur with the [1, 3, 3, 1] filter and use stride 2.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, downsample: bool = False):
        layers: list[nn.Module] = []
        if downsample:
            pad = 4 - 2 + kernel - 1  # filter taps - factor + conv taps - 1
            layers.append(FIRFilter(pad=((pad + 1) // 2, pad // 2)))
        conv = nn.Conv2d(in_ch, out_ch, kernel, stride=2 if downsample else 1,
                         padding=0 if downsample else kernel // 2, bias=False)
        layers += [spectral_norm(conv), BiasLeakyReLU(out_ch)]
        super().__init__(*layers)


class ConvBlock(nn.Module):
    """3x3 conv, then blur + stride-2 3x3 conv.

    Args:
        in_ch: input channels.
        out_ch: output channels.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class FromRGB(nn.Module):
    """Wavelet image -> features added to the main path; optionally halves the wavelet image first.

    Args:
        out_ch: feature channels.
        downsample: rebuild the image (inverse Haar), blur-downsample x2, Haar again.
    """

    def __init__(self, out_ch: int, downsample: bool):
        super().__init__()
        self.iwt = InverseHaarTransform() if downsample else None
        self.downsample = FIRFilter(pad=(1, 1), down=2) if downsample else None
        self.dwt = HaarTransform() if downsample else None
        self.conv = ConvLayer(12, out_ch, 1)

    def forward(self, wavelets: Tensor, skip: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.downsample is not None:
            wavelets = self.dwt(self.downsample(self.iwt(wavelets)))
        out = self.conv(wavelets)
        return wavelets, out if skip is None else out + skip


class Discriminator(nn.Module):
    """Images [B, 3, H, W] in model space -> logits [B, 1].

    Args:
        config: the discriminator configuration.
    """

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        self.dwt = HaarTransform()
        self.from_rgbs = nn.ModuleList()
        self.convs = nn.ModuleList()
        shapes = config.stage_shapes()
        ch = config.channels
        # The wavelet image starts at stage len - 2 (half the image); each conv block halves it.
        in_ch = ch[-1]
        for i in range(len(shapes) - 2, 0, -1):
            out_ch = ch[i - 1]
            self.from_rgbs.append(FromRGB(in_ch, downsample=i != len(shapes) - 2))
            self.convs.append(ConvBlock(in_ch, out_ch))
            in_ch = out_ch
        c4 = ch[0]
        self.from_rgbs.append(FromRGB(c4, downsample=True))
        self.final_conv = ConvLayer(in_ch + 1, c4, 3)
        base = shapes[0][0] * shapes[0][1]
        self.final_linear = nn.Sequential(spectral_norm(nn.Linear(c4 * base, c4)), BiasLeakyReLU(c4), spectral_norm(nn.Linear(c4, 1)))
        if config.num_classes:
            embed = nn.Embedding(config.num_classes, c4)
            nn.init.xavier_uniform_(embed.weight)
            self.class_embed = spectral_norm(embed)

    def input_blocks(self, n: int) -> list[nn.Module]:
        """The first ``n`` blocks from the input side (each: its from-RGB layer and conv block), e.g. for FreezeD."""
        if not 0 <= n <= len(self.convs):
            raise ValueError(f"the discriminator has {len(self.convs)} blocks before its output block, not {n}")
        return [m for i in range(n) for m in (self.from_rgbs[i], self.convs[i])]

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Logits [B, 1] of images x [B, 3, H, W] (and, for a conditional D, class indices c [B])."""
        h, w = self.config.shape
        if x.ndim != 4 or x.shape[1:] != (3, h, w):
            raise ValueError(f"discriminator input must have shape [batch, 3, {h}, {w}], got {tuple(x.shape)}")
        if (c is None) != (self.config.num_classes == 0):
            raise ValueError("a conditional discriminator needs class labels" if c is None else
                             "this discriminator is unconditional: pass no class labels")
        wavelets = self.dwt(x)
        out = None
        for from_rgb, conv in zip(self.from_rgbs, self.convs):
            wavelets, out = from_rgb(wavelets, out)
            out = conv(out)
        _, out = self.from_rgbs[-1](wavelets, out)
        out = torch.cat([out, self._minibatch_stddev(out)], dim=1)
        out = self.final_conv(out)
        features = self.final_linear[1](self.final_linear[0](out.flatten(1)))
        logits = self.final_linear[2](features)
        if c is not None:
            logits = logits + (self.class_embed(c.to(x.device)) * features).sum(1, keepdim=True)
        return logits

    def _minibatch_stddev(self, x: Tensor) -> Tensor:
        """One channel: std over groups of samples (sample b is in group b mod B/G), averaged."""
        b, c, h, w = x.shape
        group = min(b, self.config.stddev_group)
        if b % group:
            raise ValueError(f"discriminator batch {b} must be divisible by the stddev group {group}")
        std = torch.sqrt(x.view(group, -1, c, h, w).var(0, unbiased=False) + 1e-8)
        return std.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).repeat(group, 1, h, w)
