"""Small data on a CPU: training from scratch with and without ADA, then fine-tuning versus training from scratch.

Data: the Noto emoji (3786 images, 64x64 RGBA, composited on white and resized to 32x32 by
`stylenat prepare`), split by category (emoji.json) and by base emoji, so that the skin-tone
variants of one emoji never fall on both sides of a split:

* A: ~1000 images of "People & Body" for training, ~500 other ones held out;
* B: "Objects" (a different category): ~200 for training, the rest held out.

Runs (the `tiny` preset, 32x32; the same number of images shown in each comparison):

1. scratch on A without augmentation, and 2. with `--aug ada`: r_t = E[sign(D(real))] over
   time (ADA's overfitting heuristic), ADA's p, SWD against A's held-out images, sample grids;
3. fine-tuning run 2 onto B (`--init`, `--aug ada`) versus 4. scratch on B (`--aug ada`), same
   steps: SWD against B's held-out images and against B's training images.

    python benchmarks/emoji_ada.py [--zip ../shared/data/noto-emoji-64.zip] [--work runs/emoji_ada]

Prints a table, writes benchmarks/results/emoji_ada.json and the grids emoji_ada_<run>.png. Runs
finished earlier in --work are reused (an interrupted run is resumed), so it can be stopped and
started again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

from stylenat._system import cpu_name
from stylenat.data import prepare_dataset, save_image_grid
from stylenat.metrics.registry import measure
from stylenat.models import resolve_model
from stylenat.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESOLUTION = 32
# ADA's default speed (p from 0 to 1 in 500k images) is made for runs of millions of images; these
# runs show tens of thousands, so p must be able to move within them.
ADA = ["--aug", "ada", "--set", "ada_kimg=10"]


def split_emoji(zip_path: Path, work: Path) -> dict[str, Path]:
    """Folders of images: A_train, A_heldout, B_train, B_heldout (by category, then by base emoji)."""
    folders = {name: work / "raw" / name for name in ("A_train", "A_heldout", "B_train", "B_heldout")}
    if all(f.is_dir() for f in folders.values()):
        return folders
    shutil.rmtree(work / "raw", ignore_errors=True)
    with zipfile.ZipFile(zip_path) as z:
        meta = json.loads(z.read("noto-emoji-64/emoji.json"))
        groups: dict[str, dict[str, list[str]]] = {}
        for e in meta:
            images = [e["image"]] + [v["image"] for v in (e.get("skin_variations") or {}).values()]
            groups.setdefault(e["category"], {})[e["unified"]] = images
        rng = random.Random(0)

        def take(category: str, n_train: int, n_heldout: int, prefix: str) -> None:
            bases = sorted(groups[category])
            rng.shuffle(bases)
            sides = {"train": [], "heldout": []}
            for base in bases:
                side = "train" if len(sides["train"]) < n_train else "heldout"
                if side == "heldout" and len(sides["heldout"]) >= n_heldout:
                    break
                sides[side].extend(groups[category][base])
            for side, images in sides.items():
                folder = folders[f"{prefix}_{side}"]
                folder.mkdir(parents=True)
                for name in images:
                    (folder / name).write_bytes(z.read(f"noto-emoji-64/img/{name}"))

        take("People & Body", 1000, 500, "A")
        take("Objects", 200, 10**6, "B")
    return folders


def prepare(folders: dict[str, Path], work: Path) -> dict[str, Path]:
    out = {}
    for name, folder in folders.items():
        out[name] = work / f"{name}.zip"
        if not out[name].exists():
            prepare_dataset(folder, out[name], RESOLUTION, progress=False)
    return out


def train(run_dir: Path, args: list[str], threads: int) -> subprocess.Popen | None:
    """Start (or resume) a training run in its own process; None when it is finished already."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if (run_dir / "done").exists():
        return None
    cmd = [sys.executable, "-m", "stylenat", "train"]
    cmd += ["--resume", str(run_dir)] if (run_dir / "config.json").exists() else [*args, "--run-dir", str(run_dir)]
    log = open(run_dir.parent / f"{run_dir.name}.out", "a")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait(procs: dict[Path, subprocess.Popen | None]) -> None:
    for run_dir, proc in procs.items():
        if proc is not None and proc.wait() != 0:
            sys.exit(f"training {run_dir} failed; see {run_dir.parent / (run_dir.name + '.out')}")
        (run_dir / "done").touch()


def stats_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def swd(run_dir: Path, real: Path, num: int) -> float:
    g = resolve_model(run_dir, device="cpu")
    return measure(g, real, [f"swd{num}"], progress=False)[f"swd{num}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared" / "data" / "noto-emoji-64.zip")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "emoji_ada")
    parser.add_argument("--steps", type=int, default=2000, help="steps of the runs from scratch on A (batch 16)")
    parser.add_argument("--ft-steps", type=int, default=600, help="steps of the fine-tuning comparison on B")
    args = parser.parse_args()
    if not args.zip.is_file():
        sys.exit(f"{args.zip} not found: pass --zip PATH to noto-emoji-64.zip")
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(split_emoji(args.zip, args.work), args.work)
    counts = {name: json.loads(zipfile.ZipFile(path).read("dataset.json"))["count"] for name, path in data.items()}
    print("images:", counts)

    common = ["--preset", "tiny", "--checkpoint-every", "200", "--sample-every", "1000000", "--tick-every", "50", "--seed", "1"]
    runs = {"A_scratch": args.work / "A_scratch", "A_ada": args.work / "A_ada", "B_finetune": args.work / "B_finetune",
            "B_scratch": args.work / "B_scratch"}
    started = time.time()
    wait({runs["A_scratch"]: train(runs["A_scratch"], [*common, "--data", str(data["A_train"]), "--steps", str(args.steps)], 1),
          runs["A_ada"]: train(runs["A_ada"], [*common, *ADA, "--data", str(data["A_train"]), "--steps", str(args.steps)], 1)})
    wait({runs["B_finetune"]: train(runs["B_finetune"], [*common, *ADA, "--init", str(runs["A_ada"]), "--data",
                                                         str(data["B_train"]), "--steps", str(args.ft_steps)], 1),
          runs["B_scratch"]: train(runs["B_scratch"], [*common, *ADA, "--data", str(data["B_train"]),
                                                       "--steps", str(args.ft_steps)], 1)})
    train_minutes = (time.time() - started) / 60

    rows = []
    for name, run_dir in runs.items():
        stats = stats_of(run_dir)
        real = "A" if name.startswith("A") else "B"
        last = stats[-1]
        row = {"run": name, "steps": last["step"], "kimg": last["kimg"], "final_r_t": last["r_t"], "final_p": last.get("aug_p"),
               "swd_heldout": swd(run_dir, data[f"{real}_heldout"], counts[f"{real}_heldout"]),
               "swd_train": swd(run_dir, data[f"{real}_train"], counts[f"{real}_train"]),
               "r_t": [[s["step"], round(s["r_t"], 4)] for s in stats],
               "p": [[s["step"], round(s["aug_p"], 4)] for s in stats if "aug_p" in s],
               "train_minutes": sum(s["sec_per_step"] * (s["step"] - prev["step"]) for prev, s in zip([{"step": 0}] + stats, stats)) / 60}
        grid = RESULTS / f"emoji_ada_{name}.png"
        save_image_grid(generate(resolve_model(run_dir, device="cpu"), range(64)), grid, (8, 8))
        row["grid"] = str(grid.relative_to(ROOT))
        rows.append(row)

    print(f"\n{'run':<11} {'steps':>6} {'kimg':>6} {'r_t':>6} {'p':>6} {'SWD held-out':>13} {'SWD train':>10}")
    for r in rows:
        p = "-" if r["final_p"] is None else f"{r['final_p']:.3f}"
        print(f"{r['run']:<11} {r['steps']:>6} {r['kimg']:>6.1f} {r['final_r_t']:>6.2f} {p:>6} {r['swd_heldout']:>13.1f} {r['swd_train']:>10.1f}")
    record = {"hardware": f"{cpu_name()}, {os.cpu_count()} cores, 1 thread per run, two runs at a time",
              "torch": torch.__version__, "python": platform.python_version(), "resolution": RESOLUTION,
              "images": counts, "ada": ADA, "train_wall_minutes": train_minutes, "command": " ".join(sys.argv), "runs": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "emoji_ada.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RESULTS / 'emoji_ada.json'}")


if __name__ == "__main__":
    main()
