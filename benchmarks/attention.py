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


# --------------------------------------------------------------------------------------------
# --blocks: computed / needed scores of the flex block masks, before and after the 2-D layout
# --------------------------------------------------------------------------------------------

BLOCK_PRESETS = ("ffhq256", "ffhq1024", "church256")
OLD_BLOCK = 128  # create_block_mask's default block, used by the old layout on both sides
OLD_TILE = 8


def old_flex_order(h: int, w: int, d: int, tile: int = OLD_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """The token order of the flex backend before 2387c6f (``_flex_layout`` of 445a4ba).

    Sorted by (dilation group y, group x, tile y, tile x, row in tile, col in tile). Returns
    (perm: position -> flat pixel, inv: flat pixel -> position); queries and keys share it.
    """
    y = torch.arange(h)[:, None].expand(h, w).reshape(-1)
    x = torch.arange(w)[None, :].expand(h, w).reshape(-1)
    gy, jy, gx, jx = y % d, y // d, x % d, x // d
    key = (((gy * d + gx) * h + jy // tile) * w + jx // tile) * tile * tile + (jy % tile) * tile + jx % tile
    perm = torch.argsort(key)
    return perm, torch.argsort(perm)


def _windows(length: int, kernel: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per axis: [L, L] membership (NA's window) and [L, k] the keys of each query (repeats pad)."""
    from stylenat.nn.attention import _axis_dense

    inside, _ = _axis_dense(length, kernel, dilation)
    width = int(inside.sum(1).max())
    idx = torch.argsort((~inside).to(torch.int8), dim=1, stable=True)[:, :width]
    ok = torch.gather(inside, 1, idx)
    return inside, torch.where(ok, idx, idx[:, :1])


def _block_sizes(n: int, block: int) -> torch.Tensor:
    return torch.clamp(n - torch.arange(-(-n // block)) * block, max=block)


def old_blocks_by_window(h: int, w: int, kernel: int, d: int, block: int = OLD_BLOCK) -> dict:
    """Non-empty blocks of the old mask from every query's window: the key blocks its k*k keys lie in.

    A block (query block, key block) is non-empty exactly when some query of it has a key of it in
    its window, so the distinct (query block, key block) pairs over all (query, window key) pairs
    are the non-empty blocks; cost N * k^2, nothing of size N x N.
    """
    perm, inv = old_flex_order(h, w, d)
    in_y, win_y = _windows(h, kernel, d)
    in_x, win_x = _windows(w, kernel, d)
    n = h * w
    nb = -(-n // block)
    sizes = _block_sizes(n, block)
    nonempty, computed = 0, 0
    chunk = max(block, (2**22 // (win_y.shape[1] * win_x.shape[1])) // block * block)  # whole query blocks
    for p0 in range(0, n, chunk):
        pos = torch.arange(p0, min(p0 + chunk, n))
        pix = perm[pos]
        keys = win_y[pix // w][:, :, None] * w + win_x[pix % w][:, None, :]
        ids = torch.unique((pos // block)[:, None] * nb + inv[keys.flatten(1)] // block)
        nonempty += len(ids)
        computed += int((sizes[ids // nb] * sizes[ids % nb]).sum())
    needed = int(in_y.sum()) * int(in_x.sum())
    return {"nonempty_blocks": nonempty, "blocks": nb * nb, "computed": computed, "needed": needed}


def old_blocks_by_rows(h: int, w: int, kernel: int, d: int, block: int = OLD_BLOCK) -> dict:
    """The same count the direct way: one block row (block queries x all N keys) at a time.

    The row's [h, w] map of keys some query sees is any over its queries of in_y[qy] x in_x[qx],
    one [h, block] @ [block, w] product of the per-axis memberships (``_axis_dense``).
    """
    from stylenat.nn.attention import _axis_dense

    perm, _ = old_flex_order(h, w, d)
    in_y, _ = _axis_dense(h, kernel, d)
    in_x, _ = _axis_dense(w, kernel, d)
    in_y, in_x = in_y.float(), in_x.float()
    n = h * w
    nb = -(-n // block)
    sizes = _block_sizes(n, block)
    nonempty, computed = 0, 0
    for qb in range(nb):
        q = perm[qb * block:(qb + 1) * block]
        seen = (in_y[q // w].T @ in_x[q % w]).reshape(-1)[perm] > 0  # [N], keys in sequence order
        hit = torch.nn.functional.pad(seen, (0, nb * block - n)).reshape(nb, block).any(1)
        nonempty += int(hit.sum())
        computed += int(sizes[qb] * sizes[hit].sum())
    return {"nonempty_blocks": nonempty, "computed": computed}


def tiled_stats(h: int, w: int, kernel: int, d: int, tile: int = 8) -> dict:
    """Scores the tiled backend computes: per axis tiles x Tq x U, product over the axes."""
    from stylenat.nn.attention import _axis_tiles

    ay, ax = _axis_tiles(h, kernel, d, tile), _axis_tiles(w, kernel, d, tile)
    per_axis = [a.q_idx.shape[0] * a.q_idx.shape[1] * a.k_idx.shape[1] for a in (ay, ax)]
    needed = h * w * kernel * kernel
    return {"q_tile": [ay.q_idx.shape[1], ax.q_idx.shape[1]], "k_tile": [ay.k_idx.shape[1], ax.k_idx.shape[1]],
            "computed": per_axis[0] * per_axis[1], "needed": needed, "ratio": per_axis[0] * per_axis[1] / needed}


def block_shapes(presets=BLOCK_PRESETS) -> dict:
    """Distinct (resolution, kernel, dilation) of the presets' NA layers, with who uses them."""
    from stylenat.models import get_preset

    shapes: dict = {}
    for name in presets:
        for layer in get_preset(name)[0].attention_layers():
            key = (layer["resolution"], layer["kernel"], layer["dilation"])
            use = f"{name} {layer['heads']}x{layer['head_dim']}"
            shapes.setdefault(key, [])
            if use not in shapes[key]:
                shapes[key].append(use)
    return dict(sorted(shapes.items()))


def blocks_main(out: Path | None, check_max: int) -> None:
    from stylenat.nn.attention import flex_layout_stats

    t_start = time.perf_counter()
    rows = []
    tile = lambda t: f"{t[0]}x{t[1]}"
    head = (f"{'res':>4} {'k':>2} {'dil':>3} | {'before':>7} {'blocks':>12} {'count s':>7} | "
            f"{'g16 q/kv tile':>13} {'blocks':>7} {'ratio':>6} | {'g64 q/kv tile':>13} {'blocks':>7} {'ratio':>6} | {'tiled':>6}")
    print("computed / needed scores per NA layer shape (before: old order, 128x128 blocks; after: 2-D layout)")
    print(head)
    print("-" * len(head))
    for (res, k, d), users in block_shapes().items():
        t0 = time.perf_counter()
        before = old_blocks_by_window(res, res, k, d)
        before["count_s"] = time.perf_counter() - t0
        before["ratio"] = before["computed"] / before["needed"]
        before.update(order="old: (group, 8x8 tile)", block=[OLD_BLOCK, OLD_BLOCK])
        if res <= check_max:  # cross-check against the direct block-row count
            t0 = time.perf_counter()
            direct = old_blocks_by_rows(res, res, k, d)
            direct["count_s"] = time.perf_counter() - t0
            assert direct["nonempty_blocks"] == before["nonempty_blocks"] and direct["computed"] == before["computed"], (res, k, d, direct, before)
            before["direct_check"] = direct
        after = {g: flex_layout_stats(res, res, k, d, granule=g) for g in (16, 64)}
        tiled = tiled_stats(res, res, k, d)
        rows.append({"resolution": res, "kernel": k, "dilation": d, "used_by": users, "before": before,
                     "after_granule16": after[16], "after_granule64": after[64], "tiled": tiled})
        cell = lambda a: f"{tile(a['q_tile']) + '/' + tile(a['kv_tile']):>13} {a['q_block']:>3}x{a['kv_block']:<3} {a['ratio']:6.2f}"
        direct_s = f"+{before['direct_check']['count_s']:.1f}" if "direct_check" in before else ""
        print(f"{res:4d} {k:2d} {d:3d} | {before['ratio']:7.2f} {before['nonempty_blocks']:>5}/{before['blocks']:<6} "
              f"{before['count_s']:7.2f} | {cell(after[16])} | {cell(after[64])} | {tiled['ratio']:6.2f}"
              f"{'  (direct ' + direct_s[1:] + ' s)' if direct_s else ''}", flush=True)
    total = time.perf_counter() - t_start
    print(f"\nbefore: non-empty/total 128x128 blocks of the old mask (blocks clipped to N when N < 128), counted from "
          f"each query's window; cross-checked by a direct block-row count (128 queries x N keys per row, as an [h,128]@[128,w] product) up to "
          f"{check_max}x{check_max}.\nafter: flex_layout_stats, granule 16 (forward, fp32 training) and 64 (CUDA bf16/fp16 "
          f"backward); blocks = q_block x kv_block tokens. tiled: 8x8 query tiles, (8+k-1)^2 keys clamped to the group.\n"
          f"total {total:.1f} s")
    result = {"what": "computed / needed attention scores of the flex block masks per NA layer shape of "
                      + ", ".join(BLOCK_PRESETS),
              "torch": torch.__version__, "hardware": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
              "direct_check_max_resolution": check_max, "total_s": total, "rows": rows}
    out = out or HERE / "results" / "attention_blocks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="16,32,64,128,256")
    ap.add_argument("--dtypes", default=None, help="comma list; default float32 (CPU) or float32,bfloat16 (CUDA)")
    ap.add_argument("--backends", default=None, help="comma list; default dense-sdpa,tiled (+flex on CUDA)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=20.0, help="stop repeating a case after this long")
    ap.add_argument("--out", default=None)
    ap.add_argument("--blocks", action="store_true",
                    help="print computed/needed scores of the flex block masks (old and new layout) and exit")
    ap.add_argument("--check-max", type=int, default=256,
                    help="--blocks: cross-check the old count by direct block rows up to this map edge")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return
    if args.blocks:
        blocks_main(Path(args.out) if args.out else None, args.check_max)
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
