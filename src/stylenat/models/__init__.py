"""StyleNAT models: configurations, presets, builders, output-space helpers and the model format."""

from __future__ import annotations

import torch
from torch import Tensor

from stylenat.models.config import FAMILIES, PRESETS, DiscriminatorConfig, GeneratorConfig, get_preset
from stylenat.models.discriminator import Discriminator
from stylenat.models.generator import Generator, seeds_to_z
from stylenat.models.io import load_model, save_model
from stylenat.models.loading import default_device, resolve_model, resolve_models

__all__ = [
    "PRESETS",
    "FAMILIES",
    "GeneratorConfig",
    "DiscriminatorConfig",
    "Generator",
    "Discriminator",
    "get_preset",
    "build_generator",
    "build_discriminator",
    "model_to_uint8",
    "uint8_to_model",
    "save_model",
    "load_model",
    "resolve_model",
    "resolve_models",
    "default_device",
    "seeds_to_z",
]


def build_generator(config: str | GeneratorConfig) -> Generator:
    """A freshly initialised generator from a preset name or a :class:`GeneratorConfig`."""
    return Generator(get_preset(config)[0] if isinstance(config, str) else config)


def build_discriminator(config: str | DiscriminatorConfig) -> Discriminator:
    """A freshly initialised discriminator from a preset name or a :class:`DiscriminatorConfig`."""
    return Discriminator(get_preset(config)[1] if isinstance(config, str) else config)


def _mean_std(x: Tensor, cfg: GeneratorConfig) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return mean, std


def model_to_uint8(raw: Tensor, cfg: GeneratorConfig) -> Tensor:
    """Raw model output [B, 3, S, S] -> uint8 pixels: (raw * std + mean) * 255, rounded, clamped."""
    mean, std = _mean_std(raw, cfg)
    return (raw.float() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def uint8_to_model(x: Tensor, cfg: GeneratorConfig) -> Tensor:
    """uint8 pixels [B, 3, S, S] -> float32 in the model's space: (x / 255 - mean) / std."""
    mean, std = _mean_std(x, cfg)
    return (x.float() / 255 - mean) / std

