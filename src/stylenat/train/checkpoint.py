"""Checkpoints: safetensors + JSON (no pickle), written atomically, the last K kept.

A checkpoint is a directory ``checkpoints/step-<9 digits>/``. It is written under a temporary
name in the same parent, every file and the directory are fsynced, then it is renamed into place
and the ``latest`` pointer file is replaced atomically. A process killed at any moment leaves
either the previous checkpoint as latest or the new one complete; stale temporary directories
are removed by the next save.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from stylenat.models.io import CHECKPOINT_PREFIX, MODEL_FILE, checkpoint_dirs, latest_checkpoint


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Create checkpoint ``step`` by calling ``write(directory)``, atomically; keep the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:09d}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old)
    return final


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as tensors named ``<prefix>.<param index>.<key>`` plus JSON for the rest."""
    sd = opt.state_dict()
    tensors, other = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().to("cpu", copy=True).contiguous()  # a snapshot
            else:
                other.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> None:
    """Inverse of :func:`optimizer_to_flat`; loads the state into ``opt``."""
    state: dict[int, dict] = {int(idx): dict(values) for idx, values in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def capture_rng(train_gen: torch.Generator, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's random states: the training generator, torch's global CPU (and CUDA) generator,
    numpy and Python ``random``, as uint8 tensors and JSON."""
    tensors = {"train": train_gen.get_state(), "torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(py_state), py_gauss],
    }
    return tensors, meta


def restore_rng(train_gen: torch.Generator, device: torch.device, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    train_gen.set_state(tensors["train"])
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))
