"""Image grids (checked cell by cell against the inputs) and the demo faces."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.data import draw_face, save_image_grid


def test_image_grid_places_images_row_major(tmp_path):
    images = torch.randint(0, 256, (5, 3, 4, 6), dtype=torch.uint8)
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", grid=(2, 3))
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 4, 3 * 6, 3)
    for i in range(6):
        r, c = divmod(i, 3)
        cell = grid[r * 4:(r + 1) * 4, c * 6:(c + 1) * 6]
        want = images[i].permute(1, 2, 0).numpy() if i < 5 else np.zeros((4, 6, 3), np.uint8)
        np.testing.assert_array_equal(cell, want)


def test_image_grid_default_shape_and_errors(tmp_path):
    images = np.zeros((10, 3, 2, 2), np.uint8)
    assert Image.open(save_image_grid(images, tmp_path / "g.png")).size == (4 * 2, 3 * 2)
    with pytest.raises(ValueError, match="do not fit"):
        save_image_grid(images, tmp_path / "g.png", grid=(3, 3))
    with pytest.raises(ValueError, match="uint8"):
        save_image_grid(images.astype(np.float32), tmp_path / "g.png")


def test_demo_faces_are_deterministic_per_index_and_seed():
    a = np.asarray(draw_face(7, seed=0, size=32))
    np.testing.assert_array_equal(a, np.asarray(draw_face(7, seed=0, size=32)))
    assert not np.array_equal(a, np.asarray(draw_face(8, seed=0, size=32)))
    assert not np.array_equal(a, np.asarray(draw_face(7, seed=1, size=32)))
    # One face at every size: the 32px image is the 64px one box-downsampled (up to rounding).
    small = np.asarray(draw_face(7, size=64).resize((32, 32), Image.Resampling.BOX), dtype=int)
    assert np.abs(small - a).max() <= 2


def test_demo_faces_are_cheap():
    start = time.perf_counter()
    for i in range(200):
        draw_face(i, size=64)
    assert (time.perf_counter() - start) / 200 < 0.01  # 4096 faces in well under a minute even on a busy CPU
