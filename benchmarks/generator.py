"""Generator throughput and peak memory: prints a table, writes benchmarks/results/generator_<device>.json.

CPU: images/s of g_ema at batch 1 and 8 for ffhq256 and tiny (few passes, at least 2 s; each case
runs in its own process so its peak RSS is its own). CUDA: the paper's protocol (SPEC "Evaluation"): batch 1,
10 warm-up passes, 500 timed passes with CUDA events, fp32/TF32 and bf16 autocast.

    python benchmarks/generator.py                 # CPU, or CUDA when available
    python benchmarks/generator.py --device cpu --presets tiny --passes 20
    python benchmarks/generator.py --device cpu --threads 1   # on cores shared with other jobs
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from stylenat.models import build_generator

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def measure_cpu(preset: str, batch: int, warmup: int, passes: int) -> dict:
    torch.manual_seed(0)
    g = build_generator(preset).eval()
    z = torch.randn(batch, g.style_dim)
    with torch.no_grad():
        for _ in range(warmup):
            g(z)
        t0 = time.perf_counter()
        done = 0
        # At least `passes` passes, more while under 2 s: tiny gets a stable mean, ffhq256 stays affordable.
        while done < passes or time.perf_counter() - t0 < 2.0:
            g(z)
            done += 1
        seconds = (time.perf_counter() - t0) / done
        passes = done
    return {
        "preset": preset, "batch": batch, "dtype": "fp32", "passes": passes,
        "seconds_per_pass": seconds, "img_per_s": batch / seconds,
        "peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # peak RSS (KiB on Linux)
    }


def measure_cuda(preset: str, batch: int, warmup: int, passes: int, dtype: str) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    g = build_generator(preset).cuda().eval()
    z = torch.randn(batch, g.style_dim, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), autocast:
        for _ in range(warmup):
            g(z)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(passes):
            g(z)
        end.record()
        torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / passes
    return {
        "preset": preset, "batch": batch, "dtype": dtype, "passes": passes,
        "seconds_per_pass": seconds, "img_per_s": batch / seconds,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=["ffhq256", "tiny"])
    parser.add_argument("--passes", type=int, help="timed passes (default: 1 on CPU, repeated for at least 2 s; 500 on CUDA)")
    parser.add_argument("--warmup", type=int, help="warm-up passes (default: 1 on CPU, 10 on CUDA)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 avoids thread spinning on shared cores")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "BATCH"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    cpu = args.device == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    passes = args.passes or (1 if cpu else 500)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 10)
    if args.one:
        print(json.dumps(measure_cpu(args.one[0], int(args.one[1]), warmup, passes)))
        return
    rows = []
    for preset in args.presets:
        if cpu:
            for batch in (1, 8):
                cmd = [sys.executable, __file__, "--device", "cpu", "--one", preset, str(batch),
                       "--passes", str(passes), "--warmup", str(warmup), "--threads", str(torch.get_num_threads())]
                rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        else:
            rows += [measure_cuda(preset, 1, warmup, passes, dtype) for dtype in ("fp32/tf32", "bf16")]
    hardware = _cpu_name() + f", {torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name()
    print(f"generator throughput on {hardware} (torch {torch.__version__})")
    print(f"{'preset':10} {'batch':>5} {'dtype':>9} {'img/s':>9} {'s/pass':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['preset']:10} {r['batch']:>5} {r['dtype']:>9} {r['img_per_s']:>9.2f} {r['seconds_per_pass']:>8.3f} {r['peak_mem_gib']:>9.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"generator_{args.device}.json"
    out.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "warmup": warmup, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
