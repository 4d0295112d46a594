"""The project's model file: one ``.safetensors`` file, no pickle (loading it runs no code).

On-disk layout::

    <name>.safetensors
      header metadata (strings):
        "format":    "stylenat-model/1"
        "g_config":  GeneratorConfig.to_dict() as JSON
        "d_config":  DiscriminatorConfig.to_dict() as JSON, or "null"
        "modules":   JSON list of the module names stored, e.g. ["g", "g_ema", "d"]
        "extra":     JSON object supplied by the writer (step, source checkpoint, ...)
      tensors: "<module>.<state-dict key>", e.g. "g_ema.mapping.w_avg",
               "d.final_linear.0.parametrizations.weight.original"

Generators ("g", "g_ema", or any name starting with "g") are rebuilt from g_config, the
discriminator ("d") from d_config. Files are written atomically (temp file, fsync, rename).

Where model files live in a training run: ``<run>/checkpoints/step-<9 digits>/model.safetensors``;
:func:`find_model_file` turns a run directory, a ``checkpoints/`` directory or a checkpoint
directory into the model file of its newest checkpoint. A ``step-*`` directory is complete by
construction (the trainer renames it into place only after every file in it is written and fsynced).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from stylenat._system import atomic_path
from stylenat.errors import MissingFileError, ModelFileError, first_line
from stylenat.models.config import DiscriminatorConfig, GeneratorConfig

__all__ = ["save_model", "load_model", "load_models", "read_model_file", "find_model_file", "checkpoint_dirs", "latest_checkpoint",
           "FORMAT", "MODEL_FILE", "CHECKPOINT_PREFIX"]

FORMAT = "stylenat-model/1"
MODEL_FILE = "model.safetensors"  # a checkpoint directory's G, G_ema and D
CHECKPOINT_PREFIX = "step-"


def save_model(
    path,
    modules: dict[str, nn.Module],
    g_config: GeneratorConfig,
    d_config: DiscriminatorConfig | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``modules`` (e.g. {"g": g, "g_ema": g_ema, "d": d}) and their configs to ``path``."""
    from safetensors.torch import save_file

    tensors = {}
    for name, module in modules.items():
        if "." in name:
            raise ValueError(f"module name {name!r} must not contain '.'")
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "g_config": json.dumps(g_config.to_dict()),
        "d_config": json.dumps(None if d_config is None else d_config.to_dict()),
        "modules": json.dumps(list(modules)),
        "extra": json.dumps(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Checkpoint directories ``step-*`` under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint directory under ``root``, or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def find_model_file(path: str | Path) -> Path:
    """The model file that ``path`` names: a file as it is; a checkpoint directory's model file;
    the newest checkpoint's of a run directory or of a ``checkpoints/`` directory."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist (expected a stylenat model file or a run directory)")
    if not path.is_dir():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    for root in (path / "checkpoints", path):
        ckpt = latest_checkpoint(root)
        if ckpt is not None:
            return ckpt / MODEL_FILE
    raise MissingFileError(f"{path} is a directory without checkpoints (expected a run directory or a checkpoint)")


def read_model_file(path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(metadata with parsed JSON values, {module name: state dict}) of a model file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = find_model_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # safetensors has its own error types for foreign, truncated or corrupt files
        raise ModelFileError(f"{path} is not a readable stylenat model file ({first_line(exc)}); "
                             "it may be truncated or of another kind") from None
    if raw.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a stylenat model file (format {raw.get('format')!r}, expected {FORMAT!r})")
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
        states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in meta["modules"]}
        for key, value in load_file(str(path)).items():
            name, _, rest = key.partition(".")
            states[name][rest] = value
    except Exception as exc:
        raise ModelFileError(f"{path} is a damaged stylenat model file ({first_line(exc)})") from None
    return meta, states


def load_models(path, names=None, device="cpu") -> dict[str, nn.Module]:
    """Rebuild modules ``names`` (default: all) of a model file, load their weights, move them to
    ``device``, eval mode; {name: module}."""
    from stylenat.models.discriminator import Discriminator
    from stylenat.models.generator import Generator

    meta, states = read_model_file(path)
    missing = [n for n in names or () if n not in states]
    if missing:
        raise ModelFileError(f"{path} holds modules {sorted(states)}, not {missing[0]!r}")
    out = {}
    for name in names or list(states):
        if name.startswith("g"):
            module = Generator(GeneratorConfig.from_dict(meta["g_config"]))
        elif meta["d_config"] is not None:
            module = Discriminator(DiscriminatorConfig.from_dict(meta["d_config"]))
        else:
            raise ModelFileError(f"{path} stores {name!r} but no discriminator config")
        try:
            module.load_state_dict(states[name])
        except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
            raise ModelFileError(f"{path} does not match its own config for {name!r}: {first_line(exc)}") from None
        out[name] = module.to(device).eval()
    return out


def load_model(path, which: str = "g_ema", device="cpu") -> nn.Module:
    """Rebuild module ``which`` of a model file, load its weights, move it to ``device``, eval mode."""
    return load_models(path, [which], device)[which]
