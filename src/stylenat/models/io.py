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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from stylenat._system import atomic_path
from stylenat.models.config import DiscriminatorConfig, GeneratorConfig

__all__ = ["save_model", "load_model", "read_model_file", "resolve_model_path", "FORMAT"]

FORMAT = "stylenat-model/1"


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


def resolve_model_path(path) -> Path:
    """The model file ``path`` names. (The training part extends this to run directories.)"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path} (expected a .safetensors file written by stylenat)")
    return path


def read_model_file(path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(metadata with parsed JSON values, {module name: state dict}) of a model file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = resolve_model_path(path)
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a stylenat model file (format {raw.get('format')!r}, expected {FORMAT!r})")
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in meta["modules"]}
    for key, value in load_file(str(path)).items():
        name, _, rest = key.partition(".")
        states[name][rest] = value
    return meta, states


def load_model(path, which: str = "g_ema", device="cpu") -> nn.Module:
    """Rebuild module ``which`` of a model file, load its weights, move it to ``device``, eval mode."""
    from stylenat.models.discriminator import Discriminator
    from stylenat.models.generator import Generator

    meta, states = read_model_file(path)
    if which not in states:
        raise ValueError(f"{path} holds modules {sorted(states)}, not {which!r}")
    if which.startswith("g"):
        module = Generator(GeneratorConfig.from_dict(meta["g_config"]))
    elif meta["d_config"] is not None:
        module = Discriminator(DiscriminatorConfig.from_dict(meta["d_config"]))
    else:
        raise ValueError(f"{path} stores {which!r} but no discriminator config")
    missing, unexpected = module.load_state_dict(states[which], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config for {which!r}: missing {missing}, unexpected {unexpected}")
    return module.to(device).eval()
