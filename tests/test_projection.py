"""stylenat.projection: inverting images the model made, the optimisation's contract (schedule,
determinism, spaces, frames, progress), targets prepared like `stylenat prepare`, latent files."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.data.prepare import prepare_dataset
from stylenat.errors import ConfigError, DataError, MissingFileError, ModelFileError
from stylenat.metrics.lpips import LPIPS
from stylenat.models import build_generator, model_to_uint8, save_model
from stylenat.projection import (
    PyramidDistance,
    _lr_at,
    load_latent,
    load_target,
    project,
    psnr,
    save_latent,
    w_stats,
)
from stylenat.sampling import generate

SIZE = 32  # the tiny preset
FAST = dict(distance="pyramid", w_avg_samples=2000)


def varied_tiny(style_dim: int | None = None, resolution: int | None = None) -> torch.nn.Module:
    """A tiny generator whose images change a lot with w.

    With the default init the transformer blocks (the only readers of w) add almost nothing, so all
    seeds give nearly one image (about 31 dB apart) and an inversion test would pass from the start;
    larger block weights make seeds 14-17 dB apart. ToRGB gets std 0.3 as in test_sampling.
    """
    torch.manual_seed(0)
    cfg = build_generator("tiny").config
    if style_dim is not None:
        cfg = dataclasses.replace(cfg, style_dim=style_dim)
    if resolution == 16:
        cfg = dataclasses.replace(cfg, resolution=16, channels=cfg.channels[:3], heads=cfg.heads[:3],
                                  kernels=cfg.kernels[:3], dilations=cfg.dilations[:3])
    g = build_generator(cfg)
    for p in g.synthesis.to_rgbs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    for m in g.synthesis.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    g.compute_w_avg(n=256)
    return g.eval()


@pytest.fixture(scope="module")
def g():
    return varied_tiny()


@pytest.fixture(autouse=True)
def no_lpips_files(tmp_path, monkeypatch):
    """No LPIPS weights from this machine: "auto" must mean the fallback unless a test says otherwise."""
    monkeypatch.setenv("STYLENAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("STYLENAT_LPIPS", raising=False)
    monkeypatch.delenv("STYLENAT_LPIPS_VGG", raising=False)


def render(g, ws: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model_to_uint8(g.synthesis(ws[None]), g.config)[0]


def test_inverting_a_generated_image_in_w_plus(g):
    target = generate(g, [5])[0]
    assert math.isinf(psnr(target, target))
    w_avg, _ = w_stats(g, 2000)
    start = psnr(render(g, w_avg[None].repeat(g.num_ws, 1)), target)
    result = project(g, target, steps=60, space="w+", **FAST)
    assert start < 25  # the mean image is far from the target: the test measures the optimisation
    assert result.psnr >= 30, f"PSNR {result.psnr:.1f} dB"
    assert result.distance == "laplacian-pyramid" and result.space == "w+"
    assert (result.image.int() - target.int()).abs().float().mean() < 3  # about 1 % of the range
    assert torch.equal(result.image, render(g, result.ws)) and torch.equal(result.target, target)
    losses = result.losses
    assert set(losses) == {"total", "perceptual", "pixel"} and all(v.shape == (60,) for v in losses.values())
    assert torch.allclose(losses["total"], losses["perceptual"] + losses["pixel"], rtol=1e-5)  # pixel_weight 1
    for curve in losses.values():
        assert curve[-5:].mean() < 0.25 * curve[:5].mean()


def test_latent_shapes_per_space(g):
    target = generate(g, [1])[0]
    plus = project(g, target, steps=4, space="w+", **FAST)
    single = project(g, target, steps=4, space="w", **FAST)
    assert plus.latent.shape == (g.num_ws, g.style_dim) and plus.ws.shape == (g.num_ws, g.style_dim)
    assert single.latent.shape == (g.style_dim,) and single.ws.shape == (g.num_ws, g.style_dim)
    assert torch.equal(single.ws, single.latent[None].expand(g.num_ws, -1))
    assert torch.equal(single.image, render(g, single.ws))


def test_deterministic_per_seed_and_leaves_the_model_alone(g):
    target = generate(g, [2])[0]
    before = {k: v.clone() for k, v in g.state_dict().items()}
    g.train()
    a = project(g, target, steps=6, seed=1, **FAST)
    assert g.training  # mode restored
    g.eval()
    b = project(g, target, steps=6, seed=1, **FAST)
    c = project(g, target, steps=6, seed=2, **FAST)
    assert torch.equal(a.latent, b.latent) and torch.equal(a.losses["total"], b.losses["total"])
    assert not torch.equal(a.latent, c.latent)
    assert all(torch.equal(v, before[k]) for k, v in g.state_dict().items())
    assert all(p.grad is None for p in g.parameters())


def test_frames_and_progress_callback(g):
    calls = []
    result = project(g, generate(g, [3])[0], steps=7, record_every=3, callback=lambda *a: calls.append(a), **FAST)
    assert result.frames.shape == (2, 3, SIZE, SIZE) and result.frames.dtype == torch.uint8
    assert result.frame_steps == [3, 6]
    assert [c[:2] for c in calls] == [(i, 7) for i in range(1, 8)]
    assert set(calls[-1][2]) == {"total", "perceptual", "pixel"}
    assert calls[-1][2]["total"] == pytest.approx(float(result.losses["total"][-1]))
    assert project(g, result.target, steps=2, **FAST).frames is None


def test_learning_rate_schedule():
    # linear ramp-up over the first 5 %, flat, half-cosine ramp-down over the last 25 %
    assert _lr_at(0.0, 0.1, 0.25, 0.05) == 0
    assert _lr_at(0.025, 0.1, 0.25, 0.05) == pytest.approx(0.05)
    assert _lr_at(0.5, 0.1, 0.25, 0.05) == pytest.approx(0.1)
    assert _lr_at(0.875, 0.1, 0.25, 0.05) == pytest.approx(0.05)
    assert _lr_at(0.999, 0.1, 0.25, 0.05) < 1e-5


def test_distance_choice(g, tmp_path, monkeypatch):
    target = generate(g, [4])[0]
    assert project(g, target, steps=1, distance="auto", w_avg_samples=100).distance == "laplacian-pyramid"
    with pytest.raises(MissingFileError, match="vgg16-397923af.pth"):
        project(g, target, steps=1, distance="lpips", w_avg_samples=100)
    torch.manual_seed(0)
    module = LPIPS().eval()
    result = project(g, target, steps=2, distance="auto", lpips=module, w_avg_samples=100)
    assert result.distance == "lpips-vgg16"
    # Files that are found but wrong are refused, not silently replaced by the fallback.
    monkeypatch.setenv("STYLENAT_LPIPS_VGG", str(tmp_path / "vgg.pth"))
    monkeypatch.setenv("STYLENAT_LPIPS", str(tmp_path / "lin.pth"))
    (tmp_path / "vgg.pth").write_bytes(b"x")
    (tmp_path / "lin.pth").write_bytes(b"y")
    with pytest.raises(ModelFileError, match="sha256"):
        project(g, target, steps=1, distance="auto", w_avg_samples=100)
    with pytest.raises(ConfigError, match="distance"):
        project(g, target, steps=1, distance="l2")
    with pytest.raises(ConfigError, match="space"):
        project(g, target, steps=1, space="z")


def test_pyramid_distance():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    d = PyramidDistance()
    assert torch.all(d(x, x) == 0) and torch.all(d(x, y) > 0.1)
    assert torch.allclose(d(x, y), d(y, x))
    assert len(d.features_of(x)) == 3 + 2 * 3  # 32, 16, 8: two bands and the residual, gradients per level


def test_targets_are_prepared_like_the_dataset_tool(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(src / "photo.png")
    prepare_dataset(src, tmp_path / "prepared", SIZE, progress=False)
    written = np.asarray(Image.open(tmp_path / "prepared" / "00000000.png"))
    prepared = torch.from_numpy(written.transpose(2, 0, 1).copy())
    assert torch.equal(load_target(src / "photo.png", SIZE), prepared)
    assert torch.equal(load_target(Image.open(src / "photo.png"), SIZE), prepared)
    assert torch.equal(load_target(prepared, SIZE), prepared)
    with pytest.raises(DataError, match=r"uint8 \[3, 32, 32\]"):
        load_target(torch.zeros(3, 64, 64, dtype=torch.uint8), SIZE)


def test_unreadable_or_missing_image_files(g, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="broken.png is not a readable image") as info:
        project(g, bad, steps=1, **FAST)
    assert "\n" not in str(info.value)
    with pytest.raises(MissingFileError, match="does not exist"):
        project(g, tmp_path / "absent.png", steps=1, **FAST)


def test_latent_file_round_trip(g, tmp_path):
    ws = torch.randn(g.num_ws, g.style_dim)
    w = torch.randn(g.style_dim)
    assert torch.equal(load_latent(save_latent(tmp_path / "plus.safetensors", ws, g, "w+"), g), ws)
    assert torch.equal(load_latent(save_latent(tmp_path / "w.safetensors", w, g, "w"), g), w[None].expand(g.num_ws, -1))
    with pytest.raises(ConfigError, match="shape"):
        save_latent(tmp_path / "x.safetensors", w, g, "w+")


def test_latent_files_of_other_models_or_kinds_are_refused(g, tmp_path):
    path = save_latent(tmp_path / "plus.safetensors", torch.zeros(g.num_ws, g.style_dim), g, "w+")
    with pytest.raises(ModelFileError, match="another model .style_dim 64, this model has 32") as info:
        load_latent(path, varied_tiny(style_dim=32))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFileError, match="another model .num_ws 8, this model has 6"):
        load_latent(path, varied_tiny(resolution=16))
    similar = build_generator(dataclasses.replace(g.config, mlp_ratio=2.0))  # same latent shapes
    with pytest.warns(UserWarning, match="another model configuration"):
        assert load_latent(path, similar).shape == (g.num_ws, g.style_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_latent(path, g)  # its own model: no warning
    model_file = save_model(tmp_path / "model.safetensors", {"g_ema": g}, g.config)
    with pytest.raises(ModelFileError, match="not a stylenat latent file .format 'stylenat-model/1'"):
        load_latent(model_file, g)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(ModelFileError, match="not a stylenat latent file"):
        load_latent(junk, g)
    with pytest.raises(MissingFileError):
        load_latent(tmp_path / "absent.safetensors", g)


def test_package_root_re_exports_project():
    import stylenat

    assert stylenat.project is project and "project" in stylenat.__all__
    with pytest.raises(AttributeError, match="no attribute 'projector'"):
        stylenat.projector  # noqa: B018
