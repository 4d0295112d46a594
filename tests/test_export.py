"""Export: ONNX files run by onnxruntime and torch.export programs give the pixels PyTorch gives
(within one level) for the same seeds and two psi values, z or ws in, for tiny, a narrow ffhq-family
model at 64 (class-conditional), one at 32x16 (32 wide, 16 high) and ffhq256 (slow); metadata, errors
and the CLI."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import re

import numpy as np
import pytest
import torch
from PIL import Image

import stylenat
from stylenat import export as export_module
from stylenat.cli import main
from stylenat.errors import ConfigError, ModelFileError, UserError
from stylenat.export import export, load_exported
from stylenat.models import build_generator, get_preset
from stylenat.models.io import save_model
from stylenat.sampling import generate, synthesize

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SEEDS = [3, 11, 12, 40]
PSIS = (1.0, 0.5)  # two values: psi is an input of the graph, not baked in


def _trained_like(g):
    """Weights moved off their init (so the images are not flat) and a w_avg of the model's own."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in g.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if name.startswith("synthesis.to_rgbs"):
                p.mul_(8)  # ToRGB starts near zero (gain 0.02): full-contrast images compare more pixels
    g.compute_w_avg(500)
    if g.config.num_classes:
        g.compute_class_w_avg(100)
    return g.eval()


@pytest.fixture(scope="module")
def tiny():
    return _trained_like(build_generator("tiny"))


@pytest.fixture(scope="module")
def micro():
    """A 16px model of three stages: the quickest to export, for the tests of everything around the graph."""
    cfg = dataclasses.replace(get_preset("tiny")[0], resolution=16, channels=(16, 16, 16), heads=(2, 2, 2),
                              kernels=((4,), (5,), (5,)), dilations=((1,), (1,), (1,)), style_dim=16, n_mlp=1)
    return _trained_like(build_generator(cfg))


@pytest.fixture(scope="module")
def family64():
    """The ffhq family's structure at 64 (its kernels and per-stage dilations 1, 2, 4, 8 in half the
    heads), narrowed to keep the test quick, and class-conditional with named classes."""
    cfg = get_preset("ffhq", 64)[0]
    n = len(cfg.channels)
    cfg = dataclasses.replace(cfg, channels=(32,) * n, heads=(2,) * n, style_dim=32, num_classes=3,
                              class_names=("cat", "dog", "fox"))
    return _trained_like(build_generator(cfg))


@pytest.fixture(scope="module")
def rect():
    """The ffhq family at 32x16 (32 wide, 16 high; stages 4x2 .. 32x16, kernels such as 4x7), narrowed."""
    return _trained_like(build_generator(get_preset("ffhq", "32x16", cbase=512, cmax=32)[0]))


def _export_job(model: str, out: str, input: str):
    """In a worker process: export a saved model (one thread: the workers share the two cores)."""
    torch.set_num_threads(1)
    return export(stylenat.load(model), out, input=input)


@pytest.fixture(scope="module")
def onnx_files(tiny, micro, family64, rect, tmp_path_factory):
    """The four ONNX exports of this module, made side by side in worker processes (each export is
    mostly single-threaded tracing, so two at once take little more than one)."""
    folder = tmp_path_factory.mktemp("export")
    jobs = {"family64": (family64, "z"), "tiny": (tiny, "z"), "micro_w": (micro, "w"), "rect": (rect, "z")}
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for name, (g, input) in jobs.items():
            save_model(folder / f"{name}.safetensors", {"g_ema": g}, g.config)
            futures[name] = pool.submit(_export_job, str(folder / f"{name}.safetensors"), str(folder / f"{name}.onnx"),
                                        input)
        reports = {name: f.result() for name, f in futures.items()}
    for report in reports.values():
        assert report.max_level_diff <= 1 and report.checked_images == 6
    return {name: folder / f"{name}.onnx" for name in jobs}


@pytest.fixture(scope="module")
def tiny_onnx(onnx_files):
    return onnx_files["tiny"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    return int((a.int() - b.int()).abs().max())


def test_tiny_onnx_gives_pytorchs_pixels(tiny, tiny_onnx):
    e = load_exported(tiny_onnx)
    for psi in PSIS:
        assert _max_diff(e.generate(SEEDS, psi, batch=3), generate(tiny, SEEDS, psi)) <= 1
    # psi really is an input: the two values give different images
    assert _max_diff(e.generate(SEEDS, PSIS[0]), e.generate(SEEDS, PSIS[1])) > 10


def test_onnx_metadata_and_signature(tiny, tiny_onnx):
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert inputs == {"z": ("tensor(float)", ["batch", tiny.style_dim]), "psi": ("tensor(float)", [])}
    (out,) = session.get_outputs()
    assert (out.name, out.type, out.shape) == ("images", "tensor(uint8)", ["batch", 3, 32, 32])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["generator_config"]) == tiny.config.to_dict()
    assert meta["input"] == "z" and meta["opset"] == "18" and meta["format"] == "stylenat-export/1"
    assert meta["stylenat_version"] and json.loads(meta["classes"]) == []
    assert (meta["resolution"], meta["width"], meta["height"]) == ("32", "32", "32")  # a square: its side, as ever
    import onnx

    assert {o.domain or "ai.onnx": o.version for o in onnx.load(str(tiny_onnx)).opset_import}["ai.onnx"] == 18


def test_family64_class_conditional_onnx(family64, onnx_files):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_files["family64"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        ("z", "tensor(float)", ["batch", 32]), ("psi", "tensor(float)", []), ("labels", "tensor(int64)", ["batch"])]
    e = load_exported(onnx_files["family64"])
    assert e.config.classes == ("cat", "dog", "fox")
    z = np.zeros((2, 32), np.float32)
    with pytest.raises(ConfigError, match=r"labels must be 2 class indices in 0-2, got"):
        e(z, 1.0, np.array([0, 3]))  # the graph would not object: its one-hot of 3 is all zeros
    for psi in (0.0, -0.5, 1.5):  # any truncation, including extrapolation
        assert _max_diff(e.generate(SEEDS, psi, labels="cat"), generate(family64, SEEDS, psi, labels="cat")) <= 1
    for psi in PSIS:
        for labels in ("dog", [0, 1, 2, 0]):
            assert _max_diff(e.generate(SEEDS, psi, labels=labels), generate(family64, SEEDS, psi, labels=labels)) <= 1
    # the labels input matters: other classes, other images
    assert _max_diff(e.generate(SEEDS, 1.0, labels="cat"), e.generate(SEEDS, 1.0, labels="fox")) > 10
    with pytest.raises(ConfigError, match="unknown class 'owl'"):
        e.generate(SEEDS, 1.0, labels="owl")


def test_a_rectangular_onnx_gives_pytorchs_pixels_at_its_width_and_height(rect, onnx_files):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_files["rect"]), providers=["CPUExecutionProvider"])
    (out,) = session.get_outputs()
    assert (out.name, out.type, out.shape) == ("images", "tensor(uint8)", ["batch", 3, 16, 32])  # [B, 3, H, W]
    meta = session.get_modelmeta().custom_metadata_map
    assert (meta["resolution"], meta["width"], meta["height"]) == ("32x16", "32", "16")
    assert json.loads(meta["generator_config"])["resolution"] == [16, 32]
    e = load_exported(onnx_files["rect"])
    assert (e.resolution, e.shape, e.width, e.height) == ((16, 32), (16, 32), 32, 16)
    for psi in PSIS:
        got, want = e.generate(SEEDS, psi, batch=3), generate(rect, SEEDS, psi)
        assert got.shape == want.shape == (4, 3, 16, 32)
        assert _max_diff(got, want) <= 1
    assert e.generate([]).shape == (0, 3, 16, 32)


def test_w_input_renders_any_latents(micro, onnx_files):
    e = load_exported(onnx_files["micro_w"])
    # w+ latents with every ws index different (as projection makes them): the graph reads each one
    ws = micro.w_avg + 0.7 * torch.randn(5, micro.num_ws, micro.style_dim, generator=torch.Generator().manual_seed(0))
    assert _max_diff(e.synthesize(ws), synthesize(micro, ws, 16)) <= 1
    with pytest.raises(ConfigError, match="takes latents ws"):
        e.generate(SEEDS)


@pytest.mark.parametrize("input", ["z", "w"])
def test_torch_export_program(micro, tmp_path, input):
    path = tmp_path / f"micro_{input}.pt2"
    report = export(micro, path, format="torch-export", input=input)
    assert report.max_level_diff <= 1 and report.opset is None
    e = load_exported(path)
    assert e.config == micro.config and e.input == input
    if input == "z":
        for psi in PSIS:
            assert _max_diff(e.generate(SEEDS, psi), generate(micro, SEEDS, psi)) <= 1
    else:
        ws = torch.randn(3, micro.num_ws, micro.style_dim)
        assert _max_diff(e.synthesize(ws), synthesize(micro, ws, 16)) <= 1


def test_a_failed_check_writes_nothing(micro, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "MAX_LEVEL_DIFF", -1)  # any export now "differs"
    (tmp_path / "g.pt2").write_bytes(b"the previous export")
    micro.train()
    with pytest.raises(ModelFileError, match=r"differs from PyTorch by up to 0 pixel levels \(allowed -1\).*nothing was "
                                             r"written"):
        export(micro.double(), tmp_path / "g.pt2", format="torch-export")
    assert [p.name for p in tmp_path.iterdir()] == ["g.pt2"]  # no temporary file left
    assert (tmp_path / "g.pt2").read_bytes() == b"the previous export"
    assert micro.training and next(micro.parameters()).dtype == torch.float64  # the caller's model is untouched
    micro.float().eval()


def test_cli_export_then_generate_from_the_file(tiny, tiny_onnx, micro, tmp_path, capsys):
    model = tmp_path / "tiny.safetensors"
    save_model(model, {"g_ema": tiny}, tiny.config)
    assert main(["generate", str(tiny_onnx), "--seeds", "0-3", "--trunc", "0.7", "--grid", "2x2", "--out",
                 str(tmp_path / "onnx")]) == 0
    assert main(["generate", str(model), "--seeds", "0-3", "--trunc", "0.7", "--out", str(tmp_path / "torch")]) == 0
    for s in range(4):
        a = np.asarray(Image.open(tmp_path / "onnx" / f"seed{s:04d}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "torch" / f"seed{s:04d}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1
    capsys.readouterr()
    assert main(["mix", str(tiny_onnx), "--rows", "0", "--cols", "1", "--layers", "0", "--out", str(tmp_path / "m.png")]) == 2
    assert "is an exported model: `stylenat generate` samples it" in capsys.readouterr().err
    save_model(tmp_path / "micro.safetensors", {"g_ema": micro}, micro.config)
    assert main(["export", str(tmp_path / "micro.safetensors"), "--format", "torch-export", "--out",
                 str(tmp_path / "g.pt2")]) == 0
    assert re.search(r"wrote .*g\.pt2 \(torch-export; inputs z, psi; .* s\); checked against PyTorch on 6 images: largest "
                     r"pixel difference [01] level", capsys.readouterr().out)


def test_errors(tiny, tmp_path, monkeypatch):
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match=r"junk\.onnx is not a readable ONNX model"):
        load_exported(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match=r"missing\.onnx is not a file"):
        load_exported(tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match="export input 'x'"):
        export(tiny, tmp_path / "g.onnx", input="x")
    with pytest.raises(ConfigError, match=r"g\.onnx: a torch-export file is named \*\.pt2"):
        export(tiny, tmp_path / "g.onnx", format="torch-export")
    with pytest.raises(ConfigError, match=r"is a folder; give the file to write, e\.g\. .*generator\.onnx"):
        export(tiny, tmp_path)
    with pytest.raises(ConfigError, match=r"--opset 17: the ONNX exporter writes opset 18 or newer"):
        export(tiny, tmp_path / "g.onnx", opset=17)
    real = export_module._importable
    monkeypatch.setattr(export_module, "_importable", lambda name: name != "onnxscript" and real(name))
    with pytest.raises(UserError, match=r'ONNX export needs onnxscript: pip install "stylenat\[onnx\]"'):
        export(tiny, tmp_path / "g.onnx")


@pytest.mark.slow
def test_ffhq256_onnx(tmp_path):
    g = _trained_like(build_generator("ffhq256"))
    report = export(g, tmp_path / "ffhq256.onnx", check_seeds=[0, 1])
    assert report.max_level_diff <= 1
    e = load_exported(tmp_path / "ffhq256.onnx")
    assert _max_diff(e.generate([5], 0.7), generate(g, [5], 0.7)) <= 1
