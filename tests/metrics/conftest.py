"""Fixtures for the metrics tests: a random-weight Inception file of the real layout, tiny image sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.metrics.inception import FIDInception


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the FID Inception layout whose activations stay near unit scale.

    He-normal convs and BN statistics near (0, 1) keep 90-odd layers from vanishing, so tests
    comparing features compare real numbers, not zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    state = FIDInception().state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * (2 / fan_in) ** 0.5
        elif key.endswith(("bn.running_var", "bn.weight")):
            state[key] = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.endswith(("bn.running_mean", "bn.bias")) or key.startswith("fc."):
            state[key] = 0.1 * torch.randn(value.shape, generator=gen)
    return state


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> str:
    """Path of a random-weight file laid out like pt_inception-2015-12-05 (verify=False to load)."""
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(random_inception_state(), path)
    return str(path)


def write_images(folder, count: int, size: int | tuple[int, int] = 8, seed: int = 0) -> list[np.ndarray]:
    """Write `count` random RGB PNGs of `size` (a side, or (height, width)) into `folder`; returns them
    as HWC uint8 arrays in name order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(count)]
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")
    return arrays


class ChannelMoments:
    """A cheap stand-in for Inception: features = per-channel mean and mean square; counts calls."""

    cache_key = "channel-moments-v1"

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += len(images)
        x = images.double() / 255
        return torch.cat([x.mean(dim=(2, 3)), (x ** 2).mean(dim=(2, 3))], 1)


def channel_moments_np(arrays: list[np.ndarray]) -> np.ndarray:
    """The same features as ChannelMoments, computed with numpy from HWC arrays."""
    x = np.stack(arrays).astype(np.float64) / 255
    return np.concatenate([x.mean(axis=(1, 2)), (x ** 2).mean(axis=(1, 2))], 1)


@pytest.fixture
def image_writer():
    """write_images(folder, count, size=8, seed=0) -> the written images as HWC arrays."""
    return write_images


@pytest.fixture
def extractor() -> ChannelMoments:
    """A fresh call-counting stand-in extractor."""
    return ChannelMoments()


@pytest.fixture
def extractor_oracle():
    """numpy version of the stand-in extractor: list of HWC arrays -> features [N, 6]."""
    return channel_moments_np


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache dir and no $STYLENAT_INCEPTION from the environment."""
    monkeypatch.setenv("STYLENAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STYLENAT_INCEPTION", raising=False)
    return tmp_path / "cache"
