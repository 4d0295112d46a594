"""Shared set-up of the explorer tests: a tiny generator, saved in the project format and loaded back."""

from __future__ import annotations

import pytest
import torch

from stylenat.models import build_generator, resolve_model
from tests.test_sampling import save_tiny_model


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def g(model_file):
    return resolve_model(model_file, device="cpu")


@pytest.fixture(scope="session")
def cond_g(g):
    """A class-conditional tiny generator with two named classes, "cat" and "dog" (random weights)."""
    torch.manual_seed(1)
    cond = build_generator(g.config.replace(num_classes=2, class_names=("cat", "dog"))).eval()
    for p in cond.synthesis.to_rgbs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cond.compute_class_w_avg(n=16)
    return cond


@pytest.fixture(scope="session")
def rect_g():
    """A 32x16 generator (32 wide, 16 high; the ffhq family, narrowed), random weights with contrast."""
    from stylenat.models import get_preset

    with torch.random.fork_rng():
        torch.manual_seed(2)
        rect = build_generator(get_preset("ffhq", "32x16", cbase=512, cmax=32)[0]).eval()
        for p in rect.synthesis.to_rgbs.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return rect
