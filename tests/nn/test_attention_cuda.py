"""The CUDA path (flex_attention, compiled) against the float64 oracle; skipped without a GPU."""

from __future__ import annotations

import random

import pytest
import torch

from stylenat.nn.attention import choose_backend, na2d

from .test_attention import _pair, oracle, random_case

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("seed", range(4))
def test_flex_cuda_matches_oracle_with_gradients(dtype, tol, seed):
    q, k, v, kernel, dil, rpb = random_case(random.Random(seed), with_rpb=True)
    grad_out = torch.randn_like(q)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
    want = oracle(*leaves64[:3], _pair(kernel), _pair(dil), leaves64[3], q.shape[-1] ** -0.5)
    want.backward(grad_out)
    leaves = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v, rpb)]
    assert choose_backend(leaves[0]) == "flex"
    got = na2d(*leaves[:3], kernel, dil, rpb=leaves[3])
    got.backward(grad_out.to("cuda", dtype))
    assert rel(got.cpu(), want) < tol
    for name, a, b in zip("q k v rpb".split(), leaves, leaves64):
        assert rel(a.grad.cpu(), b.grad) < tol, name


def test_ffhq_layer_shape_cuda():
    # A real generator shape: 64x64, 8 heads, head_dim 32, kernel 7, dilation 8.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 64, 64, 32, generator=g) for _ in range(3))
    rpb = torch.randn(8, 13, 13, generator=g)
    want = na2d(q.double(), k.double(), v.double(), 7, 8, rpb=rpb.double(), backend="tiled")
    got = na2d(q.cuda(), k.cuda(), v.cuda(), 7, 8, rpb=rpb.cuda())
    assert rel(got.cpu(), want) < 1e-4
