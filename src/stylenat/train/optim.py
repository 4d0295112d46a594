"""Adam with the lazy-regularization adjustment, and the linear learning-rate decay."""

from __future__ import annotations

import torch
from torch import nn


def lazy_ratio(interval: int | None) -> float:
    """c = interval / (interval + 1): the share of optimizer steps that are not regularization steps."""
    return interval / (interval + 1) if interval else 1.0


def make_adam(params, lr: float, betas: tuple[float, float], reg_interval: int | None = None) -> torch.optim.Adam:
    """Adam whose lr and betas are adjusted (lr * c, beta ** c) for a regularizer applied every
    ``reg_interval`` steps as an extra optimizer step, so the effective averaging horizon per
    main step stays as configured (StyleGAN2, Appendix B)."""
    c = lazy_ratio(reg_interval)
    opt = torch.optim.Adam(params, lr=lr * c, betas=(betas[0] ** c, betas[1] ** c))
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def lr_factor(step: int, decay_start: int | None, total: int) -> float:
    """1 before ``decay_start``, then linear down to 0 at ``total`` steps."""
    if decay_start is None or step < decay_start or total <= decay_start:
        return 1.0
    return max(0.0, (total - step) / (total - decay_start))


def set_lr_factor(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * factor


def requires_grad(params: nn.Module | list[nn.Parameter], flag: bool) -> None:
    """Turn gradients of a module's parameters (or of a list of parameters) on or off."""
    for p in params.parameters() if isinstance(params, nn.Module) else params:
        p.requires_grad_(flag)
