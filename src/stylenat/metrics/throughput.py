"""Generator throughput (the paper's protocol), its memory, and an analytic FLOP count.

Protocol (the paper's throughput measurement): g_ema, batch 1, 10 warm-up passes, 500 timed passes
timed with CUDA events; a larger batch shows the throughput ceiling. On the CPU the defaults
shrink to 3 warm-up and 10 timed passes, timed by the wall clock.

Modes (``benchmark(mode=...)``, ``stylenat bench --mode``): ``paper`` runs the generator eagerly as
it is (the protocol above); ``fast`` compiles it first (:func:`stylenat.models.compiled.compile_generator`:
inductor, CUDA graphs on CUDA, frozen weights on the CPU) and reports the compile time apart from
the timed passes: the first warm-up pass at each batch size is timed on its own (``first_pass_ms``;
compiled, it includes compiling that shape) and ``compile_s`` is that pass less a timed one.

FLOPs count multiply-adds as 2 and cover the matrix products only (linear layers, attention
scores and weighted sums, the 1x1 ToRGB convs and the FIR skip upsampling as executed on the
zero-stuffed map); norms, activations, softmax and bias additions are left out. That is what
torch.utils.flop_counter counts too, so the fraction of the device's peak is comparable to
other models measured the same way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from stylenat._system import cpu_name, peak_rss_bytes
from stylenat.errors import ConfigError
from stylenat.models.config import GeneratorConfig
from stylenat.nn.attention import split_heads

__all__ = ["generator_flops", "generator_flops_breakdown", "peak_flops", "PEAK_TFLOPS", "MODES", "measure_throughput",
           "benchmark"]

# Dense peak TFLOP/s from NVIDIA's data sheets, per (device, math): "fp32" plain CUDA cores,
# "tf32" / "bf16" tensor cores without sparsity. Keys are matched against the device name in order.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),  # SXM (HBM3)
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
]


def generator_flops_breakdown(config: GeneratorConfig) -> dict[str, int]:
    """FLOPs of one image through the generator, by kind of layer (see the module docstring).

    Per stage of h x w tokens (config.stage_shapes(), so a rectangle counts its own h * w), with
    ky * kx keys per query for a head group of kernel (ky, kx).
    """
    shapes = config.stage_shapes()
    ch, sd, last = config.channels, config.style_dim, len(shapes) - 1
    parts = dict.fromkeys(("mapping", "style", "qkv", "attention", "proj", "mlp", "upsample", "to_rgb"), 0)
    parts["mapping"] = config.n_mlp * 2 * sd * sd
    for s, (h, w) in enumerate(shapes):
        n, c, heads = h * w, ch[s], config.heads[s]
        head_dim, hidden = c // heads, int(c * config.mlp_ratio)
        # Every head group sees ky*kx keys per query (the 4x4 stage: kernel 4, all 16 tokens).
        kernels = [(k, k) if isinstance(k, int) else k for k in config.kernels[s]]
        keys = sum(nh * ky * kx for nh, (ky, kx) in zip(split_heads(heads, len(kernels)), kernels))
        blocks = 2
        parts["style"] += blocks * 2 * (2 * sd * 2 * c)  # two AdaINs per block, one w -> (gamma, beta) each
        parts["qkv"] += blocks * 2 * n * c * 3 * c
        parts["attention"] += blocks * 2 * 2 * n * keys * head_dim  # q.k scores, then weights @ v
        parts["proj"] += blocks * 2 * n * c * c
        parts["mlp"] += blocks * 2 * (2 * n * c * hidden)
        out = 4 * n if s < last else n  # tokens after the stage: twice h and w, except at the image
        if s < last:
            parts["upsample"] += 2 * out * c * ch[s + 1]
        if 0 < s < last:  # the RGB skip from the previous stage: 4x4 FIR on the zero-stuffed map
            parts["to_rgb"] += 2 * 3 * out * 16
        parts["to_rgb"] += 2 * out * ch[min(s + 1, last)] * 3
    return parts


def generator_flops(config: GeneratorConfig) -> int:
    """FLOPs of one image through the generator (mapping included)."""
    return sum(generator_flops_breakdown(config).values())


def _math_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return "bf16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(device_name: str, dtype: torch.dtype = torch.float32) -> float | None:
    """Peak FLOP/s of a known GPU for ``dtype`` (float32 counts TF32 when it is enabled), else None."""
    for key, table in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return table[_math_kind(dtype)] * 1e12
    return None


@torch.no_grad()
def measure_throughput(g: nn.Module, batch: int, warmup: int, iters: int, dtype: torch.dtype = torch.float32) -> dict:
    """Time ``iters`` forward passes z -> image of ``batch`` images after ``warmup`` untimed ones.

    Args:
        g: the generator, in eval mode on its device (eager, or compiled by
            :func:`stylenat.models.compiled.compile_generator`). batch: images per pass.
        warmup, iters: untimed and timed passes. dtype: float32, or bfloat16 (autocast).
    Returns:
        batch, warmup, iters, ms_per_pass (mean, median, min), ms_per_img, img_per_s, peak_memory_bytes
        (CUDA: max_memory_allocated over the timed passes; CPU: growth of the process's peak RSS,
        0 when an earlier peak was higher), and first_pass_ms: the first warm-up pass on its own,
        wall clock, synchronized (for a compiled g it includes compiling this shape; None without
        warm-up).
    """
    from stylenat.models.compiled import compile_settings

    dev = next(g.parameters()).device
    cuda = dev.type == "cuda"
    z = torch.randn(batch, g.style_dim, generator=torch.Generator().manual_seed(0)).to(dev)
    # A conditional model times the same pass with its classes in turn (the label embedding is one small matmul).
    classes = g.mapping.num_classes
    c = torch.arange(batch, device=dev) % classes if classes else None
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    settings = compile_settings(g)
    # CUDA graphs: each pass is a new step, so the previous pass's (discarded) outputs may be reused.
    mark_step = torch.compiler.cudagraph_mark_step_begin if settings and settings["cudagraphs"] else (lambda: None)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    first = None
    with autocast:
        for i in range(warmup):
            sync()
            t0 = time.perf_counter()
            mark_step()
            g(z, c=c)
            if i == 0:
                sync()
                first = (time.perf_counter() - t0) * 1e3
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in events:
                mark_step()
                start.record()
                g(z, c=c)
                end.record()
            torch.cuda.synchronize(dev)
            times = [start.elapsed_time(end) for start, end in events]
            memory = torch.cuda.max_memory_allocated(dev)
        else:
            rss = peak_rss_bytes()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                g(z, c=c)
                times.append((time.perf_counter() - t0) * 1e3)
            memory = peak_rss_bytes() - rss
    mean = sum(times) / len(times)
    return {"batch": batch, "warmup": warmup, "iters": iters, "ms_per_pass": mean,
            "ms_per_pass_median": sorted(times)[len(times) // 2], "ms_per_pass_min": min(times), "ms_per_img": mean / batch,
            "img_per_s": 1e3 * batch / mean, "peak_memory_bytes": int(memory), "first_pass_ms": first}


MODES = ("paper", "fast")


def benchmark(g: nn.Module, batches: Sequence[int] | None = None, warmup: int | None = None, iters: int | None = None,
              dtype: torch.dtype = torch.float32, progress: bool = True, mode: str = "paper",
              compile_mode: str | None = None) -> dict:
    """Throughput of ``g`` at each batch size, with the device, parameter and FLOP counts.

    Args:
        g: a stylenat generator on the device to measure. batches: batch sizes, measured in
            ascending order; default 1 and 32 on CUDA, 1 and 8 elsewhere.
        warmup, iters: untimed and timed passes; default 10 / 500 on CUDA, 3 / 10 elsewhere.
        dtype: float32 or bfloat16. progress: print one line per batch size on stderr.
        mode: ``paper`` (g as it is, eager) or ``fast``: g is compiled in place first
            (:func:`stylenat.models.compiled.compile_generator` with ``compile_mode``, default
            per device); needs warmup >= 1, the pass that compiles.
    Returns a JSON-ready dict (see docs/metrics.md, the `stylenat bench` paragraph): with ``mode``, ``compile`` (the
    settings and ``setup_s``, the eager pass and wrapping before the first compiled pass; None in
    paper mode) and per batch size ``first_pass_ms`` and ``compile_s`` (first pass less the median
    timed pass; None in paper mode).
    """
    from stylenat.models.compiled import compile_generator, compile_settings

    if mode not in MODES:
        raise ConfigError(f"unknown bench mode {mode!r}; choose one of {', '.join(MODES)}")
    dev = next(g.parameters()).device
    cuda = dev.type == "cuda"
    warmup = (10 if cuda else 3) if warmup is None else warmup
    iters = (500 if cuda else 10) if iters is None else iters
    batches = ((1, 32) if cuda else (1, 8)) if batches is None else batches
    if warmup < 0 or iters < 1 or not batches or min(batches) < 1:
        raise ConfigError("need warmup >= 0, iters >= 1 and batch sizes >= 1")
    if mode == "fast" and warmup < 1:
        raise ConfigError("the fast mode needs warmup >= 1: the first pass at each batch size compiles")
    name = torch.cuda.get_device_name(dev) if cuda else cpu_name()
    flops = generator_flops(g.config)
    peak = peak_flops(name, dtype) if cuda else None
    g.eval()
    compiled = None
    if mode == "fast":
        t0 = time.perf_counter()
        compile_generator(g, compile_mode)
        compiled = {**compile_settings(g), "setup_s": time.perf_counter() - t0}
    results = []
    for batch in sorted(set(batches)):
        r = measure_throughput(g, batch, warmup, iters, dtype)
        r["achieved_tflops"] = flops * r["img_per_s"] / 1e12
        r["peak_fraction"] = None if peak is None else flops * r["img_per_s"] / peak
        r["compile_s"] = None if compiled is None else (r["first_pass_ms"] - r["ms_per_pass_median"]) / 1e3
        results.append(r)
        if progress:
            extra = "" if compiled is None else f" (first pass {r['first_pass_ms'] / 1e3:.1f} s: compiling)"
            print(f"batch {batch}: {r['img_per_s']:.2f} img/s, {r['ms_per_img']:.2f} ms/img{extra}", file=sys.stderr)
    return {
        "mode": mode, "compile": compiled,
        "device": str(dev), "device_name": name,
        "threads": torch.get_num_threads() if not cuda else None,
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
        "resolution": g.config.resolution, "width": g.config.width, "height": g.config.height,
        "parameters": sum(p.numel() for p in g.parameters()),
        "flops_per_image": flops, "gflops_per_image": flops / 1e9,
        "peak_tflops": None if peak is None else peak / 1e12,
        "results": results,
    }
