"""Your own data and fine-tuning: models sized by the data, --init from a run or an official
checkpoint, FreezeD, and exact resume with the augmentations (ADA, DiffAugment)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.cli import main
from stylenat.data import prepare_dataset
from stylenat.errors import ConfigError
from stylenat.models import get_preset, resolve_model, save_model
from stylenat.models.io import latest_checkpoint, read_model_file
from stylenat.sampling import generate
from stylenat.train import get_train_preset
from stylenat.train.setup import _official_init_preset, load_init as _load_init, resolve_config
from tests.train.helpers import MICRO, assert_bitwise_equal, cli, final_state

SMALL = ["--batch", "4", "--set", "grid=[2,2]", "--tick-every", "1"]


def _folder(path: Path, count: int, size: int | tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(count):
        w, h = (size, size) if isinstance(size, int) else size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


def _grid(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ---- models sized by the data ---------------------------------------------------------------------


def test_family_sized_by_a_64px_folder_is_the_official_table(tmp_path):
    data = _folder(tmp_path / "d64", 4, 64)
    cfg = resolve_config(get_train_preset("ffhq").replace(data=str(data)))
    g_cfg, d_cfg = get_preset("ffhq", 64)
    assert cfg.resolution == 64 and cfg.generator == g_cfg.to_dict() and cfg.discriminator == d_cfg.to_dict()
    assert g_cfg.channels == (512,) * 5 and g_cfg.dilations[-1] == (1, 8)
    prepare_dataset(data, tmp_path / "p128", 128, progress=False)
    assert resolve_config(get_train_preset("church").replace(data=str(tmp_path / "p128"))).resolution == 128


def test_cli_without_a_preset_trains_at_the_datas_resolution(tmp_path):
    data = _folder(tmp_path / "d16", 8, 16)
    small = ["--generator", "channels=[16,16,16]", "--generator", "heads=[2,2,2]", "--generator", "style_dim=16",
             "--generator", "n_mlp=1", "--discriminator", "channels=[16,16,16]", "--set", "bcr_real=0", "--set", "bcr_fake=0"]
    cli("--data", str(data), *small, *SMALL, "--steps", "2", "--run-dir", str(tmp_path / "run"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["preset"] == "ffhq" and config["resolution"] == 16
    assert config["generator"]["dilations"] == [[1], [1, 1], [1, 2]]  # the family's groups at 16: dilations 1 and 16/8


def test_resolution_mismatches_are_errors_not_resizes(tmp_path, capsys):
    data = _folder(tmp_path / "d64", 4, 64)
    assert main(["train", "--preset", "tiny", "--data", str(data), "--steps", "1", "--run-dir", str(tmp_path / "a")]) == 2
    assert "holds 64x64 images but the model is 32x32" in capsys.readouterr().err
    assert main(["train", "--resolution", "128", "--data", str(data), "--steps", "1", "--run-dir", str(tmp_path / "b")]) == 2
    assert "holds 64x64 images but the model is 128x128" in capsys.readouterr().err
    assert main(["train", "--data", "demo", "--steps", "1", "--run-dir", str(tmp_path / "c")]) == 2
    assert "cannot size the ffhq model from demo" in capsys.readouterr().err
    mixed = _folder(tmp_path / "mixed", 3, (40, 30))
    assert main(["train", "--data", str(mixed), "--steps", "1", "--run-dir", str(tmp_path / "d")]) == 2
    assert "its images are 40x30, not a model size" in capsys.readouterr().err
    assert main(["train", "--preset", "ffhq256", "--generator", "resolution=128", "--steps", "1", "--run-dir", str(tmp_path / "e")]) == 2
    assert "use --preset ffhq --resolution 128" in capsys.readouterr().err
    # Photos of mixed sizes, or of one size that is not a power of two, are cropped and resized on the fly.
    odd = _folder(tmp_path / "odd", 3, 100)
    assert resolve_config(get_train_preset("ffhq").replace(data=str(odd), resolution=64)).resolution == 64
    assert resolve_config(get_train_preset("ffhq").replace(data=str(mixed), resolution=32)).resolution == 32


# ---- fine-tuning ----------------------------------------------------------------------------------


def test_init_from_a_run_starts_from_its_weights(reference_run, tmp_path):
    run = tmp_path / "ft"
    cli("--init", str(reference_run), "--data", "demo", *MICRO[4:], "--steps", "3", "--run-dir", str(run))
    # The first grid is the source's G_ema, pixel for pixel (same seeds, same grid as its last one).
    assert np.array_equal(_grid(run / "fakes_000000000.png"), _grid(reference_run / "fakes_000000020.png"))
    config = json.loads((run / "config.json").read_text())
    source = latest_checkpoint(reference_run / "checkpoints") / "model.safetensors"
    assert config["init"] == str(source.resolve()) and len(config["init_sha256"]) == 64
    meta = json.loads((latest_checkpoint(run / "checkpoints") / "train_state.json").read_text())
    assert meta["step"] == 3 and meta["images"] == 12  # counters start fresh
    # No preset is claimed for a model that came from --init (the source and its digest say where it came from).
    assert config["preset"] is None and config["init_preset"] is None
    log = (run / "log.txt").read_text()
    assert "fine-tuning from" in log and f"model from {source.resolve()}" in log and "preset ffhq" not in log
    cli("--resume", str(run), "--steps", "4")  # and such a run resumes from its config.json
    assert json.loads((latest_checkpoint(run / "checkpoints") / "train_state.json").read_text())["step"] == 4


def test_freeze_d_keeps_the_first_blocks_bitwise(reference_run, tmp_path):
    run = tmp_path / "ft"
    cli("--init", str(reference_run), "--data", "demo", *MICRO[4:], "--steps", "3", "--freeze-d", "1", "--run-dir", str(run))
    _, before = read_model_file(latest_checkpoint(reference_run / "checkpoints") / "model.safetensors")
    _, after = read_model_file(latest_checkpoint(run / "checkpoints") / "model.safetensors")
    frozen = [k for k in before["d"] if k.startswith(("from_rgbs.0.", "convs.0."))]
    trained = [k for k in before["d"] if k.startswith("final_linear") and "original" in k]
    assert frozen and trained
    assert all(torch.equal(before["d"][k], after["d"][k]) for k in frozen)  # weights and spectral-norm vectors
    assert not any(torch.equal(before["d"][k], after["d"][k]) for k in trained)


def test_init_from_an_official_checkpoint_starts_from_what_it_generates(official_dir, official_tag, tmp_path):
    ckpt, meta = official_dir / f"{official_tag}_checkpoint.pt", official_dir / f"{official_tag}_meta.json"
    run = tmp_path / "ft"
    cli("--init", str(ckpt), "--meta", str(meta), "--data", "demo", *SMALL, "--steps", "1", "--set", "bcr_real=0",
        "--set", "bcr_fake=0", "--run-dir", str(run))
    g = resolve_model(ckpt, meta=meta, device="cpu")
    expected = generate(g, range(4), batch=4)  # the grid's seeds 0..3, row-major in a 2x2 grid
    s = g.resolution
    grid = _grid(run / "fakes_000000000.png")
    cells = np.stack([grid[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(2) for c in range(2)])
    assert np.array_equal(cells, expected.permute(0, 2, 3, 1).numpy())  # the same weights, the same math: exact
    assert json.loads((run / "config.json").read_text())["init_meta"]["size"] == s
    # What a fine-tuning run loads is what the official code computes: the parity fixture's outputs.
    fixture = official_dir / f"{official_tag}_expected.pt"
    if fixture.is_file():
        e = torch.load(fixture, weights_only=True)
        config = get_train_preset("ffhq").replace(preset=None, init=str(ckpt), init_meta=json.loads(meta.read_text()))
        _, modules = _load_init(config)
        with torch.no_grad():
            image = modules["g_ema"](e["z"])
            assert ((image - e["image"]).norm() / e["image"].norm()).item() < 1e-4
            if "d" in modules:
                logits = modules["d"](e["d_input"])
                assert ((logits - e["d_logits"]).norm() / e["d_logits"].norm()).item() < 1e-4


def test_init_without_a_discriminator_and_override_conflicts(reference_run, tmp_path, capsys):
    _, states = read_model_file(latest_checkpoint(reference_run / "checkpoints") / "model.safetensors")
    g = resolve_model(reference_run, device="cpu")
    path = save_model(tmp_path / "g_only.safetensors", {"g_ema": g}, g.config)
    cli("--init", str(path), "--data", "demo", *MICRO[4:], "--steps", "1", "--run-dir", str(tmp_path / "ok"))
    assert "D starts fresh" in (tmp_path / "ok" / "log.txt").read_text()
    assert main(["train", "--init", str(path), "--generator", "style_dim=32", "--steps", "1", "--run-dir", str(tmp_path / "x")]) == 2
    assert "its config cannot be changed (--generator style_dim)" in capsys.readouterr().err
    data = _folder(tmp_path / "d32", 4, 32)
    assert main(["train", "--init", str(path), "--data", str(data), "--steps", "1", "--run-dir", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    # Advice that fits fine-tuning: the model keeps its size, so the data must be prepared at it.
    assert "holds 32x32 images but the model is 16x16" in err and "prepare the data at 16" in err
    assert "--resolution" not in err and "--preset" not in err
    # FreezeD would keep a fresh D's random blocks: refused.
    assert main(["train", "--init", str(path), "--freeze-d", "1", "--steps", "1", "--run-dir", str(tmp_path / "z")]) == 2
    assert "holds no discriminator" in capsys.readouterr().err


def _stand_in(g_cfg, d_cfg=None) -> dict:
    """What resolve_config reads of the modules an --init model gives: their configs."""
    from types import SimpleNamespace

    return {"g_ema": SimpleNamespace(config=g_cfg), **({"d": SimpleNamespace(config=d_cfg)} if d_cfg else {})}


def test_init_keeps_the_models_size_and_preset(reference_run, tmp_path, capsys):
    d16 = _folder(tmp_path / "d16", 4, 16)
    run = ["--init", str(reference_run), "--data", str(d16), "--steps", "1"]
    # The audit's case: a 16px model, 16px data, --resolution 32 ran at 16 and exited 0.
    assert main(["train", *run, "--resolution", "32", "--run-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resolution 32" in err and "is 16x16" in err and "keeps its size" in err and "\n" not in err
    assert not (tmp_path / "a").exists()
    # A preset that does not describe the model is refused too (it would be recorded as the model's).
    assert main(["train", *run, "--preset", "tiny", "--run-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--preset tiny does not describe the model" in err and "drop --preset" in err and "\n" not in err

    g16, d16_cfg = get_preset("ffhq", 16)
    init = _stand_in(g16, d16_cfg)
    base = get_train_preset("ffhq").replace(data=str(d16), init="model.safetensors")
    for ok in ({"preset": None}, {"preset": "ffhq"}, {"preset": None, "resolution": 16}, {"preset": "ffhq", "resolution": 16}):
        cfg = resolve_config(base.replace(**ok), init)
        assert cfg.resolution == 16 and cfg.generator == g16.to_dict() and cfg.preset == ok["preset"]
    for preset in ("ffhq256", "church", "tiny"):
        with pytest.raises(ConfigError, match=f"--preset {preset} does not describe the model"):
            resolve_config(base.replace(preset=preset), init)
    with pytest.raises(ConfigError, match="--resolution 32: the model from --init model.safetensors is 16x16"):
        resolve_config(base.replace(preset="ffhq", resolution=32), init)
    # A model without a discriminator gets the preset's when one is named (else the official one).
    tiny_g, tiny_d = get_preset("tiny")
    tiny_data = _folder(tmp_path / "d32", 4, 32)
    fresh = resolve_config(base.replace(data=str(tiny_data), preset="tiny"), _stand_in(tiny_g))
    assert fresh.discriminator == tiny_d.to_dict()
    # A conditional model's classes are no conflict with a preset (presets have none).
    labelled = g16.replace(num_classes=2, class_names=("a", "b"))
    with pytest.raises(ConfigError, match="the model has 2 classes"):  # the data's classes are checked as before
        resolve_config(base.replace(preset="ffhq"), _stand_in(labelled, d16_cfg.replace(num_classes=2)))


def test_freeze_d_needs_a_model_to_start_from(tmp_path, capsys):
    with pytest.raises(ConfigError, match="without --init they start random"):
        resolve_config(get_train_preset("tiny").replace(freeze_d=1))
    assert main(["train", "--preset", "tiny", "--freeze-d", "1", "--steps", "1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "add --init MODEL" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_family_preset_for_an_official_checkpoint(official_dir, official_tag, tmp_path, capsys):
    base = get_train_preset("ffhq").replace(init="x.pt", init_preset="ffhq")
    # Sized by --resolution or by the data, a family names its released preset ...
    assert _official_init_preset(base.replace(resolution=256)) == "ffhq256"
    assert _official_init_preset(base.replace(init_preset="church", resolution=256)) == "church256"
    data = _folder(tmp_path / "d1024", 1, 1024)
    assert _official_init_preset(base.replace(data=str(data))) == "ffhq1024"
    assert _official_init_preset(base.replace(init_preset="ffhq256")) == "ffhq256"  # a named one is used as given
    # ... and where there is none, the advice is what works for an official checkpoint: --meta.
    with pytest.raises(ConfigError, match=r"no named ffhq preset at 128x128.*--meta META.json|--meta META.json.*128x128"):
        _official_init_preset(base.replace(resolution=128))
    ckpt = official_dir / f"{official_tag}_checkpoint.pt"
    assert main(["train", "--init", str(ckpt), "--preset", "ffhq", "--data", "demo", "--steps", "1",
                 "--run-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "named preset it was trained with (ffhq256, ffhq1024) or --meta META.json" in err and "size is not known" in err
    # generate has no --resolution: its advice names what it does have.
    assert main(["generate", str(ckpt), "--preset", "ffhq", "--seeds", "0", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "named preset (ffhq256, ffhq1024)" in err and "--meta META.json" in err and "--resolution" not in err
    # --meta only describes official checkpoints.
    g = resolve_model(official_dir / f"{official_tag}_checkpoint.pt", meta=official_dir / f"{official_tag}_meta.json", device="cpu")
    model = save_model(tmp_path / "m.safetensors", {"g_ema": g}, g.config)
    assert main(["train", "--init", str(model), "--meta", str(official_dir / f"{official_tag}_meta.json"),
                 "--steps", "1", "--run-dir", str(tmp_path / "b")]) == 2
    assert "is a stylenat model with its own configuration: drop --meta" in capsys.readouterr().err


def test_a_restarted_fine_tuning_run_checks_its_source(reference_run, tmp_path, capsys):
    g = resolve_model(reference_run, device="cpu")
    path = save_model(tmp_path / "g.safetensors", {"g_ema": g}, g.config)
    cli("--init", str(path), "--data", "demo", *MICRO[4:], "--steps", "1", "--run-dir", str(tmp_path / "run"))
    for ckpt in (tmp_path / "run" / "checkpoints").iterdir():  # as if killed before its first checkpoint
        shutil.rmtree(ckpt)
    save_model(path, {"g_ema": g, "g": copy.deepcopy(g)}, g.config)  # the source file changed meanwhile
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "changed since this run started from it" in capsys.readouterr().err


# ---- augmentation keeps resume exact --------------------------------------------------------------


@pytest.mark.parametrize("aug", [["--aug", "ada", "--set", "ada_interval=2", "--set", "ada_kimg=0.05"],
                                 ["--aug", "ada", "--aug-p", "0.6"], ["--aug", "diffaug"]],
                         ids=["ada", "ada-fixed-p", "diffaug"])
def test_resume_with_augmentation_is_bitwise_exact(tmp_path, aug):
    common = [*MICRO, "--checkpoint-every", "5", "--seed", "7", *aug]
    cli(*common, "--steps", "12", "--run-dir", str(tmp_path / "full"))
    cli(*common, "--steps", "7", "--run-dir", str(tmp_path / "part"))
    cli("--resume", str(tmp_path / "part"), "--steps", "12")
    assert_bitwise_equal(final_state(tmp_path / "part"), final_state(tmp_path / "full"))
    if "ada_interval=2" in aug:
        meta = json.loads((latest_checkpoint(tmp_path / "full" / "checkpoints") / "train_state.json").read_text())
        assert 0 < meta["components"]["ada"]["p"] <= 1  # p moved, and is in the checkpoint
        stats = [json.loads(line) for line in (tmp_path / "full" / "stats.jsonl").read_text().splitlines()]
        assert all("aug_p" in s and -1 <= s["r_t"] <= 1 for s in stats)
