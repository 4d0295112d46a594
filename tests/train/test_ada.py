"""ADA: exact blitting, resampling at known transforms, colour closed forms, seeding, gradients, controller."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from stylenat.errors import ConfigError
from stylenat.train import ada
from stylenat.train.ada import AdaController, AugmentParams, AugmentPipe

F64 = torch.float64
MEAN = torch.tensor(ada.IMAGENET_MEAN, dtype=F64).view(1, 3, 1, 1)
STD = torch.tensor(ada.IMAGENET_STD, dtype=F64).view(1, 3, 1, 1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _ramp(n: int = 1, h: int = 8, w: int = 8) -> torch.Tensor:
    """Images with no symmetry: every pixel of every channel distinct."""
    return torch.arange(n * 3 * h * w, dtype=torch.float32).view(n, 3, h, w) / 100


def _blob(cx: float = 0.0, cy: float = 0.0, sx: float = 4.0, sy: float = 4.0, size: int = 32) -> torch.Tensor:
    """A Gaussian (1, 3, size, size) image centred (cx, cy) pixels off the image centre."""
    j = torch.arange(size, dtype=F64) - (size - 1) / 2
    g = torch.exp(-((j.view(1, -1) - cx) ** 2 / (2 * sx**2) + (j.view(-1, 1) - cy) ** 2 / (2 * sy**2)))
    return g.expand(1, 3, size, size).contiguous()


def _to_pm1(x: torch.Tensor) -> torch.Tensor:
    """Model space -> [-1, 1] pixels."""
    return 2 * (x * STD + MEAN) - 1


def _from_pm1(y: torch.Tensor) -> torch.Tensor:
    return ((y + 1) / 2 - MEAN) / STD


def _geom(params: AugmentParams, x: torch.Tensor) -> torch.Tensor:
    return ada.geometric_matrix(params, x.shape[0])


# -- p = 0, blitting -------------------------------------------------------------------------------


def test_p_zero_returns_the_input_and_draws_nothing():
    x = torch.randn(4, 3, 16, 16)
    gen = _gen(1)
    state = gen.get_state()
    out = AugmentPipe("bgc")(x, 0.0, gen)
    assert out is x and torch.equal(out, x)
    assert torch.equal(gen.get_state(), state)


def test_quarter_turns_and_xflip_are_torch_permutations_bitwise():
    pipe = AugmentPipe("none")
    x = _ramp()
    for k in range(4):
        out = pipe.apply(x, AugmentParams(rotate90=_t(k)))
        assert torch.equal(out, torch.rot90(x, k, dims=(-2, -1)))
    assert torch.equal(pipe.apply(x, AugmentParams(xflip=_t(1))), x.flip(-1))
    # ADA's order: the flip acts first, then the turn.
    both = pipe.apply(x, AugmentParams(xflip=_t(1), rotate90=_t(1)))
    assert torch.equal(both, torch.rot90(x.flip(-1), 1, dims=(-2, -1)))
    # A turn followed by its inverse.
    back = pipe.apply(pipe.apply(x, AugmentParams(rotate90=_t(1))), AugmentParams(rotate90=_t(3)))
    assert torch.equal(back, x)


def test_forward_with_only_rotate90_turns_every_image_by_a_quarter_multiple():
    pipe = AugmentPipe("none", rotate90=1)
    x = torch.randn(64, 3, 8, 8)
    out = pipe(x, 1.0, _gen(2))
    seen = set()
    for i in range(len(x)):
        ks = [k for k in range(4) if torch.equal(out[i], torch.rot90(x[i], k, dims=(-2, -1)))]
        assert len(ks) == 1
        seen.add(ks[0])
    assert seen == {0, 1, 2, 3}


def test_integer_translation_moves_pixels_and_reflects_at_the_borders():
    pipe = AugmentPipe("none")
    x = _ramp(2, 8, 10)
    out = pipe.apply(x, AugmentParams(xint=_t([2, -1], [2, -1])))  # 2 right, 1 up
    assert torch.equal(out[..., : 8 - 1, 2:], x[..., 1:, : 10 - 2])  # interior
    # Borders mirror about the edge pixels (F.pad's 'reflect'): column 0 reads column 2, the last row row 6.
    assert torch.equal(out, F.pad(x, (2, 0, 0, 1), mode="reflect")[..., 1:, :10])


def test_drawn_integer_translations_match_their_parameters():
    pipe = AugmentPipe("none", xint=1)
    x = torch.randn(16, 3, 16, 16)
    gen = _gen(3)
    params = pipe.sample(16, 16, 16, 1.0, _gen(3))
    out = pipe(x, 1.0, gen)
    assert params.xint.abs().max() <= 2 and params.xint.abs().max() > 0  # round(0.125 * 16) = 2
    for i, (dx, dy) in enumerate(params.xint.long().tolist()):
        padded = F.pad(x[i : i + 1], (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="reflect")
        expected = padded[..., max(-dy, 0) : max(-dy, 0) + 16, max(-dx, 0) : max(-dx, 0) + 16]
        assert torch.equal(out[i : i + 1], expected)


def test_images_that_drew_only_blits_are_exactly_permuted_in_a_mixed_batch():
    pipe = AugmentPipe("bg")
    x = torch.randn(64, 3, 12, 12)
    params = pipe.sample(64, 12, 12, 0.5, _gen(4))
    out = pipe.apply(x, params)
    blit_only = ((params.scale == 1) & (params.rotate_pre == 0) & (params.aniso == 1) & (params.rotate_post == 0)
                 & (params.xfrac == 0).all(1))
    assert 0 < int(blit_only.sum()) < 64
    blits = AugmentParams(xflip=params.xflip, rotate90=params.rotate90, xint=params.xint)
    exact = pipe.apply(x, blits)
    assert torch.equal(out[blit_only], exact[blit_only])
    assert not torch.equal(out[~blit_only], exact[~blit_only])


# -- general geometry ------------------------------------------------------------------------------


def test_resampler_reproduces_integer_transforms_up_to_rounding():
    x = torch.randn(2, 3, 12, 12, dtype=F64)
    permute = AugmentPipe("none").apply
    cases = [
        AugmentParams(),  # identity
        AugmentParams(xfrac=_t([2, -1], [-3, 0])),  # whole pixels through the sub-pixel transform
        AugmentParams(scale=_t(1, 1), rotate_pre=_t(0, 0), aniso=_t(1, 1)),
        AugmentParams(xflip=_t(1, 0), rotate90=_t(1, 3), xint=_t([1, 2], [0, -2])),
    ]
    for params in cases:
        expected = permute(x, AugmentParams(xint=params.xfrac) if params.xfrac is not None else params)
        torch.testing.assert_close(ada.resample(x, _geom(params, x)), expected, rtol=0, atol=1e-12)
    # An arbitrary rotation by pi/2 (cos is not exactly 0) is a quarter turn in the same sense as rot90.
    quarter = ada.resample(x, _geom(AugmentParams(rotate_pre=_t(math.pi / 2, math.pi / 2)), x))
    torch.testing.assert_close(quarter, torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(ada.resample(x32, torch.eye(3, dtype=F64).repeat(2, 1, 1)), x32, rtol=0, atol=1e-5)


def test_general_transforms_match_closed_forms_on_smooth_images():
    pipe = AugmentPipe("none")
    blob = _blob()
    shifted = pipe.apply(blob, AugmentParams(xfrac=_t([0.3, -0.7])))
    torch.testing.assert_close(shifted, _blob(0.3, -0.7), rtol=0, atol=1e-2)
    scaled = pipe.apply(blob, AugmentParams(scale=_t(1.25)))
    torch.testing.assert_close(scaled, _blob(sx=5.0, sy=5.0), rtol=0, atol=1e-2)
    stretched = pipe.apply(blob, AugmentParams(aniso=_t(1.25)))  # x by 1.25, y by 0.8
    torch.testing.assert_close(stretched, _blob(sx=5.0, sy=3.2), rtol=0, atol=3e-2)
    # An elongated blob turned by a quarter with the general rotation lies along the other axis.
    turned = pipe.apply(_blob(3.0, 0.0, 3.0, 6.0), AugmentParams(rotate_post=_t(math.pi / 2)))
    torch.testing.assert_close(turned, _blob(0.0, -3.0, 6.0, 3.0), rtol=0, atol=1e-9)
    # A radially symmetric image is unchanged by a rotation, also after five turns of 72 degrees
    # (inside the disc that never samples the reflected border).
    inside = (torch.arange(32.0) - 15.5).view(1, -1) ** 2 + (torch.arange(32.0) - 15.5).view(-1, 1) ** 2 < 12**2
    rotated = pipe.apply(blob, AugmentParams(rotate_pre=_t(0.7)))
    assert (rotated - blob)[..., inside].abs().max() < 5e-3
    out = blob
    for _ in range(5):
        out = pipe.apply(out, AugmentParams(rotate_pre=_t(2 * math.pi / 5)))
    assert (out - blob)[..., inside].abs().max() < 2e-2


def test_constant_images_stay_constant_under_any_geometry():
    pipe = AugmentPipe("none")
    x = torch.full((3, 3, 16, 16), 0.7)
    params = AugmentParams(scale=_t(0.4, 1.0, 2.5), rotate_pre=_t(0.3, 2.0, -1.0), aniso=_t(1.6, 0.5, 1.0),
                           xfrac=_t([0.3, 4.2], [-1.5, 0.0], [0.0, 0.0]))
    torch.testing.assert_close(pipe.apply(x, params), x, rtol=0, atol=1e-6)


# -- colour ----------------------------------------------------------------------------------------


def _colour(x: torch.Tensor, **params) -> torch.Tensor:
    return AugmentPipe("none").apply(x, AugmentParams(**{k: torch.as_tensor(v, dtype=F64).view(-1)
                                                          for k, v in params.items()}))


def test_brightness_and_contrast_in_pm1_pixels():
    x = torch.randn(1, 3, 4, 4, dtype=F64)
    y = _to_pm1(x)
    torch.testing.assert_close(_to_pm1(_colour(x, brightness=0.3)), y + 0.3, rtol=0, atol=1e-12)
    # Contrast scales about mid-grey, 0 in [-1, 1] pixels.
    torch.testing.assert_close(_to_pm1(_colour(x, contrast=1.7)), 1.7 * y, rtol=0, atol=1e-12)
    # ADA's order: brightness before contrast.
    torch.testing.assert_close(_to_pm1(_colour(x, brightness=0.3, contrast=0.5)), 0.5 * (y + 0.3), rtol=0, atol=1e-12)


def test_luma_flip():
    x = torch.randn(1, 3, 4, 4, dtype=F64)
    once = _colour(x, lumaflip=1)
    torch.testing.assert_close(_colour(once, lumaflip=1), x, rtol=0, atol=1e-12)
    y, y1 = _to_pm1(x), _to_pm1(once)
    luma = y.mean(1, keepdim=True)
    torch.testing.assert_close(y1.mean(1, keepdim=True), -luma, rtol=0, atol=1e-12)  # luma reflected
    torch.testing.assert_close(y1 - y1.mean(1, keepdim=True), y - luma, rtol=0, atol=1e-12)  # chroma kept
    grey = _from_pm1(torch.full((1, 3, 2, 2), 0.4, dtype=F64))
    torch.testing.assert_close(_to_pm1(_colour(grey, lumaflip=1)), torch.full((1, 3, 2, 2), -0.4, dtype=F64),
                               rtol=0, atol=1e-12)


def test_hue_rotation():
    x = torch.randn(1, 3, 4, 4, dtype=F64)
    y = _to_pm1(x)
    grey = _from_pm1(torch.linspace(-1, 1, 4, dtype=F64).view(1, 1, 1, 4).expand(1, 3, 2, 4))
    torch.testing.assert_close(_colour(grey, hue=1.1), grey, rtol=0, atol=1e-12)
    torch.testing.assert_close(_colour(x, hue=2 * math.pi), x, rtol=0, atol=1e-12)
    turned = _to_pm1(_colour(x, hue=1.1))
    torch.testing.assert_close(turned.mean(1), y.mean(1), rtol=0, atol=1e-12)  # luma kept
    chroma = lambda v: (v - v.mean(1, keepdim=True)).norm(dim=1)
    torch.testing.assert_close(chroma(turned), chroma(y), rtol=0, atol=1e-12)
    # A third of a turn about (1, 1, 1) cycles the channels.
    third = _to_pm1(_colour(x, hue=2 * math.pi / 3))
    torch.testing.assert_close(third, y.roll(1, dims=1), rtol=0, atol=1e-12)


def test_saturation():
    x = torch.randn(1, 3, 4, 4, dtype=F64)
    y = _to_pm1(x)
    grey = _to_pm1(_colour(x, saturation=0.0))
    torch.testing.assert_close(grey, y.mean(1, keepdim=True).expand_as(y), rtol=0, atol=1e-12)
    assert torch.equal(_colour(x, saturation=1.0), x)  # the identity matrix is exact: nothing is done
    doubled = _to_pm1(_colour(x, saturation=2.0))
    luma = y.mean(1, keepdim=True)
    torch.testing.assert_close(doubled, luma + 2 * (y - luma), rtol=0, atol=1e-12)


def test_colour_leaves_images_that_drew_nothing_untouched():
    x = torch.randn(3, 3, 4, 4)
    out = _colour(x, brightness=[0.0, 0.2, 0.0])
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2]) and not torch.equal(out[1], x[1])


# -- randomness, gradients, arguments --------------------------------------------------------------


def test_draws_come_only_from_the_passed_generator():
    pipe = AugmentPipe("bgc")
    x = torch.randn(8, 3, 16, 16)
    global_state = torch.get_rng_state()
    g1, g2 = _gen(7), _gen(7)
    a, b = pipe(x, 0.7, g1), pipe(x, 0.7, g2)
    assert torch.equal(a, b) and torch.equal(g1.get_state(), g2.get_state())
    assert not torch.equal(a, pipe(x, 0.7, _gen(8)))
    assert torch.equal(torch.get_rng_state(), global_state)


def test_parameter_distributions():
    pipe = AugmentPipe("bgc")
    n = 20000
    full = pipe.sample(n, 64, 32, 1.0, _gen(9))
    assert abs(full.xflip.mean().item() - 0.5) < 0.02
    assert torch.equal(torch.unique(full.rotate90), _t(0, 2))  # W != H: half turns only
    assert abs((full.rotate90 == 2).double().mean().item() - 0.5) < 0.02
    assert full.xint[:, 0].abs().max() == 4 and full.xint[:, 1].abs().max() == 8  # 0.125 of width 32, height 64
    assert abs(full.scale.log2().std().item() - 0.2) < 0.01 and abs(full.aniso.log2().std().item() - 0.2) < 0.01
    assert abs(full.xfrac[:, 0].std().item() - 0.125 * 32) < 0.1 and abs(full.xfrac[:, 1].std().item() - 8) < 0.2
    assert full.rotate_pre.abs().max() <= math.pi and full.rotate_pre.abs().max() > 3.1
    assert abs(full.brightness.std().item() - 0.2) < 0.01
    assert abs(full.contrast.log2().std().item() - 0.5) < 0.02
    assert abs(full.saturation.log2().std().item() - 1.0) < 0.03
    assert abs(full.hue.std().item() - math.pi / math.sqrt(3)) < 0.05  # uniform over the full circle
    part = pipe.sample(n, 64, 64, 0.3, _gen(10))
    assert torch.equal(torch.unique(part.rotate90), _t(0, 1, 2, 3))
    assert abs((part.scale != 1).double().mean().item() - 0.3) < 0.02
    assert abs((part.hue != 0).double().mean().item() - 0.3) < 0.02
    # Pre- and post-rotation each happen with 1 - sqrt(1 - p), so at least one with p.
    rotated = (part.rotate_pre != 0) | (part.rotate_post != 0)
    assert abs(rotated.double().mean().item() - 0.3) < 0.02


def test_gradients():
    x = torch.randn(1, 3, 5, 5, dtype=F64, requires_grad=True)
    general = _geom(AugmentParams(scale=_t(1.2), rotate_pre=_t(0.4), xfrac=_t([0.3, -0.2])), x)
    assert torch.autograd.gradcheck(lambda v: ada.resample(v, general), (x,))
    # Twice differentiable, for an R1 penalty taken through the augmentation.
    assert torch.autograd.gradgradcheck(lambda v: ada.resample(v, general), (x,))
    blits = _geom(AugmentParams(xflip=_t(1), rotate90=_t(1), xint=_t([1, -2])), x)
    assert torch.autograd.gradcheck(lambda v: ada.apply_geometric(v, blits), (x,))
    colour = ada.colour_matrix(AugmentParams(hue=_t(0.8), contrast=_t(1.3), brightness=_t(0.1)), 1)
    assert torch.autograd.gradcheck(lambda v: ada.apply_colour(v, colour), (x,))
    images = torch.randn(4, 3, 16, 16, requires_grad=True)
    AugmentPipe("bgc")(images, 1.0, _gen(11)).square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and (images.grad != 0).all(1).any()


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="preset"):
        AugmentPipe("bgcf")
    with pytest.raises(ConfigError, match="blur"):
        AugmentPipe("bgc", blur=1)
    with pytest.raises(ConfigError, match="hue"):
        AugmentPipe("bgc", hue=-1)
    with pytest.raises(ConfigError, match="std"):
        AugmentPipe("bgc", std=(0.2, 0.0, 0.2))
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="p must"):
            AugmentPipe("bgc")(torch.zeros(1, 3, 8, 8), p, _gen())
    with pytest.raises(ConfigError, match="p must"):
        AdaController(p=2.0)
    with pytest.raises(ConfigError, match="interval"):
        AdaController(interval=0)
    with pytest.raises(ConfigError, match="kimg"):
        AdaController(kimg=0)


# -- controller ------------------------------------------------------------------------------------


def test_controller_steps_by_the_closed_form():
    ctl = AdaController(interval=4, kimg=0.5)  # p moves 4 * 32 / 500 per update
    step = 4 * 32 / 500
    positive = torch.tensor([3.0, 1.0, 2.0, -1.0])  # mean sign 0.5
    for s in range(1, 4):
        ctl.accumulate(positive)
        assert ctl.maybe_update(s, 32) is None and ctl.p == 0.0
    ctl.accumulate(positive.abs())
    assert ctl.maybe_update(4, 32) == pytest.approx((3 * 0.5 + 1.0) / 4)  # 0.625 > 0.6: up
    assert ctl.p == step
    for s in range(5, 9):
        ctl.accumulate(-positive.abs())
    assert ctl.maybe_update(8, 32) == -1.0 and ctl.p == 0.0  # down, clamped at 0
    for s in range(9, 13):
        ctl.accumulate(-positive)
    ctl.maybe_update(12, 32)
    assert ctl.p == 0.0  # stays at 0
    ctl.p = 1.0 - step / 2
    for s in range(13, 17):
        ctl.accumulate(positive.abs())
    ctl.maybe_update(16, 32)
    assert ctl.p == 1.0  # clamped at 1


def test_controller_reduce_hook_sums_ranks():
    ctl = AdaController(interval=1, kimg=1.0)
    ctl.accumulate(torch.tensor([1.0, 1.0]))

    def all_reduce(t: torch.Tensor) -> None:  # in place, as torch.distributed.all_reduce
        t.add_(torch.tensor([-4.0, 4.0], dtype=F64))  # another rank saw 4 negative logits

    assert ctl.maybe_update(1, 10, reduce=all_reduce) == pytest.approx(-2 / 6)
    assert ctl.p == 0.0
    ctl.accumulate(torch.tensor([1.0]))
    assert ctl.maybe_update(2, 10, reduce=lambda t: t * 3) == 1.0 and ctl.p == 10 / 1000


def test_controller_state_round_trip_continues_identically():
    gen = _gen(12)
    logits = [torch.randn(16, generator=gen) + 1.5 for _ in range(20)]  # mostly positive: p rises
    a = AdaController(interval=4, kimg=0.1)
    for s in range(1, 11):
        a.accumulate(logits[s - 1])
        a.maybe_update(s, 16)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["count"] == 2 * 16  # steps 9 and 10 are pending
    b = AdaController(interval=4, kimg=0.1)
    b.load_state_dict(state)
    for s in range(11, 21):
        for ctl in (a, b):
            ctl.accumulate(logits[s - 1])
        assert a.maybe_update(s, 16) == b.maybe_update(s, 16)
        assert a.p == b.p
    assert a.p > 0
    assert a.state_dict() == b.state_dict()


# -- the controller in real training: D overfitting a tiny dataset raises p, a large one does not ------


def _teacher(tmp_path):
    """A 16px generator drawn at unit scale (linear weights N(0, 1/fan_in); to-RGB at a quarter of
    that so that images stay in range), whose images differ a lot from seed to seed, and a fresh
    32-channel discriminator: the model both runs start from (``train --init``)."""
    from stylenat.models import DiscriminatorConfig, GeneratorConfig, build_discriminator, build_generator, save_model

    g_cfg = GeneratorConfig(resolution=16, channels=(16, 16, 16), heads=(2, 2, 2), kernels=((4,), (5,), (5,)),
                            dilations=((1,), (1,), (1,)), style_dim=16, n_mlp=1)
    d_cfg = DiscriminatorConfig(resolution=16, channels=(32, 32, 32))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        g, d = build_generator(g_cfg).eval(), build_discriminator(d_cfg).eval()
    gen = _gen(1)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.startswith("synthesis.") and name != "synthesis.const" and "style" not in name and p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()) * (0.25 if "to_rgb" in name else 1.0))
    g.compute_w_avg()
    return g, save_model(tmp_path / "teacher.safetensors", {"g_ema": g, "d": d}, g_cfg, d_cfg)


def test_adaptive_p_rises_when_d_overfits_a_tiny_dataset_and_stays_near_zero_on_a_large_one(tmp_path):
    """ADA's must-show, on real training runs (G, D, R1, the ADA pipeline and controller).

    Both datasets are images of one fixed generator, the teacher: 500 of them, or 2. Both runs start
    from the teacher itself with G's learning rate 0, so G's images are exactly the large set's kind
    and the only difference between the runs is the dataset's size. On the large set D cannot tell
    reals from fakes, r_t = E[sign(D(real))] stays mostly under the 0.6 target and p near 0; on two
    images D memorises the reals, r_t passes 0.6 and p climbs. Same seed, 80 steps, same settings
    (D's learning rate and a light R1 chosen so that D memorises two images within that budget).
    """
    from stylenat.data import save_image_grid
    from stylenat.models.io import latest_checkpoint
    from stylenat.sampling import generate
    from stylenat.train import get_train_preset, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest on a shared machine
    try:
        g, model = _teacher(tmp_path)
        images = generate(g, range(500), batch=250)
        for name, count in (("large", 500), ("tiny", 2)):
            (tmp_path / name).mkdir()
            for i in range(count):
                save_image_grid(images[i:i + 1], tmp_path / name / f"{i:03d}.png", (1, 1))
        p = {}
        for name in ("tiny", "large"):
            run = tmp_path / f"run_{name}"
            train(get_train_preset("tiny").replace(
                preset=None, init=str(model), data=str(tmp_path / name), run_dir=str(run), seed=0, device="cpu",
                steps=80, batch=8, xflip=False, g_lr=0.0, d_lr=2e-3, r1_gamma=0.05,
                aug="ada", ada_interval=1, ada_kimg=0.2,  # p can move by 8/200 = 0.04 per step
                tick_every=5, sample_every=10**6, checkpoint_every=10**6, grid=(1, 1)))
            stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
            state = json.loads((latest_checkpoint(run / "checkpoints") / "train_state.json").read_text())
            p[name] = ([s["aug_p"] for s in stats if "aug_p" in s], state["components"]["ada"]["p"])
    finally:
        torch.set_num_threads(threads)
    (tiny_curve, tiny_final), (large_curve, _) = p["tiny"], p["large"]
    assert len(tiny_curve) == len(large_curve) == 16
    tiny_late, large_mean = sum(tiny_curve[8:]) / 8, sum(large_curve) / len(large_curve)
    # Measured with run seeds 0, 1, 2, 3: tiny final p 0.64, 0.80, 0.88, 0.88 (mean over the second half
    # 0.51, 0.64, 0.68, 0.69); large: mean over the run 0.042, 0.072, 0.047, 0.052, final 0, 0, 0, 0.16,
    # with brief excursions to 0.19-0.28 when D's output offset, common to reals and fakes, drifts up.
    assert tiny_final >= 0.3 and tiny_late >= 0.3
    assert large_mean <= 0.1 and max(large_curve) < tiny_late
    assert tiny_late > 5 * large_mean


# -- --deterministic on CUDA -----------------------------------------------------------------------


@pytest.mark.parametrize("aug_pipe, aug_p, device, refused", [
    ("bgc", None, "cuda", True), ("g", 0.3, "cuda:1", True), ("bc", None, "cuda", False),
    ("bgc", 0.0, "cuda", False), ("bgc", None, "cpu", False),
])
def test_deterministic_cuda_refuses_ada_geometry_before_training(aug_pipe, aug_p, device, refused):
    from stylenat.train import TrainConfig
    from stylenat.train.loop import check_deterministic_support

    cfg = TrainConfig(aug="ada", aug_pipe=aug_pipe, aug_p=aug_p, deterministic=True)
    if refused:
        with pytest.raises(ConfigError, match=r"grid_sample.*drop --deterministic.*aug_pipe=") as info:
            check_deterministic_support(cfg, device)
        assert "\n" not in str(info.value)
    else:
        check_deterministic_support(cfg, device)
    check_deterministic_support(cfg.replace(deterministic=False), device)  # only deterministic runs are affected
    check_deterministic_support(cfg.replace(aug="diffaug", aug_p=None), device)


def test_resamples_names_the_geometric_group(monkeypatch):
    assert [ada.resamples(p) for p in ada.PRESETS] == [False, False, True, False, True, False, True, True]
    with pytest.raises(ConfigError, match="unknown augmentation preset"):
        ada.resamples("xyz")
    # The claim behind it: blit-and-colour pipelines never call F.grid_sample, geometric ones do.
    calls, original = [], F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(16, 3, 16, 16, requires_grad=True)
    AugmentPipe("bc")(x, 1.0, _gen(3)).sum().backward()
    assert not calls
    AugmentPipe("g")(x, 1.0, _gen(3)).sum().backward()
    assert calls


def test_logged_r_t_is_over_every_micro_batch_as_the_controller_sees_it(tmp_path):
    """With --accum > 1 the controller accumulates the signs of every micro-batch; stats.jsonl's r_t
    is the same number, not the last micro-batch's."""
    from stylenat.models import uint8_to_model
    from stylenat.train import get_train_preset
    from stylenat.train.loop import _Trainer, resolve_config

    micro_g = dict(resolution=16, channels=[16, 16, 16], heads=[2, 2, 2], kernels=[[4], [5], [5]],
                   dilations=[[1], [1], [1]], style_dim=16, n_mlp=1)
    cfg = resolve_config(get_train_preset("tiny").replace(
        data="demo", run_dir=str(tmp_path / "run"), device="cpu", batch=4, accum=3, aug="ada", ada_interval=1,
        generator=micro_g, discriminator=dict(resolution=16, channels=[16, 16, 16]), grid=(1, 1)))
    trainer = _Trainer(cfg, resume=False)
    # Centre D's output on the data so that the signs differ from micro-batch to micro-batch.
    with torch.no_grad():
        reals = torch.stack([trainer.dataset[i] for i in range(64)])
        trainer.D.final_linear[2].bias -= trainer.D(uint8_to_model(reals, trainer.g_cfg)).median()
    seen = []
    accumulate = trainer.ada.accumulate
    trainer.ada.accumulate = lambda logits: seen.append(logits.detach().sign().mean().item()) or accumulate(logits)
    differs = False
    try:
        for step in range(1, 4):
            seen.clear()
            _, stats = trainer._d_step()
            total, count = trainer.ada.stats_tensor().tolist()
            assert len(seen) == 3 and count == 12
            assert stats["r_t"].item() == pytest.approx(total / count, abs=1e-7)
            differs |= seen[-1] != pytest.approx(total / count)
            trainer.ada.maybe_update(step, 12)  # what the loop does after each step: p moves, the sums reset
    finally:
        trainer.log.close()
    assert differs  # the last micro-batch alone would have been another number
