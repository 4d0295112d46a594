"""The project model file: safetensors + JSON, round trip with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch

import stylenat
from stylenat.models import build_discriminator, build_generator, save_model
from stylenat.models.io import read_model_file


def test_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    g, d = build_generator("tiny"), build_discriminator("tiny")
    g.w_avg.normal_()
    d.train()(torch.randn(4, 3, 32, 32))  # one power iteration: u, v differ from their init
    path = save_model(tmp_path / "m.safetensors", {"g_ema": g, "d": d}, g.config, d.config, extra={"step": 7})
    z, x = torch.randn(2, g.style_dim), torch.randn(4, 3, 32, 32)
    g2, d2 = stylenat.load(path), stylenat.load(path, which="d")
    with torch.no_grad():
        assert torch.equal(g2(z, truncation_psi=0.5), g.eval()(z, truncation_psi=0.5))
        assert torch.equal(d2(x), d.eval()(x))
    assert g2.config == g.config and not g2.training
    meta, _ = read_model_file(path)
    assert meta["extra"] == {"step": 7} and meta["modules"] == ["g_ema", "d"]


def test_file_is_plain_safetensors_with_json_header(tmp_path):
    g = build_generator("tiny")
    path = save_model(tmp_path / "m.safetensors", {"g": g}, g.config)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "stylenat-model/1"
    assert "g.mapping.w_avg" in header


def test_load_errors(tmp_path):
    g = build_generator("tiny")
    path = save_model(tmp_path / "m.safetensors", {"g": g}, g.config)
    with pytest.raises(ValueError, match="holds modules"):
        stylenat.load(path)
    with pytest.raises(FileNotFoundError):
        stylenat.load(tmp_path / "nope.safetensors")
