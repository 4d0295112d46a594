"""Image sizes, as every layer takes them: an int for a square, else (height, width).

Text is WIDTHxHEIGHT ("512x384" = 512 wide, 384 high), as image tools write it; pairs are
(height, width), the order of tensors. :func:`is_model_size` is the rule of
``stylenat.models.config.stage_shapes``: width bw * 2^s and height bh * 2^s with max(bw, bh) in 4..7.
"""

from __future__ import annotations

import re

from stylenat.errors import ConfigError


def parse_size(value, where: str = "size") -> int | tuple[int, int]:
    """A size as an int for a square, else (height, width).

    Accepts an int, text ``"N"`` or ``"WxH"`` (width first), or a (height, width) pair; a square pair
    becomes its int. ConfigError (one line, naming ``where``) otherwise.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+", text):
            value = int(text)
        elif match := re.fullmatch(r"(\d+)\s*[x×]\s*(\d+)", text):
            value = (int(match.group(2)), int(match.group(1)))
        else:
            raise ConfigError(f"{where}: cannot read {value!r}; give N (a square) or WIDTHxHEIGHT, e.g. 256 or 512x384")
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        raise ConfigError(f"{where} must be N or WIDTHxHEIGHT, got {value!r}")
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} must be an int or a [height, width] pair, got {value!r}")
        h, w = value
        value = h if h == w else (h, w)
    if min(as_shape(value)) < 1:
        raise ConfigError(f"{where} must be positive, got {size_text(value)}")
    return value


def as_shape(size) -> tuple[int, int]:
    """(height, width) of a size (an int square or a (height, width) pair)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def size_text(size) -> str:
    """A size as text: WIDTHxHEIGHT (``256x256``, ``512x384``)."""
    h, w = as_shape(size)
    return f"{w}x{h}"


def size_flag(size) -> str:
    """The value of ``--size`` that asks for ``size``: N for a square, else WIDTHxHEIGHT."""
    return str(size) if isinstance(size, int) else size_text(size)


def model_base(size) -> tuple[int, int, int] | None:
    """(bh, bw, s) with ``size`` = (bh * 2^s, bw * 2^s) and max(bh, bw) in 4..7; None if a model cannot have this size."""
    h, w = as_shape(size)
    longer = max(h, w)
    if min(h, w) < 1 or longer < 4:
        return None
    s = longer.bit_length() - 3  # 4 * 2^s <= longer < 8 * 2^s
    if h % (1 << s) or w % (1 << s):
        return None
    return h >> s, w >> s, s


def is_model_size(size) -> bool:
    """Whether a model can have this size (any number of stages): see :func:`model_base`."""
    return model_base(size) is not None
