"""Exponential moving average of the generator's weights."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(half_life_steps: float) -> float:
    """Per-step decay whose weight on an old value halves every ``half_life_steps`` steps."""
    return 0.5 ** (1.0 / half_life_steps)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model for parameters; buffers (e.g. w_avg) are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)
