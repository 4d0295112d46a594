"""The flex backend on the CPU: its block layout against brute force, its compiled graphs
(inductor forward; AOT-traced forward and backward with the bias gradient) against the
reference, and the guarantees around compiling (no recompiles, a bounded number of graphs)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from stylenat.models import build_generator, get_preset
from stylenat.nn import flex
from stylenat.nn.attention import _axis_dense, choose_backend, flex_block_mask, flex_layout_stats, na2d, na_backend
from stylenat.nn.flex import FlexGraphLimitError, FlexRecompileError, flex_compile_backend, flex_plan

from .flex_helpers import cpu_backward_allowed, dense_backend
from .test_attention import _pair, oracle, random_case


def layer_shapes(preset: str) -> list[tuple[int, int, int, int, int]]:
    """(resolution, heads, head_dim, kernel, dilation) of every NA layer shape of a preset, once each."""
    g, _ = get_preset(preset)
    return sorted({(l["resolution"], l["heads"], l["head_dim"], l["kernel"], l["dilation"]) for l in g.attention_layers()})


# ---- the block layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["ffhq256", "ffhq1024", "church256"])
def test_computed_scores_within_4x_of_needed(preset):
    for r, _, _, k, d in layer_shapes(preset):
        stats = flex_layout_stats(r, r, k, d)
        # brute-force count of what NA needs: k*k keys per query
        assert stats["needed"] == r * r * k * k
        assert stats["ratio"] <= 4.0, (r, k, d, stats)


def _decode(num: torch.Tensor, idx: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    dense = torch.zeros(rows, cols, dtype=torch.bool)
    for row in range(rows):
        dense[row, idx[0, 0, row, : int(num[0, 0, row])].long()] = True
    return dense


@pytest.mark.parametrize("seed", range(10))
def test_block_mask_is_exact(seed):
    """Every (query slot, key slot) pair against the definition; blocks against their content."""
    rng = random.Random(seed)
    h, w = rng.randint(4, 40), rng.randint(4, 40)
    ky = rng.choice([k for k in (1, 3, 5, 7) if k <= h])
    kx = rng.choice([k for k in (1, 3, 5, 7) if k <= w])
    ks, dil = (ky, kx), (rng.randint(1, h // ky), rng.randint(1, w // kx))
    plan = flex_plan(h, w, ks, dil, "cpu", granule=rng.choice([16, 64]))
    bm = plan.block_mask
    qb, kb = bm.BLOCK_SIZE
    in_y, _ = _axis_dense(h, ks[0], dil[0])
    in_x, _ = _axis_dense(w, ks[1], dil[1])
    allowed = (in_y[:, None, :, None] & in_x[None, :, None, :]).reshape(h * w, h * w)
    want = allowed[plan.q_perm][:, plan.kv_perm] & (plan.kv_grp >= 0)[None, :]
    qi = torch.arange(len(plan.q_perm))[:, None].expand(-1, len(plan.kv_perm))
    ki = torch.arange(len(plan.kv_perm))[None, :].expand(len(plan.q_perm), -1)
    assert torch.equal(bm.mask_mod(0, 0, qi, ki), want)
    # every pixel's own query is a slot that is a copy of it; padding slots repeat real queries
    assert torch.equal(plan.q_perm[plan.q_inv], torch.arange(h * w))
    # blocks: non-empty exactly where some pair is allowed, full exactly where every pair is
    n_q, n_kv = len(plan.q_perm) // qb, len(plan.kv_perm) // kb
    per_block = want.reshape(n_q, qb, n_kv, kb)
    partial = _decode(bm.kv_num_blocks, bm.kv_indices, n_q, n_kv)
    full = _decode(bm.full_kv_num_blocks, bm.full_kv_indices, n_q, n_kv)
    assert torch.equal(partial | full, per_block.any(3).any(1))
    assert not (partial & full).any()
    assert (per_block.all(3).all(1) | ~full).all()  # a full block really is full
    # the transposed lists (backward) describe the same blocks
    assert torch.equal(_decode(bm.q_num_blocks, bm.q_indices, n_kv, n_q), partial.T)
    assert torch.equal(_decode(bm.full_q_num_blocks, bm.full_q_indices, n_kv, n_q), full.T)
    # the reported ratio counts the blocks the kernel computes
    assert plan.layout.computed == int((partial | full).sum()) * qb * kb
    assert plan.layout.needed == int(allowed.sum())


def test_block_mask_at_1024_is_built_from_the_layout():
    # 1024x1024 = 2**20 tokens: a dense mask would be 2**40 entries. Built from closed forms, the
    # block lists hold a few entries per block row.
    for dilation in (1, 128):
        bm = flex_block_mask(1024, 1024, 7, dilation)
        q_len, kv_len = bm.seq_lengths
        assert q_len >= 1024 * 1024 and kv_len >= 1024 * 1024
        n_q = q_len // bm.BLOCK_SIZE[0]
        assert bm.kv_indices.shape[-2] == n_q and bm.kv_indices.shape[-1] <= 64
        assert bm.q_indices.numel() <= 64 * (kv_len // bm.BLOCK_SIZE[1])


# ---- compiled graphs against the reference --------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_traced_forward_and_backward_match_oracle(seed, fresh_flex):
    """The AOT-traced graphs inductor would compile (forward, backward, bias gradient) run eagerly."""
    rng = random.Random(200 + seed)
    q, k, v, kernel, dil, rpb = random_case(rng, with_rpb=seed % 4 != 0)
    scale = q.shape[-1] ** -0.5
    grad = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, rpb)]
    want = oracle(*leaves[:3], _pair(kernel), _pair(dil), leaves[3], scale)
    want.backward(grad)
    got_leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, rpb)]
    with flex_compile_backend(dense_backend()), cpu_backward_allowed():
        got = na2d(*got_leaves[:3], kernel, dil, rpb=got_leaves[3], backend="flex")
    got.backward(grad)
    assert (got - want).abs().max() < 1e-10
    for name, a, b in zip("q k v rpb".split(), got_leaves, leaves):
        if a is not None:
            assert (a.grad - b.grad).abs().max() < 1e-10, name


def test_one_graph_serves_every_batch_of_two_or_more(fresh_flex):
    backend = dense_backend()
    g = torch.Generator().manual_seed(0)
    rpb = torch.randn(2, 13, 13, generator=g, dtype=torch.float64)
    with flex_compile_backend(backend), torch.no_grad():
        for batch in (2, 3, 5):
            q, k, v = (torch.randn(batch, 2, 16, 16, 4, generator=g, dtype=torch.float64) for _ in range(3))
            out = na2d(q, k, v, 7, 2, rpb=rpb, backend="flex")
            assert (out - na2d(q, k, v, 7, 2, rpb=rpb, backend="reference")).abs().max() < 1e-10
        assert flex.flex_graph_count() == 1
        q1 = torch.randn(1, 2, 16, 16, 4, dtype=torch.float64)
        na2d(q1, q1, q1, 7, 2, rpb=rpb, backend="flex")
        assert flex.flex_graph_count() == 2  # batch 1 is its own graph (dynamo specializes size 1)


def test_a_recompile_is_an_error(fresh_flex, monkeypatch):
    # Pretend the variant key missed the dtype: the second call must raise, not recompile.
    monkeypatch.setattr(flex, "_variant", lambda q, k, v, rpb: ("same",) * 3 + ((False,) * 4, rpb is not None))
    with flex_compile_backend(dense_backend()), torch.no_grad():
        x = torch.randn(2, 1, 8, 8, 4, dtype=torch.float64)
        na2d(x, x, x, 3, backend="flex")
        y = x.float()
        with pytest.raises(FlexRecompileError, match="would recompile"):
            na2d(y, y, y, 3, backend="flex")


def test_graph_limit(fresh_flex, monkeypatch):
    monkeypatch.setattr(flex, "FLEX_GRAPH_LIMIT", 1)
    with flex_compile_backend(dense_backend()), torch.no_grad():
        x = torch.randn(2, 1, 8, 8, 4, dtype=torch.float64)
        na2d(x, x, x, 3, backend="flex")
        na2d(x, x, x, 3, backend="flex")  # the same graph again
        with pytest.raises(FlexGraphLimitError, match="more than 1 compiled"):
            na2d(x, x, x, 5, backend="flex")


def test_cpu_flex_is_inference_only():
    x = torch.randn(1, 1, 8, 8, 16, requires_grad=True)
    with pytest.raises(ValueError, match="inference only"):
        na2d(x, x, x, 3, backend="flex")
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"), torch.no_grad():
        na2d(x.double(), x.double(), x.double(), 3, backend="flex")


def test_forcing_a_backend():
    x = torch.randn(1, 1, 32, 32, 16)
    assert choose_backend(x) == "tiled"
    with na_backend("flex"):
        assert choose_backend(x) == "flex"
        with na_backend("reference"):
            assert choose_backend(x) == "reference"
        assert choose_backend(x) == "flex"
    assert choose_backend(x) == "tiled"
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        with na_backend("fast"):
            pass
    code = "from stylenat.nn.attention import choose_backend, forced_backend; import torch; " \
           "print(forced_backend(), choose_backend(torch.empty(1, 1, 4, 4, 8)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "STYLENAT_NA_BACKEND": "reference"})
    assert run.stdout.split() == ["reference", "reference"], run.stderr
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "STYLENAT_NA_BACKEND": "fastest"})
    assert run.returncode != 0 and "STYLENAT_NA_BACKEND: unknown attention backend 'fastest'" in run.stderr


# ---- inductor on the CPU at the real shapes -------------------------------------------------------


@pytest.fixture(scope="module")
def inductor_units():
    flex.reset_flex_graphs()
    yield
    flex.reset_flex_graphs()


def test_inductor_forward_every_ffhq256_layer_shape(inductor_units):
    """Compiled flex (inductor's CPU kernel) at every NA layer shape of ffhq256, batch 1, real heads."""
    g = torch.Generator().manual_seed(0)
    for r, heads, head_dim, k, d in layer_shapes("ffhq256"):
        q, kk, v = (torch.randn(1, heads, r, r, head_dim, generator=g) for _ in range(3))
        rpb = torch.randn(heads, 2 * k - 1, 2 * k - 1, generator=g)
        with torch.no_grad():
            got = na2d(q, kk, v, k, d, rpb=rpb, backend="flex")
            want = na2d(q, kk, v, k, d, rpb=rpb, backend="tiled")
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, (r, k, d, err)


def test_ffhq256_generator_with_flex_forced_equals_tiled(inductor_units):
    torch.manual_seed(0)
    g = build_generator("ffhq256").eval()
    z = torch.randn(1, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = g(z)
        with na_backend("flex"):
            got = g(z)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert flex.flex_graph_count() <= len(layer_shapes("ffhq256")), flex.flex_graphs()  # the layer test's graphs


def test_global_settings_get_their_own_graphs(fresh_flex):
    # dynamo guards every frame on TF32, threads, autocast...: changing one between calls must
    # compile another function (or nothing), never trip the recompile error.
    x = torch.randn(2, 1, 8, 8, 16)
    before = torch.backends.cuda.matmul.allow_tf32
    with flex_compile_backend(dense_backend()), torch.no_grad():
        na2d(x, x, x, 3, backend="flex")
        try:
            torch.backends.cuda.matmul.allow_tf32 = not before
            na2d(x, x, x, 3, backend="flex")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        with torch.autocast("cpu", dtype=torch.bfloat16):
            na2d(x, x, x, 3, backend="flex")  # autocast is off inside the call: the first graph again
        na2d(x.bfloat16(), x.bfloat16(), x.bfloat16(), 3, backend="flex")
    assert flex.flex_graph_count() == 3, flex.flex_graphs()
