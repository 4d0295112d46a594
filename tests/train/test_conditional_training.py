"""Class-conditional training on labelled data: on by default, off with --cond false, grids by class,
exact resume, which labels reach D, and sampling (generate, mix, video) and per-class metrics of a
chosen class from the trained model."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
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
            "--set", "grid=[4,2]", *extra]  # more grid rows than classes


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


def test_the_log_says_the_run_is_conditional(conditional_run, tmp_path):
    log = (conditional_run / "log.txt").read_text()
    assert "class-conditional: 3 classes (blue, green, red)" in log


def test_grids_have_one_row_per_class(conditional_run, labelled):
    reals = np.asarray(Image.open(conditional_run / "reals.png"))
    assert reals.shape == (3 * 16, 2 * 16, 3)  # 4 grid rows, 3 classes: each class once
    assert np.asarray(Image.open(conditional_run / "fakes_000000008.png")).shape == (3 * 16, 2 * 16, 3)
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


# ---- which labels reach D (in process, with spies on G and D) -------------------------------------

SKEWED = [0] * 9 + [2] * 3  # dataset.json class indices: class 1 has no images, class 0 three times class 2


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> Path:
    """12 distinct 16x16 noise images labelled by SKEWED in StyleGAN's dataset.json, prepared."""
    root = tmp_path_factory.mktemp("skewed")
    rng = np.random.default_rng(1)
    for i in range(len(SKEWED)):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    (root / "dataset.json").write_text(json.dumps({"labels": [[f"{i:02d}.png", k] for i, k in enumerate(SKEWED)]}))
    prepare_dataset(root, root / "data.zip", 16, progress=False)
    return root / "data.zip"


def _trainer(data: Path, run_dir: Path, **fields):
    """A conditional micro run's trainer, built in this process (MICRO's model) without running it."""
    from stylenat.train import get_train_preset
    from stylenat.train.loop import _Trainer, resolve_config

    generator = {"resolution": 16, "channels": [16, 16, 16], "heads": [2, 2, 2], "kernels": [[4], [5], [5]],
                 "dilations": [[1], [1], [1]], "style_dim": 16, "n_mlp": 1}
    config = get_train_preset("tiny").replace(data=str(data), run_dir=str(run_dir), device="cpu", batch=4, seed=3,
                                              r1_interval=1, grid=(4, 2), generator=generator,
                                              discriminator={"resolution": 16, "channels": [16, 16, 16]}, **fields)
    return _Trainer(resolve_config(config), resume=False)


def test_reals_reach_d_with_their_own_labels_and_fakes_with_those_g_drew(skewed, tmp_path):
    from stylenat.models import uint8_to_model

    trainer = _trainer(skewed, tmp_path / "run")
    # The truth, independent of the loop: every image as the model sees it, and the label written for it.
    reals = uint8_to_model(torch.stack(list(open_dataset(skewed, 16, labels=False))), trainer.g_cfg)
    reals, truth = torch.cat([reals, reals.flip(-1)]), torch.tensor(SKEWED * 2)  # xflip: a mirror keeps its label
    made, seen = [], []  # (G's images, the labels G got); (images, labels) of every D call
    g_forward, d_forward = trainer.G.forward, trainer.D.forward

    def g_spy(z, *args, c=None, **kwargs):
        out = g_forward(z, *args, c=c, **kwargs)
        made.append((out.detach().clone(), c.clone()))
        return out

    def d_spy(x, c=None):
        seen.append((x.detach().clone(), c.clone()))
        return d_forward(x, c)

    trainer.G.forward, trainer.D.forward = g_spy, d_spy
    try:
        for _ in range(4):
            real_batches, _ = trainer._d_step()
            trainer._r1_step(real_batches)
            trainer._g_step()
    finally:
        trainer.log.close()
    real_labels, fake_calls = [], 0
    for x, c in seen:
        where = [(image == reals).flatten(1).all(1).nonzero().flatten() for image in x]
        if all(len(w) == 1 for w in where):  # a batch of real images: each must come with its own label
            assert torch.equal(c, truth[torch.cat(where)])
            real_labels += c.tolist()
        else:  # fakes: the very images G made, with the labels G made them for
            assert sum(torch.equal(x, out) for out, _ in made) == 1
            assert torch.equal(c, next(labels for out, labels in made if torch.equal(x, out)))
            fake_calls += 1
    assert len(real_labels) == 4 * 2 * 4 and fake_calls == 4 * 2  # D step + R1 on reals; D step + G step on fakes
    assert set(real_labels) == {0, 2}  # both classes came by, so a wrong label cannot go unnoticed


def test_fakes_draw_their_classes_in_the_data_proportions(skewed, tmp_path):
    trainer = _trainer(skewed, tmp_path / "run")
    trainer.log.close()
    from stylenat.train.draws import StepDraws

    labels = torch.cat([trainer._latents(StepDraws.for_micro_batch(3, (step, "g"), 4, 0, 1, 0, 1))[1] for step in range(1000)])
    n, counts = len(labels), torch.bincount(labels, minlength=3).tolist()
    assert n == 4000 and counts[1] == 0  # the class without images never comes up
    for k in (0, 2):
        p = SKEWED.count(k) / len(SKEWED)
        assert abs(counts[k] - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (k, counts)  # binomial, 5 sigma


def test_many_classes_log_and_grid_the_first_ones(tmp_path):
    names = [f"c{k:02d}" for k in range(12)]
    for k, name in enumerate(names):
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), 20 * k, np.uint8)).save(tmp_path / "src" / name / "x.png")
    prepare_dataset(tmp_path / "src", tmp_path / "data", 16, labels="folders", progress=False)
    trainer = _trainer(tmp_path / "data", tmp_path / "run", steps=1)
    trainer.run()
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "class-conditional: 12 classes (c00, c01, c02, c03, c04, c05, c06, c07, c08, c09, ... (2 more))" in log
    reals = np.asarray(Image.open(tmp_path / "run" / "reals.png"))
    assert reals.shape == (4 * 16, 2 * 16, 3)  # the grid's 4 rows: the first 4 classes, one image each
    assert [int(reals[16 * r, 0, 0]) for r in range(4)] == [0, 20, 40, 60] and reals[:, 16:].max() == 0


# ---- sampling a class: mix and video --------------------------------------------------------------


def _cell(grid: np.ndarray, r: int, c: int, size: int = 16) -> np.ndarray:
    return grid[r * size:(r + 1) * size, c * size:(c + 1) * size]


def test_cli_mix_by_class(conditional_run, tmp_path):
    from stylenat.models import model_to_uint8, seeds_to_z

    assert main(["mix", str(conditional_run), "--rows", "0-1", "--cols", "5", "--layers", "0-1", "--class", "red",
                 "--out", str(tmp_path / "mix.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "mix.png"))
    g = resolve_model(conditional_run, device="cpu")
    # Independently: w of each seed from the mapping with class 2, ws 0-1 from the column seed.
    with torch.no_grad():
        w = g.mapping(seeds_to_z([0, 1, 5], g.style_dim), c=torch.full((3,), 2))
        ws = w[:2, None].repeat(1, g.num_ws, 1)
        ws[:, :2] = w[2]
        mixed = model_to_uint8(g.synthesis(ws), g.config).permute(0, 2, 3, 1).numpy()
    own = generate(g, [0, 1, 5], labels=2).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(_cell(grid, 0, 1), own[2]) and np.array_equal(_cell(grid, 1, 0), own[0])
    assert np.array_equal(_cell(grid, 2, 0), own[1])
    assert np.array_equal(_cell(grid, 1, 1), mixed[0]) and np.array_equal(_cell(grid, 2, 1), mixed[1])
    assert not np.array_equal(own[2], generate(g, [5], labels=0)[0].permute(1, 2, 0).numpy())  # the class matters


def test_cli_video_by_class(conditional_run, tmp_path):
    from stylenat.sampling import save_video

    g = resolve_model(conditional_run, device="cpu")
    for cls, index in (("red", 2), ("0", 0)):
        out = tmp_path / f"{cls}.gif"
        assert main(["video", str(conditional_run), "--seeds", "0-2", "--frames", "1", "--no-loop", "--class", cls,
                     "--out", str(out)]) == 0
        # One frame per seed and no loop: the frames are the seeds' images of that class, as generate makes them.
        expected = save_video(generate(g, [0, 1, 2], labels=index), tmp_path / f"expected_{cls}.gif", loop=False)
        assert out.read_bytes() == expected.read_bytes()
    assert (tmp_path / "red.gif").read_bytes() != (tmp_path / "0.gif").read_bytes()


# ---- per-class metrics and the errors of the class options -----------------------------------------


def test_per_class_swd_of_a_generator_against_a_direct_computation(conditional_run, labelled):
    from stylenat.metrics.registry import measure
    from stylenat.metrics.swd import swd_from_images

    g = resolve_model(conditional_run, device="cpu")
    values = measure(g, labelled, ["swd8"], per_class=True, progress=False)
    with zipfile.ZipFile(labelled) as z:  # the real images of each class, read straight from the prepared zip
        meta = json.loads(z.read("dataset.json"))
        real = [np.asarray(Image.open(z.open(f"{i:08d}.png"))) for i in range(meta["count"])]
    for k, name in enumerate(CLASSES):
        real_k = torch.from_numpy(np.stack([im for im, label in zip(real, meta["labels"]) if label == k])).permute(0, 3, 1, 2)
        direct = swd_from_images(generate(g, range(8), labels=k), real_k)  # seeds 0-7 of class k
        assert values[f"swd8/{name}"] == pytest.approx(direct["swd_avg"], rel=1e-6, abs=1e-9)
        assert values[f"swd8_16/{name}"] == pytest.approx(direct["swd_16"], rel=1e-6, abs=1e-9)
    assert len({round(values[f"swd8/{name}"], 6) for name in CLASSES}) == 3


def test_class_options_that_do_not_fit(conditional_run, labelled, tmp_path, capsys):
    from stylenat.models import build_generator, save_model

    assert main(["generate", str(conditional_run), "--seeds", "0", "--classes", "--class", "red",
                 "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--classes makes one row for every class; drop --class" in err
    plain = save_model(tmp_path / "plain.safetensors", {"g_ema": build_generator("tiny")}, build_generator("tiny").config)
    assert main(["metrics", str(plain), str(labelled), "--metrics", "swd8", "--per-class", "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the model is unconditional" in err
    assert main(["generate", str(plain), "--seeds", "0", "--class", "1", "--out", str(tmp_path / "b")]) == 2
    assert "this model is unconditional" in capsys.readouterr().err
