"""Training at W != H: a 32x16 family model through the real CLI with ADA (geometric transforms
included) and bCR, resumed bitwise; the size read from the data and refused when it differs; ADA's
quarter turns on a rectangle; the size options."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.cli import main
from stylenat.train.ada import AugmentParams, AugmentPipe
from stylenat.train.config import TrainConfig
from stylenat.train.flags import add_train_arguments, config_from_args
from stylenat.train.setup import resolve_config

from .helpers import assert_bitwise_equal, cli, final_state

W, H = 32, 16
NARROW = ["--preset", "ffhq", "--cbase", "512", "--cmax", "32", "--batch", "4", "--tick-every", "2",
          "--sample-every", "100", "--set", "grid=[2,2]", "--set", "r1_interval=2", "--aug", "ada", "--aug-p", "0.6",
          "--bcr-real", "10", "--bcr-fake", "10", "--seed", "5"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """12 images of 32x16: a left and a right half of different colours (the layout a square can't hold)."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i in range(12):
        a = np.zeros((H, W, 3), np.uint8)
        a[:, : W // 2] = rng.integers(0, 256, 3)
        a[:, W // 2:] = rng.integers(0, 256, 3)
        a[4:12, 4:12] = 255 - a[4:12, 4:12]
        Image.fromarray(a).save(root / f"{i:02d}.png")
    return root


def test_rectangular_training_resumes_bitwise(pairs, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    out = cli(*NARROW, "--data", str(pairs), "--steps", "6", "--checkpoint-every", "3", "--run-dir", str(full)).stdout
    assert "at 32x16" in out and "params" in out
    cli(*NARROW, "--data", str(pairs), "--steps", "3", "--checkpoint-every", "3", "--run-dir", str(part))
    cli("--resume", str(part), "--steps", "6")
    assert_bitwise_equal(final_state(full), final_state(part))
    config = TrainConfig.load(full / "config.json")
    assert config.resolution == (H, W) and config.generator["resolution"] == [H, W]
    with Image.open(full / "reals.png") as grid:  # 2x2 cells of W x H
        assert grid.size == (2 * W, 2 * H)
    fakes = sorted(full.glob("fakes*.png"))
    assert fakes
    with Image.open(fakes[-1]) as grid:
        assert grid.size == (2 * W, 2 * H)


def test_the_data_sizes_the_model_and_size_errors_are_one_line(pairs, tmp_path, capsys):
    cases = ((["--resolution", "16x32"], "holds 32x16 images but the model is 16x32"),
             (["--resolution", "100x60"], "100x60 is not a model size"),
             (["--resolution", "32y16"], "cannot read '32y16'"),
             (["--cbase", "64"], "cbase 64 and cmax 32 give"),
             (["--preset", "tiny", "--cbase", "64"], "fixed width"))
    for i, (args, message) in enumerate(cases):
        assert main(["train", *NARROW, "--data", str(pairs), *args, "--steps", "1", "--run-dir", str(tmp_path / str(i))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / str(i)).exists()
    # Without --resolution the data's size (all images 32x16, an allowed size) is the model's.
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = resolve_config(config_from_args(parser.parse_args([*NARROW, "--data", str(pairs), "--run-dir", "x"])))
    assert config.resolution == (H, W) and config.generator["channels"] == [min(512 // (4 << i), 32) for i in range(4)]


def test_quarter_turns_on_a_rectangle_are_half_turns():
    pipe = AugmentPipe("none", rotate90=1)
    params = pipe.sample(512, H, W, 1.0, torch.Generator().manual_seed(0))
    assert set(params.rotate90.tolist()) == {0.0, 2.0}
    square = pipe.sample(512, W, W, 1.0, torch.Generator().manual_seed(0))
    assert set(square.rotate90.tolist()) == {0.0, 1.0, 2.0, 3.0}
    x = torch.randn(4, 3, H, W)
    out = pipe.apply(x, AugmentParams(rotate90=torch.tensor([0.0, 2.0, 2.0, 0.0], dtype=torch.float64)))
    assert torch.equal(out[1], torch.rot90(x[1], 2, dims=(-2, -1))) and torch.equal(out[0], x[0])


def test_full_ada_pipeline_keeps_the_shape_and_is_identity_at_p0():
    pipe = AugmentPipe("bgc")
    x = torch.randn(3, 3, H, W)
    assert pipe(x, 1.0, torch.Generator().manual_seed(1)).shape == (3, 3, H, W)
    assert torch.equal(pipe(x, 0.0, torch.Generator().manual_seed(1)), x)
