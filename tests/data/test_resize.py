"""resize_image against closed forms: which source pixels a centre crop keeps (offsets (w - cw) // 2,
(h - ch) // 2), and a letterbox's bands (padding of exactly the fill colour, the image's exact place)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stylenat.data.images import crop_box, fit_box, parse_fill, resize_image
from stylenat.errors import ConfigError

BOX = Image.Resampling.BOX
BANDS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)


def coordinates(h: int, w: int) -> Image.Image:
    """Pixel (y, x) is (x, y, 77): every surviving pixel says where it came from."""
    y, x = np.mgrid[:h, :w]
    return Image.fromarray(np.stack([x, y, np.full_like(x, 77)], axis=2).astype(np.uint8))


def bands(h: int, w: int, vertical: bool) -> Image.Image:
    """Four equal bands of BANDS colours: columns when `vertical`, else rows."""
    n = w if vertical else h
    strip = np.repeat(BANDS, n // 4, axis=0)  # [n, 3]
    arr = np.broadcast_to(strip[None] if vertical else strip[:, None], (h, w, 3))
    return Image.fromarray(np.ascontiguousarray(arr))


@pytest.mark.parametrize("src_hw, size, kept", [
    ((30, 40), (30, 20), (0, 10)),    # landscape source, portrait target: columns 10..29 stay
    ((30, 41), (30, 20), (0, 10)),    # odd margin: (41 - 20) // 2 = 10 on the left, 11 on the right
    ((41, 30), (20, 30), (10, 0)),    # portrait source, landscape target: rows 10..29
    ((30, 40), (10, 40), (10, 0)),    # landscape into a wider landscape: rows cut
    ((40, 30), (40, 10), (0, 10)),    # portrait into a taller portrait: columns cut
    ((30, 40), 30, (0, 5)),           # a square target: the centred square, as before
    ((16, 32), (16, 32), (0, 0)),     # already the target: unchanged
])
def test_centre_crop_keeps_exactly_the_centred_region(src_hw, size, kept):
    h, w = src_hw
    out = np.asarray(resize_image(coordinates(h, w), size))
    th, tw = (size, size) if isinstance(size, int) else size
    top, left = kept
    assert out.shape == (th, tw, 3)
    y, x = np.mgrid[:th, :tw]
    np.testing.assert_array_equal(out[..., 0], x + left)
    np.testing.assert_array_equal(out[..., 1], y + top)


@pytest.mark.parametrize("src_wh, target_wh, box", [
    ((50, 30), (32, 16), (0, 2, 50, 27)),    # aspect 2: 50 x 25 of a 50 x 30 image, top (30 - 25) // 2
    ((30, 50), (16, 32), (2, 0, 27, 50)),    # the transpose
    ((64, 48), (48, 64), (14, 0, 50, 48)),   # 4:3 to 3:4: 36 x 48, left (64 - 36) // 2
])
def test_centre_crop_then_resize_is_pillows_crop_and_resize(src_wh, target_wh, box):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (src_wh[1], src_wh[0], 3), dtype=np.uint8))
    size = (target_wh[1], target_wh[0])
    assert crop_box(*src_wh, size) == box
    want = np.asarray(img.crop(box).resize(target_wh, Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(np.asarray(resize_image(img, size)), want)
    transposed = np.asarray(resize_image(img, size[::-1]))
    assert transposed.shape == (target_wh[0], target_wh[1], 3)  # (h, w) swapped is another image, not the same one


@pytest.mark.parametrize("src, target_wh, inner", [
    # (source, (W, H), (left, top, width, height) of the image on the canvas)
    (("vertical", 64, 32), (32, 32), (0, 8, 32, 16)),     # landscape source, square target: bars above and below
    (("vertical", 64, 32), (16, 32), (0, 12, 16, 8)),     # landscape source, portrait target
    (("horizontal", 32, 64), (64, 32), (24, 0, 16, 32)),  # portrait source, landscape target: bars left and right
    (("horizontal", 32, 64), (37, 32), (10, 0, 16, 32)),  # odd margin: 10 left, 11 right
    (("vertical", 64, 32), (64, 16), (16, 0, 32, 16)),    # landscape into a wider landscape
])
@pytest.mark.parametrize("fill, rgb", [("black", (0, 0, 0)), ("#102030", (16, 32, 48)), ("white", (255, 255, 255))])
def test_letterbox_pads_with_the_fill_and_keeps_the_whole_image(src, target_wh, inner, fill, rgb):
    kind, w, h = src
    img = bands(h, w, kind == "vertical")
    out = np.asarray(resize_image(img, (target_wh[1], target_wh[0]), "box", "none", fill))
    assert out.shape == (target_wh[1], target_wh[0], 3)
    left, top, iw, ih = inner
    assert fit_box(w, h, (target_wh[1], target_wh[0])) == (left, top, left + iw, top + ih)
    pad = np.ones(out.shape[:2], bool)
    pad[top:top + ih, left:left + iw] = False
    assert (out[pad] == rgb).all()
    # The image inside: each band a quarter of the inner width (or height), exact under a box filter.
    np.testing.assert_array_equal(out[top:top + ih, left:left + iw], np.asarray(bands(ih, iw, kind == "vertical")))
    np.testing.assert_array_equal(out[top:top + ih, left:left + iw], np.asarray(img.resize((iw, ih), BOX)))


def test_an_image_of_the_target_aspect_is_just_resized_under_both_crops():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 48, 3), dtype=np.uint8))
    want = np.asarray(img.resize((32, 16), Image.Resampling.LANCZOS))
    for crop in ("center", "none"):
        np.testing.assert_array_equal(np.asarray(resize_image(img, (16, 32), crop=crop, fill="red")), want)


def test_fill_colours():
    assert parse_fill("black") == (0, 0, 0) and parse_fill("#FF8000") == (255, 128, 0) and parse_fill("gray") == (128, 128, 128)
    assert parse_fill((1, 2, 3)) == (1, 2, 3)
    with pytest.raises(ConfigError, match="unknown colour 'blurple'"):
        parse_fill("blurple")
