"""Metric names, `measure` and `stylenat metrics`: every kind against a direct computation on the same images."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import stylenat.metrics.registry as registry_module
from stylenat.cli import main
from stylenat.errors import ConfigError
from stylenat.metrics.distances import frechet_distance
from stylenat.metrics.precision_recall import precision_recall
from stylenat.metrics.registry import KINDS, METRICS, MetricSpec, measure, needs_inception, parse_metric
from stylenat.metrics.swd import swd_from_images
from tests.metrics.conftest import channel_moments_np as channel_moments


@pytest.mark.parametrize("name, spec", [
    ("fid50k", MetricSpec("fid50k", "fid", 50000)), ("kid", MetricSpec("kid", "kid", None)),
    ("swd2k", MetricSpec("swd2k", "swd", 2000)), ("pr500", MetricSpec("pr500", "pr", 500)), ("FID10K", MetricSpec("fid10k", "fid", 10000)),
])
def test_names(name, spec):
    assert parse_metric(name) == spec


@pytest.mark.parametrize("bad", ["fid1m", "is50k", "fid0", "swd-2k", ""])
def test_unknown_names_are_clear_errors(bad):
    with pytest.raises(ConfigError, match="unknown metric") as caught:
        parse_metric(bad)
    message = str(caught.value)
    assert "\n" not in message and "use fid, kid, pr or swd, optionally with an image count" in message


def test_every_kind_is_parsed_with_its_declared_default_and_weights_need():
    assert set(KINDS) == {"fid", "kid", "pr", "swd"} and all(parse_metric(n).kind in KINDS for n in METRICS)
    for name, kind in KINDS.items():
        assert parse_metric(name).images == kind.images and parse_metric(f"{name}3k").images == 3000
        assert needs_inception([name]) == kind.inception == (name != "swd")


@pytest.fixture
def stand_in_inception(monkeypatch, extractor):
    monkeypatch.setattr(registry_module, "load_inception", lambda *a, **k: extractor)
    return extractor


def _images(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def test_measure_every_kind_equals_a_direct_computation(tmp_path, image_writer, extractor_oracle, stand_in_inception):
    fake = image_writer(tmp_path / "fake", 12, size=16, seed=1)
    real = image_writer(tmp_path / "real", 10, size=16, seed=2)
    values = measure(tmp_path / "fake", tmp_path / "real", ["fid", "kid", "pr", "swd"], num=12, resolution=16,
                     batch=5, progress=False)
    f, r = extractor_oracle(fake), extractor_oracle(real)
    fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    assert values["fid"] == pytest.approx(fid, rel=1e-9)
    pr = precision_recall(r, f, k=3)
    assert (values["pr_precision"], values["pr_recall"]) == pytest.approx((pr["precision"], pr["recall"]))
    swd = swd_from_images(_images(fake), _images(real))
    assert values["swd"] == pytest.approx(swd["swd_avg"], rel=1e-6)
    assert values["swd_16"] == pytest.approx(swd["swd_16"], rel=1e-6)
    assert values["kid_std"] >= 0 and values["num_fake_fid"] == 12 and values["num_real_fid"] == 10
    assert stand_in_inception.images == 12 + 10  # one pass over each set, shared by fid, kid and pr
    # Every key is a name followed by a suffix its kind declares, and every declared suffix is there.
    patterns = {(name, suffix): re.escape(name) + re.escape(suffix).replace("<res>", r"\d+")
                for name, kind in KINDS.items() for suffix in kind.keys}
    keys = [k for k in values if not k.startswith("num_")]
    assert all(any(re.fullmatch(p, k) for p in patterns.values()) for k in keys)
    assert all(any(re.fullmatch(p, k) for k in keys) for p in patterns.values())


def test_cli_metrics_prints_one_line_each_and_writes_json(tmp_path, image_writer, capsys):
    image_writer(tmp_path / "a", 8, size=16, seed=3)
    out = tmp_path / "m.json"
    assert main(["metrics", str(tmp_path / "a"), str(tmp_path / "a"), "--metrics", "swd", "--resolution", "16",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "swd 0" and lines[1] == "swd_16 0"  # a set against itself: exactly 0
    record = json.loads(out.read_text())
    assert record["metrics"] == ["swd"] and record["results"]["swd"] == 0


def test_cli_metrics_without_inception_weights(tmp_path, image_writer, capsys, monkeypatch):
    image_writer(tmp_path / "a", 4, size=16)
    assert main(["metrics", str(tmp_path / "a"), str(tmp_path / "a"), "--metrics", "pr", "--resolution", "16"]) == 2
    err = capsys.readouterr().err
    # The message names the metric asked for, not FID.
    assert "Inception weights not found" in err and "precision/recall (pr) needs" in err and "FID" not in err
    assert main(["metrics", str(tmp_path / "a"), str(tmp_path / "a"), "--metrics", "swd,kid,pr", "--resolution", "16"]) == 2
    assert "KID and precision/recall (pr) need pt_inception" in capsys.readouterr().err
    assert main(["metrics", str(tmp_path / "a"), str(tmp_path / "a"), "--metrics", "fid", "--resolution", "16"]) == 2
    assert "FID needs pt_inception" in capsys.readouterr().err


def test_train_metrics_without_inception_weights_names_the_metric(tmp_path, capsys):
    from tests.train.helpers import MICRO

    assert main(["train", *MICRO, "--steps", "1", "--metrics", "pr50", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "precision/recall (pr) needs" in err and "FID" not in err


def test_a_generator_is_read_at_the_asked_resolution_like_the_real_images(tmp_path, image_writer, stand_in_inception, capsys):
    """--resolution R other than the model's: both sets are compared at R, the generated images
    Lanczos-resized to R as raw real images are (not an error from inside the SWD code)."""
    from PIL import Image

    from stylenat.models import GeneratorConfig, build_generator, save_model
    from stylenat.sampling import generate

    g_cfg = GeneratorConfig(resolution=16, channels=(16, 16, 16), heads=(2, 2, 2), kernels=((4,), (5,), (5,)),
                            dilations=((1,), (1,), (1,)), style_dim=16, n_mlp=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        g = build_generator(g_cfg).eval()
    model = save_model(tmp_path / "g16.safetensors", {"g_ema": g}, g_cfg)
    real = image_writer(tmp_path / "real", 8, size=32, seed=5)
    values = measure(model, tmp_path / "real", ["swd", "fid"], num=8, resolution=32, batch=3, progress=False)
    # The oracle: the model's images for seeds 0..7, resized with PIL's Lanczos directly.
    fake = [np.asarray(Image.fromarray(x).resize((32, 32), Image.Resampling.LANCZOS))
            for x in generate(g, range(8)).permute(0, 2, 3, 1).numpy()]
    swd = swd_from_images(_images(fake), _images(real))
    assert values["swd"] == pytest.approx(swd["swd_avg"], rel=1e-6) and {"swd_32", "swd_16"} <= values.keys()
    f, r = channel_moments(fake), channel_moments(real)
    fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    assert values["fid"] == pytest.approx(fid, rel=1e-9)
    # Down too, and through the command line.
    assert measure(model, tmp_path / "real", ["swd"], num=8, resolution=16, progress=False)["swd"] > 0
    assert main(["metrics", str(model), str(tmp_path / "real"), "--metrics", "swd", "--num", "8", "--resolution", "32",
                 "--out", str(tmp_path / "m.json")]) == 0
    assert capsys.readouterr().out.startswith(f"swd {values['swd']:.4f}")


def test_generator_against_data(tmp_path, image_writer):
    from stylenat.models import build_generator

    image_writer(tmp_path / "real", 6, size=32, seed=4)
    g = build_generator("tiny")
    values = measure(g, tmp_path / "real", ["swd6"], progress=False)
    assert values["swd6"] > 0 and values["num_fake_swd6"] == 6 and {"swd6_32", "swd6_16"} <= values.keys()


def test_the_cli_help_names_every_kind_and_its_default_count():
    """`stylenat metrics --help` spells the kinds for a terminal (building it must not import torch's
    stack); this keeps it from drifting from KINDS."""
    from stylenat.cli import build_parser
    from stylenat.metrics.registry import KINDS

    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "metrics" in a.choices)
    parser = sub.choices["metrics"]
    num = next(a for a in parser._actions if "--num" in a.option_strings)
    counts: dict[int, list[str]] = {}
    for kind in KINDS.values():
        assert kind.name in parser.description
        counts.setdefault(kind.images, []).append(kind.name)
    assert ", ".join(f"{'/'.join(names)} {n}" for n, names in counts.items()) in num.help


def test_a_rectangular_generator_against_rectangular_data(tmp_path, stand_in_inception):
    """A 32x16 model (32 wide, 16 high) against 32x16 real images: SWD per level at 32x16, FID on the
    same images a direct computation sees; at 64x32 the model's images are resized like real ones."""
    from PIL import Image

    from stylenat.models import build_generator, get_preset
    from stylenat.sampling import generate

    with torch.random.fork_rng():
        torch.manual_seed(0)
        g = build_generator(get_preset("ffhq", "32x16", cbase=512, cmax=32)[0]).eval()
    rng = np.random.default_rng(7)
    (tmp_path / "real").mkdir()
    real = [rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for _ in range(6)]
    for i, arr in enumerate(real):
        Image.fromarray(arr).save(tmp_path / "real" / f"{i}.png")
    values = measure(g, tmp_path / "real", ["swd", "fid"], num=6, batch=4, progress=False)
    fake = generate(g, range(6))
    assert fake.shape == (6, 3, 16, 32)
    swd = swd_from_images(fake, _images(real))
    assert set(swd) == {"swd_32x16", "swd_avg"}
    assert values["swd"] == pytest.approx(swd["swd_avg"], rel=1e-6)
    assert values["swd_32x16"] == pytest.approx(swd["swd_32x16"], rel=1e-6)
    f, r = channel_moments(list(fake.permute(0, 2, 3, 1).numpy())), channel_moments(real)
    fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    assert values["fid"] == pytest.approx(fid, rel=1e-7)  # a small FID: running sums vs np.cov
    # At another size ("WxH" as the command line gives it), both sets are read at it.
    up = measure(g, tmp_path / "real", ["swd"], num=6, resolution="64x32", progress=False)
    fake_up = [np.asarray(Image.fromarray(x).resize((64, 32), Image.Resampling.LANCZOS))
               for x in fake.permute(0, 2, 3, 1).numpy()]
    real_up = [np.asarray(Image.fromarray(x).resize((64, 32), Image.Resampling.LANCZOS)) for x in real]
    want = swd_from_images(_images(fake_up), _images(real_up))
    assert set(up) >= {"swd_64x32", "swd_32x16"} and up["swd"] == pytest.approx(want["swd_avg"], rel=1e-6)
