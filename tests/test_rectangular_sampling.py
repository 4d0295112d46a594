"""Sampling and what builds on it, on a rectangular generator: 32 wide, 16 high (ffhq family, base 4x2).

Every check would fail if a rectangle were treated as a square: shapes are (16, 32), never 32x32 or
16x16; pixel x = 31 exists, y = 16 does not; grids, strips and frames are measured in pixels; cells
are compared with the generator's own output for each seed (computed one z at a time, apart from
the code under test); projection inverts an image the model made (a known inverse).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import stylenat
from stylenat.attention_maps import attention_maps, cell_shape, render_attention_maps
from stylenat.cli import main
from stylenat.editing import render_edits, sefa_directions
from stylenat.errors import ConfigError, DataError
from stylenat.metrics.lpips import LPIPS
from stylenat.models import build_discriminator, build_generator, get_preset, load_model, model_to_uint8, save_model
from stylenat.models import seeds_to_z
from stylenat.models.config import parse_size
from stylenat.models.io import read_model_file
from stylenat.models.latents import load_latent, model_identity, save_latent
from stylenat.projection import load_target, project, psnr, w_stats
from stylenat.sampling import as_ws, generate, interpolate, save_video, style_mix

from .test_projection import vary

H, W = 16, 32
FAST = dict(distance="pyramid", w_avg_samples=2000)


def rect_generator(seed: int = 0) -> torch.nn.Module:
    """The 32x16 test model with images that change a lot with w (as tests/test_projection.py's
    varied_tiny: larger block and ToRGB weights; seeds are 18-23 dB apart)."""
    torch.manual_seed(seed)
    g_cfg, _ = get_preset("ffhq", f"{W}x{H}", cbase=512, cmax=32)
    return vary(build_generator(g_cfg))


@pytest.fixture(scope="module")
def g():
    return rect_generator()


@pytest.fixture(scope="module")
def model_file(g, tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("rect") / "rect.safetensors", {"g_ema": g}, g.config)


@pytest.fixture(autouse=True)
def no_lpips_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STYLENAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("STYLENAT_LPIPS", raising=False)
    monkeypatch.delenv("STYLENAT_LPIPS_VGG", raising=False)


def own_image(g, seed: int) -> torch.Tensor:
    """G's image of one seed, [3, H, W], straight from g(z) (not through stylenat.sampling)."""
    with torch.no_grad():
        return model_to_uint8(g(seeds_to_z([seed], g.style_dim, "cpu")), g.config)[0]


def synth(g, ws: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model_to_uint8(g.synthesis(w[None]), g.config) for w in ws])


def read_png(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())


def cells_of(grid: torch.Tensor, rows: int, cols: int, h: int = H, w: int = W) -> torch.Tensor:
    """A grid image [3, rows*h, cols*w] cut into [rows, cols, 3, h, w]."""
    assert grid.shape == (3, rows * h, cols * w)
    return grid.view(3, rows, h, cols, w).permute(1, 3, 0, 2, 4)


def test_the_model_is_a_rectangle(g):
    assert g.resolution == (H, W) and g.shape == (H, W) and g.config.stage_shapes()[-1] == (H, W)
    assert generate(g, [0, 1]).shape == (2, 3, H, W)
    assert not torch.equal(own_image(g, 0), own_image(g, 1))


def test_cli_generate_grid_cells_are_the_seeds_images(g, model_file, tmp_path):
    out = tmp_path / "samples"
    assert main(["generate", str(model_file), "--seeds", "0-4", "--grid", "2x3", "--out", str(out)]) == 0
    grid = read_png(out / "grid.png")
    assert grid.shape == (3, 2 * H, 3 * W)  # rows*16 high, cols*32 wide
    cells = cells_of(grid, 2, 3)
    for seed in range(5):
        mine = own_image(g, seed)
        assert torch.equal(cells[seed // 3, seed % 3], mine), seed
        assert torch.equal(read_png(out / f"seed{seed:04d}.png"), mine)
    assert int(cells[1, 2].max()) == 0  # the sixth cell has no seed: black


def test_style_mix_on_a_rectangle(g, model_file, tmp_path):
    rows, cols, layers = [3, 4], [5, 6, 7], [0, 1, 2, 3]
    grid = style_mix(g, rows, cols, layers, batch=2)
    assert grid.shape == (3, 4, 3, H, W)
    ws_r, ws_c = as_ws(g, rows), as_ws(g, cols)
    for r in range(2):
        assert torch.equal(grid[1 + r, 0], own_image(g, rows[r]))
        for c in range(3):
            mixed = ws_r[r].clone()
            mixed[layers] = ws_c[c, layers]
            assert torch.equal(grid[1 + r, 1 + c], synth(g, mixed[None])[0])
    for c in range(3):
        assert torch.equal(grid[0, 1 + c], own_image(g, cols[c]))
    out = tmp_path / "mix.png"
    assert main(["mix", str(model_file), "--rows", "3,4", "--cols", "5-7", "--layers", "0-3", "--out", str(out)]) == 0
    assert torch.equal(cells_of(read_png(out), 3, 4), grid)


def test_interpolation_frames_and_the_video_writer(g, model_file, tmp_path, monkeypatch):
    frames = interpolate(g, [0, 1], 3, loop=False)
    assert frames.shape == (4, 3, H, W)
    assert torch.equal(frames[0], own_image(g, 0)) and torch.equal(frames[-1], own_image(g, 1))
    path = save_video(frames, tmp_path / "walk.gif", loop=False)
    with Image.open(path) as gif:
        assert gif.size == (W, H) and gif.n_frames == 4
        first = torch.from_numpy(np.asarray(gif.convert("RGB")).transpose(2, 0, 1).copy())
    assert (first.float() - frames[0].float()).abs().mean() < 4  # GIF palettes round colours a little
    # The CLI's video command hands the writer W x H frames.
    import stylenat.sampling

    seen, save = [], stylenat.sampling.save_video
    monkeypatch.setattr(stylenat.sampling, "save_video", lambda f, *a, **k: seen.append(f) or save(f, *a, **k))
    out = tmp_path / "cli.gif"
    assert main(["video", str(model_file), "--seeds", "0,1", "--frames", "3", "--no-loop", "--out", str(out)]) == 0
    assert torch.equal(seen[0], frames)
    with Image.open(out) as gif:
        assert gif.size == (W, H)
    # H.264 in yuv420p needs even sides: odd frames are refused before anything is written.
    with pytest.raises(ConfigError, match="even width and height, the frames are 31x16"):
        save_video(frames[..., :31], tmp_path / "odd.mp4")
    assert not (tmp_path / "odd.mp4").exists()


def test_attention_maps_per_stage_have_the_stage_shape(g):
    pixel = (15, 31)  # the bottom-right pixel: outside a 16x16 image, and y = 31 is outside this one
    image, maps = attention_maps(g, 3, pixel)
    assert image.shape == (3, H, W) and torch.equal(image, own_image(g, 3))
    shapes = g.config.stage_shapes()
    assert shapes == [(2, 4), (4, 8), (8, 16), (16, 32)]
    # Stage by stage (each map's resolution its (h, w)), two blocks each, one map per head group.
    assert [m.resolution for m in maps] == [hw for hw, ks in zip(shapes, g.config.kernels) for _ in range(2 * len(ks))]
    for m in maps:
        h, w = m.shape
        assert m.weights.shape[1:] == (h, w)
        assert m.query == (15 * h // H, 31 * w // W) == (h - 1, w - 1)
        assert torch.allclose(m.weights.sum((1, 2)), torch.ones(len(m.weights)), atol=1e-5)
    # Stages by their longer side (a square's edge) or as WxH text; coarse to fine in any order.
    picked = attention_maps(g, 3, (0, 0), ["16x8", 8])[1]
    assert sorted({m.resolution for m in picked}) == [(4, 8), (8, 16)]
    assert [m.resolution for m in picked][0] == (4, 8)
    with pytest.raises(ConfigError, match="no stage at resolution 64; this model has 4x2, 8x4, 16x8, 32x16"):
        attention_maps(g, 3, (0, 0), [64])
    with pytest.raises(ConfigError, match=r"outside the 32x16 image \(y in 0-15, x in 0-31\)"):
        attention_maps(g, 3, (16, 0))


def test_attention_weights_are_the_layers_own_on_a_rectangular_map(g):
    """weights @ v, projected, equal the attention layer's output in the same pass (8x16 map, dilation (1, 2))."""
    layer = g.synthesis.stages[2].blocks[0].attn
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    try:
        _, maps = attention_maps(g, 5, (9, 20), [16])
    finally:
        hook.remove()
    ours = [m for m in maps if m.block == 0]
    assert seen["x"].shape[1:3] == (8, 16) and all(m.query == (4, 10) for m in ours)
    assert {m.dilation for m in ours} == {(1, 1), (1, 2)}
    with torch.no_grad():
        v = layer.qkv_heads(seen["x"])[2][0]
        weights = torch.cat([m.weights for m in ours])
        mixed = torch.einsum("hyx,hyxd->hd", weights, v).reshape(-1)
        assert torch.allclose(layer.proj(mixed), seen["out"][0, 4, 10], atol=1e-5)


def test_attention_overlays_keep_the_aspect(g, model_file, tmp_path):
    assert cell_shape((H, W), 128) == (64, 128) and cell_shape((32, 32), 128) == (128, 128)
    image, maps = attention_maps(g, 0, (8, 8))
    cells, grid = render_attention_maps(image, maps, (8, 8), cell=64)
    assert grid == (8, 3) and cells.shape == (24, 3, 32, 64)
    # The first column is the image itself, resized to the cell (then labelled and marked).
    base = np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((64, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(cells[0].transpose(1, 2, 0)[-8:], base[-8:])  # below the label and the mark
    out = tmp_path / "att.png"
    assert main(["attention", str(model_file), "--pixel", "15,31", "--resolutions", "8,32", "--cell", "64",
                 "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (3 * 64, 4 * 32)


def test_projection_inverts_an_image_of_the_model(g):
    target = own_image(g, 3)
    w_avg, _ = w_stats(g, 2000)
    start = psnr(synth(g, w_avg[None, None].expand(1, g.num_ws, -1))[0], target)
    result = project(g, target, steps=30, space="w+", **FAST)
    assert result.image.shape == result.target.shape == (3, H, W)
    assert start < 25 and result.psnr > start + 10, (start, result.psnr)
    assert torch.equal(result.image, synth(g, result.ws[None])[0])
    curve = result.losses["total"]
    assert curve[-3:].mean() < 0.3 * curve[:3].mean()
    # LPIPS (random VGG weights here) runs on the non-square images too.
    torch.manual_seed(0)
    lpips = project(g, target, steps=2, lpips=LPIPS().eval(), w_avg_samples=100)
    assert lpips.distance == "lpips-vgg16" and torch.isfinite(lpips.losses["total"]).all()


def test_targets_are_cropped_to_the_models_aspect(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)  # 70 wide, 50 high: taller than 2:1
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    # The largest centred 2:1 region: 70 x 35, from row 7; then Lanczos to 32 x 16.
    oracle = Image.fromarray(pixels[7:42]).resize((W, H), Image.Resampling.LANCZOS)
    expected = torch.from_numpy(np.asarray(oracle).transpose(2, 0, 1).copy())
    assert torch.equal(load_target(tmp_path / "photo.png", (H, W)), expected)
    assert torch.equal(load_target(Image.fromarray(pixels), "32x16"), expected)
    assert torch.equal(load_target(expected, (H, W)), expected)
    with pytest.raises(DataError, match=r"uint8 \[3, 16, 32\] \(32x16: height 16, width 32\)"):
        load_target(expected.transpose(1, 2).contiguous(), (H, W))  # 16 wide, 32 high: the transpose


def test_cli_project_on_a_rectangle(g, model_file, tmp_path):
    Image.fromarray(own_image(g, 4).permute(1, 2, 0).numpy()).save(tmp_path / "target.png")
    out = tmp_path / "proj"
    assert main(["project", str(model_file), str(tmp_path / "target.png"), "--steps", "25", "--distance", "pyramid",
                 "--video", "gif", "--out", str(out)]) == 0
    folder = out / "target"
    assert read_png(folder / "projected.png").shape == (3, H, W)
    beside = read_png(folder / "side_by_side.png")
    assert beside.shape == (3, H, 2 * W) and torch.equal(beside[..., :W], own_image(g, 4))
    report = json.loads((folder / "losses.json").read_text())
    curve = report["losses"]["total"]
    assert np.mean(curve[-3:]) < 0.5 * np.mean(curve[:3]) and report["psnr_db"] > 30
    latent = load_latent(folder / "latent.safetensors", g)
    assert torch.equal(synth(g, latent[None])[0], read_png(folder / "projected.png"))
    with Image.open(folder / "optimization.gif") as gif:
        assert gif.size == (2 * W, H)


def test_sefa_edit_strips(g, model_file, tmp_path):
    directions, _ = sefa_directions(g)
    ws = as_ws(g, [1, 2])
    strips = render_edits(g, ws, directions[0], [-2, 0, 2], batch=4)
    assert strips.shape == (2, 3, 3, H, W)
    assert torch.equal(strips[0, 1], own_image(g, 1)) and torch.equal(strips[1, 1], own_image(g, 2))
    moved = ws[0] + 2 * directions[0]
    assert torch.equal(strips[0, 2], synth(g, moved[None])[0])
    out = tmp_path / "edit.png"
    assert main(["edit", str(model_file), "--seeds", "1,2", "--strengths", "-2,0,2", "--out", str(out)]) == 0
    assert torch.equal(cells_of(read_png(out), 2, 3), strips)


def test_model_file_round_trip_is_bitwise(tmp_path):
    g_cfg, d_cfg = get_preset("ffhq", f"{W}x{H}", cbase=512, cmax=32)
    torch.manual_seed(1)
    g, d = build_generator(g_cfg), build_discriminator(d_cfg)
    g.w_avg.normal_()
    x = torch.randn(2, 3, H, W)
    d.train()(x)  # one power iteration: u, v differ from their init
    path = save_model(tmp_path / "m.safetensors", {"g_ema": g, "d": d}, g_cfg, d_cfg)
    meta, states = read_model_file(path)
    assert meta["g_config"]["resolution"] == [H, W] and meta["d_config"]["resolution"] == [H, W]
    g2, d2 = load_model(path), load_model(path, "d")
    assert g2.config == g_cfg and g2.resolution == (H, W) and d2.config == d_cfg
    for mine, theirs in ((g, g2), (d, d2)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    z = torch.randn(2, g.style_dim)
    with torch.no_grad():
        assert torch.equal(g2(z), g.eval()(z)) and g2(z).shape == (2, 3, H, W)
        assert torch.equal(d2(x), d.eval()(x))
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert json.loads(header["__metadata__"]["g_config"])["resolution"] == [H, W]


def test_latent_files_name_the_rectangle(g, tmp_path):
    identity = model_identity(g)
    assert identity["resolution"] == "32x16" and parse_size(identity["resolution"]) == (H, W)
    assert model_identity(build_generator("tiny"))["resolution"] == "32"  # squares as always
    ws = torch.randn(g.num_ws, g.style_dim)
    assert torch.equal(load_latent(save_latent(tmp_path / "l.safetensors", ws, g, "w+"), g), ws)


def test_hub_folder_and_card_of_a_rectangle(g, model_file, tmp_path):
    from stylenat.hub import CARD_FILE, CONFIG_FILE, export_hub

    folder = export_hub(model_file, tmp_path / "hub")
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["resolution"] == [H, W] and config["generator"]["resolution"] == [H, W]
    card = (folder / CARD_FILE).read_text()
    assert "| resolution | 32x16 |" in card and "(32x16)" in card and "16x16" not in card and "32x32" not in card
    z = torch.randn(1, g.style_dim)
    with torch.no_grad():
        assert torch.equal(stylenat.load(folder)(z), g(z))


def test_registry_entries_take_rectangles():
    from stylenat.registry import get_entry, register, unregister

    try:
        assert register("rect-a", "https://x/a.safetensors", resolution="512x384").resolution == (384, 512)
        assert get_entry("rect-a").size_text == "512x384"
        assert register("rect-b", "https://x/b.safetensors", resolution=[384, 512]).resolution == (384, 512)
        square = register("rect-c", "https://x/c.safetensors", resolution=256)
        assert square.resolution == 256 and square.size_text == "256x256"
        with pytest.raises(ConfigError, match="resolution must be a positive whole number .* or WIDTHxHEIGHT"):
            register("rect-d", "https://x/d.safetensors", resolution="512 by 384")
        with pytest.raises(ConfigError, match="resolution must be"):
            register("rect-d", "https://x/d.safetensors", resolution=0)
    finally:
        for name in ("rect-a", "rect-b", "rect-c", "rect-d"):
            unregister(name)


def test_compile_generator_warms_up_a_rectangle():
    from stylenat.models.compiled import compile_generator, compile_settings

    g_cfg, _ = get_preset("ffhq", f"{W}x{H}", cbase=512, cmax=32)
    g = build_generator(g_cfg).eval()
    calls = []
    hook = g.synthesis.register_forward_hook(lambda m, args, out: calls.append(tuple(out.shape)))
    try:
        assert compile_generator(g) is g  # compiles lazily: only the eager warm-up pass runs here
    finally:
        hook.remove()
    assert calls == [(1, 3, H, W)] and compile_settings(g)["freeze"] is True


def test_lpips_input_keeps_the_aspect():
    from stylenat.projection import _lpips_input

    x = torch.rand(1, 3, 384, 512)
    small = _lpips_input(x)
    assert small.shape == (1, 3, 192, 256)  # the longer side to 256, not a 256x256 squash
    assert torch.allclose(small, torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)  # area = 2x2 means here
    assert _lpips_input(torch.rand(1, 3, 512, 512)).shape == (1, 3, 256, 256)  # squares as before
    assert _lpips_input(x[..., :256, :128]).shape == (1, 3, 256, 128)  # small enough: as it is


@pytest.mark.slow  # an inductor compile: 10-50 s on 2 cores
def test_compiled_rectangle_equals_eager():
    from stylenat.models.compiled import compile_generator

    g_cfg, _ = get_preset("ffhq", f"{W}x{H}", cbase=512, cmax=32)
    torch.manual_seed(0)
    g = build_generator(g_cfg).eval()
    for m in g.synthesis.to_rgbs:
        torch.nn.init.xavier_normal_(m.conv.weight)  # outputs O(1), so the tolerance means something
    z = torch.randn(1, g.style_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = g(z)
        out = compile_generator(g)(z)
    assert out.shape == ref.shape == (1, 3, H, W)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
