"""The data layer's size helpers are the models' (which it may not import): same results, same errors,
and the same rule for which sizes a model can have, against a brute-force list of the allowed sizes."""

from __future__ import annotations

import pytest

from stylenat import _size as sizes
from stylenat.errors import ConfigError
from stylenat.models import config as model_config

INPUTS = [1, 16, 48, 256, "64", " 512x384 ", "32X16", "16×32", "7 x 9", "16x16", (16, 32), [384, 512], (8, 8), [5, 5],
          0, -3, "0x4", "4x0", "", "x", "12y", "1.5", 1.5, None, True, (True, 4), (4,), (4, 4, 4), [4, "8"], (0, 4),
          {"h": 1}]


def outcome(fn, value):
    try:
        return "ok", fn(value, "--size")
    except ConfigError as exc:
        return "error", str(exc)


@pytest.mark.parametrize("value", INPUTS, ids=repr)
def test_parse_size_is_the_models(value):
    assert outcome(sizes.parse_size, value) == outcome(model_config.parse_size, value)


def test_text_and_shape_are_width_first_text_of_height_first_pairs():
    for value in [16, (16, 32), (384, 512), (9, 7)]:
        assert sizes.size_text(value) == model_config.size_text(value)
        assert sizes.as_shape(value) == model_config.as_shape(value)
    assert sizes.parse_size("32x16") == (16, 32) and sizes.size_text((16, 32)) == "32x16"
    assert sizes.size_flag(64) == "64" and sizes.size_flag((16, 32)) == "32x16"
    if hasattr(model_config, "size_flag"):
        assert [sizes.size_flag(v) for v in (64, (16, 32))] == [model_config.size_flag(v) for v in (64, (16, 32))]


def test_model_sizes_match_a_brute_force_list_and_stage_shapes():
    allowed = {(bh << s, bw << s) for s in range(6) for bh in range(1, 8) for bw in range(1, 8) if max(bh, bw) >= 4}
    for h in range(1, 100):
        for w in range(1, 100):
            size = sizes.parse_size((h, w))
            assert sizes.is_model_size(size) == ((h, w) in allowed), (h, w)
    for size in [(16, 32), (32, 16), (384, 512), (64, 96), 48, 64, 4, (30, 20), 100, (3, 3), 1]:
        try:
            model_config.stage_shapes(size, min_stages=1)
            ok = True
        except ConfigError:
            ok = False
        assert sizes.is_model_size(size) == ok, size
