"""Generator throughput and peak memory: prints a table, writes benchmarks/results/generator_<device>.json.

CPU: img/s of a freshly initialised generator at batch 1 and 8 for ffhq256 and tiny. CUDA: the
paper's protocol: batch 1 (and 8), 10 warm-up passes, 500 timed
passes with CUDA events, fp32/TF32 and bf16 autocast. Timing is `stylenat.metrics.throughput`
(the same code as `stylenat bench`); each case runs in its own process so that its peak memory
(peak RSS on CPU, max_memory_allocated on CUDA) is its own.

    python benchmarks/generator.py                 # CPU, or CUDA when available
    python benchmarks/generator.py --device cpu --presets tiny --iters 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from stylenat._system import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def measure(spec: dict) -> dict:
    """One case in this process: spec has preset, batch, device, dtype, warmup, iters."""
    from stylenat._system import peak_rss_bytes
    from stylenat.metrics.throughput import measure_throughput
    from stylenat.models import build_generator

    torch.manual_seed(0)
    if spec["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the paper's fp32/TF32 setting
        torch.backends.cudnn.allow_tf32 = True
    g = build_generator(spec["preset"]).to(spec["device"]).eval()
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    row = measure_throughput(g, spec["batch"], spec["warmup"], spec["iters"], dtype)
    if spec["device"] == "cpu":
        row["peak_memory_bytes"] = peak_rss_bytes()
    return {**spec, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=["ffhq256", "tiny"])
    parser.add_argument("--iters", type=int, help="timed passes (default 500 on CUDA; on CPU 2 for ffhq256, 20 for others)")
    parser.add_argument("--warmup", type=int, help="warm-up passes (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one JSON spec
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    cpu = args.device == "cpu"
    cases = []
    for preset in args.presets:
        iters = args.iters or (500 if not cpu else 2 if preset.startswith("ffhq") else 20)
        warmup = args.warmup if args.warmup is not None else (1 if cpu else 10)
        for dtype in (["fp32"] if cpu else ["fp32/tf32", "bf16"]):
            for batch in (1, 8):
                cases.append(dict(preset=preset, batch=batch, device=args.device, dtype=dtype, warmup=warmup, iters=iters))
    hardware = f"{cpu_name()}, {torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name()
    print(f"generator throughput on {hardware} (torch {torch.__version__})")
    print(f"{'preset':10} {'batch':>5} {'dtype':>9} {'img/s':>9} {'ms/img':>9} {'peak GiB':>9}")
    rows = []
    for spec in cases:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{spec['preset']:10} {spec['batch']:>5} {spec['dtype']:>9}  failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['preset']:10} {r['batch']:>5} {r['dtype']:>9} {r['img_per_s']:>9.2f} {r['ms_per_img']:>9.1f} "
              f"{r['peak_memory_bytes'] / 2**30:>9.2f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"generator_{args.device}.json"
    out.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
