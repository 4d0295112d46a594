"""One whole training step of the recipe, against an independent, plainly written computation.

The reference below starts from the trainer's initial networks and recomputes two steps by hand:
the logistic D loss with bCR on reals and fakes, D's gradient clipped to ``d_clip``, Adam with the
lazy-regularization adjustment (lr * c, betas ** c, c = interval / (interval + 1)), lazy R1 as its
own optimizer step weighted by gamma / 2 * interval, the non-saturating G loss through D, plain
Adam for G, and the EMA. It shares with the trainer only the networks' forward passes, the bCR
transform and where the step's images and random numbers come from (the contracts of
``ShardedStream`` and ``stylenat.train.draws``, tested on their own). Mutants of the trainer (a
flipped G loss, R1 without its interval weight, Adam without the lazy adjustment, no clipping, the
EMA's weights swapped) must fail the comparison, so the comparison can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from stylenat.models import uint8_to_model
from stylenat.train import get_train_preset, losses, loop, setup
from stylenat.train.augment import bcr_augment
from stylenat.train.draws import StepDraws
from stylenat.train.losses import RecipeLoss

MICRO_G = {"resolution": 16, "channels": [16, 16, 16], "heads": [2, 2, 2], "kernels": [[4], [5], [5]],
           "dilations": [[1], [1], [1]], "style_dim": 16, "n_mlp": 1}
MICRO_D = {"resolution": 16, "channels": [16, 16, 16]}
STEPS = 3  # R1 at steps 0 and 2 (interval 2): Adam's state carries over D steps, R1 steps and G steps
# float32 against float32 in another order; a step moves weights by about the learning rate (1e-3).
ATOL, RTOL = 1e-6, 1e-4


def _config(tmp_path):
    return get_train_preset("tiny").replace(
        data="demo", run_dir=str(tmp_path / "run"), device="cpu", batch=4, seed=5, r1_interval=2, r1_gamma=2.0,
        bcr_real=10.0, bcr_fake=5.0, d_clip=5.0, ema_half_life=2.0, betas=(0.5, 0.99), grid=(1, 1),
        generator=MICRO_G, discriminator=MICRO_D)


class _Adam:
    """Adam by its definition (Kingma & Ba), one state per parameter; a parameter without a gradient is
    left alone, as torch.optim.Adam does."""

    def __init__(self, params, lr, betas, eps=1e-8):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.state = {}

    @torch.no_grad()
    def step(self, grads):
        b1, b2 = self.betas
        for p, g in zip(self.params, grads, strict=True):
            if g is None:
                continue
            t, m, v = self.state.get(p, (0, torch.zeros_like(p), torch.zeros_like(p)))
            t, m, v = t + 1, b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            self.state[p] = (t, m, v)
            p -= self.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)


def _reference(G, D, G_ema, cfg, dataset, g_cfg):
    """STEPS steps of the recipe by hand; returns each step's numbers."""
    n, c = cfg.batch, cfg.r1_interval / (cfg.r1_interval + 1)
    d_opt = _Adam(D.parameters(), cfg.d_lr * c, tuple(b**c for b in cfg.betas))
    g_opt = _Adam(G.parameters(), cfg.g_lr, cfg.betas)
    ema = 0.5 ** (1 / cfg.ema_half_life)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003))
    record = []
    for step in range(STEPS):
        real = uint8_to_model(torch.stack([dataset[int(i)] for i in order[step * n:(step + 1) * n]]), g_cfg)
        draws = {phase: StepDraws(cfg.seed, (step, phase), torch.arange(n), n) for phase in ("d", "r1", "g")}
        # D step: G's images are inputs only.
        with torch.no_grad():
            fake = G(draws["d"].scope("z").randn((n, g_cfg.style_dim)))
        real_logits, fake_logits = D(real), D(fake)
        d_loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        real_t = bcr_augment(real, draws["d"].scope("bcr-real"), cfg.bcr_translation, cfg.bcr_cutout)
        fake_t = bcr_augment(fake, draws["d"].scope("bcr-fake"), cfg.bcr_translation, cfg.bcr_cutout)
        bcr = cfg.bcr_real * (D(real_t) - real_logits).square().mean() + cfg.bcr_fake * (D(fake_t) - fake_logits).square().mean()
        grads = torch.autograd.grad(d_loss + bcr, list(D.parameters()), allow_unused=True)
        norm = torch.cat([g.flatten() for g in grads if g is not None]).square().sum().sqrt()
        scale = min(1.0, cfg.d_clip / (norm.item() + 1e-6))
        d_opt.step([None if g is None else g * scale for g in grads])
        out = {"d_loss": d_loss.item(), "bcr": bcr.item(), "d_grad_norm": norm.item()}
        # Lazy R1, its own Adam step of every D parameter (the official code's 0 * D(x) term).
        if step % cfg.r1_interval == 0:
            x = real.detach().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
            r1 = grad_x.square().sum(dim=(1, 2, 3)).mean()
            grads = torch.autograd.grad(cfg.r1_gamma / 2 * r1 * cfg.r1_interval, list(D.parameters()), allow_unused=True)
            d_opt.step([torch.zeros_like(p) if g is None else g for p, g in zip(D.parameters(), grads)])
            out["r1"] = r1.item()
        # G step through D (D's weights are not updated by it).
        g_loss = F.softplus(-D(G(draws["g"].scope("z").randn((n, g_cfg.style_dim))))).mean()
        grads = torch.autograd.grad(g_loss, list(G.parameters()))
        g_opt.step(grads)
        out.update(g_loss=g_loss.item(), g_grad_norm=torch.cat([g.flatten() for g in grads]).square().sum().sqrt().item())
        with torch.no_grad():
            for pe, p in zip(G_ema.parameters(), G.parameters()):
                pe.copy_(ema * pe + (1 - ema) * p)
            for be, b in zip(G_ema.buffers(), G.buffers()):
                be.copy_(b)
        record.append(out)
    return record


def _run(tmp_path):
    """(trainer, its step statistics, the reference's networks and statistics) from one start."""
    trainer = loop._Trainer(setup.resolve_config(_config(tmp_path)), resume=False)
    try:
        G, D, G_ema = (copy.deepcopy(m) for m in (trainer.G, trainer.D, trainer.G_ema))
        stats = [{k: float(v) for k, v in trainer.step().items()} for _ in range(STEPS)]
    finally:
        trainer.log.close()
    expected = _reference(G, D, G_ema, trainer.cfg, trainer.dataset, trainer.g_cfg)
    return trainer, stats, (G, D, G_ema), expected


def _differences(trainer, stats, nets, expected) -> list[str]:
    out = []
    for name, ours, ref in zip(("G", "D", "G_ema"), (trainer.G, trainer.D, trainer.G_ema), nets):
        for (key, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
            if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
                out.append(f"{name}.{key}: max |diff| {(a - b).abs().max().item():.3g}")
    for step, (got, want) in enumerate(zip(stats, expected)):
        for key, value in want.items():
            if got[key] != pytest.approx(value, rel=RTOL, abs=ATOL):
                out.append(f"step {step} {key}: {got[key]} != {value}")
    return out


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_three_steps_equal_the_reference(tmp_path, one_thread):
    trainer, stats, nets, expected = _run(tmp_path)
    assert any(e["d_grad_norm"] > trainer.cfg.d_clip for e in expected)  # the clipping was exercised
    assert [("r1" in s) for s in stats] == [True, False, True]
    assert not _differences(trainer, stats, nets, expected)


def _flipped_g_loss(monkeypatch):
    monkeypatch.setattr(losses, "g_nonsaturating_loss", lambda logits: F.softplus(logits).mean())


def _r1_without_interval(monkeypatch):
    original = losses.r1_penalty
    monkeypatch.setattr(losses, "r1_penalty", lambda d, x: original(d, x) / 2)  # interval 2


def _adam_without_lazy_adjustment(monkeypatch):
    original = setup.make_adam
    monkeypatch.setattr(setup, "make_adam", lambda params, lr, betas, reg_interval=None: original(params, lr, betas))


def _no_clipping(monkeypatch):
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: original(params, float("inf")))


def _ema_swapped(monkeypatch):
    original = loop.update_ema
    monkeypatch.setattr(loop, "update_ema", lambda ema, model, beta: original(ema, model, 1 - beta))


@pytest.mark.parametrize("mutant", [_flipped_g_loss, _r1_without_interval, _adam_without_lazy_adjustment, _no_clipping,
                                    _ema_swapped])
def test_a_broken_recipe_fails_the_comparison(tmp_path, monkeypatch, one_thread, mutant):
    mutant(monkeypatch)
    assert _differences(*_run(tmp_path))


def test_the_networks_that_train_in_each_phase(tmp_path, one_thread):
    """Which network requires gradients at each forward of a step: G frozen in the D and R1 steps,
    D frozen in the G step."""
    trainer = loop._Trainer(setup.resolve_config(_config(tmp_path)), resume=False)
    seen = []
    for name, module in (("G", trainer.G), ("D", trainer.D)):
        module.register_forward_hook(lambda m, args, out, name=name: seen.append(
            (name, any(p.requires_grad for p in trainer.G.parameters()), any(p.requires_grad for p in trainer.D.parameters()))))
    try:
        trainer.step()
    finally:
        trainer.log.close()
    d_step = [("G", False, True)] + [("D", False, True)] * 4  # fakes, then D on reals, fakes and both bCR views
    assert seen == [*d_step, ("D", False, True), ("G", True, False), ("D", True, False)]


def test_recipe_loss_runs_without_a_run_directory():
    """RecipeLoss on bare networks: gain scales the gradients it leaves (here 1/2 of the full one)."""
    from stylenat.models import build_discriminator, build_generator
    from stylenat.models.config import DiscriminatorConfig, GeneratorConfig

    torch.manual_seed(0)
    G, D = build_generator(GeneratorConfig.from_dict(MICRO_G)), build_discriminator(DiscriminatorConfig.from_dict(MICRO_D))
    loss = RecipeLoss(G, D, get_train_preset("tiny"))
    z, draws = torch.randn(4, 16), StepDraws(0, (0, "g"), torch.arange(4), 4)
    grads = []
    for gain in (1.0, 0.5):
        G.zero_grad(set_to_none=True)
        state = copy.deepcopy(D.state_dict())
        loss.g_micro(z, None, draws.scope(), gain)
        D.load_state_dict(state)  # the same spectral-norm vectors for both passes
        grads.append(torch.cat([p.grad.flatten() for p in G.parameters()]))
    assert torch.equal(grads[1], grads[0] / 2)
