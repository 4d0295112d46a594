"""Class-conditional training on labelled data: on by default, off with --cond false, grids by class,
exact resume, and sampling a chosen class from the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylenat.cli import main
from stylenat.data import open_dataset, prepare_dataset
from stylenat.models import resolve_model
from stylenat.models.io import latest_checkpoint, read_model_file
from stylenat.sampling import generate
from tests.train.helpers import MICRO, assert_bitwise_equal, cli, final_state

CLASSES = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """16x16 images in three class folders, each class a different colour (8 each)."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        for i in range(8):
            image = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            image[..., 2 - k] += 180
            (root / "src" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "src" / name / f"{i}.png")
    prepare_dataset(root / "src", root / "data.zip", 16, labels="folders", progress=False)
    return root / "data.zip"


def _args(data: Path, steps: int, *extra: str) -> list[str]:
    return [*MICRO[:2], "--data", str(data), *MICRO[4:], "--steps", str(steps), "--checkpoint-every", "4", "--seed", "3",
            "--set", "grid=[3,2]", *extra]


@pytest.fixture(scope="module")
def conditional_run(labelled, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cond") / "run"
    cli(*_args(labelled, 8), "--run-dir", str(run))
    return run


def test_labelled_data_trains_a_conditional_model(conditional_run):
    config = json.loads((conditional_run / "config.json").read_text())
    assert config["generator"]["num_classes"] == 3 and config["generator"]["class_names"] == CLASSES
    assert config["discriminator"]["num_classes"] == 3
    meta, states = read_model_file(latest_checkpoint(conditional_run / "checkpoints") / "model.safetensors")
    assert json.loads(json.dumps(meta["g_config"]))["class_names"] == CLASSES
    assert "class_embed.parametrizations.weight.original" in states["d"]
    g = resolve_model(conditional_run, device="cpu")
    assert g.mapping.class_w_avg.abs().sum() > 0  # computed with the checkpoint


def test_grids_have_one_row_per_class(conditional_run, labelled):
    reals = np.asarray(Image.open(conditional_run / "reals.png"))
    ds = open_dataset(labelled, 16)
    for k in range(3):
        row = reals[16 * k:16 * (k + 1)]
        first = next(image for image, label in ds if label == k)
        assert np.array_equal(row[:, :16], first.permute(1, 2, 0).numpy())
    g = resolve_model(conditional_run, device="cpu")
    fakes = np.asarray(Image.open(conditional_run / "fakes_000000008.png"))
    expected = generate(g, [2, 3], labels="green")  # row 1: class 1, cells 2 and 3 of the grid
    assert np.abs(fakes[16:32].astype(int) - np.concatenate(list(expected.permute(0, 2, 3, 1).numpy()), axis=1)).max() <= 1


def test_resume_of_a_conditional_run_is_bitwise_exact(conditional_run, labelled, tmp_path):
    cli(*_args(labelled, 5), "--run-dir", str(tmp_path / "part"))
    cli("--resume", str(tmp_path / "part"), "--steps", "8")
    assert_bitwise_equal(final_state(tmp_path / "part"), final_state(conditional_run))


def test_cond_false_ignores_labels(labelled, tmp_path):
    cli(*_args(labelled, 2), "--cond", "false", "--run-dir", str(tmp_path / "run"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["generator"]["num_classes"] == 0 and config["cond"] is False
    cli("--resume", str(tmp_path / "run"), "--steps", "3")  # and stays unconditional when resumed


def test_cond_true_without_labels_and_unconditional_init_on_labels(labelled, conditional_run, tmp_path, capsys):
    assert main(["train", *MICRO, "--steps", "1", "--cond", "true", "--run-dir", str(tmp_path / "a")]) == 2
    assert "has no labels" in capsys.readouterr().err
    plain = tmp_path / "plain"
    cli(*MICRO, "--steps", "1", "--run-dir", str(plain))
    assert main(["train", "--init", str(plain), "--data", str(labelled), *MICRO[4:], "--steps", "1",
                 "--run-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "the model has 0 classes" in err and "--cond false" in err


def test_cli_generate_by_class(conditional_run, tmp_path, capsys):
    assert main(["generate", str(conditional_run), "--seeds", "0-1", "--class", "red", "--out", str(tmp_path / "a")]) == 0
    g = resolve_model(conditional_run, device="cpu")
    expected = generate(g, [1], labels=2)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "seed0001.png")), expected)
    assert main(["generate", str(conditional_run), "--seeds", "0-3", "--classes", "--out", str(tmp_path / "b")]) == 0
    grid = np.asarray(Image.open(tmp_path / "b" / "grid.png"))
    assert grid.shape == (3 * 16, 4 * 16, 3) and (tmp_path / "b" / "seed0003-green.png").exists()
    assert main(["generate", str(conditional_run), "--seeds", "0", "--out", str(tmp_path / "c")]) == 2
    assert "choose a class" in capsys.readouterr().err
    assert main(["generate", str(conditional_run), "--seeds", "0", "--class", "purple", "--out", str(tmp_path / "c")]) == 2
    assert "unknown class 'purple'" in capsys.readouterr().err


def test_metrics_per_class(conditional_run, labelled, capsys, tmp_path):
    from stylenat.metrics.registry import measure

    values = measure(resolve_model(conditional_run, device="cpu"), labelled, ["swd8"], per_class=True, progress=False)
    assert {f"swd8/{name}" for name in CLASSES} <= values.keys()
    assert values["num_real_swd8/red"] == 8 and values["num_fake_swd8/red"] == 8
    # A labelled image set against itself, class by class: exactly 0.
    itself = measure(labelled, labelled, ["swd8"], resolution=16, per_class=True, progress=False)
    assert all(itself[f"swd8/{name}"] == 0 for name in CLASSES)
    assert main(["metrics", str(conditional_run), str(labelled), "--metrics", "swd8", "--per-class",
                 "--out", str(tmp_path / "m.json")]) == 0
    assert "swd8/green " in capsys.readouterr().out
