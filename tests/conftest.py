"""Shared test set-up: the slow/gpu markers and the official fixtures beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def official_fixture_dir() -> Path | None:
    """../shared/fixtures/official beside the project root, or $STYLENAT_OFFICIAL_FIXTURES."""
    env = os.environ.get("STYLENAT_OFFICIAL_FIXTURES")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def official_dir() -> Path:
    path = official_fixture_dir()
    if path is None:
        pytest.skip("official fixtures not found (../shared/fixtures/official or $STYLENAT_OFFICIAL_FIXTURES)")
    return path
