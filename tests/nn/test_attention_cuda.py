"""CUDA paths (compiled flex_attention, tiled) against the float64 oracle; skipped without a GPU."""

from __future__ import annotations

import random

import pytest
import torch

from stylenat.nn.attention import choose_backend, na2d

from .test_attention import _pair, oracle

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cuda_case(seed: int):
    """Random shapes flex's kernels cover: maps >= 16x16, head_dim 16 or 32, per-axis settings."""
    rng = random.Random(seed)
    h, w = rng.randint(16, 40), rng.randint(16, 40)
    ky, kx = rng.choice([3, 5, 7]), rng.choice([3, 5, 7])
    dy, dx = rng.randint(1, h // ky), rng.randint(1, w // kx)
    heads, d = rng.randint(1, 3), rng.choice([16, 32])
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, h, w, d, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(heads, 2 * ky - 1, 2 * kx - 1, generator=g, dtype=torch.float64)
    return q, k, v, (ky, kx), (dy, dx), rpb


@pytest.mark.parametrize("backend", ["flex", "tiled"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("seed", range(4))
def test_cuda_matches_oracle_with_gradients(backend, dtype, tol, seed):
    q, k, v, kernel, dil, rpb = cuda_case(seed)
    grad_out = torch.randn_like(q)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
    want = oracle(*leaves64[:3], _pair(kernel), _pair(dil), leaves64[3], q.shape[-1] ** -0.5)
    want.backward(grad_out)
    leaves = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v, rpb)]
    got = na2d(*leaves[:3], kernel, dil, rpb=leaves[3], backend=backend)
    got.backward(grad_out.to("cuda", dtype))
    assert rel(got.cpu(), want) < tol
    for name, a, b in zip("q k v rpb".split(), leaves, leaves64):
        assert rel(a.grad.cpu(), b.grad) < tol, name


def test_auto_backend_on_cuda():
    big = torch.empty(1, 2, 32, 32, 32, device="cuda")
    assert choose_backend(big) == "flex"
    assert choose_backend(big[..., :8]) == "tiled"  # head_dim below flex's kernels
    assert choose_backend(torch.empty(1, 2, 4, 4, 32, device="cuda")) == "tiled"
    assert choose_backend(big.double()) == "tiled"


def test_ffhq_layer_shape_cuda():
    # A real generator shape: 64x64, 8 heads, head_dim 32, kernel 7, dilation 8.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 64, 64, 32, generator=g) for _ in range(3))
    rpb = torch.randn(8, 13, 13, generator=g)
    want = na2d(q.double(), k.double(), v.double(), 7, 8, rpb=rpb.double(), backend="tiled")
    got = na2d(q.cuda(), k.cuda(), v.cuda(), 7, 8, rpb=rpb.cuda())
    assert rel(got.cpu(), want) < 1e-4


def test_deterministic_mode_picks_the_tiled_backend():
    q = torch.randn(1, 2, 32, 32, 32, device="cuda")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert choose_backend(q) == "tiled"
    finally:
        torch.use_deterministic_algorithms(before)
