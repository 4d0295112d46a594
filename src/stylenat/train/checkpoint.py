"""Training checkpoints: safetensors + JSON (no pickle), written atomically, the last K kept.

A checkpoint is a directory ``checkpoints/step-<9 digits>/`` holding

* ``model.safetensors``: G, G_ema and D with their configs (the model file format of
  ``stylenat.models.io``, so a checkpoint is also a model that ``stylenat generate`` reads);
* ``train_state.safetensors``: both optimizers' tensors and every rank's random states;
* ``train_state.json``: format version, step and image counters, data position, the number of
  processes, the optimizers' hyper-parameters, the non-tensor random states, the training
  config, a digest of every rank's weights, and the state of other parts (e.g. augmentation).

It is written under a temporary name in the same parent; every file and the directory are
fsynced, then it is renamed into place. A process killed at any moment (or a full disk) leaves
either the previous checkpoint as the newest or the new one complete; temporary directories of
an interrupted save are removed by the next save. Old checkpoints are renamed to a temporary
name before they are deleted, so a kill during the deletion never leaves a half-deleted
``step-*`` directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from stylenat.errors import ModelFileError, UserError
from stylenat.models.io import CHECKPOINT_PREFIX, MODEL_FILE, checkpoint_dirs, latest_checkpoint, read_model_file, save_model

__all__ = ["CheckpointWriteError", "TrainingState", "save_checkpoint", "save_training_checkpoint",
           "load_training_checkpoint", "checkpoint_dirs", "latest_checkpoint", "weights_digest", "capture_rng",
           "restore_rng", "optimizer_to_flat", "optimizer_from_flat", "MODEL_FILE", "STATE_FILE", "STATE_JSON"]

STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"
STATE_FORMAT = "stylenat-train-state"
# 1: the first release (no "format" key); 2: adds "format"/"version" and "components"; 3: the training
# generator's state is gone (a step's draws are a function of the seed and the step). An older
# checkpoint still resumes (its generator state is ignored), with the new draws from there on.
STATE_VERSION = 3


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Create checkpoint ``step`` by calling ``write(directory)``, atomically; keep the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save or mid-delete
        _remove(stale)
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
        doomed = root / f".tmp-delete-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed)
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


def capture_rng(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's global random states: torch's CPU (and CUDA) generator, numpy and Python
    ``random``, as uint8 tensors and JSON. (The training step's own numbers need no state: they are
    a function of the seed and the step, :mod:`stylenat.train.draws`.)"""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(py_state), py_gauss],
    }
    return tensors, meta


def restore_rng(device: torch.device, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def weights_digest(modules: dict[str, nn.Module]) -> str:
    """SHA-256 of every parameter and buffer, in state-dict order (equal digests: bitwise-equal weights)."""
    h = hashlib.sha256()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            h.update(f"{name}.{key}".encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class TrainingState:
    """Everything a checkpoint restores besides the module weights and optimizer states.

    step: optimizer steps done. images: images shown to D over all ranks. consumed_per_rank: real
    images each rank has drawn from its data stream. world: processes that wrote it.
    components: JSON state of other parts of the loop (e.g. ``{"ada": {...}}``), by name.
    """

    step: int = 0
    images: int = 0
    consumed_per_rank: int = 0
    world: int = 1
    components: dict = field(default_factory=dict)


def save_training_checkpoint(root: Path, state: TrainingState, modules: dict[str, nn.Module],
                             optimizers: dict[str, torch.optim.Optimizer], rng: list[tuple[dict, dict]],
                             digests: list[str], config: dict, keep: int) -> Path:
    """Write checkpoint ``state.step`` under ``root`` (see the module docstring).

    modules: {"g", "g_ema", "d"}, each with a ``config``. optimizers: by name. rng: every rank's
    :func:`capture_rng`, in rank order. digests: every rank's :func:`weights_digest`.
    config: the training config as JSON. keep: checkpoints kept.
    Raises CheckpointWriteError (the previous checkpoint intact) when the disk refuses.
    """
    tensors, opt_meta = {}, {}
    for name, opt in optimizers.items():
        flat, opt_meta[name] = optimizer_to_flat(opt, name)
        tensors.update(flat)
    for rank, (rank_tensors, _) in enumerate(rng):
        tensors.update({f"rng.{rank}.{k}": v for k, v in rank_tensors.items()})
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": state.step, "images": state.images,
            "consumed_per_rank": state.consumed_per_rank, "world": state.world, "rank_digests": digests,
            "optimizers": opt_meta, "rng": [m for _, m in rng], "components": state.components, "config": config}

    def write(directory: Path) -> None:
        save_model(directory / MODEL_FILE, modules, modules["g"].config, modules["d"].config,
                   extra={"step": state.step, "images": state.images})
        save_file(tensors, str(directory / STATE_FILE))
        (directory / STATE_JSON).write_text(json.dumps(meta))

    try:
        return save_checkpoint(root, state.step, write, keep)
    except (OSError, SafetensorError) as exc:
        # safetensors reports a failed write as its own error type, "... I/O error: <strerror> ..."
        if isinstance(exc, FileExistsError) or (isinstance(exc, SafetensorError) and "I/O error" not in str(exc)):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).split("I/O error: ")[-1]
        newest = latest_checkpoint(root)
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {state.step} under {root} ({reason}); "
            f"{'the newest checkpoint ' + newest.name + ' is intact' if newest else 'no earlier checkpoint exists'}: "
            "free space (or fix permissions) and resume") from None


def read_training_meta(path: Path) -> dict:
    """The JSON part of checkpoint ``path``, its format checked."""
    try:
        meta = json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path / STATE_JSON} is unreadable ({exc}); delete {path} to resume from the checkpoint before it") from None
    version = meta.get("version", 1) if meta.get("format", STATE_FORMAT) == STATE_FORMAT else None
    if version is None or version > STATE_VERSION:
        raise ModelFileError(f"{path} was written by a newer or foreign program (format {meta.get('format')!r} "
                             f"version {meta.get('version')!r}); this stylenat reads {STATE_FORMAT} up to version {STATE_VERSION}")
    return meta


def load_training_checkpoint(path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                             rank: int, world: int, device: torch.device) -> TrainingState:
    """Load checkpoint ``path`` into ``modules`` and ``optimizers`` and this rank's random states.

    world: the number of processes now; it must be the one that wrote the checkpoint, so that
    the data order and random streams continue exactly.
    """
    meta = read_training_meta(path)
    if meta["world"] != world:
        raise UserError(f"{path} was written by {meta['world']} process(es); resume it with the same number "
                        f"(now {world}) so data order and random streams continue exactly")
    _, weights = read_model_file(path / MODEL_FILE)
    for name, module in modules.items():
        module.load_state_dict(weights[name])
    try:
        tensors = load_file(str(path / STATE_FILE))
    except Exception as exc:  # safetensors' own error types for truncated files
        raise ModelFileError(f"{path / STATE_FILE} is damaged ({exc}); delete {path} to resume from the checkpoint before it") from None
    for name, opt in optimizers.items():
        optimizer_from_flat(opt, tensors, meta["optimizers"][name], name)
    prefix = f"rng.{rank}."
    restore_rng(device, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["rng"][rank])
    return TrainingState(meta["step"], meta["images"], meta["consumed_per_rank"], meta["world"], meta.get("components", {}))
