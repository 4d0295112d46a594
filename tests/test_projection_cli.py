"""The project / directions / edit commands and latent files in mix and video: the files written,
checked against the generator itself (latents regenerate their images, strength 0 is the identity,
edits move exactly the chosen ws), and one-line errors (exit 2) for inputs a user can get wrong."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.cli import main
from stylenat.editing import load_directions
from stylenat.models import build_generator, model_to_uint8, save_model
from stylenat.models.latents import load_latent, save_latent
from stylenat.sampling import seeds_to_w
from tests.test_projection import varied_tiny

SIZE = 32  # the tiny preset


@pytest.fixture(autouse=True)
def no_lpips_files(tmp_path, monkeypatch):
    """No LPIPS weights from this machine: "auto" means the fallback unless a test says otherwise;
    relative output paths land in the test's folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STYLENAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("STYLENAT_LPIPS", raising=False)
    monkeypatch.delenv("STYLENAT_LPIPS_VGG", raising=False)


@pytest.fixture(scope="module")
def g():
    return varied_tiny()


@pytest.fixture(scope="module")
def model_file(g, tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", {"g_ema": g}, g.config)


def synth(g, ws: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] of ws [N, num_ws, D], one image per pass (as the commands run with --batch 1)."""
    with torch.no_grad():
        return torch.cat([model_to_uint8(g.synthesis(w[None]), g.config) for w in ws])


def read_png(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).copy())


def cells(path, rows: int, cols: int) -> torch.Tensor:
    """A grid PNG cut back into uint8 cells [rows, cols, 3, S, S]."""
    grid = read_png(path)
    assert grid.shape == (3, rows * SIZE, cols * SIZE)
    return grid.view(3, rows, SIZE, cols, SIZE).permute(1, 3, 0, 2, 4)


def save_png(image: torch.Tensor, path) -> None:
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def run_error(argv, capsys) -> str:
    """The command's stderr, asserting exit status 2 and a single line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"stylenat {argv[0]}: error:")
    return err


# ---- project --------------------------------------------------------------------------------------


def test_project_writes_every_file_and_the_latent_regenerates_the_image(g, model_file, tmp_path, capsys):
    target = synth(g, seeds_to_w(g, [5])[:, None].expand(-1, g.num_ws, -1))[0]
    save_png(target, tmp_path / "face.png")
    out = tmp_path / "out"
    assert main(["project", str(model_file), str(tmp_path / "face.png"), "--out", str(out), "--steps", "30",
                 "--video", "gif", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "laplacian-pyramid, the fallback" in printed.out and "face.png" in printed.out
    assert "project face.png: 30/30 steps, loss" in printed.err  # the progress line
    folder = out / "face"
    assert sorted(p.name for p in folder.iterdir()) == [
        "latent.safetensors", "losses.json", "optimization.gif", "projected.png", "side_by_side.png"]

    report = json.loads((folder / "losses.json").read_text())
    total = report["losses"]["total"]
    assert report["distance"] == "laplacian-pyramid" and report["space"] == "w+" and len(total) == 30
    assert np.mean(total[-5:]) < 0.5 * np.mean(total[:5])  # the curve goes down
    assert np.allclose(total, np.add(report["losses"]["perceptual"], report["losses"]["pixel"]), rtol=1e-5)

    projected = read_png(folder / "projected.png")
    side = read_png(folder / "side_by_side.png")
    assert side.shape == (3, SIZE, 2 * SIZE)
    assert torch.equal(side[..., :SIZE], target) and torch.equal(side[..., SIZE:], projected)
    mse = (projected.double() - target.double()).square().mean().item()
    assert report["psnr_db"] == pytest.approx(10 * np.log10(255**2 / mse))
    assert report["psnr_db"] > 25
    ws = load_latent(folder / "latent.safetensors", g)  # w+: one latent per ws index
    assert ws.shape == (g.num_ws, g.style_dim)
    assert torch.equal(synth(g, ws[None])[0], projected)
    with Image.open(folder / "optimization.gif") as gif:
        assert gif.size == (2 * SIZE, SIZE) and gif.n_frames == 30  # 30 steps: a frame per step


def test_project_a_folder_in_w(g, model_file, tmp_path, capsys):
    images = synth(g, seeds_to_w(g, [1, 2])[:, None].expand(-1, g.num_ws, -1))
    (tmp_path / "in" / "sub").mkdir(parents=True)
    save_png(images[0], tmp_path / "in" / "a.png")
    save_png(images[1], tmp_path / "in" / "sub" / "b.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["project", str(model_file), str(tmp_path / "in"), "--out", str(out), "--steps", "2",
                 "--space", "w", "--distance", "pyramid"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("latent.safetensors")) == [
        "a/latent.safetensors", "sub/b/latent.safetensors"]
    w = load_latent(out / "a" / "latent.safetensors", g)
    assert torch.equal(w, w[:1].expand(g.num_ws, -1))  # space w: one latent for every layer
    assert json.loads((out / "sub" / "b" / "losses.json").read_text())["space"] == "w"
    save_png(images[0], tmp_path / "in" / "a.jpg")
    capsys.readouterr()
    err = run_error(["project", str(model_file), str(tmp_path / "in"), "--out", str(out), "--steps", "1"], capsys)
    assert "share the output folder" in err


def test_project_unreadable_image(model_file, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert "broken.png is not a readable image" in run_error(["project", str(model_file), str(bad)], capsys)
    assert not (tmp_path / "projections").exists()


def test_project_missing_lpips_files(model_file, tmp_path, monkeypatch, capsys):
    target = tmp_path / "t.png"
    save_png(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), target)
    err = run_error(["project", str(model_file), str(target), "--distance", "lpips"], capsys)
    assert "vgg16-397923af.pth" in err and "STYLENAT_LPIPS_VGG" in err
    # A variable naming a missing file is an error even with --distance auto, not a silent fallback.
    monkeypatch.setenv("STYLENAT_LPIPS", str(tmp_path / "missing.pth"))
    err = run_error(["project", str(model_file), str(target)], capsys)
    assert "missing.pth (from $STYLENAT_LPIPS) does not exist" in err


# ---- directions and edit --------------------------------------------------------------------------


def test_directions_prints_the_top_eigenvalues(g, model_file, tmp_path, capsys):
    path = tmp_path / "dirs.safetensors"
    assert main(["directions", str(model_file), "--layers", "2-5", "--top", "3", "--out", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    directions, values, layers = load_directions(path, g)
    assert layers == [2, 3, 4, 5] and directions.shape == (g.style_dim, g.style_dim)
    assert len(lines) == 4 and [float(line.split()[1]) for line in lines[1:]] == pytest.approx(values[:3].tolist(), abs=1e-4)


def test_edit_seeds_and_latents(g, model_file, tmp_path):
    dirs = tmp_path / "dirs.safetensors"
    assert main(["directions", str(model_file), "--layers", "2-5", "--out", str(dirs)]) == 0
    direction = load_directions(dirs, g)[0][1]
    latent = torch.randn(g.num_ws, g.style_dim)
    save_latent(tmp_path / "l.safetensors", latent, g, "w+")

    out = tmp_path / "seeds.png"
    assert main(["edit", str(model_file), "--seeds", "1,2", "--direction", "1", "--strengths=-2,0,2.5",
                 "--directions", str(dirs), "--trunc", "0.7", "--batch", "1", "--out", str(out)]) == 0
    grid = cells(out, 2, 3)
    ws = seeds_to_w(g, [1, 2], 0.7)[:, None].repeat(1, g.num_ws, 1)
    assert torch.equal(grid[:, 1], synth(g, ws))  # strength 0: the seeds' own images
    moved = ws.clone()
    moved[:, 2:6] += 2.5 * direction  # the file's layers, and only those
    assert torch.equal(grid[:, 2], synth(g, moved))
    assert not torch.equal(grid[:, 0], grid[:, 1])

    out = tmp_path / "latent.png"
    assert main(["edit", str(model_file), "--latent", str(tmp_path / "l.safetensors"), "--layers", "0-1",
                 "--strengths", "0,3", "--batch", "1", "--out", str(out)]) == 0
    grid = cells(out, 1, 2)
    assert torch.equal(grid[0, 0], synth(g, latent[None])[0])


def test_edit_errors(g, model_file, tmp_path, capsys):
    other = varied_tiny(style_dim=32)
    save_latent(tmp_path / "other.safetensors", torch.zeros(other.style_dim), other, "w")
    err = run_error(["edit", str(model_file), "--latents", str(tmp_path / "other.safetensors"), "--out", "x.png"], capsys)
    assert "for another model (style_dim 32, this model has 64)" in err
    err = run_error(["edit", str(model_file), "--seeds", "1", "--direction", "64", "--out", "x.png"], capsys)
    assert "there are 64 directions" in err
    err = run_error(["edit", str(model_file), "--seeds", "1", "--strengths", "1,x", "--out", "x.png"], capsys)
    assert "--strengths: cannot read '1,x'" in err


# ---- latent files in mix and video ----------------------------------------------------------------


def test_mix_with_latent_rows(g, model_file, tmp_path):
    latents = torch.randn(2, g.num_ws, g.style_dim)
    paths = [save_latent(tmp_path / f"{i}.safetensors", latents[i], g, "w+") for i in range(2)]
    out = tmp_path / "mix.png"
    assert main(["mix", str(model_file), "--row-latents", ",".join(map(str, paths)), "--cols", "3,4",
                 "--layers", "0-3", "--batch", "1", "--out", str(out)]) == 0
    grid = cells(out, 3, 3)
    w_cols = seeds_to_w(g, [3, 4])
    assert torch.equal(grid[1:, 0], synth(g, latents))
    mixed = latents[:, None].repeat(1, 2, 1, 1)
    mixed[:, :, :4] = w_cols[None, :, None]
    assert torch.equal(grid[1:, 1:].flatten(0, 1), synth(g, mixed.flatten(0, 1)))


def test_video_with_latent_keyframes(g, model_file, tmp_path, capsys):
    paths = [save_latent(tmp_path / f"{i}.safetensors", torch.randn(g.num_ws, g.style_dim), g, "w+") for i in range(2)]
    out = tmp_path / "walk.gif"
    assert main(["video", str(model_file), "--latents", ",".join(map(str, paths)), "--frames", "4", "--no-loop",
                 "--out", str(out)]) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 5
    fewer = varied_tiny(resolution=16)  # 6 latents, not 8
    save_latent(tmp_path / "small.safetensors", torch.zeros(fewer.style_dim), fewer, "w")
    err = run_error(["video", str(model_file), "--latents", f"{paths[0]},{tmp_path / 'small.safetensors'}",
                     "--out", str(out)], capsys)
    assert "for another model (num_ws 6, this model has 8)" in err


def test_latents_of_a_similar_model_warn(g, model_file, tmp_path):
    similar = dataclasses.replace(g.config, mlp_ratio=2.0)  # same latent shapes, other weights
    path = save_latent(tmp_path / "s.safetensors", torch.zeros(g.style_dim), build_generator(similar), "w")
    with pytest.warns(UserWarning, match="another model configuration"):
        assert main(["edit", str(model_file), "--latents", str(path), "--out", str(tmp_path / "e.png")]) == 0
