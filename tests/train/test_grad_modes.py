"""Grad mode of the generator's forward passes in a training run.

The D step makes its fakes under ``torch.no_grad()`` (G is frozen there; its images are only D's
inputs). These tests prove that changes no bit of a run, and pin every generator forward a run
makes (grad mode, batch, autocast dtype): each distinct combination is a separate graph of the
compiled attention, so this is the list the graph count of a training run is built from.
"""

from __future__ import annotations

import pytest
import torch

from stylenat.cli import main
from stylenat.models.generator import Generator
from stylenat.train import losses, loop
from tests.train.helpers import MICRO, assert_bitwise_equal, final_state

# MICRO (the tiny preset at 16px) with everything that touches the fakes of the D step switched on:
# bCR on fakes and reals, ADA (a fixed p, so every transform runs), lazy R1, two micro-batches.
FAKE_PATHS = [*MICRO, "--steps", "6", "--checkpoint-every", "6", "--accum", "2", "--seed", "3",
              "--set", "bcr_fake=10", "--set", "bcr_real=10", "--aug", "ada", "--aug-p", "0.5"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (helpers.ENV); two threads on 2 shared cores crawl
    yield
    torch.set_num_threads(before)


def _train(*args) -> None:
    assert main(["train", *args]) == 0


class _NoGradLeavesGradOn:
    """``torch`` as the losses module sees it, except that ``no_grad()`` leaves grad mode on (as the
    D step was before it made its fakes under no_grad)."""

    no_grad = staticmethod(torch.enable_grad)

    def __getattr__(self, name):
        return getattr(torch, name)


def _record_fakes(monkeypatch, grad_on: bool) -> list[bool]:
    """Record the grad mode of every forward of the training G (not G_ema); with ``grad_on`` the D
    step's fakes are made with grad mode on."""
    original, modes = Generator.forward, []

    def forward(self, *args, **kwargs):
        if self.training:
            modes.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "forward", forward)
    if grad_on:
        monkeypatch.setattr(losses, "torch", _NoGradLeavesGradOn())
    return modes


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_d_step_fakes_without_grad_change_no_bit(tmp_path, monkeypatch, one_thread, amp):
    """The oracle is the same run with the D step's fakes made with grad mode on (the code before the
    change), bitwise: G's parameters do not require gradients in the D step and neither do the
    latents, so autograd recorded nothing there even with grad mode on; the forward computes the same
    kernels on the same inputs either way (autocast's weight cache, the one grad-mode-dependent
    part of autocast, only holds weights that require grad). Any bit that moves is a real change."""
    args = [*FAKE_PATHS, *(["--amp", amp] if amp else [])]
    modes = _record_fakes(monkeypatch, grad_on=False)
    _train(*args, "--run-dir", str(tmp_path / "new"))
    assert modes == [False, False, True, True] * 6  # per step: 2 D-step micro-batches, then 2 G-step ones
    monkeypatch.undo()
    modes = _record_fakes(monkeypatch, grad_on=True)
    _train(*args, "--run-dir", str(tmp_path / "old"))
    assert modes == [True] * 24
    assert_bitwise_equal(final_state(tmp_path / "new"), final_state(tmp_path / "old"))


def test_generator_forwards_of_a_run(tmp_path, monkeypatch, one_thread):
    """Every generator forward of a run (with metrics, grids and bf16 autocast): which network, grad
    mode, parameters requiring grad, batch, autocast dtype."""
    calls = []
    original = Generator.forward

    def forward(self, z, *args, **kwargs):
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        calls.append(("G" if self.training else "G_ema", torch.is_grad_enabled(),
                      next(self.parameters()).requires_grad, z.shape[0], amp))
        return original(self, z, *args, **kwargs)

    monkeypatch.setattr(Generator, "forward", forward)
    # batch 4, a 2x3 grid (chunks of 4 and 2), swd18 (chunks 4, 4, 4, 4, 2), 4 steps, grids at 0, 2, 4.
    _train(*MICRO, "--steps", "4", "--checkpoint-every", "4", "--amp", "bf16", "--set", "grid=[2,3]",
           "--sample-every", "2", "--metrics", "swd18", "--metrics-every", "4", "--run-dir", str(tmp_path / "run"))
    d_step = ("G", False, False, 4, torch.bfloat16)
    g_step = ("G", True, True, 4, torch.bfloat16)
    grid = [("G_ema", False, False, 4, None), ("G_ema", False, False, 2, None)]
    metric = [("G_ema", False, False, 4, None)] * 4 + [("G_ema", False, False, 2, None)]
    assert calls == [*grid, *[d_step, g_step] * 2, *grid, *[d_step, g_step] * 2, *grid, *metric]


def test_window_means_are_the_per_value_means():
    """A tick's means from one copy equal the means of the values one by one (the former code)."""
    gen = torch.Generator().manual_seed(0)
    window = [{"d_loss": torch.randn((), generator=gen), "aug_p": 0.25 * i,
               **({"r1": torch.rand((), generator=gen)} if i % 3 == 0 else {})} for i in range(7)]
    expected = {k: float(torch.stack([torch.as_tensor(s[k]).float().cpu() for s in window if k in s]).mean())
                for k in sorted({k for s in window for k in s})}
    assert loop._window_means(window) == expected
