"""Latent files and the model identity that latent and direction files carry.

A latent file holds one latent of a generator (e.g. found by ``stylenat project``) as
``.safetensors`` (no pickle; loading one runs no code)::

    tensors:  "latent": w [style_dim] (space "w") or ws [num_ws, style_dim] (space "w+")
    metadata: "format": "stylenat-latent/1", "space", "num_ws", "style_dim", "resolution",
              "model": first 16 hex digits of the sha256 of the generator config JSON (sorted keys)

"resolution" is the image edge for a square model ("256", as always) and WIDTHxHEIGHT for a
rectangular one ("512x384"); :func:`stylenat.models.config.parse_size` reads both forms.

Other tagged files (e.g. SeFa directions, :mod:`stylenat.editing`) reuse :func:`model_identity`,
:func:`read_tagged_file` and :func:`check_identity`: a file made for a model with other latent
shapes is refused, one made for another configuration with the same shapes loads with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from hashlib import sha256
from pathlib import Path

from torch import Tensor, nn

from stylenat._system import atomic_path
from stylenat.errors import ConfigError, MissingFileError, ModelFileError, first_line
from stylenat.models.config import size_text

__all__ = ["LATENT_FORMAT", "SPACES", "model_identity", "read_tagged_file", "check_identity", "save_latent",
           "load_latent"]

LATENT_FORMAT = "stylenat-latent/1"
SPACES = ("w", "w+")


def model_identity(g: nn.Module) -> dict[str, str]:
    """Metadata naming the model a latent belongs to: config hash, resolution, num_ws, style_dim."""
    config = json.dumps(g.config.to_dict(), sort_keys=True)
    return {
        "model": sha256(config.encode()).hexdigest()[:16],
        "resolution": str(g.resolution) if isinstance(g.resolution, int) else size_text(g.resolution),
        "num_ws": str(g.num_ws),
        "style_dim": str(g.style_dim),
    }


def latent_shape(g: nn.Module, space: str) -> tuple[int, ...]:
    """Shape of a latent of ``g`` in ``space``: (style_dim,) for "w", (num_ws, style_dim) for "w+"."""
    if space not in SPACES:
        raise ConfigError(f"space must be 'w' or 'w+', got {space!r}")
    return (g.style_dim,) if space == "w" else (g.num_ws, g.style_dim)


def read_tagged_file(path: str | os.PathLike, fmt: str, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file whose metadata "format" is ``fmt``.

    Args:
        path: the file.
        fmt: the expected format tag, e.g. "stylenat-latent/1".
        what: its kind in words, for messages (e.g. "latent").
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (expected a stylenat {what} file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path)) if meta.get("format") == fmt else {}
    except Exception as exc:  # safetensors has its own error types for foreign, truncated or corrupt files
        raise ModelFileError(f"{path} is not a stylenat {what} file ({first_line(exc)})") from None
    if meta.get("format") != fmt:
        raise ModelFileError(f"{path} is not a stylenat {what} file (format {meta.get('format')!r}, expected {fmt!r})")
    return tensors, meta


def check_identity(path: Path, meta: dict[str, str], g: nn.Module, what: str) -> None:
    """Check a file's model identity against ``g``.

    ModelFileError when its latent size or count differs from g's; a warning when only the config
    hash differs (same latent shapes, so the file loads, but it was made for another model).

    Args:
        path: the file, for messages.
        meta: its metadata (from :func:`read_tagged_file`).
        g: the generator it is about to be used with.
        what: its kind in words, for messages (e.g. "latent").
    """
    mine = model_identity(g)
    for key in ("style_dim", "num_ws"):
        if meta.get(key) != mine[key]:
            raise ModelFileError(
                f"{path} is a {what} for another model ({key} {meta.get(key)}, this model has {mine[key]}); "
                "use it with the model it was made for")
    if meta.get("model") != mine["model"]:
        warnings.warn(f"{path} was made for another model configuration ({meta.get('model')}, this one is "
                      f"{mine['model']}); its latent shapes fit, but the result may be meaningless", stacklevel=3)


def save_latent(path: str | os.PathLike, latent: Tensor, g: nn.Module, space: str) -> Path:
    """Write a latent file (layout in the module docstring) atomically; returns its path.

    Args:
        path: output ``.safetensors`` file.
        latent: w [style_dim] for space "w", ws [num_ws, style_dim] for "w+".
        g: the generator the latent belongs to.
        space: "w" or "w+".
    """
    from safetensors.torch import save_file

    want = latent_shape(g, space)
    if tuple(latent.shape) != want:
        raise ConfigError(f"a {space} latent of this model has shape {list(want)}, got {list(latent.shape)}")
    meta = {"format": LATENT_FORMAT, "space": space, **model_identity(g)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({"latent": latent.detach().float().cpu().contiguous()}, tmp, metadata=meta)
    return path


def load_latent(path: str | os.PathLike, g: nn.Module) -> Tensor:
    """The latent of a file written by :func:`save_latent`, as ws [num_ws, style_dim] (w is broadcast).

    Args:
        path: a latent ``.safetensors`` file.
        g: the generator it will be used with (checked against the file's metadata).
    """
    path = Path(path)
    tensors, meta = read_tagged_file(path, LATENT_FORMAT, "latent")
    check_identity(path, meta, g, "latent")
    latent = tensors.get("latent")
    space = meta.get("space")
    if latent is None or space not in SPACES or tuple(latent.shape) != latent_shape(g, space):
        raise ModelFileError(f"{path} is a damaged latent file (space {space!r}, "
                             f"tensor {None if latent is None else list(latent.shape)})")
    return latent.float() if latent.ndim == 2 else latent.float()[None].repeat(g.num_ws, 1)
