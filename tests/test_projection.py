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
from stylenat.models import build_generator, model_to_uint8, save_model, seeds_to_z
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


CLASSES = ("cat", "dog", "owl")


def varied_tiny(style_dim: int | None = None, resolution: int | None = None, conditional: bool = False) -> torch.nn.Module:
    """A tiny generator whose images change a lot with w.

    With the default init the transformer blocks (the only readers of w) add almost nothing, so all
    seeds give nearly one image (about 31 dB apart) and an inversion test would pass from the start;
    larger block weights make seeds 14-17 dB apart. ToRGB gets std 0.3 as in test_sampling.
    ``conditional``: three classes named CLASSES (their mean w are about 6 apart, w_std about 5).
    """
    torch.manual_seed(0)
    cfg = build_generator("tiny").config
    if style_dim is not None:
        cfg = dataclasses.replace(cfg, style_dim=style_dim)
    if conditional:
        cfg = dataclasses.replace(cfg, num_classes=len(CLASSES), class_names=CLASSES)
    if resolution == 16:
        cfg = dataclasses.replace(cfg, resolution=16, channels=cfg.channels[:3], heads=cfg.heads[:3],
                                  kernels=cfg.kernels[:3], dilations=cfg.dilations[:3])
    return vary(build_generator(cfg))


def vary(g: torch.nn.Module) -> torch.nn.Module:
    """``g`` with larger block and ToRGB weights, its mean w (of each class) recomputed, in eval mode."""
    for p in g.synthesis.to_rgbs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    for m in g.synthesis.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    g.compute_w_avg(n=256)
    if g.num_classes:
        g.compute_class_w_avg(n=256)
    return g.eval()


@pytest.fixture(scope="module")
def g():
    return varied_tiny()


@pytest.fixture(scope="module")
def gc():
    return varied_tiny(conditional=True)


class AdamSpy(torch.optim.Adam):
    """Adam that records, per optimiser made, the latent it starts from and the learning rate and
    latent of every step (the projector's loop is otherwise invisible from outside)."""

    runs: list[dict] = []

    def __init__(self, params, *args, **kwargs):
        params = list(params)
        super().__init__(params, *args, **kwargs)
        AdamSpy.runs.append({"start": params[0].detach().clone(), "lrs": [], "after": []})

    def step(self, closure=None):
        run = AdamSpy.runs[-1]
        run["lrs"].append(self.param_groups[0]["lr"])
        out = super().step(closure)
        run["after"].append(self.param_groups[0]["params"][0].detach().clone())
        return out


@pytest.fixture
def adam_runs(monkeypatch) -> list[dict]:
    AdamSpy.runs = []
    monkeypatch.setattr(torch.optim, "Adam", AdamSpy)
    return AdamSpy.runs


def mean_w(g, n: int = 4000, label: int | None = None) -> tuple[torch.Tensor, float]:
    """Mean w and RMS distance from it, from an independent draw (the seeds' z of sampling, not
    w_stats's stream): an oracle for w_stats up to sampling error."""
    z = seeds_to_z(range(10_000, 10_000 + n), g.style_dim, "cpu")
    c = None if label is None else torch.full((n,), label, dtype=torch.long)
    with torch.no_grad():
        ws = g.mapping.embed(z, c).double()
    avg = ws.mean(0)
    return avg.float(), float(((ws - avg).square().sum() / n).sqrt())


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


def stylegan2_lr(step: int, steps: int, lr: float, rampdown: float, rampup: float) -> float:
    """StyleGAN2-ADA projector.py's learning rate, written out from its source."""
    t = step / steps
    lr_ramp = min(1.0, (1.0 - t) / rampdown)
    lr_ramp = 0.5 - 0.5 * np.cos(lr_ramp * np.pi)
    lr_ramp = lr_ramp * min(1.0, t / rampup)
    return lr * lr_ramp


def test_the_loop_uses_the_learning_rate_ramp(g, adam_runs):
    # Ramps long enough that most of 12 steps see a different rate: up over 3 steps, down over 6.
    project(g, generate(g, [6])[0], steps=12, lr=0.2, lr_rampup=0.25, lr_rampdown=0.5, **FAST)
    (run,) = adam_runs
    expected = [stylegan2_lr(i, 12, 0.2, 0.5, 0.25) for i in range(12)]
    assert run["lrs"] == pytest.approx(expected, abs=1e-12)
    assert len(set(np.round(expected, 9))) >= 9  # the check compares a real ramp, not a constant
    assert torch.equal(run["after"][0], run["start"])  # step 0 has rate 0: Adam does not move the latent
    assert not torch.equal(run["after"][1], run["after"][0])


def test_the_optimisation_starts_at_the_mean_w(g, adam_runs):
    target = generate(g, [7])[0]
    project(g, target, steps=1, space="w+", **FAST)
    project(g, target, steps=1, space="w", **FAST)
    w_avg, w_std = w_stats(g, 2000)
    assert torch.equal(adam_runs[0]["start"], w_avg.expand(1, g.num_ws, -1))
    assert torch.equal(adam_runs[1]["start"], w_avg.view(1, 1, -1))
    oracle, oracle_std = mean_w(g)
    # w_stats's mean is the model's mean w: within sampling error (w_std / sqrt(2000) per
    # coordinate, about 0.1 over 64 of them) of an independent draw, far closer than a random w.
    assert (w_avg - oracle).norm() < 0.25 and w_std == pytest.approx(oracle_std, rel=0.03)
    assert (seeds_to_w_plain(g, 3) - oracle).norm() > 3
    # Given stats are used as they are, without mapping anything.
    start = torch.randn(g.style_dim)
    calls = []
    embed = g.mapping.embed
    g.mapping.embed = lambda *a, **k: calls.append(1) or embed(*a, **k)
    try:
        result = project(g, target, steps=1, space="w", stats=(start, 0.0), distance="pyramid")
    finally:
        del g.mapping.embed
    assert calls == [] and torch.equal(adam_runs[2]["start"], start.view(1, 1, -1))
    assert torch.equal(result.latent, start)  # step 0 has rate 0 and w_std 0 means no noise
    with pytest.raises(ConfigError, match="stats must be"):
        project(g, target, steps=1, stats=(torch.zeros(3), 1.0), distance="pyramid")


def seeds_to_w_plain(g, seed: int) -> torch.Tensor:
    with torch.no_grad():
        return g.mapping.embed(seeds_to_z([seed], g.style_dim, "cpu"))[0]


def test_conditional_projection_starts_at_the_class_mean(gc, adam_runs):
    target = generate(gc, [5], labels=2)[0]
    result = project(gc, target, label="owl", steps=25, space="w+", **FAST)
    assert result.label == 2
    class_avg, class_std = w_stats(gc, 2000, label=2)
    assert torch.equal(adam_runs[0]["start"], class_avg.expand(1, gc.num_ws, -1))
    start_image = render(gc, class_avg.expand(gc.num_ws, -1))
    assert result.psnr > psnr(start_image, target) + 8  # it optimises from there
    project(gc, target, label=0, steps=1, **FAST)
    assert torch.equal(adam_runs[1]["start"], w_stats(gc, 2000, label=0)[0].expand(1, gc.num_ws, -1))
    # Each class's statistics are its own: near an independent draw of that class, far from the others.
    for k in range(len(CLASSES)):
        avg, std = w_stats(gc, 2000, label=k)
        oracles = [mean_w(gc, label=j)[0] for j in range(len(CLASSES))]
        assert (avg - oracles[k]).norm() < 0.3
        assert all((avg - oracles[j]).norm() > 3 for j in range(len(CLASSES)) if j != k)
        assert std == pytest.approx(mean_w(gc, label=k)[1], rel=0.03)
    assert torch.equal(w_stats(gc, 500, label="dog")[0], w_stats(gc, 500, label=1)[0])


def test_class_errors(g, gc):
    target = generate(gc, [1], labels=0)[0]
    with pytest.raises(ConfigError, match=r"class-conditional \(3 classes\).*label=") as info:
        project(gc, target, steps=1, **FAST)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="class-conditional"):
        w_stats(gc, 100)
    with pytest.raises(ConfigError, match="unknown class 'emu'"):
        project(gc, target, label="emu", steps=1, **FAST)
    with pytest.raises(ConfigError, match="class 3 does not exist"):
        project(gc, target, label=3, steps=1, **FAST)
    with pytest.raises(ConfigError, match="unconditional"):
        project(g, generate(g, [1])[0], label=0, steps=1, **FAST)


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
    assert " at 0x" not in str(info.value) and "BytesIO" not in str(info.value)  # no object reprs
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
