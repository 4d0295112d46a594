"""Model families at any resolution: the official rule's parameter count in closed form, checked
against the official counts at 256 and 1024 and then against every family member we build."""

from __future__ import annotations

import pytest
import torch

from stylenat.errors import ConfigError
from stylenat.models import build_discriminator, build_generator, get_preset
from stylenat.models.config import FAMILY_RESOLUTIONS

OFFICIAL_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}


def official_generator_params(size: int, min_heads: int = 4, style_dim: int = 512, n_mlp: int = 8) -> int:
    """The official generator's parameter count, written out from its architecture.

    Mapping: n_mlp linear layers with bias. Constant 512x4x4. Per stage (resolutions 4..size), two
    blocks of: two AdaIN style layers (style_dim -> 2C, bias), qkv (C -> 3C, bias), output projection
    (C -> C, bias), one relative-position-bias table per head, (2k-1)^2 entries (k = 4 at 4x4 -- full
    attention over the map --, 7 elsewhere, whatever the head groups), an MLP C -> 4C -> C with biases.
    Between stages: LayerNorm (2 C_in), linear C_in -> C_out without bias, alpha. ToRGB after every
    stage: 1x1 conv C -> 3 with bias, plus an extra bias of 3.
    """
    res = [2**i for i in range(2, size.bit_length())]
    channels = [OFFICIAL_CHANNELS[r] for r in res]
    total = n_mlp * (style_dim * style_dim + style_dim) + channels[0] * 16
    for i, (r, c) in enumerate(zip(res, channels)):
        heads = max(c // 32, min_heads)
        k = 4 if r == 4 else 7
        block = 2 * (style_dim * 2 * c + 2 * c) + (c * 3 * c + 3 * c) + (c * c + c) + heads * (2 * k - 1) ** 2 \
            + (c * 4 * c + 4 * c) + (4 * c * c + c)
        total += 2 * block
        out = channels[i + 1] if i + 1 < len(res) else c
        if i + 1 < len(res):
            total += 2 * c + c * out + 1
        total += out * 3 + 3 + 3
    return total


def official_discriminator_params(size: int) -> int:
    """The official (StyleSwin) wavelet discriminator's parameter count with spectral norm, written out.

    The input is Haar-transformed to 12 channels at size/2. Scales i = log2(size) - 1 down to 3 (the
    wavelet image at 2^i): a from-RGB 1x1 conv 12 -> C_in (no bias) with a leaky-ReLU bias, then a
    conv block: 3x3 conv C_in -> C_in and a blurred stride-2 3x3 conv C_in -> C_out = channels[2^(i-1)],
    each without conv bias but with an activation bias; C_in starts at channels[size]. At 4x4: one
    more from-RGB 12 -> C4, the minibatch-stddev channel, a 3x3 conv (C + 1) -> C4 with its bias, a
    linear 16 C4 -> C4 with bias followed by a biased leaky ReLU (two bias vectors), and a linear
    C4 -> 1 with bias. Spectral norm's u, v are buffers, not parameters.
    """
    in_ch, total = OFFICIAL_CHANNELS[size], 0
    for i in range(size.bit_length() - 2, 2, -1):
        out_ch = OFFICIAL_CHANNELS[2 ** (i - 1)]
        total += (12 * in_ch + in_ch) + (9 * in_ch * in_ch + in_ch) + (9 * in_ch * out_ch + out_ch)
        in_ch = out_ch
    c4 = OFFICIAL_CHANNELS[4]
    return total + (12 * c4 + c4) + (9 * (in_ch + 1) * c4 + c4) + (16 * c4 * c4 + 2 * c4) + (c4 + 1)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_closed_form_reproduces_the_official_counts():
    assert official_generator_params(256) == 48_921_000
    assert official_generator_params(1024) == 49_452_934


@pytest.mark.parametrize("resolution", FAMILY_RESOLUTIONS)
def test_ffhq_family_follows_the_official_rule(resolution):
    g_cfg, _ = get_preset("ffhq", resolution)
    with torch.device("meta"):
        g = build_generator(g_cfg)
    assert _count(g) == official_generator_params(resolution)
    assert g_cfg.dilations[-1] == (1, resolution // 8) and g_cfg.kernels[-1] == (7, 7)
    assert g_cfg.heads == tuple(max(c // 32, 4) for c in g_cfg.channels)


def test_discriminator_closed_form_reproduces_the_official_counts():
    # official_state_shapes.json (the official code's discriminators at 256 and 1024) counts these.
    assert official_discriminator_params(256) == 26_211_585
    assert official_discriminator_params(1024) == 27_736_641


@pytest.mark.parametrize("resolution", FAMILY_RESOLUTIONS)
@pytest.mark.parametrize("family", ["ffhq", "church"])
def test_family_discriminators_follow_the_official_rule(family, resolution):
    _, d_cfg = get_preset(family, resolution)
    with torch.device("meta"):
        d = build_discriminator(d_cfg)
    assert _count(d) == official_discriminator_params(resolution)


def test_ffhq128_count():
    # The number docs/training.md states for `--preset ffhq --resolution 128`.
    assert official_generator_params(128) == 47_965_529


@pytest.mark.parametrize("resolution", [16, 64, 512])
def test_church_family(resolution):
    g_cfg, _ = get_preset("church", resolution)
    assert g_cfg.dilations[-1] == tuple(2**i for i in range((resolution // 8).bit_length()))
    assert g_cfg.heads == tuple(max(c // 32, 8) for c in g_cfg.channels)


def test_named_presets_equal_their_family_members():
    assert get_preset("ffhq256") == get_preset("ffhq", 256)
    assert get_preset("ffhq1024") == get_preset("ffhq", 1024)
    assert get_preset("church256") == get_preset("church", 256)


def test_resolution_errors():
    # A family without a size: the advice must work wherever it is read (generate and convert-official
    # have no --resolution; an official checkpoint needs the preset it was trained with, or --meta).
    with pytest.raises(ConfigError, match=r"family of models.*named preset \(ffhq256, ffhq1024\).*--meta") as info:
        get_preset("ffhq")
    assert "--resolution" not in str(info.value)
    with pytest.raises(ConfigError, match=r"named preset \(church256\)"):
        get_preset("church")
    with pytest.raises(ConfigError, match="36x36 is not a model size"):
        get_preset("ffhq", 36)
    with pytest.raises(ConfigError, match="use --preset ffhq --resolution 128"):
        get_preset("ffhq256", 128)


def _allowed(w: int, h: int, stages=(3, 9)) -> bool:
    """The size rule written out: w = bw * 2^s, h = bh * 2^s, max(bw, bh) in 4..7, s + 1 stages."""
    return any(w == bw << s and h == bh << s and 4 <= max(bw, bh) <= 7
               for s in range(stages[0] - 1, stages[1]) for bw in range(1, 8) for bh in range(1, 8))


@pytest.mark.parametrize("size", [36, 100, 2048, 8, 9])
def test_advice_for_a_size_no_preset_has_is_never_refused_advice(size):
    """`train --preset tiny --resolution 36` once advised `--preset ffhq --resolution 36`, which is
    then refused: the advice names only sizes that exist, the nearest ones (by brute force)."""
    with pytest.raises(ConfigError) as info:
        get_preset("tiny", size)
    message = str(info.value)
    assert f"--resolution {size}" not in message and f"no preset is {size}x{size}" in message
    squares = [r for r in range(1, 4000) if _allowed(r, r)]
    nearest = [r for r in (max([r for r in squares if r < size], default=None),
                           min([r for r in squares if r > size], default=None)) if r is not None]
    assert f"nearest: {' or '.join(map(str, nearest))};" in message
    for r in nearest:
        get_preset("ffhq", r)  # what it names works
