"""Training throughput (images/s) and peak memory per preset, batch and precision.

Each configuration trains a fresh run with `stylenat.train.train` on the demo data in its own
process (so peak memory is its own and a CUDA out-of-memory error ends only that measurement) and
reads the per-step timings from the run's stats.jsonl. The first step (compilation, allocation,
and an R1 step) is warm-up and not timed. Timed steps include R1 steps in their real share only
when they span a multiple of the R1 interval (``--steps 33`` with interval 16); with fewer steps
the numbers are the D + G step alone, which the table says.

    python benchmarks/train.py                       # CPU: tiny (batch 16) and ffhq256 (batch 1, one timed step)
    python benchmarks/train.py --device cuda         # GPU: tiny, ffhq256 batch 8 and the largest that fits, fp32/TF32 and bf16

Writes benchmarks/results/train_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def measure(preset: str, batch: int, steps: int, device: str, amp: str | None) -> dict:
    """Run in this process: train ``steps`` steps and summarize the timed ones."""
    from stylenat.train import get_train_preset, train

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = dataclasses.replace(
            get_train_preset(preset), data="demo", run_dir=run_dir, steps=steps, batch=batch, device=device, amp=amp,
            tick_every=1, sample_every=10**9, checkpoint_every=10**9, grid=(1, 1), lr_decay_start=None,
        )
        train(cfg)
        stats = [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]
    timed = stats[1:]
    sec = sum(s["sec_per_step"] for s in timed) / len(timed)
    r1_steps = sum(1 for s in timed if "r1" in s)
    return {"preset": preset, "batch": batch, "device": device, "amp": amp or ("fp32" if device == "cpu" else "fp32/tf32"),
            "timed_steps": len(timed), "r1_steps_timed": r1_steps, "sec_per_step": sec, "img_per_s": batch / sec,
            "peak_mem_gib": max(s["peak_mem_gib"] for s in stats)}


def run_isolated(preset: str, batch: int, steps: int, device: str, amp: str | None) -> dict | None:
    """``measure`` in a child process; None when it fails (e.g. out of memory)."""
    args = [sys.executable, __file__, "--one", json.dumps([preset, batch, steps, device, amp])]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {preset} batch {batch} {amp or ''}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return

    rows = []
    if args.device == "cpu":
        plan = [("tiny", 16, 11, None), ("ffhq256", 1, 2, None)]
    else:
        plan = [("tiny", 64, 33, None), ("tiny", 64, 33, "bf16")]
        for amp in (None, "bf16"):
            plan.append(("ffhq256", 8, 33, amp))
    for preset, batch, steps, amp in plan:
        print(f"measuring {preset} batch {batch} {amp or ''} ...", flush=True)
        row = run_isolated(preset, batch, steps, args.device, amp)
        if row:
            rows.append(row)
    if args.device != "cpu":  # the largest ffhq256 batch per device that fits, by doubling
        for amp in (None, "bf16"):
            batch, best = 16, None
            while (row := run_isolated("ffhq256", batch, 17, args.device, amp)) is not None:
                best, batch = row, batch * 2
            if best:
                rows.append({**best, "largest_batch": True})

    name = torch.cuda.get_device_name() if args.device != "cpu" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\ntraining throughput on {name} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'preset':<9} {'batch':>5} {'precision':<10} {'img/s':>8} {'s/step':>8} {'peak GiB':>9}  timed steps")
    for r in rows:
        note = f"{r['timed_steps']} ({r['r1_steps_timed']} with R1)" + (", largest batch that fits" if r.get("largest_batch") else "")
        print(f"{r['preset']:<9} {r['batch']:>5} {r['amp']:<10} {r['img_per_s']:>8.2f} {r['sec_per_step']:>8.2f} {r['peak_mem_gib']:>9.2f}  {note}")
    out = Path(__file__).parent / "results" / f"train_{'cpu' if args.device == 'cpu' else 'gpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
