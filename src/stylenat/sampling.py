"""Seeds -> images: generation with truncation, style mixing, latent interpolation videos.

Style mixing and interpolation also take latents instead of seeds (e.g. found by
:func:`stylenat.projection.project`): ws [N, num_ws, style_dim] or w [N, style_dim], used as they
are (truncation applies to seeds only). Latents are mixed and interpolated per ws index.

Every function takes a stylenat generator ``g`` and returns uint8 pixels ``[N, 3, H, W]`` on the
CPU (H x W: the model's image, ``g.shape``; H == W for a square model). A seed always gives the
same latent (:func:`stylenat.models.seeds_to_z`), so a seed gives the same image here, in FID
runs and in the CLI, whatever batch it is drawn in.

Style mixing convention (StyleGAN2's ``style_mixing.py``): cell (row r, column c) of the grid
takes every latent of row seed r, except the ws indices in ``layers``, which come from column
seed c. ws index 2s + j feeds block j of stage s (the 4x4 base of a square at s = 0, then
8x8, ...; a rectangle's base map is e.g. 4x2), so low indices ("0-3": the 4x4 and 8x8 stages)
carry coarse structure (pose, layout) and high ones the fine detail (texture, colour).
"""

from __future__ import annotations

import contextlib
import importlib.util
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from stylenat.errors import ConfigError
from stylenat.models import seeds_to_z
from stylenat.models.config import as_shape, size_text

__all__ = [
    "class_index",
    "class_indices",
    "generate",
    "synthesize",
    "style_mix",
    "interpolate",
    "seeds_to_w",
    "as_ws",
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


def _device_of(g) -> torch.device:
    """Where g's weights are; the CPU for a generator without torch weights (an exported file)."""
    weight = next(g.parameters(), None) if isinstance(g, nn.Module) else None
    return torch.device("cpu") if weight is None else weight.device


def synthesize(g: nn.Module, ws: Tensor, batch: int = 16) -> Tensor:
    """ws [N, num_ws, style_dim] (or w [N, style_dim], broadcast) -> uint8 [N, 3, H, W] on the CPU."""
    from stylenat.models import model_to_uint8

    if ws.ndim == 2:
        ws = ws[:, None].expand(-1, g.num_ws, -1)
    dev = _device_of(g)
    with _eval_mode(g):
        out = [model_to_uint8(g.synthesis(ws[i:i + batch].to(dev)), g.config).cpu() for i in range(0, len(ws), batch)]
    return torch.cat(out) if out else torch.zeros(0, 3, *as_shape(g.resolution), dtype=torch.uint8)


def _plain_label(value) -> int | str:
    """One class as a Python int (an index) or str (a name): ints, numpy integers and 0-d integer
    tensors or arrays are indices; ConfigError for anything else (floats, bools, longer arrays)."""
    if isinstance(value, str):
        return str(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "tolist"):  # numpy scalar, 0-d array or tensor
        value = value.tolist()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"a class is an index (an integer) or a class name, got {value!r}")
    return int(value)


def class_index(g: nn.Module, value) -> int:
    """The class index ``value`` names for a conditional generator: an index (int, numpy integer or
    0-d integer tensor), or a class name; a string of digits that is not a class name is an index."""
    classes = list(g.config.classes)
    if not classes:
        raise ConfigError("this model is unconditional: it has no classes")
    value = _plain_label(value)
    if isinstance(value, str) and value not in classes and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value < len(classes):
            hint = f" (to name the class {value!r}, pass it as a string)" if str(value) in classes else ""
            raise ConfigError(f"class {value} does not exist: this model has classes 0-{len(classes) - 1}{hint}")
        return value
    if value not in classes:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise ConfigError(f"unknown class {value!r}; this model's classes are: {shown}")
    return classes.index(value)


def class_indices(g: nn.Module, labels, n: int, keyword: str = "labels") -> Tensor | None:
    """Class indices [n] on g's device for a conditional generator (None for an unconditional one):
    one class for all (an index, a name, a numpy integer or a 0-d tensor) or one per image (a
    sequence, 1-d tensor or array of them). ConfigError when a conditional model gets no class, an
    unconditional one gets one, or a class does not exist; ``keyword``: the Python argument named
    in the message."""
    if not g.config.num_classes:
        if labels is not None:
            raise ConfigError(f"this model is unconditional: it takes no class, got {labels!r} "
                              f"(drop --class; Python: {keyword}=None)")
        return None
    if labels is None:
        raise ConfigError(f"this model is class-conditional ({g.config.num_classes} classes): choose a class "
                          f"(--class N or NAME; Python: {keyword}=...)")
    if isinstance(labels, str) or getattr(labels, "ndim", 1) == 0 or not isinstance(labels, Iterable):
        c = [class_index(g, labels)] * n
    else:
        if getattr(labels, "ndim", 1) != 1:
            raise ConfigError(f"labels must be one class or one per image, got an array of shape {tuple(labels.shape)}")
        c = [class_index(g, v) for v in labels]
    if len(c) != n:
        raise ConfigError(f"{len(c)} labels for {n} images")
    return torch.tensor(c, dtype=torch.long, device=_device_of(g))


def seeds_to_w(g: nn.Module, seeds: Sequence[int], truncation_psi: float = 1.0,
               labels: int | str | Sequence[int | str] | Tensor | None = None) -> Tensor:
    """w [len(seeds), style_dim] of the seeds, truncated toward the mean w by ``truncation_psi`` (for
    a conditional model: toward the mean w of each image's class; ``labels``: one class or one per seed)."""
    with _eval_mode(g):
        return g.mapping(seeds_to_z(seeds, g.style_dim, _device_of(g)), truncation_psi=truncation_psi,
                         c=class_indices(g, labels, len(seeds)))


def as_ws(g: nn.Module, sources: Sequence[int] | Tensor, truncation_psi: float = 1.0,
          labels: int | str | Sequence[int | str] | Tensor | None = None) -> Tensor:
    """Latents ws [N, num_ws, style_dim] on g's device, from seeds or from latents.

    Args:
        g: a stylenat generator.
        sources: seeds (mapped, then truncated by ``truncation_psi``), or latents ws
            [N, num_ws, style_dim] or w [N, style_dim] (used as they are).
        truncation_psi: truncation of seeds toward the mean w.
        labels: the class of seeds for a conditional model (see :func:`seeds_to_w`).
    """
    if not isinstance(sources, Tensor):
        return seeds_to_w(g, sources, truncation_psi, labels)[:, None].expand(-1, g.num_ws, -1)
    ws = sources.to(_device_of(g), torch.float32)
    ws = ws[:, None].expand(-1, g.num_ws, -1) if ws.ndim == 2 else ws
    if ws.shape[1:] != (g.num_ws, g.style_dim):
        raise ConfigError(f"latents must be ws [N, {g.num_ws}, {g.style_dim}] or w [N, {g.style_dim}] for this "
                          f"model, got {list(sources.shape)}")
    return ws


def generate(g: nn.Module, seeds: Sequence[int], truncation_psi: float = 1.0, batch: int = 16,
             labels: int | str | Sequence[int | str] | Tensor | None = None) -> Tensor:
    """One image per seed: uint8 [len(seeds), 3, H, W].

    Args:
        g: a stylenat generator, on the device it should run on.
        seeds: integer seeds; the same seed gives the same image whatever the batch.
        truncation_psi: 1 = no truncation, 0 = every seed gives the mean image (w_avg, or its class's).
        batch: images per synthesis pass (memory only).
        labels: for a class-conditional model: one class for every seed, or one per seed; a class is an
            index (int, numpy integer, integer tensor element) or a name; a sequence, 1-d tensor or
            array gives one per seed.
    """
    return synthesize(g, seeds_to_w(g, seeds, truncation_psi, labels), batch)


def style_mix(g: nn.Module, row_seeds: Sequence[int] | Tensor, col_seeds: Sequence[int] | Tensor,
              layers: Sequence[int], truncation_psi: float = 1.0, batch: int = 16,
              labels: int | str | None = None) -> Tensor:
    """Style-mixing grid: uint8 [R + 1, C + 1, 3, H, W] (convention in the module docstring).

    Row 0 holds the column seeds' own images, column 0 the row seeds' own images, the corner is
    black; cell (1 + r, 1 + c) mixes row seed r with column seed c.

    Args:
        g: a stylenat generator.
        row_seeds, col_seeds: the sources: seeds or latents (see :func:`as_ws`).
        layers: ws indices (0 .. g.num_ws - 1) taken from the column source.
        truncation_psi: truncation of seeds. batch: images per synthesis pass.
        labels: the class of the seeds, for a conditional model.
    """
    bad = [i for i in layers if not 0 <= i < g.num_ws]
    if bad or not layers:
        raise ConfigError(f"layers must be ws indices in 0-{g.num_ws - 1} for this model, got {list(layers)}")
    ws_rows, ws_cols = as_ws(g, row_seeds, truncation_psi, labels), as_ws(g, col_seeds, truncation_psi, labels)
    rows, cols = len(ws_rows), len(ws_cols)
    ws = ws_rows[:, None].repeat(1, cols, 1, 1)  # [R, C, num_ws, D]
    idx = torch.tensor(sorted(set(layers)), device=ws.device)
    ws[:, :, idx] = ws_cols[None, :, idx]
    h, w = as_shape(g.resolution)
    grid = torch.zeros(rows + 1, cols + 1, 3, h, w, dtype=torch.uint8)
    grid[0, 1:] = synthesize(g, ws_cols, batch)
    grid[1:, 0] = synthesize(g, ws_rows, batch)
    grid[1:, 1:] = synthesize(g, ws.flatten(0, 1), batch).view(rows, cols, 3, h, w)
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


def _lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Linear interpolation of latents a, b (any equal shape) at fractions t [F] -> [F, *a.shape]."""
    return torch.lerp(a[None], b[None], t.view(-1, *[1] * a.ndim))


def interpolate(g: nn.Module, seeds: Sequence[int] | Tensor, frames_per_seed: int, loop: bool = True,
                space: str = "w", truncation_psi: float = 1.0, batch: int = 16, labels: int | str | None = None) -> Tensor:
    """Frames of a walk through the seeds' latents: uint8 [F, 3, H, W].

    Args:
        g: a stylenat generator.
        seeds: key frames, visited in order (at least 2): seeds, or latents (see :func:`as_ws`;
            space "w" only), interpolated per ws index.
        frames_per_seed: frames from one key frame to the next (the key frame included).
        loop: also go from the last seed back to the first (F = len(seeds) * frames_per_seed);
            otherwise end on the last seed (F = (len(seeds) - 1) * frames_per_seed + 1).
        space: "w": linear steps between the mapped w; "z": spherical steps between the z, each
            frame mapped on its own.
        truncation_psi: applied to every frame. batch: images per synthesis pass.
        labels: the class of the seeds, for a conditional model.
    """
    if len(seeds) < 2 or frames_per_seed < 1:
        raise ConfigError("an interpolation needs at least 2 seeds and 1 frame per seed")
    if space not in ("w", "z"):
        raise ConfigError(f"space must be 'w' or 'z', got {space!r}")
    if space == "z" and isinstance(seeds, Tensor):
        raise ConfigError("latents are points in w, not z; interpolate them with space 'w'")
    keys = seeds_to_z(seeds, g.style_dim, _device_of(g)) if space == "z" else as_ws(g, seeds, truncation_psi, labels)
    pairs = list(zip(keys[:-1], keys[1:])) + ([(keys[-1], keys[0])] if loop else [])
    t = torch.arange(frames_per_seed, device=keys.device, dtype=keys.dtype) / frames_per_seed
    step = _slerp if space == "z" else _lerp
    path = torch.cat([step(a, b, t) for a, b in pairs] + ([] if loop else [keys[-1:]]))
    if space == "z":
        with _eval_mode(g):
            path = g.mapping(path, truncation_psi=truncation_psi, c=class_indices(g, labels, len(path)))
    return synthesize(g, path, batch)


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
    forever when True, play once otherwise. Frames keep their W x H (any aspect); an .mp4 needs
    even W and H (every model size has them), ConfigError otherwise.
    """
    import numpy as np

    if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8 or not len(frames):
        raise ConfigError(f"a video needs uint8 frames [F, 3, H, W], got {frames.dtype} {list(frames.shape)}")
    if Path(path).suffix.lower() == ".mp4" and (frames.shape[-1] % 2 or frames.shape[-2] % 2):
        raise ConfigError(f"an .mp4 (H.264, yuv420p) needs an even width and height, the frames are "
                          f"{size_text(tuple(frames.shape[-2:]))}; write a .gif")
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

        # libx264 wants even sides (checked above) and yuv420p for players to accept it.
        with imageio.get_writer(path, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1) as writer:
            for a in np.asarray(arrays):
                writer.append_data(a)
    return path
