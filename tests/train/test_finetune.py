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
from stylenat.models import get_preset, resolve_model, save_model
from stylenat.models.io import latest_checkpoint, read_model_file
from stylenat.sampling import generate
from stylenat.train import get_train_preset
from stylenat.train.loop import resolve_config
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
    assert "differ in size or are not square" in capsys.readouterr().err
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
    assert "fine-tuning from" in (run / "log.txt").read_text()


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
    assert np.abs(cells.astype(int) - expected.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1  # rounding of equal math
    assert json.loads((run / "config.json").read_text())["init_meta"]["size"] == s


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
    assert "holds 32x32 images but the model is 16x16" in capsys.readouterr().err


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
