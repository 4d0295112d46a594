"""Neighborhood-attention benchmark at the NA layer shapes of the FFHQ-256 generator (batch 1).

For every stage 16x16 ... 256x256 and both head groups (kernel 7, dilation 1 and res/8) it times
forward and forward+backward and records peak memory for each backend, and for dense
``scaled_dot_product_attention`` with the bias and the window as one float mask (the naive
alternative; its mask is rebuilt from the bias table each call, as a training layer must).

Each measurement runs in a fresh subprocess so that peak memory (max RSS above the process's
baseline on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) belongs to that case alone.

    python benchmarks/attention.py                      # CPU table + benchmarks/results/attention_cpu.json
    python benchmarks/attention.py --device cuda        # adds flex; fp32 and bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
HEAD_DIM = 32
KERNEL = 7
# FFHQ-256: channels per resolution and heads = max(C // 32, 4), split in two groups.
CHANNELS = {16: 512, 32: 512, 64: 512, 128: 256, 256: 128}
# Dense attention is skipped when its score + mask tensors alone would exceed this.
DENSE_LIMIT_BYTES = 6 * 2**30


def layer_shapes(sizes):
    for res in sizes:
        heads = max(CHANNELS[res] // 32, 4)
        for dil in (1, res // 8):
            yield res, heads // 2, dil


def dense_sdpa(q, k, v, kernel, dilation, rpb, scale):
    """The naive alternative: one [heads, HW, HW] float mask holding the bias and -inf outside."""
    from stylenat.nn.attention import _axis_dense

    b, heads, h, w, d = q.shape
    in_y, rel_y = _axis_dense(h, kernel, dilation)
    in_x, rel_x = _axis_dense(w, kernel, dilation)
    allowed = (in_y[:, None, :, None] & in_x[None, :, None, :]).reshape(h * w, h * w).to(q.device)
    index = (rel_y[:, None, :, None] * (2 * kernel - 1) + rel_x[None, :, None, :]).reshape(h * w, h * w).to(q.device)
    mask = rpb.reshape(heads, -1)[:, index].masked_fill(~allowed, float("-inf"))
    flat = lambda t: t.reshape(b, heads, h * w, d)
    out = torch.nn.functional.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask, scale=scale)
    return out.reshape(q.shape)


def measure_one(spec: dict) -> dict:
    """Run one case in this process and return its timings and peak memory."""
    from stylenat._system import peak_rss_bytes
    from stylenat.nn.attention import na2d

    dev = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    res, heads, dil, backend, mode = spec["res"], spec["heads"], spec["dilation"], spec["backend"], spec["mode"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, res, res, HEAD_DIM, generator=g).to(dev, dtype) for _ in range(3))
    rpb = (0.02 * torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=g)).to(dev, dtype)
    backward = mode == "fwd+bwd"
    for t in (q, k, v, rpb):
        t.requires_grad_(backward)
    scale = HEAD_DIM**-0.5
    if backend == "dense-sdpa":
        fn = lambda: dense_sdpa(q, k, v, KERNEL, dil, rpb, scale)
    else:
        fn = lambda: na2d(q, k, v, KERNEL, dil, rpb=rpb, scale=scale, backend=backend)

    def step():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        return out

    cuda = dev.type == "cuda"
    # Baseline before the warm-up pass: max RSS never falls, so the first pass must be inside the window.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_bytes()
    step()  # warm-up: caches, compilation
    times = []
    deadline = time.perf_counter() + spec["budget_s"]
    while len(times) < spec["repeat"] and (len(times) < 2 or time.perf_counter() < deadline):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "runs": len(times), "peak_bytes": max(peak, 0)}


def run_case(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env, timeout=1800
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": tail[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dense_bytes(res: int, heads: int, dtype_bytes: int, backward: bool) -> int:
    n = (res * res) ** 2 * heads
    return n * dtype_bytes * (3 if backward else 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="16,32,64,128,256")
    ap.add_argument("--dtypes", default=None, help="comma list; default float32 (CPU) or float32,bfloat16 (CUDA)")
    ap.add_argument("--backends", default=None, help="comma list; default dense-sdpa,tiled (+flex on CUDA)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=20.0, help="stop repeating a case after this long")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return

    cuda = args.device.startswith("cuda")
    dtypes = (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    backends = (args.backends or ("dense-sdpa,tiled,flex" if cuda else "dense-sdpa,tiled")).split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    header = f"{'dtype':9} {'res':>4} {'heads':>5} {'dil':>3} {'backend':11} {'fwd ms':>9} {'fwd MiB':>8} {'f+b ms':>9} {'f+b MiB':>8}"
    print(header)
    print("-" * len(header))
    for dtype in dtypes:
        for res, heads, dil in layer_shapes(sizes):
            for backend in backends:
                row = {"dtype": dtype, "res": res, "heads": heads, "dilation": dil, "head_dim": HEAD_DIM, "kernel": KERNEL, "backend": backend}
                for mode in ("fwd", "fwd+bwd"):
                    size = 2 if dtype != "float32" else 4
                    if backend in ("dense-sdpa", "reference") and dense_bytes(res, heads, size, mode != "fwd") > DENSE_LIMIT_BYTES:
                        row[mode] = {"error": f"skipped: dense needs > {DENSE_LIMIT_BYTES / 2**30:.0f} GiB"}
                        continue
                    spec = dict(device=args.device, dtype=dtype, res=res, heads=heads, dilation=dil, backend=backend,
                                mode=mode, repeat=args.repeat, budget_s=args.budget_s)
                    row[mode] = run_case(spec)
                rows.append(row)
                cell = lambda m: (f"{row[m]['median_s'] * 1e3:9.2f} {row[m]['peak_bytes'] / 2**20:8.1f}"
                                  if "median_s" in row[m] else f"{'-':>9} {'-':>8}")
                print(f"{dtype:9} {res:4d} {heads:5d} {dil:3d} {backend:11} {cell('fwd')} {cell('fwd+bwd')}", flush=True)

    ratios = {}
    for r in rows:
        if r["backend"] == "dense-sdpa":
            continue
        dense = next((d for d in rows if d["backend"] == "dense-sdpa" and all(d[x] == r[x] for x in ("dtype", "res", "dilation"))), None)
        for mode in ("fwd", "fwd+bwd"):
            if dense and "median_s" in dense[mode] and "median_s" in r[mode]:
                ratios[f"{r['backend']} {r['dtype']} {r['res']} d{r['dilation']} {mode}"] = r[mode]["median_s"] / dense[mode]["median_s"]
    if ratios:
        print("\ntime relative to dense SDPA (lower is better):")
        for name, ratio in ratios.items():
            print(f"  {name:32} {ratio:6.3f}x")
    errors = [(r["backend"], r["res"], r["dilation"], m, r[m]["error"]) for r in rows for m in ("fwd", "fwd+bwd") if "error" in r[m]]
    for e in errors:
        print("  not measured:", *e)

    hardware = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    result = {"device": args.device, "hardware": hardware, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rows": rows, "ratio_to_dense": ratios}
    out = Path(args.out or HERE / "results" / f"attention_{'cuda' if cuda else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
