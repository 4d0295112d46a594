"""A class-conditional model on the Noto emoji, judged by a classifier trained on the real images.

Data: the Noto emoji (64x64 RGBA, composited on white and resized to 32x32 by `stylenat prepare`)
with their category from emoji.json as the class (9 classes; "Component", 5 images, is left out),
split by base emoji (skin-tone variants stay together) into ~90% for training and ~10% held out.

1. `stylenat prepare --labels folders` and a conditional `tiny` model trained on the training part
   (labels on by default; fakes draw their labels in the data's proportions).
2. A small CNN classifier trained on the same real training images (flips, a few epochs).
3. Its accuracy on the held-out real images, and on images the model generates for each class
   (the fraction of class-k images it calls k): if the model's classes are right, the two are close.

    python benchmarks/emoji_conditional.py [--zip ../shared/data/noto-emoji-64.zip] [--work runs/emoji_cond]

Prints a table, writes benchmarks/results/emoji_conditional.json and the class grid
emoji_conditional_grid.png (one row per class). Finished steps are reused when run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stylenat._system import cpu_name
from stylenat.data import open_dataset, prepare_dataset, save_image_grid
from stylenat.models import resolve_model
from stylenat.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESOLUTION = 32
PER_CLASS = 200  # generated images per class for the classifier


def split_by_category(zip_path: Path, work: Path) -> dict[str, Path]:
    """Class folders (one per category) of the training and held-out parts."""
    folders = {"train": work / "raw" / "train", "heldout": work / "raw" / "heldout"}
    if all(f.is_dir() for f in folders.values()):
        return folders
    rng = random.Random(0)
    with zipfile.ZipFile(zip_path) as z:
        for entry in json.loads(z.read("noto-emoji-64/emoji.json")):
            if entry["category"] == "Component":
                continue
            side = "heldout" if rng.random() < 0.1 else "train"
            images = [entry["image"]] + [v["image"] for v in (entry.get("skin_variations") or {}).values()]
            folder = folders[side] / entry["category"].replace(" & ", " and ")
            folder.mkdir(parents=True, exist_ok=True)
            for name in images:
                (folder / name).write_bytes(z.read(f"noto-emoji-64/img/{name}"))
    return folders


class Classifier(nn.Module):
    """Three conv blocks and a linear layer: enough to tell emoji categories apart at 32x32."""

    def __init__(self, classes: int):
        super().__init__()
        layers, ch = [], 3
        for out in (32, 64, 128):
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            ch = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.float() / 127.5 - 1).flatten(1))


def train_classifier(data: Path, classes: int, path: Path, epochs: int = 12) -> Classifier:
    model = Classifier(classes)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    ds = open_dataset(data, RESOLUTION, xflip=True)
    # Balanced sampling: the classes range from 85 to 2000 images.
    weights = 1.0 / torch.bincount(ds.labels, minlength=classes).float()[ds.labels]
    weights = torch.cat([weights, weights])
    loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=torch.utils.data.WeightedRandomSampler(
        weights, len(ds), generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(epochs):
        model.train()
        for images, labels in loader:
            opt.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            opt.step()
        print(f"classifier epoch {epoch + 1}/{epochs}", flush=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    predicted = torch.cat([model(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])
    per_class = {name: float((predicted[labels == k] == k).float().mean()) for k, name in enumerate(classes)
                 if (labels == k).any()}
    return {"accuracy": float((predicted == labels).float().mean()),
            "balanced_accuracy": sum(per_class.values()) / len(per_class), "per_class": per_class}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared" / "data" / "noto-emoji-64.zip")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "emoji_cond")
    parser.add_argument("--steps", type=int, default=3000, help="training steps of the conditional model (batch 16)")
    args = parser.parse_args()
    if not args.zip.is_file():
        sys.exit(f"{args.zip} not found: pass --zip PATH to noto-emoji-64.zip")
    args.work.mkdir(parents=True, exist_ok=True)
    folders = split_by_category(args.zip, args.work)
    data = {}
    for side, folder in folders.items():
        data[side] = args.work / f"{side}.zip"
        if not data[side].exists():
            prepare_dataset(folder, data[side], RESOLUTION, labels="folders", progress=False)
    train_set = open_dataset(data["train"], RESOLUTION)
    classes = train_set.class_names
    counts = {name: int((train_set.labels == k).sum()) for k, name in enumerate(classes)}
    print("training images per class:", counts)

    run = args.work / "run"
    started = time.time()
    if not (run / "done").exists():
        cmd = [sys.executable, "-m", "stylenat", "train"]
        cmd += ["--resume", str(run)] if (run / "config.json").exists() else [
            "--preset", "tiny", "--data", str(data["train"]), "--steps", str(args.steps), "--checkpoint-every", "250",
            "--sample-every", "1000", "--tick-every", "100", "--seed", "1", "--set", "grid=[9,8]", "--run-dir", str(run)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
        (run / "done").touch()
    train_minutes = (time.time() - started) / 60

    classifier = train_classifier(data["train"], len(classes), args.work / "classifier.pt")
    heldout = open_dataset(data["heldout"], RESOLUTION)
    real_images = torch.stack([heldout[i][0] for i in range(len(heldout))])
    real = accuracy(classifier, real_images, heldout.labels, classes)
    g = resolve_model(run, device="cpu")
    fake_images = torch.cat([generate(g, range(PER_CLASS), labels=k) for k in range(len(classes))])
    fake_labels = torch.arange(len(classes)).repeat_interleave(PER_CLASS)
    fake = accuracy(classifier, fake_images, fake_labels, classes)
    grid = RESULTS / "emoji_conditional_grid.png"
    save_image_grid(torch.cat([generate(g, range(8), labels=k) for k in range(len(classes))]), grid, (len(classes), 8))

    print(f"\n{'class':<20} {'train imgs':>10} {'real held-out':>14} {'generated':>10}")
    for name in classes:
        print(f"{name:<20} {counts[name]:>10} {real['per_class'].get(name, float('nan')):>14.2f} {fake['per_class'][name]:>10.2f}")
    print(f"{'accuracy':<20} {'':>10} {real['accuracy']:>14.3f} {fake['accuracy']:>10.3f}")
    print(f"{'balanced accuracy':<20} {'':>10} {real['balanced_accuracy']:>14.3f} {fake['balanced_accuracy']:>10.3f}")
    record = {"hardware": f"{cpu_name()}, {os.cpu_count()} cores", "torch": torch.__version__,
              "python": platform.python_version(), "resolution": RESOLUTION, "classes": classes,
              "train_images_per_class": counts, "heldout_images": len(heldout), "steps": args.steps,
              "train_wall_minutes_this_invocation": train_minutes, "generated_per_class": PER_CLASS,
              "classifier_on_real_heldout": real, "classifier_on_generated": fake, "grid": str(grid.relative_to(ROOT)),
              "command": " ".join(sys.argv)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "emoji_conditional.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RESULTS / 'emoji_conditional.json'}")


if __name__ == "__main__":
    main()
