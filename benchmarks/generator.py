"""Generator throughput and peak memory: prints a table, writes benchmarks/results/generator_<device>.json.

Modes (as in `stylenat bench --mode`): ``paper``, the generator eager as it is; ``fast``, compiled
with torch.compile (inductor; `stylenat.models.compiled`): on the CPU in float32 with frozen
weights and glibc keeping freed memory for reuse, on CUDA with CUDA graphs and bf16 autocast.
The first pass of a compiled case compiles; its time is reported apart (``compile_s``) from the
timed passes. ``--ablate`` adds, on the CPU, the two fast-mode settings one at a time (eager with
the memory setting; compiled without it), so each one's share can be read.

CPU default: ffhq256 and tiny, batch 1 and 8, 1 warm-up pass (the compile, in the fast mode) and
5 timed passes at batch 1 (2 at batch 8 of ffhq256), timed by the wall clock. CUDA: the paper's
protocol: 10 warm-up and 500 timed passes with CUDA events, fp32/TF32 and bf16 autocast (paper),
bf16 (fast). Timing is `stylenat.metrics.throughput.benchmark` (the same code as `stylenat
bench`); each case runs in its own process, so its peak memory (peak RSS on CPU,
max_memory_allocated on CUDA), its compile and its process-wide settings are its own.

    python benchmarks/generator.py                 # CPU, or CUDA when available
    python benchmarks/generator.py --device cpu --presets ffhq256 --batches 1 --modes paper fast --ablate
    python benchmarks/generator.py --device cpu --presets tiny --iters 20
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from stylenat._system import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("paper", "eager+keep_memory", "compiled", "fast")


def measure(spec: dict) -> dict:
    """One case in this process: spec has preset, batch, device, dtype, mode, keep_memory, compile, warmup, iters."""
    from stylenat._system import peak_rss_bytes
    from stylenat.metrics.throughput import benchmark
    from stylenat.models import build_generator
    from stylenat.models.compiled import keep_freed_memory

    torch.manual_seed(0)
    if spec["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the paper's fp32/TF32 setting
        torch.backends.cudnn.allow_tf32 = True
    kept = keep_freed_memory() if spec["keep_memory"] else False
    g = build_generator(spec["preset"]).to(spec["device"]).eval()
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    report = benchmark(g, [spec["batch"]], spec["warmup"], spec["iters"], dtype, progress=False,
                       mode="fast" if spec["compile"] else "paper")
    row = report["results"][0]
    if spec["device"] == "cpu":
        row["peak_memory_bytes"] = peak_rss_bytes()
    return {**spec, **row, "keep_freed_memory": kept, "compile_settings": report["compile"]}


def cases(args) -> list[dict]:
    cpu = args.device == "cpu"
    out = []
    variants = []  # (label, mode, compile, keep_memory)
    for mode in args.modes:
        if mode == "paper":
            variants.append(("paper", "paper", False, False))
            if args.ablate and cpu:
                variants.append(("eager+keep_memory", "paper", False, True))
        else:
            if args.ablate and cpu:
                variants.append(("compiled", "fast", True, False))
            variants.append(("fast", "fast", True, cpu))
    if args.variants:
        variants = [v for v in variants if v[0] in args.variants]
    for preset in args.presets:
        for batch in args.batches:
            big = preset.startswith("ffhq") or preset.startswith("church")
            iters = args.iters or (500 if not cpu else (2 if big and batch > 1 else 5 if big else 20))
            warmup = args.warmup if args.warmup is not None else (1 if cpu else 10)
            for label, mode, compiled, keep in variants:
                dtypes = ["fp32"] if cpu else (["fp32/tf32", "bf16"] if mode == "paper" else ["bf16"])
                for dtype in dtypes:
                    out.append(dict(preset=preset, batch=batch, device=args.device, dtype=dtype, mode=mode,
                                    variant=label, compile=compiled, keep_memory=keep, warmup=warmup, iters=iters))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=["ffhq256", "tiny"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=["paper", "fast"], default=["paper", "fast"])
    parser.add_argument("--ablate", action="store_true", help="CPU: also eager with kept memory, compiled without")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="only these of the cases above")
    parser.add_argument("--iters", type=int, help="timed passes (default 500 on CUDA; on CPU 5 for ffhq256 at batch 1, "
                                                  "2 above, 20 for others)")
    parser.add_argument("--warmup", type=int, help="warm-up passes, the first one timed apart (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--note", help="free text stored in the JSON (e.g. that the machine was shared)")
    parser.add_argument("--out", type=Path, help="output JSON (default benchmarks/results/generator_<device>.json)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one JSON spec
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    cpu = args.device == "cpu"
    hardware = f"{cpu_name()}, {torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name()
    print(f"generator throughput on {hardware} (torch {torch.__version__})")
    print(f"{'preset':9} {'batch':>5} {'variant':>18} {'dtype':>9} {'img/s':>8} {'ms/img':>9} {'median ms':>10} "
          f"{'min ms':>9} {'compile s':>9} {'peak GiB':>8}")
    rows = []
    for spec in cases(args):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{spec['preset']:9} {spec['batch']:>5} {spec['variant']:>18} {spec['dtype']:>9}  failed: "
                  f"{proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["process_s"] = time.perf_counter() - t0
        rows.append(r)
        comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        print(f"{r['preset']:9} {r['batch']:>5} {r['variant']:>18} {r['dtype']:>9} {r['img_per_s']:>8.3f} "
              f"{r['ms_per_img']:>9.1f} {r['ms_per_pass_median']:>10.1f} {r['ms_per_pass_min']:>9.1f} {comp:>9} "
              f"{r['peak_memory_bytes'] / 2**30:>8.2f}", flush=True)
    out = args.out or RESULTS / f"generator_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv, skip = [], False  # the command without --note (stored on its own)
    for a in sys.argv[1:]:
        if skip or a == "--note":
            skip = not skip
            continue
        argv.append(a)
    command = shlex.join(["python", "benchmarks/generator.py", *argv])
    out.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "command": command,
                               "note": args.note, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
