"""Configs, presets and parameter counts against the official numbers (paper and official code)."""

from __future__ import annotations

import json

import pytest
import torch

from stylenat.models import PRESETS, DiscriminatorConfig, GeneratorConfig, build_discriminator, build_generator, get_preset

# Confirmed by building the official code (the paper's table, the fixtures' official_state_shapes.json).
OFFICIAL_PARAMS = {
    "ffhq256": (48_921_000, 26_211_585),
    "ffhq1024": (49_452_934, 27_736_641),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_parameter_counts(name):
    with torch.device("meta"):
        g, d = build_generator(name), build_discriminator(name)
    assert (_count(g), _count(d)) == OFFICIAL_PARAMS[name]


def test_church_uses_pyramid_dilations_and_min_heads_8():
    g, _ = get_preset("church256")
    assert g.dilations[-1] == (1, 2, 4, 8, 16, 32) and g.dilations[3] == (1, 2, 4)  # 32x32: [1, 2, 4]
    assert min(g.heads) == 8


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_json_round_trip(name):
    g, d = get_preset(name)
    assert GeneratorConfig.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    assert DiscriminatorConfig.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def _tiny_with(**changes) -> dict:
    return {**get_preset("tiny")[0].to_dict(), **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"resolution": 36}, "36x36 is not a model size"),
        ({"resolution": [24, 64]}, r"64x24 is not a model size.*nearest"),
        ({"channels": [64, 64, 32]}, "one entry per stage"),
        ({"kernels": [[4], [5], [5, 5], [9, 9]], "dilations": [[1], [1], [1, 2], [1, 4]]}, "does not fit"),
        ({"kernels": [[4], [4], [5, 5], [3, 3]]}, "does not fit"),
        ({"kernels": [[4], [5], [5], [3, 3]]}, "one entry per head group"),
        ({"heads": [2, 2, 3, 2]}, "heads"),
        ({"heads": [2, 2, 2, 1]}, "head groups"),
        ({"channels": [64, 64, 32, 6], "heads": [2, 2, 2, 1]}, "position codes"),
    ],
)
def test_impossible_configs_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        GeneratorConfig.from_dict(_tiny_with(**changes))


def test_unknown_fields_and_presets_raise():
    with pytest.raises(ValueError, match=r"unknown GeneratorConfig field\(s\)"):
        GeneratorConfig.from_dict(_tiny_with(depth=3))
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("ffhq512")


def test_discriminator_too_small_raises():
    with pytest.raises(ValueError, match="8x8 is not a model size.*at least 3 stages"):
        DiscriminatorConfig(resolution=8, channels=(64, 32))
