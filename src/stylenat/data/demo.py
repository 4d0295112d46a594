"""Built-in offline demo data: procedurally drawn cartoon faces, deterministic per index.

The faces are meant to be learnable by a tiny generator in minutes on a CPU: one centred face per
image, large flat shapes with strong contrast, variety only in colours, proportions and features.
Each face is drawn with PIL.ImageDraw on a large canvas and downsampled with a box filter, which
anti-aliases the edges. At a rectangle the canvas is widened (or heightened) around the same face:
the background and the shoulders extend, the face stays centred at the scale of the shorter side.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from stylenat._size import as_shape, parse_size

DEMO_VERSION = 1  # bump when the drawing changes, so cache keys built from fingerprints change
DEMO_SIZE = 4096  # images in the demo dataset
_CANVAS = 256  # drawing resolution; every coordinate below is on this canvas

_SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 86), (160, 100, 62), (112, 70, 45)]
_HAIR = [(30, 24, 20), (70, 45, 25), (120, 75, 35), (200, 160, 80), (170, 60, 30), (120, 120, 125), (60, 60, 160)]
_BACKGROUND = [(120, 180, 230), (150, 220, 160), (245, 200, 110), (230, 140, 150), (180, 150, 220),
               (110, 200, 200), (240, 240, 235), (90, 110, 140)]
_SHIRT = [(200, 50, 50), (40, 90, 180), (50, 150, 80), (240, 190, 40), (120, 60, 150), (40, 40, 45), (235, 235, 235)]
_EYE = [(60, 40, 20), (40, 90, 160), (50, 120, 60), (20, 20, 20)]


def _jitter(rng: random.Random, color: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    """`color` with each channel moved by up to `amount` so palette entries are not exact copies."""
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)


def _darker(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(c * factor) for c in color)


def draw_face(index: int, seed: int = 0, size: int | tuple[int, int] = 64) -> Image.Image:
    """Draw demo face number `index` as an RGB image of `size`.

    index: which face (any integer); seed: selects a different family of faces; size: an int for a
    square, else (height, width) (or "WIDTHxHEIGHT"): the face is centred and scaled to the shorter
    side. The same (index, seed) always gives the same face, at every size.
    """
    h, w = as_shape(parse_size(size, "size"))
    short = min(h, w)
    # The canvas has the output's aspect; the face is drawn on its centred _CANVAS x _CANVAS square.
    canvas_w, canvas_h = max(_CANVAS, round(_CANVAS * w / short)), max(_CANVAS, round(_CANVAS * h / short))
    ox, oy = (canvas_w - _CANVAS) // 2, (canvas_h - _CANVAS) // 2
    rng = random.Random(seed * 1_000_003 + index)
    img = Image.new("RGB", (canvas_w, canvas_h), _jitter(rng, rng.choice(_BACKGROUND), 20))
    draw = ImageDraw.Draw(img)

    cx = ox + 128 + rng.randint(-8, 8)
    cy = oy + 126 + rng.randint(-6, 6)
    fw = rng.randint(58, 74)  # half width of the face
    fh = rng.randint(70, 86)  # half height
    skin = _jitter(rng, rng.choice(_SKIN))
    hair = _jitter(rng, rng.choice(_HAIR))

    # Shoulders and neck first: everything else overlaps them.
    shirt = _jitter(rng, rng.choice(_SHIRT))
    draw.ellipse((cx - 110, cy + fh - 10, cx + 110, cy + fh + 150), fill=shirt)
    if canvas_h > cy + fh + 70:  # a tall canvas: the shirt goes on below the ellipse (never on a square one)
        draw.rectangle((cx - 110, cy + fh + 70, cx + 110, canvas_h), fill=shirt)
    draw.rectangle((cx - 22, cy + fh - 30, cx + 22, cy + fh + 12), fill=_darker(skin, 0.9))

    style = rng.randrange(4)  # 0 bald, 1 short, 2 long, 3 puffy
    if style == 2:
        draw.rounded_rectangle((cx - fw - 16, cy - fh - 14, cx + fw + 16, cy + fh + 30), radius=60, fill=hair)
    elif style == 3:
        draw.ellipse((cx - fw - 30, cy - fh - 34, cx + fw + 30, cy + fh - 10), fill=hair)

    for side in (-1, 1):  # ears
        ex = cx + side * fw
        draw.ellipse((ex - 14, cy - 12, ex + 14, cy + 22), fill=skin)
    draw.ellipse((cx - fw, cy - fh, cx + fw, cy + fh), fill=skin)

    if style in (1, 2, 3):  # hair on top of the head: a cap cut by the forehead line
        top = cy - fh - rng.randint(4, 14)
        fringe = cy - fh + rng.randint(28, 50)
        draw.chord((cx - fw - 6, top, cx + fw + 6, 2 * fringe - top), 180, 360, fill=hair)

    eye_y = cy + rng.randint(-12, 4)
    eye_dx = rng.randint(24, 32)
    eye_r = rng.randint(10, 15)
    iris = _jitter(rng, rng.choice(_EYE), 8)
    look = rng.randint(-4, 4)
    brow = _darker(hair, 0.8) if style else _darker(skin, 0.5)
    brow_tilt = rng.randint(-5, 5)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.ellipse((ex - eye_r, eye_y - eye_r * 0.8, ex + eye_r, eye_y + eye_r * 0.8), fill=(250, 250, 250))
        pr = eye_r * 0.6
        draw.ellipse((ex + look - pr, eye_y - pr, ex + look + pr, eye_y + pr), fill=iris)
        draw.ellipse((ex + look - pr / 2, eye_y - pr / 2, ex + look + pr / 2, eye_y + pr / 2), fill=(15, 15, 15))
        by = eye_y - eye_r - 8
        draw.line((ex - 14, by + side * brow_tilt, ex + 14, by - side * brow_tilt), fill=brow, width=6)

    if rng.random() < 0.2:  # glasses
        for side in (-1, 1):
            ex = cx + side * eye_dx
            draw.ellipse((ex - eye_r - 7, eye_y - eye_r - 6, ex + eye_r + 7, eye_y + eye_r + 6), outline=(20, 20, 20), width=4)
        draw.line((cx - eye_dx + eye_r + 7, eye_y, cx + eye_dx - eye_r - 7, eye_y), fill=(20, 20, 20), width=4)

    nose_y = eye_y + rng.randint(20, 28)
    draw.ellipse((cx - 7, nose_y - 5, cx + 7, nose_y + 7), fill=_darker(skin, 0.8))

    if rng.random() < 0.4:  # blush
        for side in (-1, 1):
            bx = cx + side * (eye_dx + 8)
            draw.ellipse((bx - 12, nose_y - 4, bx + 12, nose_y + 10), fill=_darker((255, 150, 150), 0.95))

    mouth_y = nose_y + rng.randint(18, 26)
    mw = rng.randint(18, 30)
    lips = (150, 40, 50)
    mouth = rng.randrange(3)  # 0 smile, 1 open smile, 2 neutral
    if mouth == 0:
        draw.arc((cx - mw, mouth_y - 16, cx + mw, mouth_y + 8), 20, 160, fill=lips, width=6)
    elif mouth == 1:
        draw.chord((cx - mw, mouth_y - 14, cx + mw, mouth_y + 16), 0, 180, fill=(110, 20, 30))
        draw.chord((cx - mw + 6, mouth_y - 12, cx + mw - 6, mouth_y + 2), 0, 180, fill=(250, 250, 250))
    else:
        draw.line((cx - mw * 0.7, mouth_y, cx + mw * 0.7, mouth_y), fill=lips, width=6)

    return img.resize((w, h), Image.Resampling.BOX) if (w, h) != img.size else img
