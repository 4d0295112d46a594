"""GAN losses and regularizers of the recipe, on discriminator logits [B, 1]."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def d_logistic_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Logistic D loss: -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))), batch means."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating G loss: -log sigmoid(D(G(z))), batch mean."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(d: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """Batch mean of ||grad_x D(x)||^2 on real images, differentiable w.r.t. D's parameters.

    ``d`` maps images to logits: the plain module (not a DDP wrapper), or D after a differentiable
    augmentation (the gradient is then taken w.r.t. the un-augmented image, as in ADA). It is
    taken with ``torch.autograd.grad`` and needs a double backward.
    """
    real = real.detach().requires_grad_(True)
    logits = d(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    # The zero term gives every D parameter a gradient on the R1 step (the last bias does not reach
    # grad_x), so Adam steps all of them, as the official code does with its `0 * real_pred[0]`.
    return grad.square().flatten(1).sum(1).mean() + 0 * logits.sum()


def consistency_loss(aug_logits: Tensor, logits: Tensor) -> Tensor:
    """Balanced consistency regularization term: MSE between D(aug x) and D(x), both differentiable."""
    return F.mse_loss(aug_logits, logits)
