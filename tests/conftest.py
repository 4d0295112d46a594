"""Shared test set-up: the slow/gpu markers and where the official parity fixtures are."""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from .http_server import FileServer


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


COMMITTED_OFFICIAL_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"


def official_fixture_dir() -> Path:
    """The official parity fixtures: $STYLENAT_OFFICIAL_FIXTURES, then ../shared/fixtures/official
    beside the project root (the full set), then the compact copies committed in tests/fixtures/official.

    An explicitly set $STYLENAT_OFFICIAL_FIXTURES that is not a directory is an error rather than a
    silent fall-back, so a typo cannot pass the suite on other fixtures than the ones asked for.
    """
    env = os.environ.get("STYLENAT_OFFICIAL_FIXTURES")
    if env:
        if not Path(env).is_dir():
            raise pytest.UsageError(f"$STYLENAT_OFFICIAL_FIXTURES={env!r} is not a directory")
        return Path(env)
    shared = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official"
    return shared if shared.is_dir() else COMMITTED_OFFICIAL_FIXTURES


def official_tags(path: Path) -> list[str]:
    """The fixture tags in ``path``: one per ``<tag>_meta.json`` (with its checkpoint and expected)."""
    return sorted(p.name[: -len("_meta.json")] for p in path.glob("*_meta.json"))


def official_shapes(path: Path) -> dict:
    """official_state_shapes.json, or its gzip-compressed copy (the committed compact set)."""
    plain = path / "official_state_shapes.json"
    if plain.is_file():
        return json.loads(plain.read_text())
    return json.loads(gzip.decompress((path / "official_state_shapes.json.gz").read_bytes()))


def load_official_archive(path: Path) -> dict:
    """An official checkpoint as stored ({'g', 'd', 'g_ema', 'args'}, some may be dropped)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return official_fixture_dir()


@pytest.fixture(scope="session")
def official_tag(official_dir) -> str:
    """One checkpoint tag for the tests that need just one: small32_hydra_uneven (the smallest,
    with a discriminator) where present, else the first tag found."""
    tags = official_tags(official_dir)
    assert tags, f"no <tag>_meta.json in {official_dir}"
    return "small32_hydra_uneven" if "small32_hydra_uneven" in tags else tags[0]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh $STYLENAT_CACHE, no offline switch, mirror or user registry, retries without pauses,
    and the registry's register() entries restored afterwards."""
    from stylenat import _download, registry

    for name in ("STYLENAT_OFFLINE", "HF_HUB_OFFLINE", "STYLENAT_MIRROR", "STYLENAT_REGISTRY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STYLENAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_download, "BACKOFF_S", (0, 0, 0))
    before = dict(registry._registered)
    yield tmp_path / "cache"
    registry._registered.clear()
    registry._registered.update(before)


@pytest.fixture
def server():
    """A loopback HTTP file server (tests/http_server.py), stopped afterwards."""
    srv = FileServer().start()
    yield srv
    srv.stop()
