"""NA at the layer shapes of rectangular family models (W != H), against the oracle written from
the definition (test_attention.py): kernels and dilations per axis, full attention along one axis
only (an even kernel equal to that axis), on every backend."""

from __future__ import annotations

import pytest
import torch

from stylenat.models import get_preset
from stylenat.nn.attention import na2d
from stylenat.nn.flex import flex_compile_backend

from .flex_helpers import cpu_backward_allowed, dense_backend
from .test_attention import _pair, assert_close, oracle, run_with_grads


def _layers(family: str, size: str, max_tokens: int = 200):
    g_cfg, _ = get_preset(family, size, cbase=512, cmax=32)
    seen, out = set(), []
    for layer in g_cfg.attention_layers():
        key = (layer["shape"], layer["kernel"], layer["dilation"])
        h, w = layer["shape"]
        if key not in seen and h * w <= max_tokens:
            seen.add(key)
            out.append(pytest.param(*key, id=f"{family}{size}-{w}x{h}-k{layer['kernel']}-d{layer['dilation']}"))
    return out


CASES = _layers("ffhq", "64x32") + _layers("church", "48x64") + _layers("ffhq", "48x32")


def test_the_cases_cover_per_axis_settings():
    # Full attention along one axis only, different dilations per axis, and portrait maps.
    kernels = [c.values[1] for c in CASES]
    dilations = [c.values[2] for c in CASES]
    shapes = [c.values[0] for c in CASES]
    assert any(isinstance(k, tuple) and k[0] % 2 == 0 and k[0] != k[1] for k in kernels)
    assert any(isinstance(d, tuple) and d[0] != d[1] for d in dilations)
    assert any(h > w for h, w in shapes) and any(h < w for h, w in shapes)


def _case(shape, kernel, seed=0):
    h, w = shape
    ky, kx = _pair(kernel)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, h, w, 3, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(2, 2 * ky - 1, 2 * kx - 1, generator=g, dtype=torch.float64)
    return q, k, v, rpb


@pytest.mark.parametrize("shape, kernel, dilation", CASES)
def test_tiled_matches_the_oracle_at_rectangular_layers(shape, kernel, dilation):
    q, k, v, rpb = _case(shape, kernel)
    grad = torch.randn_like(q)
    want, want_grads = run_with_grads(lambda q, k, v, r: oracle(q, k, v, _pair(kernel), _pair(dilation), r, 0.5),
                                      q, k, v, rpb, grad)
    for backend in ("tiled", "reference"):
        got, got_grads = run_with_grads(lambda q, k, v, r: na2d(q, k, v, kernel, dilation, rpb=r, scale=0.5, backend=backend),
                                        q, k, v, rpb, grad)
        assert_close(got, want, what=f"{backend} output")
        for name, a, b in zip(["q", "k", "v", "rpb"], got_grads, want_grads):
            assert_close(a, b, what=f"{backend} grad {name}")


@pytest.mark.parametrize("shape, kernel, dilation", CASES[1::3])
def test_flex_matches_the_oracle_at_rectangular_layers(shape, kernel, dilation, fresh_flex):
    # flex's traced forward and backward graphs (the bias gradient included), run densely in float64.
    q, k, v, rpb = _case(shape, kernel, seed=1)
    grad = torch.randn_like(q)
    want, want_grads = run_with_grads(lambda q, k, v, r: oracle(q, k, v, _pair(kernel), _pair(dilation), r, 0.5),
                                      q, k, v, rpb, grad)
    with flex_compile_backend(dense_backend()), cpu_backward_allowed():
        got, got_grads = run_with_grads(lambda q, k, v, r: na2d(q, k, v, kernel, dilation, rpb=r, scale=0.5, backend="flex"),
                                        q, k, v, rpb, grad)
    assert_close(got, want, what="flex output")
    for name, a, b in zip(["q", "k", "v", "rpb"], got_grads, want_grads):
        assert_close(a, b, what=f"flex grad {name}")
