"""Attention maps: the recomputed weights against hand-worked windows and against na2d's output."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from stylenat.attention_maps import attention_maps, attention_weights, axis_window, render_attention_maps
from stylenat.cli import main
from stylenat.models import build_generator, save_model
from stylenat.nn.attention import HydraNeighborhoodAttention, na2d


def test_axis_window_by_hand():
    # L = 8, k = 3: interior windows are centred, border windows shift inward.
    assert axis_window(8, 3, 1, 4) == ([3, 4, 5], [1, 2, 3])
    assert axis_window(8, 3, 1, 0) == ([0, 1, 2], [2, 3, 4])
    assert axis_window(8, 3, 1, 7) == ([5, 6, 7], [0, 1, 2])
    # d = 2: pixel 1 is sub-position 0 of the odd group {1, 3, 5, 7}.
    assert axis_window(8, 3, 2, 1) == ([1, 3, 5], [2, 3, 4])
    # L = 9, d = 2: the even group {0, 2, 4, 6, 8} has 5 members; pixel 8 is its last.
    assert axis_window(9, 3, 2, 8) == ([4, 6, 8], [0, 1, 2])
    # Full attention (k = L): every pixel sees the whole axis.
    assert axis_window(4, 4, 1, 1)[0] == [0, 1, 2, 3]


@pytest.fixture
def hydra():
    torch.manual_seed(0)
    attn = HydraNeighborhoodAttention(40, 5, kernel_sizes=[3, 5], dilations=[(3, 2), 1]).double()
    for table in attn.rpb_tables():  # unit-scale biases, so a wrong bias index shows
        torch.nn.init.normal_(table)
    return attn


@pytest.mark.parametrize("pixel", [(0, 0), (4, 5), (8, 9), (2, 7)])
def test_weights_reproduce_na2d(hydra, pixel):
    x = torch.randn(2, 9, 10, 40, dtype=torch.float64)
    groups = attention_weights(hydra, x, *pixel)
    q, k, v = hydra.qkv_heads(x)
    start = 0
    for weights, nh, ks, dil, table in zip(groups, hydra.group_heads, hydra.kernel_sizes, hydra.dilations,
                                           hydra.rpb_tables()):
        assert weights.shape == (2, nh, 9, 10)
        assert torch.allclose(weights.sum((2, 3)), torch.ones(2, nh, dtype=torch.float64))
        # Zero outside the window: exactly ky * kx keys, all in the query's dilation group.
        support = weights[0, 0] > 0
        assert int(support.sum()) == ks[0] * ks[1]
        ys, xs = support.nonzero().unbind(1)
        assert ((ys - pixel[0]) % dil[0] == 0).all() and ((xs - pixel[1]) % dil[1] == 0).all()
        sl = slice(start, start + nh)
        got = torch.einsum("bhyx,bhyxd->bhd", weights, v[:, sl])
        for backend in ("reference", "tiled"):
            out = na2d(q[:, sl], k[:, sl], v[:, sl], ks, dil, rpb=table, scale=hydra.scale, backend=backend)
            assert torch.allclose(got, out[:, :, pixel[0], pixel[1]], atol=1e-12)
        start += nh


def test_out_of_range_pixel(hydra):
    with pytest.raises(ValueError, match="outside"):
        attention_weights(hydra, torch.zeros(1, 9, 10, 40, dtype=torch.float64), 9, 0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_generator("tiny").eval()


def test_maps_come_from_the_real_forward_pass(tiny):
    """weights @ v, projected, must equal the attention layer's own output in the same pass."""
    seen = {}
    layer = tiny.synthesis.stages[2].blocks[1].attn  # 16x16, two groups (k5 d1, k5 d2)
    hook = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    try:
        image, maps = attention_maps(tiny, seed=7, pixel=(21, 6), resolutions=[16, 32])
    finally:
        hook.remove()
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert [(m.resolution, m.block, m.group) for m in maps] == [(r, b, p) for r in (16, 32) for b in (0, 1) for p in (0, 1)]
    ours = [m for m in maps if (m.resolution, m.block) == (16, 1)]
    assert all(m.query == (10, 3) for m in ours)  # (21 * 16 // 32, 6 * 16 // 32)
    with torch.no_grad():
        v = layer.qkv_heads(seen["x"])[2][0]
        weights = torch.cat([m.weights for m in ours])  # [heads, 16, 16]
        mixed = torch.einsum("hyx,hyxd->hd", weights, v).reshape(-1)
        assert torch.allclose(layer.proj(mixed), seen["out"][0, 10, 3], atol=1e-5)


def test_render_layout(tiny):
    image, maps = attention_maps(tiny, seed=0, pixel=(5, 5))
    cells, grid = render_attention_maps(image, maps, (5, 5), cell=64)
    assert grid == (8, 3)  # 4 stages x 2 blocks; the image plus at most 2 head groups
    assert cells.shape == (24, 3, 64, 64) and cells.dtype.name == "uint8"


def test_cli_attention(tiny, tmp_path, capsys):
    model = save_model(tmp_path / "tiny.safetensors", {"g_ema": tiny}, tiny.config)
    out = tmp_path / "att.png"
    assert main(["attention", str(model), "--seed", "3", "--pixel", "31,0", "--resolutions", "8,32",
                 "--cell", "32", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (3 * 32, 4 * 32)
    assert main(["attention", str(model), "--pixel", "32,0", "--out", str(out)]) == 2
    assert "outside the 32x32 image" in capsys.readouterr().err
