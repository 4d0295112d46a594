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

from stylenat._system import file_sha256
from stylenat.cli import attach_number_lists, main
from stylenat.editing import load_directions
from stylenat.metrics import lpips as lp
from stylenat.models import build_generator, model_to_uint8, save_model
from stylenat.models.generator import MappingNetwork
from stylenat.models.latents import load_latent, save_latent
from stylenat.projection import w_stats
from stylenat.sampling import seeds_to_w
from tests.metrics.test_lpips import random_lin_state, random_vgg_state
from tests.test_projection import CLASSES, varied_tiny

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


@pytest.fixture(scope="module")
def gc():
    return varied_tiny(conditional=True)


@pytest.fixture(scope="module")
def cond_file(gc, tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "cond.safetensors", {"g_ema": gc}, gc.config)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random weights in the layouts of the two real LPIPS files (as tests/metrics/test_lpips.py
    makes them; the real ones are never downloaded)."""
    folder = tmp_path_factory.mktemp("lpips")
    vgg, lin = folder / lp.VGG_NAME, folder / lp.LIN_NAME
    torch.save(random_vgg_state(), vgg)
    torch.save(random_lin_state(), lin)
    return vgg, lin


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
    err = run_error(["project", str(model_file), str(bad)], capsys)
    assert "broken.png is not a readable image" in err
    assert " at 0x" not in err and "BytesIO" not in err  # no object reprs, only the file's name
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


def test_project_one_named_lpips_file_names_the_other(model_file, lpips_files, tmp_path, capsys):
    target = tmp_path / "t.png"
    save_png(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), target)
    vgg, lin = lpips_files
    # --lpips-vgg alone with --distance auto: the lin file is missing, and that is said, not a fallback.
    err = run_error(["project", str(model_file), str(target), "--lpips-vgg", str(vgg)], capsys)
    assert "--lpips-vgg is given" in err and f"lin weights ({lp.LIN_NAME}), is missing" in err
    assert "--lpips-lin PATH" in err and str(tmp_path / "cache" / lp.LIN_NAME) in err  # where it can go
    err = run_error(["project", str(model_file), str(target), "--lpips-lin", str(lin)], capsys)
    assert "--lpips-lin is given" in err and f"VGG16 weights ({lp.VGG_NAME}), is missing" in err
    assert not (tmp_path / "projections").exists()


def test_project_uses_lpips_files_it_finds(g, model_file, lpips_files, tmp_path, monkeypatch, capsys):
    target = tmp_path / "t.png"
    save_png(synth(g, seeds_to_w(g, [3])[:, None].expand(-1, g.num_ws, -1))[0], target)
    cache = tmp_path / "cache"  # $STYLENAT_CACHE: where auto looks for both files
    cache.mkdir()
    for f in lpips_files:
        (cache / f.name).symlink_to(f)  # found by name in the cache directory
    argv = ["project", str(model_file), str(target), "--steps", "2", "--seed", "4"]
    # Found but not the real files: the checksums refuse them.
    assert "sha256" in run_error(argv, capsys)
    # The checksums are still verified, against these files' own digests.
    monkeypatch.setattr(lp, "VGG_SHA256_PREFIX", file_sha256(cache / lp.VGG_NAME)[:8])
    monkeypatch.setattr(lp, "LIN_SHA256", file_sha256(cache / lp.LIN_NAME))
    assert main([*argv, "--out", "lpips"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("distance: lpips-vgg16\n") and "(lpips-vgg16, w+," in out
    used = json.loads((tmp_path / "lpips" / "t" / "losses.json").read_text())
    assert used["distance"] == "lpips-vgg16"
    assert main([*argv, "--out", "pyramid", "--distance", "pyramid"]) == 0
    fallback = json.loads((tmp_path / "pyramid" / "t" / "losses.json").read_text())
    assert fallback["distance"] == "laplacian-pyramid"
    # Same seed and start: only the distance differs, and so do its values.
    assert not np.allclose(used["losses"]["perceptual"], fallback["losses"]["perceptual"], rtol=1e-3)
    assert used["losses"]["pixel"][0] == pytest.approx(fallback["losses"]["pixel"][0])


def test_project_computes_the_mean_w_once_for_a_folder(g, model_file, tmp_path, monkeypatch):
    images = synth(g, seeds_to_w(g, [1, 2, 3])[:, None].expand(-1, g.num_ws, -1))
    (tmp_path / "in").mkdir()
    for i, image in enumerate(images):
        save_png(image, tmp_path / "in" / f"{i}.png")
    mapped = []
    embed = MappingNetwork.embed
    monkeypatch.setattr(MappingNetwork, "embed", lambda self, z, c=None: mapped.append(len(z)) or embed(self, z, c))
    assert main(["project", str(model_file), str(tmp_path / "in"), "--steps", "1", "--distance", "pyramid"]) == 0
    assert sum(mapped) == 10_000  # w_stats's samples, once for the three targets


def test_project_conditional(gc, cond_file, tmp_path, capsys):
    target = synth(gc, seeds_to_w(gc, [5], labels=2)[:, None].expand(-1, gc.num_ws, -1))[0]
    save_png(target, tmp_path / "owl.png")
    # One step at learning rate 0 (the ramp starts there): the latent is where the projection began.
    assert main(["project", str(cond_file), str(tmp_path / "owl.png"), "--class", "owl", "--steps", "1",
                 "--space", "w", "--out", "p"]) == 0
    assert "class 2 (owl)" in capsys.readouterr().out
    report = json.loads((tmp_path / "p" / "owl" / "losses.json").read_text())
    assert report["class"] == 2 and report["class_name"] == "owl"
    start = load_latent(tmp_path / "p" / "owl" / "latent.safetensors", gc)[0]
    assert torch.equal(start, w_stats(gc, label=2)[0])  # the class's mean w
    assert (start - w_stats(gc, label=0)[0]).norm() > 3
    err = run_error(["project", str(cond_file), str(tmp_path / "owl.png")], capsys)
    assert "class-conditional (3 classes)" in err and "--class" in err
    assert "unknown class 'emu'" in run_error(["project", str(cond_file), str(tmp_path / "owl.png"), "--class", "emu"],
                                              capsys)
    assert not (tmp_path / "projections").exists()


def test_project_class_for_an_unconditional_model(model_file, tmp_path, capsys):
    save_png(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), tmp_path / "t.png")
    assert "unconditional" in run_error(["project", str(model_file), str(tmp_path / "t.png"), "--class", "1"], capsys)


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


def test_negative_strengths_without_the_equals_sign(g, model_file, tmp_path):
    assert attach_number_lists(["edit", "m", "--strengths", "-3,-1.5,0,1.5,3", "--out", "x"]) == [
        "edit", "m", "--strengths=-3,-1.5,0,1.5,3", "--out", "x"]
    assert attach_number_lists(["edit", "--strengths", "-.5", "--", "--strengths", "-1"]) == [
        "edit", "--strengths=-.5", "--", "--strengths", "-1"]
    assert attach_number_lists(["edit", "--strengths", "--out", "x"]) == ["edit", "--strengths", "--out", "x"]
    out = tmp_path / "e.png"
    assert main(["edit", str(model_file), "--seeds", "1", "--strengths", "-3,-1.5,0", "--layers", "0-1",
                 "--batch", "1", "--out", str(out)]) == 0
    grid = cells(out, 1, 3)
    ws = seeds_to_w(g, [1])[:, None].repeat(1, g.num_ws, 1)
    direction = torch.linalg.eigh(stacked_unit_rows(g, [0, 1]).T @ stacked_unit_rows(g, [0, 1]))[1][:, -1]
    direction = direction * direction[direction.abs().argmax()].sign()  # the sign convention of the docs
    moved = ws.clone()
    moved[:, :2] -= 3 * direction.float()
    assert torch.equal(grid[0, 2], synth(g, ws)[0])  # strength 0
    assert (grid[0, 0].int() - synth(g, moved)[0].int()).abs().max() <= 1  # -3: the first column


def stacked_unit_rows(g, ws_indices) -> torch.Tensor:
    """SeFa's matrix of tests/test_editing.py: the chosen blocks' style weights, unit rows."""
    rows = [norm.style.weight.detach().double() * norm.style.scale
            for s, stage in enumerate(g.synthesis.stages) for j, block in enumerate(stage.blocks)
            if 2 * s + j in ws_indices for norm in (block.norm1, block.norm2)]
    a = torch.cat(rows)
    return a / a.norm(dim=1, keepdim=True)


def test_edit_with_a_class(gc, cond_file, tmp_path, capsys):
    for k in (0, 2):
        out = tmp_path / f"e{k}.png"
        assert main(["edit", str(cond_file), "--seeds", "1,4", "--class", CLASSES[k], "--strengths", "0,2",
                     "--batch", "1", "--out", str(out)]) == 0
        ws = seeds_to_w(gc, [1, 4], labels=k)[:, None].repeat(1, gc.num_ws, 1)
        assert torch.equal(cells(out, 2, 2)[:, 0], synth(gc, ws))  # strength 0: the seeds of that class
    assert not torch.equal(read_png(tmp_path / "e0.png"), read_png(tmp_path / "e2.png"))
    err = run_error(["edit", str(cond_file), "--seeds", "1", "--out", "x.png"], capsys)
    assert "class-conditional" in err


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


def test_mix_with_latent_columns_and_both(g, model_file, tmp_path):
    latents = torch.randn(4, g.num_ws, g.style_dim)
    paths = [str(save_latent(tmp_path / f"{i}.safetensors", latents[i], g, "w+")) for i in range(4)]
    out = tmp_path / "mix.png"
    assert main(["mix", str(model_file), "--rows", "1,2", "--col-latents", ",".join(paths[:2]), "--layers", "4-7",
                 "--batch", "1", "--out", str(out)]) == 0
    grid = cells(out, 3, 3)
    assert torch.equal(grid[0, 1:], synth(g, latents[:2]))  # row 0: the column latents' own images
    w_rows = seeds_to_w(g, [1, 2])
    mixed = w_rows[:, None, None].repeat(1, 2, g.num_ws, 1)
    mixed[:, :, 4:] = latents[None, :2, 4:]
    assert torch.equal(grid[1:, 1:].flatten(0, 1), synth(g, mixed.flatten(0, 1)))
    assert main(["mix", str(model_file), "--row-latents", paths[2], "--col-latents", paths[3], "--layers", "0",
                 "--batch", "1", "--out", str(out)]) == 0
    grid = cells(out, 2, 2)
    both = latents[2].clone()
    both[0] = latents[3, 0]
    assert torch.equal(grid[1, 0], synth(g, latents[2:3])[0]) and torch.equal(grid[0, 1], synth(g, latents[3:4])[0])
    assert torch.equal(grid[1, 1], synth(g, both[None])[0])


def test_mix_and_video_with_a_class(gc, cond_file, tmp_path, monkeypatch):
    out = tmp_path / "mix.png"
    assert main(["mix", str(cond_file), "--rows", "1", "--cols", "2", "--class", "dog", "--layers", "0-3",
                 "--batch", "1", "--out", str(out)]) == 0
    grid = cells(out, 2, 2)
    w = seeds_to_w(gc, [1, 2], labels=1)[:, None].repeat(1, gc.num_ws, 1)
    assert torch.equal(grid[1, 0], synth(gc, w[:1])[0]) and torch.equal(grid[0, 1], synth(gc, w[1:])[0])
    frames = capture_video_frames(monkeypatch)
    assert main(["video", str(cond_file), "--seeds", "1,2", "--class", "dog", "--frames", "2", "--no-loop",
                 "--batch", "1", "--out", str(tmp_path / "v.gif")]) == 0
    (video,) = frames
    assert torch.equal(video[0], synth(gc, w[:1])[0]) and torch.equal(video[-1], synth(gc, w[1:])[0])


def capture_video_frames(monkeypatch) -> list[torch.Tensor]:
    """The frames the video command hands to save_video (which still writes the file)."""
    import stylenat.sampling

    captured, save = [], stylenat.sampling.save_video
    monkeypatch.setattr(stylenat.sampling, "save_video", lambda frames, *a, **k: captured.append(frames) or save(frames, *a, **k))
    return captured


def test_video_latent_frames_are_the_latents_images(g, model_file, tmp_path, monkeypatch):
    latents = torch.randn(2, g.num_ws, g.style_dim)
    paths = [str(save_latent(tmp_path / f"{i}.safetensors", latents[i], g, "w+")) for i in range(2)]
    frames = capture_video_frames(monkeypatch)
    out = tmp_path / "walk.gif"
    assert main(["video", str(model_file), "--latents", ",".join(paths), "--frames", "4", "--no-loop", "--batch", "1",
                 "--out", str(out)]) == 0
    (video,) = frames
    assert video.shape == (5, 3, SIZE, SIZE)
    assert torch.equal(video[0], synth(g, latents[:1])[0]) and torch.equal(video[4], synth(g, latents[1:])[0])
    halfway = synth(g, ((latents[0] + latents[1]) / 2)[None])[0]  # per ws index, linear
    assert (video[2].int() - halfway.int()).abs().max() <= 1
    with Image.open(out) as gif:  # the file holds those frames (GIF palettes round colours a little)
        gif.seek(0)
        first = torch.from_numpy(np.asarray(gif.convert("RGB")).transpose(2, 0, 1).copy())
    assert (first.float() - video[0].float()).abs().mean() < 4


def test_trunc_and_class_with_latent_files_alone_are_refused(g, model_file, tmp_path, capsys):
    path = str(save_latent(tmp_path / "l.safetensors", torch.zeros(g.style_dim), g, "w"))
    err = run_error(["edit", str(model_file), "--latents", path, "--trunc", "0.5", "--out", "x.png"], capsys)
    assert "--trunc truncates the latents of seeds" in err and "drop --trunc" in err
    err = run_error(["mix", str(model_file), "--row-latents", path, "--col-latents", path, "--layers", "0",
                     "--trunc", "0.7", "--out", "x.png"], capsys)
    assert "--trunc" in err
    err = run_error(["video", str(model_file), "--latents", f"{path},{path}", "--class", "1", "--out", "x.gif"], capsys)
    assert "--class picks the class of seeds" in err
    # With seeds on one side, --trunc has seeds to act on.
    assert main(["mix", str(model_file), "--row-latents", path, "--cols", "1", "--layers", "0", "--trunc", "0.7",
                 "--out", str(tmp_path / "m.png")]) == 0


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
