"""A rectangular model on a CPU: pairs of emoji side by side (64x32), against a square model of the
same family and width trained on the same pairs letterboxed to 64x64.

Data: the Noto emoji (64x64 RGBA, composited on white). Each image is a face ("Smileys &
Emotion") on the left and an animal or plant ("Animals & Nature") on the right, 128x64, made
into datasets by `stylenat prepare`: `--size 64x32` (the pair as it is) and `--size 64 --crop none
--fill white` (StyleGAN's letterbox: the same 64x32 pixels between two white bars of 16 rows).
The emoji are split by base emoji: the held-out pairs use faces and animals the training pairs
never show.

Runs (one CPU thread each, side by side; the tiny preset's short-run recipe, ADA on, no x-flips):

* rect: `--preset ffhq --resolution 64x32 --cbase 1024 --cmax 64`;
* square: `--preset ffhq --resolution 64 --cbase 1024 --cmax 64` on the letterboxed pairs.

Measured: seconds per step, parameters, and SWD of 1000 samples against the held-out pairs and
against the training pairs at 64x32 (the square model's samples cut to the band between the bars).

    python benchmarks/emoji_pairs.py [--zip ../shared/data/noto-emoji-64.zip] [--work runs/emoji_pairs] [--steps 500]

Prints a table, writes benchmarks/results/emoji_pairs.json and the grids emoji_pairs_<run>.png.
Runs finished earlier in --work are reused and an interrupted one is resumed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import sys
import time
import zipfile
from pathlib import Path

import torch
from PIL import Image

from stylenat._system import cpu_name
from stylenat.data import open_dataset, prepare_dataset, save_image_grid
from stylenat.metrics.swd import swd_from_images
from stylenat.models import resolve_model
from stylenat.sampling import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emoji_ada import train, wait  # noqa: E402  (the same run helpers: start or resume a run, wait for it)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WIDTH = ["--cbase", "1024", "--cmax", "64"]
# The tiny preset's recipe for runs of hundreds of steps (src/stylenat/train/config.py), ADA for ~2000 images;
# no mirrored copies: a mirror puts the animal on the left, a layout the data never shows.
RECIPE = ["--batch", "16", "--d-lr", "1e-3", "--g-lr", "2e-3", "--lr-decay-start", "none", "--r1-gamma", "0.3",
          "--r1-interval", "4", "--bcr-real", "0", "--bcr-fake", "0", "--ema-half-life", "100", "--aug", "ada",
          "--set", "ada_kimg=10", "--no-xflip", "--checkpoint-every", "100", "--sample-every", "1000000", "--tick-every", "50",
          "--seed", "1"]
LEFT, RIGHT = "Smileys & Emotion", "Animals & Nature"


def make_pairs(zip_path: Path, work: Path, n_train: int = 2000, n_heldout: int = 500) -> dict[str, Path]:
    """Folders of 128x64 pair images: train and heldout (disjoint base emoji on both sides)."""
    folders = {side: work / "raw" / side for side in ("train", "heldout")}
    if all(f.is_dir() for f in folders.values()):
        return folders
    shutil.rmtree(work / "raw", ignore_errors=True)
    rng = random.Random(0)
    with zipfile.ZipFile(zip_path) as z:
        meta = json.loads(z.read("noto-emoji-64/emoji.json"))

        def bases(category: str) -> tuple[list[str], list[str]]:
            names = sorted(e["image"] for e in meta if e["category"] == category)
            rng.shuffle(names)
            cut = len(names) * 4 // 5
            return names[:cut], names[cut:]

        def emoji(name: str) -> Image.Image:
            with Image.open(io.BytesIO(z.read(f"noto-emoji-64/img/{name}"))) as img:
                return img.convert("RGBA")

        left, right = bases(LEFT), bases(RIGHT)
        for k, (side, count) in enumerate((("train", n_train), ("heldout", n_heldout))):
            folders[side].mkdir(parents=True)
            for i in range(count):
                canvas = Image.new("RGBA", (128, 64), (255, 255, 255, 255))
                a, b = emoji(rng.choice(left[k])), emoji(rng.choice(right[k]))
                canvas.alpha_composite(a, (0, 0))
                canvas.alpha_composite(b, (64, 0))
                canvas.convert("RGB").save(folders[side] / f"{i:05d}.png")
    return folders


def prepare(folders: dict[str, Path], work: Path) -> dict[str, Path]:
    out = {}
    for side, folder in folders.items():
        for kind, kwargs in (("rect", {"size": "64x32"}), ("square", {"size": 64, "crop": "none", "fill": "white"})):
            out[f"{kind}_{side}"] = work / f"{kind}_{side}.zip"
            if not out[f"{kind}_{side}"].exists():
                prepare_dataset(folder, out[f"{kind}_{side}"], progress=False, **kwargs)
    return out


def band(images: torch.Tensor) -> torch.Tensor:
    """The 64x32 band between the letterbox bars of 64x64 images."""
    return images[:, :, 16:48, :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared" / "data" / "noto-emoji-64.zip")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "emoji_pairs")
    parser.add_argument("--steps", type=int, default=500, help="steps of each run (batch 16)")
    parser.add_argument("--samples", type=int, default=1000, help="samples per SWD")
    args = parser.parse_args()
    if not args.zip.is_file():
        sys.exit(f"{args.zip} not found: pass --zip PATH to noto-emoji-64.zip")
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(make_pairs(args.zip, args.work), args.work)
    runs = {"rect": ["--resolution", "64x32"], "square": ["--resolution", "64"]}
    started = time.time()
    wait({args.work / name: train(args.work / name, ["--preset", "ffhq", *size, *WIDTH, *RECIPE, "--data",
                                                     str(data[f"{name}_train"]), "--steps", str(args.steps)], 1)
          for name, size in runs.items()})
    wall = (time.time() - started) / 60

    reals = {side: open_dataset(data[f"rect_{side}"], (32, 64)) for side in ("train", "heldout")}
    reals = {side: torch.stack([ds[i] for i in range(min(len(ds), args.samples))]) for side, ds in reals.items()}
    rows = []
    for name in runs:
        run_dir = args.work / name
        g = resolve_model(run_dir, device="cpu")
        fakes = generate(g, range(args.samples))
        cut = band(fakes) if name == "square" else fakes
        stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
        timed = [s for s in stats if s["step"] > stats[0]["step"]]
        row = {"run": name, "size": g.config.size_text, "steps": stats[-1]["step"],
               "g_params": sum(p.numel() for p in g.parameters()),
               "sec_per_step": sum(s["sec_per_step"] for s in timed) / max(1, len(timed)),
               "swd_heldout": swd_from_images(cut, reals["heldout"]), "swd_train": swd_from_images(cut, reals["train"]),
               "final_p": stats[-1].get("aug_p")}
        grid = RESULTS / f"emoji_pairs_{name}.png"
        save_image_grid(fakes[:48], grid, (8, 6))
        row["grid"] = str(grid.relative_to(ROOT))
        rows.append(row)
    # The floor: held-out pairs against training pairs (real against real, the same count).
    floor = swd_from_images(reals["heldout"], reals["train"][: len(reals["heldout"])])
    print(f"real held-out vs real train: SWD {floor['swd_avg']:.1f}")

    print(f"\n{'run':<7} {'size':>6} {'G params':>9} {'steps':>6} {'s/step':>7} {'SWD held-out':>13} {'SWD train':>10}")
    for r in rows:
        print(f"{r['run']:<7} {r['size']:>6} {r['g_params']:>9,} {r['steps']:>6} {r['sec_per_step']:>7.2f} "
              f"{r['swd_heldout']['swd_avg']:>13.1f} {r['swd_train']['swd_avg']:>10.1f}")
    record = {"hardware": f"{cpu_name()}, {os.cpu_count()} cores, 1 thread per run, two runs at a time",
              "torch": torch.__version__, "python": platform.python_version(), "width": WIDTH, "recipe": RECIPE,
              "pairs": {"left": LEFT, "right": RIGHT, "train": len(reals["train"]), "heldout": len(reals["heldout"])},
              "swd_real_heldout_vs_train": floor, "train_wall_minutes": wall, "command": " ".join(sys.argv),
              "runs": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "emoji_pairs.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(f"wrote {RESULTS / 'emoji_pairs.json'}")


if __name__ == "__main__":
    main()
