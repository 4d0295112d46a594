"""Helpers of the end-to-end training tests: a micro model run through the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from stylenat.models.io import latest_checkpoint, read_model_file

# A 16px variant of the tiny preset: a few milliseconds per step, every code path of the loop.
MICRO = [
    "--preset", "tiny", "--data", "demo", "--batch", "4", "--tick-every", "5", "--sample-every", "10",
    "--generator", "resolution=16", "--generator", "channels=[16,16,16]", "--generator", "heads=[2,2,2]",
    "--generator", "kernels=[[4],[5],[5]]", "--generator", "dilations=[[1],[1],[1]]", "--generator", "style_dim=16", "--generator", "n_mlp=1",
    "--discriminator", "resolution=16", "--discriminator", "channels=[16,16,16]", "--set", "grid=[2,2]", "--set", "r1_interval=3",
]
STEPS = 20
# The reference run of the exact-resume tests: MICRO for STEPS steps, checkpoints every 5, seed 7.
REFERENCE = [*MICRO, "--steps", str(STEPS), "--checkpoint-every", "5", "--seed", "7"]
# One thread per process: on a shared 2-core machine OpenMP spinning makes tiny ops 100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN = [sys.executable, "-m", "stylenat", "train"]


def cli(*args, check=True, env=None) -> subprocess.CompletedProcess:
    """`stylenat train ARGS` in a subprocess; raises with its output unless it exits 0 (when check)."""
    proc = subprocess.run([*TRAIN, *args], env=env or ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint: weights, optimizer states and random states."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    _, modules = read_model_file(ckpt / "model.safetensors")
    tensors = {f"{m}.{k}": v for m, state in modules.items() for k, v in state.items()}
    return {**tensors, **load_file(str(ckpt / "train_state.safetensors"))}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])
