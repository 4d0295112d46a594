"""Turning arbitrary image files into RGB images of a given size (cropped or letterboxed), and image
grids back into PNG files.

Conversion rules (documented in docs/data.md):
- transparency (RGBA, LA, PA, palette with a transparent colour) is composited on white, the usual
  backdrop of product shots and drawings; dropping alpha would expose arbitrary hidden colours;
- 16-bit grayscale (I;16*) is scaled by 1/257; 32-bit integer (I) is scaled the same way when any
  value exceeds 255, else taken as is; float (F) is taken as [0, 1] when its maximum is at most 1,
  else as [0, 255];
- everything else (L, 1, CMYK, YCbCr, ...) goes through Pillow's own convert("RGB");
- the EXIF orientation tag is applied; animated files contribute their first frame.
"""

from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps

from stylenat._system import atomic_path
from stylenat._size import as_shape, parse_size
from stylenat.errors import ConfigError

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
}
CROPS = ("center", "none")
_WHITE = (255, 255, 255)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale a single-channel 16/32-bit or float image to 8-bit L (rules in the module docstring)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
    elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        scale = 1.0 / 257.0
    else:
        scale = 1.0
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8))


@functools.cache
def image_extensions() -> frozenset[str]:
    """File extensions (".png", ".jpg", ...) of every image format Pillow reads here, lower case."""
    Image.init()  # registers every format plugin, so the extension table is complete
    return frozenset(Image.registered_extensions())


def is_image_name(name: str) -> bool:
    """Whether a file name has the extension of an image format Pillow reads."""
    return os.path.splitext(name)[1].lower() in image_extensions()


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any mode to RGB (rules in the module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_depth_to_l(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode image file bytes to an upright RGB Pillow image.

    data: the whole file. Raises OSError/ValueError (and friends) for non-images and truncated or
    corrupt files; callers decide whether to skip them.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # forces a full decode here, so truncated files fail now, not later
        upright = ImageOps.exif_transpose(img)
        return to_rgb(upright)


def parse_fill(fill) -> tuple[int, int, int]:
    """An RGB fill colour from a name Pillow's ImageColor knows ("black", "white", "gray", ...),
    "#rrggbb" (or any other form ImageColor reads), or an (r, g, b) triple; ConfigError otherwise."""
    if isinstance(fill, (tuple, list)) and len(fill) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in fill):
        return tuple(fill)
    try:
        return ImageColor.getcolor(str(fill), "RGB")
    except ValueError:
        raise ConfigError(f"fill: unknown colour {fill!r}; give a colour name (black, white, gray, ...) or #rrggbb") from None


def fill_text(fill) -> str:
    """An RGB fill colour as "#rrggbb" (as dataset.json stores it)."""
    return "#{:02x}{:02x}{:02x}".format(*parse_fill(fill))


def crop_box(width: int, height: int, size) -> tuple[int, int, int, int]:
    """The largest centred region of a width x height image with the aspect of ``size`` (an int
    square or (h, w)), as a Pillow box (left, top, right, bottom); the whole image if it has it."""
    th, tw = as_shape(size)
    if width * th >= height * tw:  # wider than the target (or as wide): keep the height
        cw, ch = max(1, min(width, (2 * height * tw + th) // (2 * th))), height
    else:
        cw, ch = width, max(1, min(height, (2 * width * th + tw) // (2 * tw)))
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch


def fit_box(width: int, height: int, size) -> tuple[int, int, int, int]:
    """Where a width x height image goes, resized to fit inside ``size`` (an int square or (h, w))
    with its aspect kept and centred: (left, top, right, bottom) on the target canvas."""
    th, tw = as_shape(size)
    if width * th >= height * tw:  # wider than the target (or as wide): it fills the width
        nw, nh = tw, max(1, min(th, (2 * height * tw + width) // (2 * width)))
    else:
        nw, nh = max(1, min(tw, (2 * width * th + height) // (2 * height))), th
    left, top = (tw - nw) // 2, (th - nh) // 2
    return left, top, left + nw, top + nh


def resize_image(img: Image.Image, size, filter: str = "lanczos", crop: str = "center",
                 fill="black") -> Image.Image:
    """Make `img` an image of `size`: an int for a square, else (height, width).

    img: RGB Pillow image; filter: one of FILTERS; crop: "center" cuts the largest centred region of
    the target's aspect (see crop_box) and resizes it, "none" resizes the whole image to fit inside
    the target and pads it, centred, with `fill` (a letterbox, as StyleGAN's LSUN Car 512x384;
    see fit_box); fill: colour of the padding (see parse_fill). An image that already has the
    target's aspect is just resized either way.
    """
    th, tw = as_shape(size)
    w, h = img.size
    if crop == "center":
        box = crop_box(w, h, (th, tw))
        if box != (0, 0, w, h):
            img = img.crop(box)
    elif crop == "none":
        box = fit_box(w, h, (th, tw))
        if box != (0, 0, tw, th):
            inner = img.resize((box[2] - box[0], box[3] - box[1]), FILTERS[filter])
            img = Image.new("RGB", (tw, th), parse_fill(fill))
            img.paste(inner, box[:2])
            return img
    else:
        raise ConfigError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")
    if img.size != (tw, th):
        img = img.resize((tw, th), FILTERS[filter])
    return img


def check_resize_options(size, filter: str, crop: str, fill="black") -> int | tuple[int, int]:
    """Raise one clear ConfigError for an impossible size, filter, crop or fill setting; returns the
    size as an int (a square) or (height, width) (see stylenat._size.parse_size)."""
    size = parse_size(size, "size")
    if filter not in FILTERS:
        raise ConfigError(f"unknown filter {filter!r}; choose one of {', '.join(FILTERS)}")
    if crop not in CROPS:
        raise ConfigError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")
    parse_fill(fill)
    return size


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB Pillow image -> uint8 tensor [3, H, W]."""
    # The transpose is done in numpy: torch's strided uint8 copy is several times slower here.
    return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


def save_image_grid(images, path: str | Path, grid: tuple[int, int] | None = None) -> Path:
    """Tile images into one PNG.

    images: uint8 tensor or array [N, 3, H, W]; path: output file; grid: (rows, cols), by default the
    smallest near-square grid holding N. Cells past N stay black. Returns the path written.
    """
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {arr.dtype} {list(arr.shape)}")
    n, _, h, w = arr.shape
    if grid is None:
        cols = math.ceil(math.sqrt(n))
        grid = (math.ceil(n / cols), cols)
    rows, cols = grid
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
    canvas = np.zeros((rows * cols, h, w, 3), dtype=np.uint8)
    canvas[:n] = arr.transpose(0, 2, 3, 1)
    canvas = canvas.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot tell the image format of {path}; use a .png or .jpg name")
    with atomic_path(path) as tmp:  # a run killed mid-write leaves the previous grid, not half a PNG
        Image.fromarray(canvas).save(tmp, format=fmt)
    return path
