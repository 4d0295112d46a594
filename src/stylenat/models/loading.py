"""Load a model from whatever a user points at: a run, a checkpoint, a model file, an official .pt, a
Hub-style folder, a registered name, an hf:// repository."""

from __future__ import annotations

import difflib
import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from stylenat.errors import ConfigError, MissingFileError, ModelFileError
from stylenat.models.io import find_model_file, load_models

__all__ = ["default_device", "resolve_model", "resolve_models", "model_source_file", "MODEL_HELP"]

MODEL_HELP = ("expected a training run directory, a stylenat .safetensors model file, a folder written by "
              "`stylenat export-hub`, an official StyleNAT .pt checkpoint (with --preset or --meta), a registered "
              "model name (`stylenat models` lists them) or hf://OWNER/REPO")


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when present, else the CPU."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _is_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # safetensors raises its own error type for foreign files
        return False


def resolve_model(path: str | Path, preset: str | None = None, meta: str | Path | dict | None = None,
                  which: str = "g_ema", device: str | torch.device | None = None) -> nn.Module:
    """Load a generator (or ``which`` module) from whatever the user points at, in eval mode.

    Args:
        path: a training run directory (its latest checkpoint), a checkpoint directory, a
            stylenat ``.safetensors`` model file, a Hub-style folder, an official StyleNAT ``.pt``
            checkpoint, a registered model name (``stylenat.registry``) or ``hf://OWNER/REPO[@REV]``.
        preset: for official checkpoints: the preset they were trained with (e.g. "ffhq256").
        meta: for official checkpoints instead of ``preset``: a configuration dict or a JSON
            file of it (the official configuration terms, see ``stylenat.models.official``).
        which: module to load: "g_ema" (default), "g" or "d".
        device: where to put it; default CUDA when present.
    """
    return resolve_models(path, preset, meta, [which], device)[which]


def resolve_models(path: str | Path, preset: str | None = None, meta: str | Path | dict | None = None,
                   names: list[str] | None = None, device: str | torch.device | None = None) -> dict[str, nn.Module]:
    """Modules ``names`` (default: every one stored, of "g", "g_ema", "d") of what ``path`` names,
    in eval mode; arguments as for :func:`resolve_model`."""
    path, device = model_source_file(path), default_device(device)
    if zipfile.is_zipfile(path):  # torch.save archives are zip files
        if preset is None and meta is None:
            raise ConfigError(f"{path} looks like an official StyleNAT checkpoint; say how it was configured "
                              f"with --preset (e.g. ffhq256) or --meta META.json")
        from stylenat.models.official import load_official_checkpoint

        if isinstance(meta, (str, Path)):
            meta = read_official_meta(meta)
        modules = load_official_checkpoint(path, meta if meta is not None else preset)
        missing = [n for n in names or () if n not in modules]
        if missing:
            raise ModelFileError(f"{path} holds {sorted(modules)}, not {missing[0]!r}")
        return {n: modules[n].to(device) for n in names or modules}
    if _is_safetensors(path) or path.suffix == ".safetensors":
        return load_models(path, names, device)
    raise ModelFileError(f"{path} is not a model: {MODEL_HELP}")


def model_source_file(path: str | Path) -> Path:
    """The file a model comes from: ``path`` itself, the model file of a run, checkpoint or Hub-style
    directory (checked against its config.json), or, for a name that is no local path, the cached file
    of a registered model or of ``hf://OWNER/REPO[@REV]`` (downloaded on first use)."""
    # Lazy: both import the models package, which imports this module.
    from stylenat.hub import check_hub_dir, hf_model_file, is_hub_dir
    from stylenat.registry import entries, fetch, is_registered

    text = str(path)
    if text.startswith("hf://"):
        return hf_model_file(text)
    local = Path(path)
    if local.exists():  # a local file or folder wins over a registry entry of the same name
        if is_hub_dir(local):
            return check_hub_dir(local)
        return find_model_file(local) if local.is_dir() else local
    if is_registered(text):
        return fetch(text)
    near = difflib.get_close_matches(text, list(entries()), n=1)
    raise MissingFileError(f"{path} does not exist{f' (did you mean the registered {near[0]!r}?)' if near else ''}: "
                           f"{MODEL_HELP}")


def read_official_meta(path: str | Path) -> dict:
    """An official configuration (``--meta``) from its JSON file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no configuration file at {path} (--meta expects a JSON file)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path} must hold a JSON object with the official configuration")
    return meta
