"""onnxruntime against PyTorch on the CPU, same machine, same run: prints a table, writes
benchmarks/results/export_cpu.json.

For each preset the generator (seeded random weights: the timing does not depend on them) is
exported once with `stylenat.export.export` (the check against PyTorch included; its time and the
file size are recorded). Each case then runs in its own process, so its peak memory (peak RSS) is
its own: onnxruntime on the exported file (CPU execution provider), or PyTorch eager on the same
function (z, psi -> uint8 images: mapping, truncation, synthesis, pixels; the tiled attention
path). Both processes import torch and stylenat, so the RSS compare like with like (VmHWM: the
child's own peak). Timed by the wall clock after one untimed pass. The export's own peak memory is
recorded too (each export runs in a process of its own).

    python benchmarks/export.py                          # tiny and ffhq256, batch 1 and 8
    python benchmarks/export.py --presets tiny --iters 50
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stylenat._system import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
RUNTIMES = ("onnxruntime", "pytorch")


def _generator(preset: str):
    from stylenat.models import build_generator

    torch.manual_seed(0)
    g = build_generator(preset).eval()
    g.compute_w_avg(1000)
    return g


def measure(spec: dict) -> dict:
    """One case in this process: spec has preset, runtime, batch, iters, onnx (the file); or preset and
    export (the file to write)."""
    import numpy as np

    from stylenat._system import peak_rss_bytes
    from stylenat.export import ZToImages, export, load_exported
    from stylenat.nn.attention import na_backend

    if "export" in spec:
        report = export(_generator(spec["preset"]), spec["export"], check_seeds=[0, 1])
        return {"export_s": report.seconds, "file_bytes": Path(spec["export"]).stat().st_size,
                "max_level_diff": report.max_level_diff, "opset": report.opset, "peak_rss_bytes": peak_rss_bytes()}
    if spec["runtime"] == "onnxruntime":
        e = load_exported(spec["onnx"])
        z = torch.randn(spec["batch"], e.config.style_dim, generator=torch.Generator().manual_seed(0)).numpy()

        def run():
            return e(z, 0.7)
    else:
        module = ZToImages(_generator(spec["preset"]))
        z = torch.randn(spec["batch"], module.g.style_dim, generator=torch.Generator().manual_seed(0))
        psi = torch.tensor(0.7)

        def run():
            with torch.no_grad(), na_backend("tiled"):
                return module(z, psi)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(spec["iters"]):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    assert np.asarray(out).dtype == np.uint8
    median = sorted(times)[len(times) // 2]
    return {**spec, "first_pass_s": first, "ms_per_pass_median": 1e3 * median, "ms_per_pass_min": 1e3 * min(times),
            "img_per_s": spec["batch"] / median, "peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ffhq256"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--iters", type=int, help="timed passes (default 20 for tiny, 5 for ffhq256 at batch 1, 2 above)")
    parser.add_argument("--note", help="free text stored in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS / "export_cpu.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one JSON spec
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    import onnxruntime

    hardware = f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"onnxruntime {onnxruntime.__version__} vs torch {torch.__version__} on {hardware}")
    exports, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            path = Path(tmp) / f"{preset}.onnx"
            spec = dict(preset=preset, export=str(path))
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"export of {preset} failed: {proc.stderr[-2000:]}")
            exports[preset] = e = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{preset}: exported in {e['export_s']:.1f} s (peak {e['peak_rss_bytes'] / 2**30:.1f} GiB), "
                  f"{e['file_bytes'] / 2**20:.1f} MiB, largest pixel difference from PyTorch {e['max_level_diff']}")
        print(f"{'preset':9} {'batch':>5} {'runtime':>12} {'img/s':>8} {'ms/pass':>9} {'min ms':>9} {'peak MiB':>9}")
        for preset in args.presets:
            for batch in args.batches:
                big = preset != "tiny"
                iters = args.iters or ((2 if batch > 1 else 5) if big else 20)
                for runtime in RUNTIMES:
                    spec = dict(preset=preset, runtime=runtime, batch=batch, iters=iters, onnx=str(Path(tmp) / f"{preset}.onnx"))
                    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(f"{preset:9} {batch:>5} {runtime:>12}  failed: {proc.stderr.strip().splitlines()[-1:]}")
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    r.pop("onnx")
                    rows.append(r)
                    print(f"{preset:9} {batch:>5} {runtime:>12} {r['img_per_s']:>8.2f} {r['ms_per_pass_median']:>9.1f} "
                          f"{r['ms_per_pass_min']:>9.1f} {r['peak_rss_bytes'] / 2**20:>9.0f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                                    "command": shlex.join(["python", "benchmarks/export.py", *sys.argv[1:]]), "note": args.note,
                                    "exports": exports, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
