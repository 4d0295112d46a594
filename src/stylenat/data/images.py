"""Turning arbitrary image files into square RGB images, and image grids back into PNG files.

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
from PIL import Image, ImageOps

from stylenat._system import atomic_path
from stylenat.errors import ConfigError, DataError

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


def square_resize(img: Image.Image, size: int, filter: str = "lanczos", crop: str = "center") -> Image.Image:
    """Make `img` a `size` x `size` image.

    img: RGB Pillow image; size: output side in pixels; filter: one of FILTERS; crop: "center" cuts
    the largest centred square first, "none" requires the image to be square already (ValueError
    otherwise, so non-square inputs are reported rather than stretched).
    """
    w, h = img.size
    if crop == "center" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    elif crop == "none" and w != h:
        raise DataError(f"not square ({w}x{h}); use crop 'center'")
    if img.size != (size, size):
        img = img.resize((size, size), FILTERS[filter])
    return img


def check_resize_options(size: int, filter: str, crop: str) -> None:
    """Raise one clear ValueError for an impossible size, filter or crop setting."""
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"size must be a positive integer, got {size!r}")
    if filter not in FILTERS:
        raise ConfigError(f"unknown filter {filter!r}; choose one of {', '.join(FILTERS)}")
    if crop not in CROPS:
        raise ConfigError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")


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
