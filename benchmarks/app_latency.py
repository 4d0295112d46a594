"""Latency of the explorer's requests (`stylenat serve`): prints a table, writes
benchmarks/results/app_latency_<device>.json.

Each request goes over HTTP on loopback to the app served in this process (uvicorn in a thread),
with the body the page sends, so a time includes JSON, PNG encoding and the server, not only the
model. Generators have random weights (they time the same as trained ones). Every kind of request
is sent once untimed first (the first edit computes the SeFa directions, cached after).

    python benchmarks/app_latency.py                          # tiny and ffhq256 on the CPU
    python benchmarks/app_latency.py --presets tiny --reps 20 --frames 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path

import torch

from stylenat import __version__
from stylenat._system import cpu_name
from stylenat.app import Explorer
from stylenat.app.server import BackgroundServer
from stylenat.models import build_generator

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_REPS = {"tiny": 10, "ffhq256": 3}


def requests(g, frames: int, seed: int) -> dict[str, dict]:
    """The body of each timed request, as the page sends it (seed varies per repetition)."""
    centre = [g.resolution // 2, g.resolution // 3]
    return {
        "image": {"path": "/api/image", "body": {"latent": {"seed": seed}, "psi": 0.7}},
        "mix (3 images)": {"path": "/api/mix", "body": {"a": {"seed": seed}, "b": {"seed": seed + 1},
                                                        "layers": [0, 1, 2, 3], "psi": 0.7}},
        "attention (all stages)": {"path": "/api/attention", "body": {"seed": seed, "pixel": centre, "psi": 0.7}},
        f"interpolation ({frames} frames)": {"path": "/api/interpolate", "body": {
            "a": {"seed": seed}, "b": {"seed": seed + 1}, "frames": frames, "psi": 0.7}},
        "edit (3 sliders)": {"path": "/api/edit", "body": {"latent": {"seed": seed}, "strengths": [2, -1, 1],
                                                           "psi": 0.7}},
    }


def post(url: str, body: dict) -> tuple[float, int]:
    """(seconds, response bytes) of one request."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as res:
        size = len(res.read())
    return time.perf_counter() - start, size


def measure(preset: str, device: str, reps: int, frames: int) -> list[dict]:
    torch.manual_seed(0)
    g = build_generator(preset).to(device).eval()
    rows = []
    with BackgroundServer(Explorer(g)) as server:
        for name, req in requests(g, frames, seed=0).items():
            post(server.url + req["path"], req["body"])  # untimed warm-up
            times, size = [], 0
            for rep in range(reps):
                req = requests(g, frames, seed=1 + rep)[name]
                seconds, size = post(server.url + req["path"], req["body"])
                times.append(seconds)
            rows.append({"preset": preset, "request": name, "reps": reps, "ms_median": 1000 * statistics.median(times),
                         "ms_min": 1000 * min(times), "response_kb": size / 1024})
            print(f"{preset:>8} {name:<26} {rows[-1]['ms_median']:>10.1f} {rows[-1]['ms_min']:>10.1f} "
                  f"{rows[-1]['response_kb']:>9.0f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--presets", nargs="+", default=["tiny", "ffhq256"])
    parser.add_argument("--reps", type=int, help="timed requests of each kind (default 10 for tiny, 3 for ffhq256)")
    parser.add_argument("--frames", type=int, default=8, help="frames of the timed interpolation (default 8)")
    args = parser.parse_args()
    hardware = cpu_name() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{hardware}, {torch.get_num_threads()} torch threads; torch {torch.__version__}; stylenat {__version__}")
    print(f"{'preset':>8} {'request':<26} {'median ms':>10} {'min ms':>10} {'answer kB':>9}")
    load_before = os.getloadavg()[0]  # other processes on the machine slow every row down: say so
    rows = [r for p in args.presets for r in measure(p, args.device, args.reps or DEFAULT_REPS.get(p, 3), args.frames)]
    report = {"device": args.device, "hardware": hardware, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "stylenat": __version__, "frames": args.frames, "load_average_1min": [load_before, os.getloadavg()[0]],
              "results": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"app_latency_{args.device}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
