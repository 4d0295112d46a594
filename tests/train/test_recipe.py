"""Losses, regularizers, optimizer adjustments, lr schedule and EMA against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stylenat.train.config import TRAIN_PRESETS, TrainConfig
from stylenat.train.ema import ema_beta, update_ema
from stylenat.train.losses import consistency_loss, d_logistic_loss, g_nonsaturating_loss, r1_penalty
from stylenat.train.optim import lr_factor, make_adam, set_lr_factor


class LinearD(nn.Module):
    """D(x) = <w, x> + b: its input gradient is w for every sample."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))
        self.b = nn.Parameter(torch.randn(()))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1, keepdim=True) + self.b


def test_r1_of_linear_discriminator_is_squared_weight_norm():
    torch.manual_seed(0)
    d = LinearD((3, 4, 4)).double()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    r1 = r1_penalty(d, x)
    assert r1.item() == pytest.approx(d.w.square().sum().item(), rel=1e-12)
    # Differentiable w.r.t. D's parameters (double backward): d||w||^2/dw = 2w.
    (grad,) = torch.autograd.grad(r1, d.w)
    torch.testing.assert_close(grad, 2 * d.w.detach(), rtol=1e-12, atol=0)


def test_logistic_losses_at_known_logits():
    real = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    fake = torch.tensor([[-1.0], [3.0]], dtype=torch.float64)
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731 - softplus, spelled out
    expected_d = (sp(-0.0) + sp(-2.0)) / 2 + (sp(-1.0) + sp(3.0)) / 2
    assert d_logistic_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-12)
    assert g_nonsaturating_loss(fake).item() == pytest.approx((sp(1.0) + sp(-3.0)) / 2, rel=1e-12)
    assert d_logistic_loss(torch.zeros(4, 1), torch.zeros(4, 1)).item() == pytest.approx(2 * math.log(2))


def test_consistency_loss_is_mse():
    a = torch.tensor([[1.0], [4.0]])
    b = torch.tensor([[0.0], [2.0]])
    assert consistency_loss(a, b).item() == pytest.approx((1 + 4) / 2)


def test_lazy_regularization_adjusts_d_adam():
    p = nn.Parameter(torch.zeros(1))
    c = 16 / 17
    opt = make_adam([p], 2e-4, (0.0, 0.99), reg_interval=16)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(2e-4 * c, rel=1e-15)
    assert group["betas"] == pytest.approx((0.0, 0.99**c), rel=1e-15)
    plain = make_adam([p], 5e-5, (0.0, 0.99)).param_groups[0]
    assert plain["lr"] == 5e-5 and plain["betas"] == (0.0, 0.99)
    set_lr_factor(opt, 0.25)
    assert group["lr"] == pytest.approx(2e-4 * c * 0.25, rel=1e-15)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 1.0), (774_999, 1.0), (775_000, 1.0), (887_500, 0.5), (943_750, 0.25), (1_000_000, 0.0)],
)
def test_linear_lr_decay(step, expected):
    assert lr_factor(step, 775_000, 1_000_000) == pytest.approx(expected, abs=1e-15)
    assert lr_factor(step, None, 1_000_000) == 1.0


def test_ema_beta_from_half_life_matches_recipe():
    assert ema_beta(10_000 / 32) == pytest.approx(0.5 ** (32 / 10_000), rel=1e-15)
    assert ema_beta(TRAIN_PRESETS["ffhq256"].ema_half_life) == pytest.approx(0.5 ** (32 / 10_000), rel=1e-15)
    assert ema_beta(7) ** 7 == pytest.approx(0.5, rel=1e-12)


def test_update_ema_lerps_parameters_and_copies_buffers():
    ema, model = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
        model.running_mean.fill_(7.0)
    update_ema(ema, model, 0.75)
    torch.testing.assert_close(ema.weight, torch.full((2,), 1.5))  # 0.75 * 1 + 0.25 * 3
    torch.testing.assert_close(ema.running_mean, torch.full((2,), 7.0))


def test_ffhq256_preset_is_the_published_recipe():
    c = TRAIN_PRESETS["ffhq256"]
    assert (c.r1_gamma, c.r1_interval, c.bcr_real, c.bcr_fake, c.d_clip) == (10.0, 16, 10.0, 10.0, 5.0)
    assert (c.d_lr, c.g_lr, c.betas, c.batch) == (2e-4, 2e-4 / 4, (0.0, 0.99), 8)
    assert (c.steps, c.lr_decay_start, c.bcr_translation, c.bcr_cutout, c.xflip) == (1_000_000, 775_000, 1 / 8, 1 / 2, True)


@pytest.mark.parametrize("name", sorted(TRAIN_PRESETS))
def test_config_json_round_trip(name, tmp_path):
    cfg = TRAIN_PRESETS[name]
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\): 'nope'"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp16")
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(batch=0)


def test_r1_step_gives_every_parameter_a_gradient():
    from stylenat.models import DiscriminatorConfig, build_discriminator

    d = build_discriminator(DiscriminatorConfig(resolution=16, channels=(8, 8, 8)))
    r1_penalty(d, torch.randn(4, 3, 16, 16)).backward()
    missing = [n for n, p in d.named_parameters() if p.grad is None]
    assert not missing, missing
