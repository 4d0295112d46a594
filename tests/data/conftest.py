"""The oracle the data tests share: Pillow's own centre crop and resize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def center_resize(img: Image.Image, size: int, resample=Image.Resampling.LANCZOS) -> np.ndarray:
    """Pillow's crop of the largest centred square, then Pillow's resize; HxWx3 uint8."""
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)).resize((size, size), resample))


@pytest.fixture
def pillow_center_resize():
    return center_resize
