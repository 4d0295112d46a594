"""Where each head group of the generator looks: the exact attention weights at one query pixel.

The weights are recomputed from the real q, k, v of each Hydra-NA layer (captured with forward
hooks during one synthesis pass) and the window rule of natten 0.17, independently of the na2d
backends; the tests check them against na2d's output.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from stylenat.errors import ConfigError
from stylenat.models.config import as_shape, parse_size, size_text
from stylenat.nn.attention import HydraNeighborhoodAttention

__all__ = ["axis_window", "attention_weights", "AttentionMap", "attention_maps", "render_attention_maps", "cell_shape"]


def axis_window(length: int, kernel: int, dilation: int, i: int) -> tuple[list[int], list[int]]:
    """The keys pixel ``i`` of an axis sees: (key pixels, their bias offsets key_sub - i_sub + kernel - 1).

    Rule (natten 0.17, see stylenat.nn.attention): group g = i mod d, sub-position j = i div d,
    group length ceil((L - g) / d), window start clamp(j - k // 2, 0, group length - k).
    """
    g, j = i % dilation, i // dilation
    group_len = -(-(length - g) // dilation)
    start = min(max(j - kernel // 2, 0), group_len - kernel)
    subs = range(start, start + kernel)
    return [t * dilation + g for t in subs], [t - j + kernel - 1 for t in subs]


def attention_weights(attn: HydraNeighborhoodAttention, x: Tensor, y: int, x_pos: int) -> list[Tensor]:
    """Softmax weights of query pixel (y, x_pos) in every head group of ``attn``.

    Args:
        attn: the Hydra-NA layer. x: its input [B, H, W, C]. y, x_pos: the query pixel.
    Returns:
        per head group, [B, heads_in_group, H, W]: the weight of every key pixel, zero outside
        the group's window; each head's weights sum to 1.
    """
    b, h, w, _ = x.shape
    if not (0 <= y < h and 0 <= x_pos < w):
        raise ConfigError(f"query pixel ({y}, {x_pos}) is outside the {h}x{w} map")
    q, k, _ = attn.qkv_heads(x)
    out, start = [], 0
    for nh, (ky, kx), (dy, dx), table in zip(attn.group_heads, attn.kernel_sizes, attn.dilations, attn.rpb_tables()):
        heads = slice(start, start + nh)
        rows, rel_y = axis_window(h, ky, dy, y)
        cols, rel_x = axis_window(w, kx, dx, x_pos)
        keys = k[:, heads][:, :, rows][:, :, :, cols]  # [B, nh, ky, kx, D]
        query = q[:, heads, y, x_pos] * attn.scale  # [B, nh, D]
        scores = torch.einsum("bhd,bhyxd->bhyx", query, keys)
        scores = scores + table[:, rel_y][:, :, rel_x].to(scores.dtype)
        probs = scores.flatten(2).softmax(-1).view_as(scores)
        full = scores.new_zeros(b, nh, h, w)
        full[:, :, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = probs
        out.append(full)
        start += nh
    return out


@dataclass
class AttentionMap:
    """Attention of one head group of one block at one query pixel.

    resolution: the stage's map: its edge for a square map, else its (height, width) (as in
    ``GeneratorConfig.attention_layers``); block: 0 or 1 within the stage; group: head-group index;
    kernel, dilation: the group's (y, x) window; query: the pixel (y, x) on this stage's map;
    weights: [heads_in_group, h, w] (the stage's map) for the first image of the batch.
    """

    resolution: int | tuple[int, int]
    block: int
    group: int
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    query: tuple[int, int]
    weights: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the stage's map."""
        return as_shape(self.resolution)


def _stage_key(value, names: dict) -> int | tuple[int, int]:
    """The stage ``value`` names: an int is the stage whose longer side it is (a square's edge),
    text "WxH" or an (h, w) pair the stage of that map. ConfigError for anything else."""
    try:
        size = parse_size(int(value) if isinstance(value, numbers.Integral) else value, "resolutions")
    except (ConfigError, TypeError, ValueError):
        size = None
    if isinstance(size, int):
        found = [key for key in names if max(as_shape(key)) == size]
    else:
        found = [size] if size in names else []
    if not found:
        have = sorted(names) if all(isinstance(k, int) for k in names) else ", ".join(size_text(k) for k in names)
        raise ConfigError(f"no stage at resolution {value!r}; this model has {have}")
    return found[0]


@torch.no_grad()
def attention_maps(g: nn.Module, seed: int | Tensor, pixel: tuple[int, int],
                   resolutions: Sequence[int | str | tuple[int, int]] | None = None,
                   truncation_psi: float = 1.0, labels: int | str | None = None) -> tuple[Tensor, list[AttentionMap]]:
    """Generate the image of ``seed`` and read every head group's attention at one of its pixels.

    Args:
        g: a stylenat generator. seed: the image's seed (as in :func:`stylenat.sampling.generate`),
            or its latents ws [num_ws, style_dim] / w [style_dim] (e.g. a projection's).
        pixel: (y, x) in output-image pixels of the H x W image; on a stage's h x w map it is
            (y * h // H, x * w // W).
        resolutions: stages to read (default all), coarse to fine whatever the order given: each
            an int, the stage's longer side (a square stage's edge, e.g. 16), or the stage's map as
            "WxH" text or an (h, w) pair. truncation_psi, labels: as in generate.
    Returns:
        (the image, uint8 [3, H, W]; the maps, stage by stage, block by block, group by group).
    """
    from stylenat.models import model_to_uint8
    from stylenat.sampling import as_ws

    height, width = as_shape(g.resolution)
    py, px = pixel
    if not (0 <= py < height and 0 <= px < width):
        axes = f" (y in 0-{height - 1}, x in 0-{width - 1})" if height != width else ""
        raise ConfigError(f"pixel ({py}, {px}) is outside the {size_text(g.resolution)} image{axes}")
    shapes = g.config.stage_shapes()
    # Keyed like AttentionMap.resolution: a square map's edge, else (h, w); stages differ 2x, so keys are unique.
    stages = {(h if h == w else (h, w)): stage for (h, w), stage in zip(shapes, g.synthesis.stages)}
    order = list(stages)
    wanted = order if resolutions is None else sorted({_stage_key(r, stages) for r in resolutions}, key=order.index)
    captured: dict[tuple[int, int], Tensor] = {}
    hooks = [
        block.attn.register_forward_pre_hook(lambda m, args, key=(r, j): captured.__setitem__(key, args[0]))
        for r in wanted for j, block in enumerate(stages[r].blocks)
    ]
    try:
        raw = g.synthesis(as_ws(g, seed[None] if isinstance(seed, Tensor) else [seed], truncation_psi, labels))
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for r in wanted:
        mh, mw = as_shape(r)
        query = (py * mh // height, px * mw // width)
        for j, block in enumerate(stages[r].blocks):
            attn = block.attn
            for p, weights in enumerate(attention_weights(attn, captured[(r, j)][:1], *query)):
                maps.append(AttentionMap(r, j, p, attn.kernel_sizes[p], attn.dilations[p], query, weights[0].float().cpu()))
    return model_to_uint8(raw, g.config)[0].cpu(), maps


def _heat_colors(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] [H, W] -> RGB float [H, W, 3]: black, red, yellow, white (a 'hot' ramp)."""
    return np.clip(np.stack([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0, 1)


def _label(cell: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(cell)
    draw = ImageDraw.Draw(img)
    *_, right, bottom = draw.textbbox((2, 1), text)
    draw.rectangle((0, 0, right + 2, bottom + 1), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(img)


def cell_shape(shape: tuple[int, int], cell: int) -> tuple[int, int]:
    """(height, width) of a cell whose longer side is ``cell`` and whose aspect is that of ``shape``
    (h, w): (cell, cell) for a square; the shorter side rounded, at least 1."""
    h, w = shape
    longer = max(h, w)
    return max(1, round(h * cell / longer)), max(1, round(w * cell / longer))


def render_attention_maps(image: Tensor, maps: list[AttentionMap], pixel: tuple[int, int],
                          cell: int = 128) -> tuple[np.ndarray, tuple[int, int]]:
    """Draw the maps as a grid of heat maps over the image.

    One row per (resolution, block); column 0 is the image with the query pixel marked, then one
    cell per head group: its heads' weights averaged, scaled to the cell's maximum, blown up
    (nearest) to the cell and laid over a dimmed copy of the image. Each cell is labelled.

    Args:
        image: uint8 [3, H, W]. maps: from :func:`attention_maps`. pixel: the query (y, x) in
        image pixels. cell: the longer side of each cell in pixels; cells keep the image's
        aspect (a square image: cell x cell; 32x16 with cell 128: 128 wide, 64 high).
    Returns:
        (uint8 cells [rows * cols, 3, cell_h, cell_w] in row-major order, (rows, cols)), for
        :func:`stylenat.data.images.save_image_grid`.
    """
    from PIL import Image

    height, width = image.shape[-2:]
    cell_h, cell_w = cell_shape((height, width), cell)
    base = np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((cell_w, cell_h), Image.Resampling.BILINEAR))
    marked = base.copy()
    cy, cx = (pixel[0] * cell_h) // height, (pixel[1] * cell_w) // width
    marked[max(cy - 2, 0):cy + 3, max(cx - 2, 0):cx + 3] = (0, 255, 0)
    rows: dict[tuple, list[np.ndarray]] = {}
    for m in maps:
        row = rows.setdefault((m.resolution, m.block), [_label(marked, f"{size_text(m.resolution)} block {m.block}")])
        heat = m.weights.mean(0).numpy()
        heat = heat / max(float(heat.max()), 1e-12)
        # Nearest keeps each key pixel a crisp block; box averages when the map is larger than the cell.
        mh, mw = m.weights.shape[-2:]
        resample = Image.Resampling.NEAREST if cell_h >= mh and cell_w >= mw else Image.Resampling.BOX
        heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((cell_w, cell_h), resample))
        over = 0.35 * base / 255 + 0.65 * _heat_colors(heat)
        text = f"k{m.kernel[0]} d{m.dilation[0]}" if m.kernel[0] == m.kernel[1] and m.dilation[0] == m.dilation[1] \
            else f"k{m.kernel} d{m.dilation}"
        row.append(_label((over * 255).round().astype(np.uint8), text))
    cols = max(len(r) for r in rows.values())
    blank = np.zeros((cell_h, cell_w, 3), np.uint8)
    cells = [c for r in rows.values() for c in r + [blank] * (cols - len(r))]
    return np.stack(cells).transpose(0, 3, 1, 2), (len(rows), cols)
