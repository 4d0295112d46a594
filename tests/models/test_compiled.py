"""The compiled generator (stylenat.models.compiled) and `stylenat bench --mode fast`, on the CPU.

Each inductor compile of the tiny generator costs seconds on 2 cores (about 10 s with freezing and
inductor's kernel cache warm, 50 s cold), so this file compiles it twice: g(z) here and in the bench
subprocess, at the same shapes so the second reuses the first's kernels.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from stylenat.errors import ConfigError
from stylenat.models import build_generator
from stylenat.models.compiled import compile_generator, compile_settings, default_compile_mode

# Compiled and eager differ by float32 rounding only: inductor fuses and reorders the reductions
# (AdaIN and LayerNorm statistics, softmax), computes the upsampling as gathers (models/generator.py)
# and with freezing runs the linears through oneDNN. Measured: 3e-7 of the largest output value
# here (ffhq256, random weights: 3e-6); the bound leaves room.
RTOL = 1e-5


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    g = build_generator("tiny").eval()
    # The official init scales ToRGB by 0.02 (images start near the mean); scale the outputs up to
    # O(1) so the tolerance is not met just because everything is near zero.
    for m in g.synthesis.to_rgbs:
        nn.init.xavier_normal_(m.conv.weight)
    return g


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = ref.abs().max().item()
    assert scale > 0.1
    err = (out - ref).abs().max().item()
    assert err <= RTOL * scale, f"compiled differs from eager by {err:.3g} (largest value {scale:.3g})"


def test_compiled_generator_equals_eager():
    g = _tiny()
    # Batch 1, like the bench test: the same kernels, so a cold inductor cache compiles them once
    # (cold, this test takes about 50 s on 2 cores; with the cache warm about 10 s).
    z = torch.randn(1, g.style_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = g(z)
    assert compile_generator(g) is g
    assert compile_settings(g) == {"backend": "inductor", "mode": "default", "freeze": True, "dynamic": False,
                                   "cudagraphs": False}
    with torch.no_grad():
        _close(g(z), ref)  # the whole forward: one graph
        # Frozen: every linear runs prepacked (oneDNN/MKL), none as a plain addmm/mm of the weights.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            g(z)
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::addmm", "aten::mm", "aten::linear"}, sorted(ops)
    # g.synthesis (what sampling calls) is compiled the same way, as its own graph; calling it here
    # would cost another compile (about 20 s cold), so only check that it is.
    assert g.synthesis._compiled_call_impl is not None
    # In place: the state dict keeps its names (no _orig_mod. prefix), so saving is unchanged.
    assert all(not k.startswith("_orig_mod") for k in g.state_dict())


def test_whole_forward_is_one_graph():
    # What compile_generator relies on: after its eager warm-up pass (attention layout caches
    # filled) dynamo traces the generator without a graph break. Tracing only, no inductor.
    g = _tiny()
    with torch.no_grad():
        g.synthesis(torch.zeros(1, g.num_ws, g.style_dim))
        explained = torch._dynamo.explain(g)(torch.randn(1, g.style_dim))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compile_generator_rejects_bad_modes():
    g = _tiny()
    assert default_compile_mode("cpu") == "default" and default_compile_mode("cuda") == "reduce-overhead"
    with pytest.raises(ConfigError, match="unknown compile mode"):
        compile_generator(g, "fastest", warm_up=False)
    with pytest.raises(ConfigError, match="CUDA graphs"):
        compile_generator(g, "reduce-overhead", warm_up=False)
    assert compile_settings(g) is None


@pytest.mark.slow  # 35 s of inductor compile; CI's gpu_check dry run runs `stylenat bench tiny --mode fast` too
def test_cli_bench_fast_mode(tmp_path):
    # A subprocess: the fast mode changes process-wide state (glibc's malloc settings, dynamo's caches).
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "stylenat", "bench", "tiny", "--device", "cpu", "--mode", "fast", "--iters", "2",
           "--warmup", "1", "--batch", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "fast" and report["dtype"] == "float32"
    c = report["compile"]
    assert c["backend"] == "inductor" and c["mode"] == "default" and c["freeze"] is True and c["setup_s"] > 0
    r = report["results"][0]
    assert r["batch"] == 1 and r["warmup"] == 1 and r["iters"] == 2
    assert r["first_pass_ms"] > r["ms_per_pass_median"] and r["compile_s"] > 0
    assert r["compile_s"] == pytest.approx((r["first_pass_ms"] - r["ms_per_pass_median"]) / 1e3)
    assert "fast mode" in run.stdout and "compile time batch 1" in run.stdout


def test_benchmark_fast_mode_needs_a_warmup_pass():
    with pytest.raises(ConfigError, match="warmup >= 1"):
        from stylenat.metrics.throughput import benchmark

        benchmark(_tiny(), batches=[1], warmup=0, iters=1, mode="fast", progress=False)
