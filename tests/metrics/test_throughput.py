"""Throughput bench: the analytic FLOP count against torch's FLOP counter, the peak table, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stylenat.cli import main
from stylenat.metrics.throughput import benchmark, generator_flops, generator_flops_breakdown, peak_flops
from stylenat.models import build_generator
from stylenat.nn.attention import HydraNeighborhoodAttention


def counted_flops(g) -> tuple[int, int, int]:
    """(FLOPs torch counts for one image, of them inside na2d, our closed-form attention term).

    na2d's own count includes scores the tiled backend computes and masks, so it is split off:
    attention layer total minus its qkv and proj linears. The closed form counts 2 * 2 * k*k * head_dim
    per query and head, with the map size read from the layer's real input.
    """
    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, args[0].shape[1:3]))
             for m in g.modules() if isinstance(m, HydraNeighborhoodAttention)]
    with FlopCounterMode(display=False) as counter:
        g(torch.randn(1, g.style_dim, device=next(g.parameters()).device))
    for h in hooks:
        h.remove()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    inside, closed = 0, 0
    for name, m in g.named_modules():
        if isinstance(m, HydraNeighborhoodAttention):
            key = f"Generator.{name}"
            inside += counts.get(key, 0) - counts.get(f"{key}.qkv", 0) - counts.get(f"{key}.proj", 0)
            h, w = sizes[m]
            closed += sum(4 * h * w * nh * ky * kx * m.head_dim for nh, (ky, kx) in zip(m.group_heads, m.kernel_sizes))
    return counter.get_total_flops(), inside, closed


@pytest.mark.parametrize("preset", ["tiny", "ffhq256"])
def test_flops_match_the_counter(preset):
    # ffhq256 runs on the meta device: shapes only, so the full-size count costs no compute.
    with torch.device("meta" if preset != "tiny" else "cpu"):
        g = build_generator(preset).eval()
    total, inside, closed = counted_flops(g)
    parts = generator_flops_breakdown(g.config)
    assert total - inside == generator_flops(g.config) - parts["attention"]  # every linear/conv, exactly
    assert parts["attention"] == closed


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200", torch.bfloat16) == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == pytest.approx(312e12)
    assert peak_flops("NVIDIA GeForce RTX 3090") is None


def test_benchmark_report():
    g = build_generator("tiny")
    report = benchmark(g, batches=[2, 1], warmup=0, iters=2, progress=False)
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert report["parameters"] == sum(p.numel() for p in g.parameters())
    for r in report["results"]:
        assert r["img_per_s"] == pytest.approx(1e3 * r["batch"] / r["ms_per_pass"])
        assert r["peak_fraction"] is None and r["achieved_tflops"] > 0


def test_cli_bench_preset(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "tiny", "--device", "cpu", "--batch", "1", "--warmup", "0", "--iters", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["results"][0]["iters"] == 1
    # The paper mode (the default): eager, nothing compiled; no warm-up pass, so no first pass timed.
    assert report["mode"] == "paper" and report["compile"] is None
    assert report["results"][0]["compile_s"] is None and report["results"][0]["first_pass_ms"] is None
    assert "img/s" in capsys.readouterr().out


def test_benchmark_of_a_conditional_model_passes_its_classes():
    from stylenat.models import get_preset

    g = build_generator(get_preset("tiny")[0].replace(num_classes=3))
    seen = []
    g.mapping.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("c")), with_kwargs=True)
    benchmark(g, batches=[4], warmup=1, iters=1, progress=False)
    assert len(seen) == 2 and all(c is not None and c.tolist() == [0, 1, 2, 0] for c in seen)


def test_flops_of_a_rectangle_count_its_own_tokens():
    # 32 wide, 16 high: stages 4x2, 8x4, 16x8, 32x16 ((h, w) = (2, 4) ... (16, 32)), kernels (4, 7) etc.
    from stylenat.models import get_preset

    cfg = get_preset("ffhq", "32x16", cbase=512, cmax=32)[0]
    g = build_generator(cfg).eval()
    total, inside, closed = counted_flops(g)
    parts = generator_flops_breakdown(cfg)
    assert total - inside == generator_flops(cfg) - parts["attention"]  # every linear/conv, exactly
    assert parts["attention"] == closed
    # The square formula with h * w tokens per stage, written out from the stage shapes.
    shapes = [(2, 4), (4, 8), (8, 16), (16, 32)]
    assert cfg.stage_shapes() == shapes
    ch = cfg.channels
    assert parts["qkv"] == sum(2 * 2 * h * w * c * 3 * c for (h, w), c in zip(shapes, ch))
    assert parts["proj"] == sum(2 * 2 * h * w * c * c for (h, w), c in zip(shapes, ch))
    assert parts["upsample"] == sum(2 * (2 * h) * (2 * w) * ch[s] * ch[s + 1] for s, (h, w) in enumerate(shapes[:-1]))
    keys = [sum(nh * ky * kx for nh, (ky, kx) in zip(a.group_heads, a.kernel_sizes))
            for a in (stage.blocks[0].attn for stage in g.synthesis.stages)]
    head_dim = [c // nh for c, nh in zip(ch, cfg.heads)]
    assert parts["attention"] == sum(2 * 2 * 2 * h * w * k * d for (h, w), k, d in zip(shapes, keys, head_dim))
    # Its transpose (16 wide, 32 high) does the same work; a square of its width does more.
    assert generator_flops(get_preset("ffhq", "16x32", cbase=512, cmax=32)[0]) == generator_flops(cfg)
    assert generator_flops(get_preset("ffhq", 32, cbase=512, cmax=32)[0]) > generator_flops(cfg)
    report = benchmark(g, batches=[1], warmup=0, iters=1, progress=False)
    assert (report["resolution"], report["width"], report["height"]) == ((16, 32), 32, 16)
