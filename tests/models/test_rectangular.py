"""Models of W != H: the allowed-size rule (against a brute-force enumeration), the shapes at every
stage of G and D, the family rule per axis, the width knobs, and parameter counts in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from stylenat.errors import ConfigError
from stylenat.models import build_discriminator, build_generator, get_preset
from stylenat.models.config import (GeneratorConfig, nearest_sizes, parse_size, size_text, stage_shapes)
from stylenat.nn.layers import sinusoidal_table

from .test_families import official_discriminator_params, official_generator_params


def allowed(w: int, h: int, min_stages: int = 2) -> bool:
    """The rule written out: w = bw * 2^s, h = bh * 2^s, the base's longer side 4..7, s + 1 stages."""
    return any(w == bw << s and h == bh << s and 4 <= max(bw, bh) <= 7
               for s in range(min_stages - 1, 12) for bw in range(1, 8) for bh in range(1, 8))


def test_parse_size_reads_width_first():
    assert parse_size("512x384") == (384, 512) and parse_size("256") == 256 and parse_size(64) == 64
    assert parse_size("64X64") == 64 and parse_size([32, 64]) == (32, 64) and parse_size((16, 16)) == 16
    assert size_text((384, 512)) == "512x384"
    for bad in ("512x", "x384", "1.5x2", "abc", True, 3.0, (1, 2, 3)):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_the_size_rule_is_the_brute_force_one():
    for w in range(1, 97):
        for h in range(1, 97):
            try:
                shapes = stage_shapes((h, w))
            except ConfigError:
                assert not allowed(w, h), f"{w}x{h} refused"
                continue
            assert allowed(w, h), f"{w}x{h} accepted"
            bh, bw = shapes[0]
            assert 4 <= max(bh, bw) <= 7 and shapes[-1] == (h, w)
            assert shapes == [(bh << i, bw << i) for i in range(len(shapes))]


@pytest.mark.parametrize("w, h", [(100, 60), (1024, 576), (30, 30), (64, 9)])
def test_a_refused_size_names_the_nearest_allowed_ones(w, h):
    with pytest.raises(ConfigError) as info:
        get_preset("ffhq", f"{w}x{h}")
    message = str(info.value)
    assert message.startswith(f"{w}x{h} is not a model size") and "nearest:" in message
    named = [parse_size(t.strip(" ()")) for t in message.split("nearest: ")[1].rstrip(")").split(" or ")]
    assert named == nearest_sizes((h, w), 3, 9)
    for size in named:
        get_preset("ffhq", size)  # every size it names exists
    # The first named size is the closest in log distance among all family sizes (brute force).
    distance = lambda hw: abs(math.log(hw[0] / h)) + abs(math.log(hw[1] / w))  # noqa: E731
    everything = {(bh << s, bw << s) for s in range(2, 9) for bw in range(1, 8) for bh in range(1, 8)
                  if 4 <= max(bw, bh) <= 7}
    first = named[0] if isinstance(named[0], tuple) else (named[0], named[0])
    if w != h:
        assert distance(first) <= min(map(distance, everything)) + 1e-12


@pytest.mark.parametrize("size", ["64x32", "32x64", "48x32", "64x48", "40x24"])
def test_generator_and_discriminator_shapes_at_every_stage(size):
    g_cfg, d_cfg = get_preset("ffhq", size, cbase=512, cmax=32)
    h, w = g_cfg.shape
    assert size_text(g_cfg.resolution) == size
    shapes = g_cfg.stage_shapes()
    G, D = build_generator(g_cfg), build_discriminator(d_cfg)
    seen = []
    for stage in G.synthesis.stages:
        stage.blocks[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:3])))
    x = G(torch.randn(4, g_cfg.style_dim))
    assert seen == shapes and tuple(x.shape) == (4, 3, h, w)
    assert tuple(G.synthesis.const.shape[2:]) == shapes[0]
    assert D.final_linear[0].in_features == d_cfg.channels[0] * shapes[0][0] * shapes[0][1]
    assert D(x).shape == (4, 1)
    with pytest.raises(ValueError, match=f"shape \\[batch, 3, {h}, {w}\\]"):
        D(x.transpose(2, 3))


def test_family_rule_per_axis():
    g, _ = get_preset("ffhq", "512x256")
    for (h, w), ks, ds in zip(g.stage_shapes(), g.kernels, g.dilations):
        if (h, w) == g.stage_shapes()[0]:
            assert ks == ((h, w),) and ds == (1,)  # full attention over the base
            continue
        longer = max(h, w)
        for k, d, want in zip(ks, ds, (1, max(1, longer // 8))):
            ky, kx = (k, k) if isinstance(k, int) else k
            dy, dx = (d, d) if isinstance(d, int) else d
            assert (ky, kx) == (min(7, h), min(7, w))
            assert (dy, dx) == (max(1, want * h // longer), max(1, want * w // longer))
    # the sparse group spans (nearly) the whole map on both axes at the last stage: 256x512, k7
    assert g.dilations[-1] == (1, (32, 64))
    church, _ = get_preset("church", "64x32")
    assert church.dilations[-1] == (1, (1, 2), (2, 4), (4, 8))


def test_squares_are_the_official_models():
    for r in (16, 256, 1024):
        assert get_preset("ffhq", r) == get_preset("ffhq", r, cbase=32768, cmax=512)
        assert get_preset("ffhq", f"{r}x{r}") == get_preset("ffhq", r)
    g, d = get_preset("ffhq256")
    assert g.resolution == 256 and g.to_dict()["resolution"] == 256 and d.to_dict()["resolution"] == 256


def test_rectangular_config_round_trips_json():
    g, d = get_preset("church", "512x384")
    assert g.to_dict()["resolution"] == [384, 512]
    assert GeneratorConfig.from_dict(g.to_dict()) == g
    assert GeneratorConfig.from_dict({**g.to_dict(), "resolution": "512x384"}) == g


def generator_params(cfg: GeneratorConfig) -> int:
    """The parameter count written out (test_families.official_generator_params for any stage
    shapes, widths, head groups and per-axis kernels)."""
    sd, ch = cfg.style_dim, cfg.channels
    shapes = cfg.stage_shapes()
    total = cfg.n_mlp * (sd * sd + sd) + ch[0] * shapes[0][0] * shapes[0][1]
    for i, (c, heads, ks) in enumerate(zip(ch, cfg.heads, cfg.kernels)):
        groups = [heads // len(ks) + (1 if j >= len(ks) - heads % len(ks) else 0) for j in range(len(ks))]
        rpb = sum(n * (2 * (k if isinstance(k, int) else k[0]) - 1) * (2 * (k if isinstance(k, int) else k[1]) - 1)
                  for n, k in zip(groups, ks))
        hidden = int(c * cfg.mlp_ratio)
        block = 2 * (sd * 2 * c + 2 * c) + (c * 3 * c + 3 * c) + (c * c + c) + rpb + (c * hidden + hidden) + (hidden * c + c)
        total += 2 * block
        out = ch[i + 1] if i + 1 < len(ch) else c
        if i + 1 < len(ch):
            total += 2 * c + c * out + 1
        total += out * 3 + 3 + 3
    return total


def discriminator_params(channels, base_tokens: int) -> int:
    total, in_ch = 0, channels[-1]
    for i in range(len(channels) - 2, 0, -1):
        out_ch = channels[i - 1]
        total += (12 * in_ch + in_ch) + (9 * in_ch * in_ch + in_ch) + (9 * in_ch * out_ch + out_ch)
        in_ch = out_ch
    c4 = channels[0]
    return total + (12 * c4 + c4) + (9 * (in_ch + 1) * c4 + c4) + (base_tokens * c4 * c4 + 2 * c4) + (c4 + 1)


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_closed_forms_agree_with_the_official_ones():
    g, _ = get_preset("ffhq", 256)
    assert generator_params(g) == official_generator_params(256) == 48_921_000
    assert discriminator_params(get_preset("ffhq", 256)[1].channels, 16) == official_discriminator_params(256)


@pytest.mark.parametrize("family, size, cbase, cmax", [("ffhq", 64, 1024, 64), ("ffhq", "64x32", 1024, 64),
                                                       ("church", "32x64", 2048, 128), ("ffhq", "512x384", 32768, 512)])
def test_parameter_counts(family, size, cbase, cmax):
    g_cfg, d_cfg = get_preset(family, size, cbase=cbase, cmax=cmax)
    assert g_cfg.channels == tuple(min(cbase // (4 << i), cmax) for i in range(len(g_cfg.channels)))
    assert g_cfg.style_dim == min(cmax, 512)
    with torch.device("meta"):
        G, D = build_generator(g_cfg), build_discriminator(d_cfg)
    bh, bw = g_cfg.stage_shapes()[0]
    assert _count(G) == generator_params(g_cfg)
    assert _count(D) == discriminator_params(d_cfg.channels, bh * bw)


def test_narrow_family_model_at_64_is_small():
    # The numbers docs/models.md gives for `--preset ffhq --resolution 64 --cbase 1024 --cmax 64`.
    g_cfg, d_cfg = get_preset("ffhq", 64, cbase=1024, cmax=64)
    assert g_cfg.channels == (64, 64, 64, 32, 16) and g_cfg.heads == (4, 4, 4, 4, 4)
    assert generator_params(g_cfg) == 506_666
    assert discriminator_params(d_cfg.channels, 16) == 265_249
    g_cfg, d_cfg = get_preset("ffhq", "64x32", cbase=1024, cmax=64)
    assert (generator_params(g_cfg), discriminator_params(d_cfg.channels, 8)) == (505_306, 232_481)
    g_cfg, d_cfg = get_preset("ffhq", 64)
    assert generator_params(g_cfg) == official_generator_params(64) == 45_202_626
    assert official_discriminator_params(64) == 20_745_729


def test_width_errors():
    with pytest.raises(ConfigError, match=r"cbase 256 and cmax 32 give 4 channels at stage 64x64.*cbase >= 512"):
        get_preset("ffhq", 64, cbase=256, cmax=32)
    with pytest.raises(ConfigError, match="fixed width.*--preset ffhq"):
        get_preset("ffhq256", cbase=1024)
    with pytest.raises(ConfigError, match="cbase must be a positive integer"):
        get_preset("ffhq", 64, cbase=0)


def test_position_codes_follow_each_axis():
    g_cfg, _ = get_preset("ffhq", "32x16", cbase=512, cmax=32)
    up = build_generator(g_cfg).synthesis.stages[0].upsample  # 4x2 -> 8x4 (h 4, w 8)
    with torch.no_grad():
        up.alpha.fill_(1.0)
        c_in = up.norm.normalized_shape[0]
        x = torch.zeros(1, 2, 4, c_in)
        out = up(x)  # zero input: LayerNorm gives its bias (0), so the output is the codes alone
    half = up.reduction.out_features // 2
    cols, rows = sinusoidal_table(8, half), sinusoidal_table(4, half)
    for i in range(4):
        for j in range(8):
            assert torch.equal(out[0, i, j, :half], cols[j]) and torch.equal(out[0, i, j, half:], rows[i])
