"""Latent editing along SeFa directions (Shen & Zhou 2021, "Closed-Form Factorization of Latent
Semantics in GANs").

A ws index i feeds the two AdaINs of block i % 2 of stage i // 2; each AdaIN maps its latent to
(gamma, beta) with an affine layer whose effective weight is ``style.weight * style.scale``
[2C, style_dim]. SeFa stacks those weights of the chosen ws indices along the output dimension
into A [R, style_dim] and takes the eigenvectors of A^T A with the largest eigenvalues: the unit
directions n that move the styles the most, |A n|^2. As in the official code (genforce/sefa
``factorize_weight``), every row of A is first scaled to unit norm, so each style channel counts
the same however large its weights are (the per-layer ``scale`` therefore cancels out).

Directions are unit vectors in w space; an edit adds ``strength * direction`` to the chosen ws
indices, so strengths are in w units (a few units is a visible edit, as in SeFa's -3 .. 3).
Each direction's sign is fixed so that its largest-magnitude component is positive.

Direction files (``.safetensors``, no pickle)::

    tensors:  "directions" [K, style_dim] (rows, by eigenvalue descending), "eigenvalues" [K]
    metadata: "format": "stylenat-directions/1", "layers": JSON list of ws indices, plus the model
              identity of :func:`stylenat.models.latents.model_identity` (config hash, resolution,
              num_ws, style_dim)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from stylenat._system import atomic_path
from stylenat.errors import ConfigError, ModelFileError
from stylenat.models import model_to_uint8
from stylenat.models.config import as_shape
from stylenat.models.latents import check_identity, model_identity, read_tagged_file

__all__ = [
    "DIRECTIONS_FORMAT",
    "style_weights",
    "sefa_directions",
    "edit",
    "render",
    "render_edits",
    "save_directions",
    "load_directions",
]

DIRECTIONS_FORMAT = "stylenat-directions/1"


def check_layers(g: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """Sorted distinct ws indices; None means all of them. ConfigError when one is out of range."""
    if layers is None:
        return list(range(g.num_ws))
    chosen = sorted({int(i) for i in layers})
    if not chosen or chosen[0] < 0 or chosen[-1] >= g.num_ws:
        raise ConfigError(f"layers must be ws indices in 0-{g.num_ws - 1} for this model, got {list(layers)}")
    return chosen


def style_weights(g: nn.Module, layers: Sequence[int] | None = None) -> Tensor:
    """Effective AdaIN style weights read by the ws indices ``layers`` (None: all), stacked: [R, style_dim].

    Rows in order of the ws index, then norm1 before norm2, gamma rows before beta rows.
    """
    rows = []
    for i in check_layers(g, layers):
        block = g.synthesis.stages[i // 2].blocks[i % 2]
        rows += [norm.style.weight.detach() * norm.style.scale for norm in (block.norm1, block.norm2)]
    return torch.cat(rows)


def sefa_directions(g: nn.Module, layers: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """SeFa directions of the ws indices ``layers`` (None: all), as in the module docstring.

    Args:
        g: a stylenat generator.
        layers: ws indices (0 .. num_ws - 1) whose style weights are factorised.
    Returns (directions [style_dim, style_dim] float32 unit rows, eigenvalues [style_dim] descending),
    on the CPU.
    """
    weight = style_weights(g, layers).double().cpu()
    weight = weight / weight.norm(dim=1, keepdim=True)
    values, vectors = torch.linalg.eigh(weight.T @ weight)  # ascending; columns are eigenvectors
    values, directions = values.flip(0), vectors.T.flip(0)
    peak = directions.abs().argmax(dim=1, keepdim=True)
    directions = directions * directions.gather(1, peak).sign()
    return directions.float(), values.float()


def edit(g: nn.Module, ws: Tensor, direction: Tensor, strengths: Sequence[float] | Tensor,
         layers: Sequence[int] | None = None) -> Tensor:
    """ws moved along ``direction`` by each strength on the ws indices ``layers`` only.

    Args:
        g: the generator the latents belong to.
        ws: latents [..., num_ws, style_dim] (e.g. from load_latent), or one w [style_dim].
        direction: [style_dim], e.g. a row of sefa_directions (unit norm: strengths are in w units).
        strengths: T multipliers of the direction; 0 leaves the latents exactly as they are.
        layers: ws indices to move (None: all); the others are copied unchanged.
    Returns [..., T, num_ws, style_dim].
    """
    if ws.ndim == 1:
        ws = ws[None].expand(g.num_ws, -1)
    if ws.shape[-2:] != (g.num_ws, g.style_dim) or direction.shape != (g.style_dim,):
        raise ConfigError(f"ws must be [..., {g.num_ws}, {g.style_dim}] and the direction [{g.style_dim}], "
                          f"got {list(ws.shape)} and {list(direction.shape)}")
    s = torch.as_tensor(strengths, dtype=ws.dtype, device=ws.device).reshape(-1)
    out = ws.unsqueeze(-3).repeat_interleave(len(s), dim=-3).clone()  # [..., T, num_ws, D]
    idx = torch.tensor(check_layers(g, layers), device=ws.device)
    out[..., idx, :] += s[:, None, None] * direction.to(ws)
    return out


def render(g: nn.Module, ws: Tensor, batch: int = 16) -> Tensor:
    """Images of latents ws [..., num_ws, style_dim] -> uint8 [..., 3, H, W] on the CPU.

    Args:
        g: a stylenat generator, on the device it should run on.
        ws: the latents.
        batch: images per synthesis pass (memory; other sizes may round a pixel differently).
    """
    flat = ws.reshape(-1, g.num_ws, g.style_dim)
    dev = g.w_avg.device
    was_training = g.training
    g.eval()
    try:
        with torch.no_grad():
            images = [model_to_uint8(g.synthesis(flat[i:i + batch].to(dev)), g.config).cpu()
                      for i in range(0, len(flat), batch)]
    finally:
        g.train(was_training)
    return torch.cat(images).reshape(*ws.shape[:-2], 3, *as_shape(g.resolution))


def render_edits(g: nn.Module, ws: Tensor, direction: Tensor, strengths: Sequence[float] | Tensor,
                 layers: Sequence[int] | None = None, batch: int = 16) -> Tensor:
    """Images of :func:`edit`: uint8 [..., T, 3, H, W] (arguments as there; batch as in render)."""
    return render(g, edit(g, ws, direction, strengths, layers), batch)


def save_directions(path: str | os.PathLike, directions: Tensor, eigenvalues: Tensor, g: nn.Module,
                    layers: Sequence[int] | None) -> Path:
    """Write a directions file (layout in the module docstring) atomically; returns its path.

    Args:
        path: output ``.safetensors`` file.
        directions: [K, style_dim] rows. eigenvalues: [K].
        g: the generator they were computed from. layers: the ws indices used (None: all).
    """
    from safetensors.torch import save_file

    if directions.ndim != 2 or directions.shape[1] != g.style_dim or eigenvalues.shape != directions.shape[:1]:
        raise ConfigError(f"directions must be [K, {g.style_dim}] with eigenvalues [K], got "
                          f"{list(directions.shape)} and {list(eigenvalues.shape)}")
    meta = {"format": DIRECTIONS_FORMAT, "layers": json.dumps(check_layers(g, layers)), **model_identity(g)}
    tensors = {"directions": directions.detach().float().cpu().contiguous(),
               "eigenvalues": eigenvalues.detach().float().cpu().contiguous()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def load_directions(path: str | os.PathLike, g: nn.Module) -> tuple[Tensor, Tensor, list[int]]:
    """(directions [K, style_dim], eigenvalues [K], layers) of a file written by save_directions.

    Args:
        path: a directions ``.safetensors`` file.
        g: the generator they will be used with (checked against the file's metadata).
    """
    path = Path(path)
    tensors, meta = read_tagged_file(path, DIRECTIONS_FORMAT, "directions")
    check_identity(path, meta, g, "directions file")
    directions, values = tensors.get("directions"), tensors.get("eigenvalues")
    try:
        layers = check_layers(g, json.loads(meta["layers"]))
        ok = directions.ndim == 2 and directions.shape[1] == g.style_dim and values.shape == directions.shape[:1]
    except (KeyError, TypeError, ValueError, AttributeError):  # absent keys or tensors, bad JSON, bad layers
        ok = False
    if not ok:
        raise ModelFileError(f"{path} is a damaged directions file (tensors or layers do not fit this model)")
    return directions, values, layers
