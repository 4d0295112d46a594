"""Seeds -> images: generation with truncation, style mixing, latent interpolation videos.

Every function takes a stylenat generator ``g`` and returns uint8 pixels ``[N, 3, S, S]`` on the
CPU. A seed always gives the same latent (:func:`stylenat.models.seeds_to_z`), so a
seed gives the same image here, in FID runs and in the CLI, whatever batch it is drawn in.

Style mixing convention (StyleGAN2's ``style_mixing.py``): cell (row r, column c) of the grid
takes every latent of row seed r, except the ws indices in ``layers``, which come from column
seed c. ws index 2s + j feeds block j of the stage at resolution 4 * 2**s, so low indices
("0-3": the 4x4 and 8x8 stages) carry coarse structure (pose, layout) and high ones the fine
detail (texture, colour).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from stylenat.errors import ConfigError
from stylenat.models import seeds_to_z

__all__ = [
    "generate",
    "style_mix",
    "interpolate",
    "seeds_to_w",
    "check_video_path",
    "save_video",
]

# ---- rendering --------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(g: nn.Module):
    """No autograd, and eval mode: in train mode g.mapping would update w_avg while sampling."""
    was_training = g.training
    g.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        g.train(was_training)


def _device_of(g: nn.Module) -> torch.device:
    return next(g.parameters()).device


def _synthesize(g: nn.Module, ws: Tensor, batch: int) -> Tensor:
    """ws [N, num_ws, style_dim] (or w [N, style_dim], broadcast) -> uint8 [N, 3, S, S] on the CPU."""
    from stylenat.models import model_to_uint8

    if ws.ndim == 2:
        ws = ws[:, None].expand(-1, g.num_ws, -1)
    dev = _device_of(g)
    with _eval_mode(g):
        out = [model_to_uint8(g.synthesis(ws[i:i + batch].to(dev)), g.config).cpu() for i in range(0, len(ws), batch)]
    return torch.cat(out) if out else torch.zeros(0, 3, g.resolution, g.resolution, dtype=torch.uint8)


def seeds_to_w(g: nn.Module, seeds: Sequence[int], truncation_psi: float = 1.0) -> Tensor:
    """w [len(seeds), style_dim] of the seeds, truncated toward ``g.w_avg`` by ``truncation_psi``."""
    with _eval_mode(g):
        return g.mapping(seeds_to_z(seeds, g.style_dim, _device_of(g)), truncation_psi=truncation_psi)


def generate(g: nn.Module, seeds: Sequence[int], truncation_psi: float = 1.0, batch: int = 16) -> Tensor:
    """One image per seed: uint8 [len(seeds), 3, S, S].

    Args:
        g: a stylenat generator, on the device it should run on.
        seeds: integer seeds; the same seed gives the same image whatever the batch.
        truncation_psi: 1 = no truncation, 0 = every seed gives the mean image (w_avg).
        batch: images per synthesis pass (memory only; the result does not depend on it).
    """
    return _synthesize(g, seeds_to_w(g, seeds, truncation_psi), batch)


def style_mix(g: nn.Module, row_seeds: Sequence[int], col_seeds: Sequence[int], layers: Sequence[int],
              truncation_psi: float = 1.0, batch: int = 16) -> Tensor:
    """Style-mixing grid: uint8 [R + 1, C + 1, 3, S, S] (convention in the module docstring).

    Row 0 holds the column seeds' own images, column 0 the row seeds' own images, the corner is
    black; cell (1 + r, 1 + c) mixes row seed r with column seed c.

    Args:
        g: a stylenat generator. row_seeds, col_seeds: the sources.
        layers: ws indices (0 .. g.num_ws - 1) taken from the column seed.
        truncation_psi: truncation of every source. batch: images per synthesis pass.
    """
    bad = [i for i in layers if not 0 <= i < g.num_ws]
    if bad or not layers:
        raise ConfigError(f"layers must be ws indices in 0-{g.num_ws - 1} for this model, got {list(layers)}")
    w_rows = seeds_to_w(g, row_seeds, truncation_psi)
    w_cols = seeds_to_w(g, col_seeds, truncation_psi)
    ws = w_rows[:, None, None, :].repeat(1, len(col_seeds), g.num_ws, 1)  # [R, C, num_ws, D]
    idx = torch.tensor(sorted(set(layers)), device=ws.device)
    ws[:, :, idx] = w_cols[None, :, None, :].expand(len(row_seeds), -1, len(idx), -1)
    size = g.resolution
    grid = torch.zeros(len(row_seeds) + 1, len(col_seeds) + 1, 3, size, size, dtype=torch.uint8)
    grid[0, 1:] = _synthesize(g, w_cols, batch)
    grid[1:, 0] = _synthesize(g, w_rows, batch)
    grid[1:, 1:] = _synthesize(g, ws.flatten(0, 1), batch).view(len(row_seeds), len(col_seeds), 3, size, size)
    return grid


def _slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of rows a, b [D] at fractions t [F] -> [F, D] (norm interpolated linearly)."""
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum().clamp(-1, 1))
    if omega < 1e-6:  # (nearly) equal directions: slerp's 0/0, and lerp is exact there
        return torch.lerp(a[None], b[None], t[:, None])
    s = torch.sin(omega)
    u = (torch.sin((1 - t) * omega)[:, None] * ua + torch.sin(t * omega)[:, None] * ub) / s
    return u * torch.lerp(na, nb, t)[:, None]


def interpolate(g: nn.Module, seeds: Sequence[int], frames_per_seed: int, loop: bool = True, space: str = "w",
                truncation_psi: float = 1.0, batch: int = 16) -> Tensor:
    """Frames of a walk through the seeds' latents: uint8 [F, 3, S, S].

    Args:
        g: a stylenat generator. seeds: key frames, visited in order (at least 2).
        frames_per_seed: frames from one key frame to the next (the key frame included).
        loop: also go from the last seed back to the first (F = len(seeds) * frames_per_seed);
            otherwise end on the last seed (F = (len(seeds) - 1) * frames_per_seed + 1).
        space: "w": linear steps between the mapped w; "z": spherical steps between the z, each
            frame mapped on its own.
        truncation_psi: applied to every frame. batch: images per synthesis pass.
    """
    if len(seeds) < 2 or frames_per_seed < 1:
        raise ConfigError("an interpolation needs at least 2 seeds and 1 frame per seed")
    if space not in ("w", "z"):
        raise ConfigError(f"space must be 'w' or 'z', got {space!r}")
    keys = seeds_to_z(seeds, g.style_dim, _device_of(g)) if space == "z" else seeds_to_w(g, seeds, truncation_psi)
    pairs = list(zip(keys[:-1], keys[1:])) + ([(keys[-1], keys[0])] if loop else [])
    t = torch.arange(frames_per_seed, device=keys.device, dtype=keys.dtype) / frames_per_seed
    step = _slerp if space == "z" else (lambda a, b, t: torch.lerp(a[None], b[None], t[:, None]))
    path = torch.cat([step(a, b, t) for a, b in pairs] + ([] if loop else [keys[-1:]]))
    if space == "z":
        with _eval_mode(g):
            path = g.mapping(path, truncation_psi=truncation_psi)
    return _synthesize(g, path, batch)


def check_video_path(path: str | Path) -> Path:
    """``path`` as a Path if :func:`save_video` can write it; else ConfigError saying what to do."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ConfigError(f"unsupported video format {path.suffix!r}; write a .gif or an .mp4")
    if suffix == ".mp4" and not all(importlib.util.find_spec(m) for m in ("imageio", "imageio_ffmpeg")):
        raise ConfigError('writing .mp4 needs imageio and imageio-ffmpeg: pip install "stylenat[video]" (or write a .gif)')
    return path


def save_video(frames: Tensor, path: str | Path, fps: float = 30, loop: bool = True) -> Path:
    """Write frames uint8 [F, 3, H, W] to a .gif (Pillow) or .mp4 (needs the ``video`` extra).

    path: output file, its suffix picks the format; fps: frames per second; loop: GIFs repeat
    forever when True, play once otherwise.
    """
    import numpy as np

    path = check_video_path(path)
    suffix = path.suffix.lower()
    arrays = frames.permute(0, 2, 3, 1).contiguous().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(a) for a in arrays]
        # Pillow takes milliseconds; browsers slow delays under 20 ms down to 100 ms, so clamp.
        extra = {"loop": 0} if loop else {}
        images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)), **extra)
    else:
        import imageio.v2 as imageio

        # libx264 wants even sides and yuv420p for players to accept it; our sides are powers of two.
        with imageio.get_writer(path, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1) as writer:
            for a in np.asarray(arrays):
                writer.append_data(a)
    return path
