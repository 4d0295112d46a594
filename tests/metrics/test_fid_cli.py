"""`stylenat fid`, evaluate() and the generator side, with a cheap stand-in for Inception."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stylenat.metrics.registry as registry_module
from stylenat.cli import main
from stylenat.metrics.distances import frechet_distance
from stylenat.metrics.features import generator_features
from stylenat.models import seeds_to_z


@pytest.fixture
def stand_in_inception(monkeypatch, extractor):
    """Make evaluate() use the call-counting stand-in instead of the real weights."""
    monkeypatch.setattr(registry_module, "load_inception", lambda *a, **k: extractor)
    return extractor


def test_cli_without_weights_says_where_to_get_them(tmp_path, image_writer, capsys):
    image_writer(tmp_path / "a", 2)
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "a"), "--resolution", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stylenat fid: error: Inception weights not found")
    assert "releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth" in err and "--inception" in err


def test_cli_folder_against_folder(tmp_path, image_writer, extractor_oracle, stand_in_inception, capsys):
    fake = image_writer(tmp_path / "fake", 6, seed=1)
    real = image_writer(tmp_path / "real", 7, seed=2)
    assert main(["fid", str(tmp_path / "fake"), str(tmp_path / "real"), "--resolution", "8", "--num", "5",
                 "--kid", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    f, r = extractor_oracle(fake[:5]), extractor_oracle(real)
    expected = frechet_distance(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    assert out.startswith(f"FID {expected:.4f} (5 vs 7 images), KID ")


def test_two_image_sets_need_a_resolution(tmp_path, image_writer, stand_in_inception, capsys):
    image_writer(tmp_path / "a", 2)
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "a")]) == 2
    assert "--resolution" in capsys.readouterr().err


def test_generator_features_use_one_latent_per_seed(extractor):
    from stylenat.models import build_generator, model_to_uint8

    torch.manual_seed(0)
    g = build_generator("tiny").train()
    stats = generator_features(g, 3, batch=2, seed=5, extractor=extractor, keep_features=True, progress=False)
    assert g.training and extractor.calls == 2  # mode restored; batches of 2 + 1
    g.eval()
    with torch.no_grad():
        images = model_to_uint8(g(seeds_to_z([5, 6, 7], g.style_dim)), g.config)
    np.testing.assert_allclose(stats.features, extractor(images).numpy(), rtol=1e-6, atol=1e-6)
