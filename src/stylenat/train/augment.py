"""Differentiable augmentations for balanced consistency regularization (DiffAugment style).

Every random draw comes from the draws passed in (:mod:`stylenat.train.draws`: the training step's
own, or a plain ``torch.Generator``), so a resumed run draws the same augmentations; the draws are a
few numbers per image, on the CPU, moved to the images' device afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stylenat.train.draws import Draws, as_draws


def _uniform(n: int, gen: Draws | torch.Generator, like: Tensor) -> Tensor:
    return as_draws(gen).rand((n,)).to(device=like.device, dtype=like.dtype).view(n, 1, 1, 1)


def flip(x: Tensor, gen: Draws | torch.Generator) -> Tensor:
    """Mirror each image horizontally with probability 1/2."""
    mask = as_draws(gen).rand((x.shape[0],)) < 0.5
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def brightness(x: Tensor, gen: Draws | torch.Generator) -> Tensor:
    """Add one offset in [-0.5, 0.5) per image."""
    return x + (_uniform(x.shape[0], gen, x) - 0.5)


def saturation(x: Tensor, gen: Draws | torch.Generator) -> Tensor:
    """Scale each pixel's deviation from its channel mean by a factor in [0, 2) per image."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_uniform(x.shape[0], gen, x) * 2) + mean


def contrast(x: Tensor, gen: Draws | torch.Generator) -> Tensor:
    """Scale each image's deviation from its mean by a factor in [0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x.shape[0], gen, x) + 0.5) + mean


def translation(x: Tensor, gen: Draws | torch.Generator, ratio: float = 0.125) -> Tensor:
    """Shift each image by whole pixels, up to ``ratio`` of its size per axis; zeros fill in."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = as_draws(gen).randint(-sy, sy + 1, (b, 1, 1)).to(x.device)
    dx = as_draws(gen).randint(-sx, sx + 1, (b, 1, 1)).to(x.device)
    # Source row/column of every output pixel, offset by 1 into a zero-padded copy.
    rows = (torch.arange(h, device=x.device).view(1, h, 1) - dy + 1).clamp(0, h + 1).expand(b, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) - dx + 1).clamp(0, w + 1).expand(b, h, w)
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: Tensor, gen: Draws | torch.Generator, ratio: float = 0.5) -> Tensor:
    """Zero one square of ``ratio`` times the image size per image, centred anywhere in the image."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = as_draws(gen).randint(0, h + (1 - ch % 2), (b, 1, 1)).to(x.device)
    cx = as_draws(gen).randint(0, w + (1 - cw % 2), (b, 1, 1)).to(x.device)
    oy = torch.arange(h, device=x.device).view(1, h, 1) - cy + ch // 2
    ox = torch.arange(w, device=x.device).view(1, 1, w) - cx + cw // 2
    inside = (oy >= 0) & (oy < ch) & (ox >= 0) & (ox < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def diffaugment(x: Tensor, gen: Draws | torch.Generator, translation_ratio: float = 0.125, cutout_ratio: float = 0.5) -> Tensor:
    """DiffAugment's policy "color,translation,cutout" (Zhao et al. 2020), applied to every image."""
    x = contrast(saturation(brightness(x, gen), gen), gen)
    return cutout(translation(x, gen, translation_ratio), gen, cutout_ratio)


def bcr_augment(x: Tensor, gen: Draws | torch.Generator, translation_ratio: float = 0.125, cutout_ratio: float = 0.5) -> Tensor:
    """The bCR policy: flip, translation, brightness, saturation, contrast, cutout."""
    x = flip(x, gen)
    x = translation(x, gen, translation_ratio)
    x = contrast(saturation(brightness(x, gen), gen), gen)
    return cutout(x, gen, cutout_ratio)
