"""GAN losses and regularizers of the recipe, on discriminator logits [B, 1], and the recipe's
loss terms per training phase (:class:`RecipeLoss`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from stylenat.train.augment import bcr_augment


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


class RecipeLoss:
    """The recipe's loss terms of one micro-batch, backpropagated into the networks' ``.grad``.

    One method per phase of a step, after StyleGAN3's ``accumulate_gradients``: the caller freezes
    the network that does not train in the phase, zeroes the gradients, calls the method once per
    micro-batch with ``gain`` = 1 / micro-batches, then averages over ranks, clips and steps.
    Needs no run directory: a test calls it with two networks and a config.

    G, D: the generator and discriminator (plain modules). cfg: the training config (its r1_*,
    bcr_* fields). augment: what D sees of an image, ``augment(x, draws)`` (ADA or DiffAugment;
    default: the image itself). autocast: the context forward passes run in (R1 always in fp32).
    """

    def __init__(self, G, D, cfg, augment: Callable | None = None, autocast=None):
        self.G, self.D, self.cfg = G, D, cfg
        self.augment = augment if augment is not None else (lambda x, draws: x)
        self.autocast = autocast if autocast is not None else nullcontext()

    def _d(self, x: Tensor, c: Tensor | None, draws) -> Tensor:
        return self.D(self.augment(x, draws), c)

    def d_micro(self, real: Tensor, real_c: Tensor | None, z: Tensor, fake_c: Tensor | None, draws, gain: float) -> dict:
        """Logistic D loss on reals and G(z) plus bCR on both; returns the detached terms and logits.

        Draw scopes: aug-real, aug-fake (augment), bcr-real, bcr-fake (the bCR transform) and
        aug-bcr-real, aug-bcr-fake (augment of the transformed images).
        """
        cfg = self.cfg
        with self.autocast:
            # G is frozen here and its images are only D's inputs (bCR on fakes needs gradients
            # w.r.t. D alone): no autograd state, and one grad mode less for compiled attention.
            with torch.no_grad():
                fake = self.G(z, c=fake_c)
            real_logits = self._d(real, real_c, draws.scope("aug-real"))
            fake_logits = self._d(fake, fake_c, draws.scope("aug-fake"))
            loss = d_logistic_loss(real_logits, fake_logits)
            bcr = real_logits.new_zeros(())
            for weight, x, c, logits, name in ((cfg.bcr_real, real, real_c, real_logits, "real"),
                                               (cfg.bcr_fake, fake, fake_c, fake_logits, "fake")):
                if weight:
                    aug = bcr_augment(x, draws.scope(f"bcr-{name}"), cfg.bcr_translation, cfg.bcr_cutout)
                    bcr = bcr + weight * consistency_loss(self._d(aug, c, draws.scope(f"aug-bcr-{name}")), logits)
        ((loss + bcr) * gain).backward()
        return {"d_loss": loss.detach(), "bcr": bcr.detach(), "real_logits": real_logits.detach(),
                "fake_logits": fake_logits.detach()}

    def r1_micro(self, real: Tensor, real_c: Tensor | None, draws, gain: float) -> Tensor:
        """Lazy R1: gamma / 2 * ||grad_x D(aug x)||^2 weighted by the interval (it runs every
        ``r1_interval`` steps); returns the detached penalty. Draw scope: aug."""
        cfg = self.cfg
        aug = draws.scope("aug")
        r1 = r1_penalty(lambda x: self._d(x, real_c, aug), real)  # fp32: the double backward is where bf16 would hurt most
        (cfg.r1_gamma / 2 * r1 * cfg.r1_interval * gain).backward()
        return r1.detach()

    def g_micro(self, z: Tensor, c: Tensor | None, draws, gain: float) -> Tensor:
        """Non-saturating G loss on D(G(z)); returns it detached. Draw scope: aug."""
        with self.autocast:
            loss = g_nonsaturating_loss(self._d(self.G(z, c=c), c, draws.scope("aug")))
        (loss * gain).backward()
        return loss.detach()
