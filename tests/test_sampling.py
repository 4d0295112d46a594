"""stylenat.sampling and the generate / mix / video CLI: determinism per seed, truncation, mixing
against hand-built latents, frame counts, model resolution and its one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.cli import main, parse_ints
from stylenat.models import build_generator, model_to_uint8, resolve_model, save_model, seeds_to_z
from stylenat.sampling import generate, interpolate, seeds_to_w, style_mix
from tests.test_projection import varied_tiny

SIZE = 32  # the tiny preset


def save_tiny_model(folder: Path) -> Path:
    """A tiny generator saved in the project format, with ToRGB weights large enough for varied pixels."""
    torch.manual_seed(0)
    g = build_generator("tiny")
    for p in g.synthesis.to_rgbs.parameters():  # the 0.02-gain init gives near-constant images
        torch.nn.init.normal_(p, std=0.3)
    g.compute_w_avg(n=256)
    path = folder / "tiny.safetensors"
    save_model(path, {"g_ema": g}, g.config)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def g(model_file):
    return resolve_model(model_file, device="cpu")


def reference_images(g, seeds, psi=1.0):
    """The generator's own forward z -> image."""
    with torch.no_grad():
        return model_to_uint8(g(seeds_to_z(seeds, g.style_dim), truncation_psi=psi), g.config)


def test_parse_ints():
    assert parse_ints("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_ints("1,5,9") == [1, 5, 9]
    assert parse_ints("7") == [7]
    for bad in ("a", "3-1", "1,,2"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_ints(bad, "--seeds")


def test_generate_matches_forward_whatever_the_batch(g):
    seeds = [3, 4, 5, 6, 7]
    together = generate(g, seeds, truncation_psi=0.7, batch=5)
    assert together.dtype == torch.uint8 and together.shape == (5, 3, SIZE, SIZE)
    assert torch.equal(together, reference_images(g, seeds, 0.7))
    # Same seed, other neighbours and batch size: same pixels.
    other = generate(g, [9, 5, 3], truncation_psi=0.7, batch=2)
    assert torch.equal(other[2], together[0]) and torch.equal(other[1], together[2])
    assert not torch.equal(together[0], together[1])


def test_truncation_zero_gives_the_mean_image(g):
    images = generate(g, [0, 1, 2, 99], truncation_psi=0)
    assert all(torch.equal(images[0], im) for im in images[1:])
    with torch.no_grad():
        mean = model_to_uint8(g.synthesis(g.w_avg.expand(1, g.num_ws, -1)), g.config)
    assert torch.equal(images[0], mean[0])


def test_style_mix_against_hand_built_latents(g):
    rows, cols, layers = [1, 2], [3, 4, 5], [0, 1, 2, 3]
    grid = style_mix(g, rows, cols, layers, truncation_psi=0.8)
    assert grid.shape == (3, 4, 3, SIZE, SIZE)
    assert (grid[0, 0] == 0).all()
    assert torch.equal(grid[0, 1:], generate(g, cols, 0.8)) and torch.equal(grid[1:, 0], generate(g, rows, 0.8))
    w_rows, w_cols = seeds_to_w(g, rows, 0.8), seeds_to_w(g, cols, 0.8)
    take = torch.tensor([i in layers for i in range(g.num_ws)])[:, None]
    ws = torch.stack([torch.where(take, w_cols[c], w_rows[r]) for r in range(len(rows)) for c in range(len(cols))])
    with torch.no_grad():
        want = model_to_uint8(g.synthesis(ws), g.config)
    assert torch.equal(grid[1:, 1:].flatten(0, 1), want)
    with pytest.raises(ValueError, match="ws indices"):
        style_mix(g, rows, cols, [g.num_ws])


@pytest.mark.parametrize("space", ["w", "z"])
def test_interpolate_frames(g, space):
    seeds = [3, 4, 5]
    looped = interpolate(g, seeds, 4, loop=True, space=space)
    assert looped.shape == (12, 3, SIZE, SIZE)
    keys = generate(g, seeds)
    assert torch.equal(looped[0], keys[0]) and torch.equal(looped[4], keys[1]) and torch.equal(looped[8], keys[2])
    once = interpolate(g, seeds, 4, loop=False, space=space)
    assert once.shape == (9, 3, SIZE, SIZE) and torch.equal(once[-1], keys[2])
    if space == "w":
        w = seeds_to_w(g, seeds[:2])
        with torch.no_grad():
            mid = model_to_uint8(g.synthesis(((w[0] + w[1]) / 2).expand(1, g.num_ws, -1)), g.config)[0]
        assert torch.equal(looped[2], mid)


def test_style_mix_and_interpolate_take_latents():
    g = varied_tiny()  # images that change a lot with w, so a wrong latent shows
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, g.num_ws, g.style_dim, generator=gen)  # w+ latents: one per ws index
    cols = torch.randn(3, g.style_dim, generator=gen)  # w latents
    grid = style_mix(g, rows, cols, [4, 5], truncation_psi=0.5)  # truncation is for seeds only
    ws = rows[:, None].repeat(1, 3, 1, 1)
    ws[:, :, 4:6] = cols[None, :, None]
    with torch.no_grad():
        want = model_to_uint8(g.synthesis(ws.flatten(0, 1)), g.config)
        own_rows = model_to_uint8(g.synthesis(rows), g.config)
    assert torch.equal(grid[1:, 1:].flatten(0, 1), want) and torch.equal(grid[1:, 0], own_rows)
    mixed = style_mix(g, rows, [7, 8], [0])  # latents on one side, seeds on the other
    assert torch.equal(mixed[0, 1:], generate(g, [7, 8]))

    frames = interpolate(g, rows, 2, loop=False)  # per ws index: halfway is the mean of each layer's latents
    assert frames.shape == (3, 3, SIZE, SIZE) and torch.equal(frames[0], own_rows[0]) and torch.equal(frames[2], own_rows[1])
    with torch.no_grad():
        mid = model_to_uint8(g.synthesis(rows.mean(0, keepdim=True)), g.config)[0]
    assert (frames[1].int() - mid.int()).abs().max() <= 1  # lerp and mean may round the last bit apart
    with pytest.raises(ValueError, match="space 'w'"):
        interpolate(g, rows, 2, space="z")
    with pytest.raises(ValueError, match=r"latents must be ws \[N, 8, 64\] or w \[N, 64\]"):
        style_mix(g, torch.zeros(1, 3, g.style_dim), [1], [0])


def test_an_unconditional_model_takes_no_class(g, model_file, tmp_path, capsys):
    for labels in (0, "cat", [0], torch.tensor(0)):
        with pytest.raises(ValueError, match="this model is unconditional: it takes no class"):
            generate(g, [1], labels=labels)
    assert torch.equal(generate(g, [1], labels=None), generate(g, [1]))
    for argv in (["generate", "--seeds", "0", "--class", "1", "--out", str(tmp_path / "a")],
                 ["generate", "--seeds", "0", "--classes", "--out", str(tmp_path / "b")],
                 ["mix", "--rows", "0", "--cols", "1", "--layers", "0", "--class", "1", "--out", str(tmp_path / "m.png")],
                 ["video", "--seeds", "0-1", "--class", "1", "--out", str(tmp_path / "v.gif")]):
        assert main([argv[0], str(model_file), *argv[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "unconditional" in err


# ---- CLI ----------------------------------------------------------------------------------------


def png_size(path):
    with Image.open(path) as im:
        return im.size


def test_cli_generate_files_and_grid(model_file, tmp_path, g):
    out = tmp_path / "gen"
    assert main(["generate", str(model_file), "--seeds", "0-3,10", "--grid", "2x3", "--out", str(out),
                 "--trunc", "0.7", "--batch", "2", "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "seed0000.png", "seed0001.png", "seed0002.png", "seed0003.png", "seed0010.png"]
    assert png_size(out / "grid.png") == (3 * SIZE, 2 * SIZE)
    pixels = np.asarray(Image.open(out / "seed0010.png")).transpose(2, 0, 1)
    assert np.array_equal(pixels, reference_images(g, [10], 0.7)[0].numpy())

    only_grid = tmp_path / "grid_only"
    assert main(["generate", str(model_file), "--seeds", "0-1", "--grid", "1x2", "--no-images", "--out", str(only_grid)]) == 0
    assert [p.name for p in only_grid.iterdir()] == ["grid.png"]


def test_cli_mix_and_video(model_file, tmp_path):
    mix = tmp_path / "mix.png"
    assert main(["mix", str(model_file), "--rows", "0-1", "--cols", "2-4", "--layers", "0-3", "--out", str(mix)]) == 0
    assert png_size(mix) == (4 * SIZE, 3 * SIZE)
    gif = tmp_path / "walk.gif"
    assert main(["video", str(model_file), "--seeds", "0-2", "--frames", "3", "--no-loop", "--out", str(gif)]) == 0
    with Image.open(gif) as im:
        assert im.size == (SIZE, SIZE) and im.n_frames == 7


@pytest.mark.skipif(all(importlib.util.find_spec(m) for m in ("imageio", "imageio_ffmpeg")),
                    reason="imageio-ffmpeg is installed, so .mp4 works")
def test_cli_mp4_without_imageio_says_what_to_install(model_file, tmp_path, capsys):
    assert main(["video", str(model_file), "--seeds", "0-1", "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "stylenat[video]"' in err and ".gif" in err


@pytest.mark.parametrize("kind", ["missing", "text", "zip"])
def test_cli_model_that_is_not_a_model(kind, tmp_path, capsys):
    path = tmp_path / "thing.pt"
    if kind == "text":
        path.write_text("hello")
    elif kind == "zip":
        torch.save({"g_ema": {}}, path)  # a torch archive: taken for an official checkpoint
    assert main(["generate", str(path), "--seeds", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("stylenat generate: error:")
    assert ("--preset" in err) and (kind == "zip" or "run directory" in err)


def test_run_directory(model_file, tmp_path):
    from stylenat.train.checkpoint import MODEL_FILE, save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 5, lambda d: (d / MODEL_FILE).write_bytes(model_file.read_bytes()), keep=2)
    g = resolve_model(run, device="cpu")
    assert torch.equal(generate(g, [1]), generate(resolve_model(model_file, device="cpu"), [1]))


def test_official_checkpoint_needs_its_configuration(official_dir, official_tag, tmp_path):
    ckpt = official_dir / f"{official_tag}_checkpoint.pt"
    meta = official_dir / f"{official_tag}_meta.json"
    g = resolve_model(ckpt, meta=meta, device="cpu")
    expected = torch.load(official_dir / f"{official_tag}_expected.pt", weights_only=True)
    with torch.no_grad():
        raw = g.synthesis(g.mapping(expected["z"][:1])[:, None].expand(-1, g.num_ws, -1))
    # unit-scale random weights give pixels up to ~10; the parity tests hold the tight tolerance
    assert torch.allclose(raw, expected["image"][:1].to(raw), atol=2e-3, rtol=1e-3)
    out = tmp_path / "official"
    assert main(["generate", str(ckpt), "--meta", str(meta), "--seeds", "0-1", "--out", str(out)]) == 0
    size = json.loads(meta.read_text())["size"]
    assert png_size(out / "seed0001.png") == (size, size)
