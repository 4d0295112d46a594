"""`stylenat train`'s options are made from TrainConfig's fields: one per field, help from the
field's docstring, values read by the field's type (stylenat.train.flags)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from stylenat._config import field_docs
from stylenat.cli import main
from stylenat.train.flags import TRAIN_FIELDS_WITHOUT_FLAG, TRAIN_FLAGS_BY_HAND, add_train_arguments, train_flag_fields
from stylenat.train import TrainConfig, get_train_preset

ROOT = Path(__file__).resolve().parents[1]
FIELDS = dataclasses.fields(TrainConfig)


def _options() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return {o: a for a in parser._actions for o in a.option_strings}


def test_every_field_has_its_flag_but_the_internal_ones():
    options = _options()
    flagged = {f.name for f in train_flag_fields()}
    assert flagged | set(TRAIN_FLAGS_BY_HAND) | set(TRAIN_FIELDS_WITHOUT_FLAG) == {f.name for f in FIELDS}
    assert not flagged & (set(TRAIN_FLAGS_BY_HAND) | set(TRAIN_FIELDS_WITHOUT_FLAG))
    for f in FIELDS:
        flag = "--" + f.name.replace("_", "-")
        if f.name in TRAIN_FIELDS_WITHOUT_FLAG:
            assert flag not in options, f"{f.name} is internal but has {flag}"
        else:
            assert options[flag].dest == f.name


def test_help_is_the_field_docstring_and_its_range():
    options = _options()
    # the docstring reader, against one field's source text written out
    assert field_docs(TrainConfig)["keep"] == "Checkpoints kept; older ones are deleted after a newer one is safely written."
    for f in train_flag_fields():
        doc = field_docs(TrainConfig)[f.name]
        assert doc, f"TrainConfig.{f.name} has no docstring"
        doc = doc.replace("``", "")  # reST literals read plainly in a terminal
        help = options["--" + f.name.replace("_", "-")].help.replace("%%", "%")
        if f.metadata:
            assert help.startswith(doc + " [") and help.endswith("]"), help
            for key, sign in (("min", ">="), ("max", "<="), ("gt", ">")):
                if key in f.metadata:
                    assert f"{sign} {f.metadata[key]}" in help[len(doc):]
        else:
            assert help == doc


@pytest.fixture
def trained(monkeypatch):
    """The TrainConfig `stylenat train` would run with (train() replaced: nothing trains)."""
    configs = []
    monkeypatch.setattr("stylenat.train.train", configs.append)

    def run(*argv: str) -> TrainConfig:
        assert main(["train", *argv]) == 0
        return configs.pop()
    return run


def test_flags_are_read_by_the_field_types(trained, tmp_path):
    cfg = trained("--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--steps", "1e3", "--batch", "4",
                  "--accum", "2", "--checkpoint-every", "5", "--sample-every", "6", "--tick-every", "7", "--keep", "9",
                  "--device", "cpu", "--amp", "bf16", "--workers", "1", "--on-nonfinite", "skip",
                  "--metrics", "fid10k,kid10k", "--metrics-every", "8", "--inception", "w.pth",
                  "--checkpoint-minutes", "0.5", "--deterministic", "--resolution", "32", "--freeze-d", "1",
                  "--aug", "ada", "--aug-p", "0.25", "--data", "demo", "--seed", "3", "--cond", "false",
                  "--betas", "0.1, 0.9", "--grid", "2 3", "--lr-decay-start", "null", "--d-clip", "none",
                  "--no-xflip", "--d-lr", "3e-4", "--ema-half-life", "50")
    assert (cfg.steps, cfg.batch, cfg.accum, cfg.checkpoint_every, cfg.sample_every, cfg.tick_every, cfg.keep) == \
        (1000, 4, 2, 5, 6, 7, 9)
    assert type(cfg.steps) is int and type(cfg.d_lr) is float and type(cfg.ema_half_life) is float
    assert (cfg.device, cfg.amp, cfg.workers, cfg.on_nonfinite, cfg.inception) == ("cpu", "bf16", 1, "skip", "w.pth")
    assert cfg.metrics == ("fid10k", "kid10k") and cfg.metrics_every == 8 and cfg.checkpoint_minutes == 0.5
    assert (cfg.deterministic, cfg.resolution, cfg.freeze_d, cfg.aug, cfg.aug_p) == (True, 32, 1, "ada", 0.25)
    assert (cfg.seed, cfg.cond, cfg.betas, cfg.grid) == (3, False, (0.1, 0.9), (2, 3))
    assert cfg.lr_decay_start is None and cfg.d_clip is None and cfg.xflip is False
    assert cfg.d_lr == 3e-4 and cfg.ema_half_life == 50.0
    # unset options keep the preset's values
    tiny = get_train_preset("tiny")
    assert (cfg.r1_gamma, cfg.r1_interval, cfg.bcr_real, cfg.g_lr) == (tiny.r1_gamma, tiny.r1_interval, tiny.bcr_real, tiny.g_lr)


def test_special_flags_and_precedence(trained, tmp_path):
    run = ("--run-dir", str(tmp_path / "r"))
    cfg = trained(*run, "--set", "steps=5", "--set", "r1_gamma=2", "--steps", "7", "--cond", "true",
                  "--generator", "style_dim=32", "--discriminator", "mbstd_group=2")
    assert (cfg.steps, cfg.r1_gamma, cfg.cond, cfg.preset) == (7, 2.0, True, "ffhq")  # the flag wins over --set
    assert cfg.generator == {"style_dim": 32} and cfg.discriminator == {"mbstd_group": 2}
    cfg = trained(*run, "--init", "ckpt.pt", "--preset", "ffhq256")
    assert (cfg.init, cfg.init_preset, cfg.preset, cfg.init_meta) == ("ckpt.pt", "ffhq256", "ffhq256", None)
    cfg = trained(*run, "--init", "runs/a")
    assert (cfg.preset, cfg.init_preset) == (None, None)
    (tmp_path / "meta.json").write_text(json.dumps({"size": 32}))
    cfg = trained(*run, "--init", "ckpt.pt", "--meta", str(tmp_path / "meta.json"))
    assert (cfg.init_meta, cfg.init_preset) == ({"size": 32}, None)
    assert trained(*run, "--preset", "tiny", "--metrics", "").metrics == ()


@pytest.mark.parametrize("argv, says", [
    (["--steps", "abc"], "--steps: cannot read 'abc'; give an integer"),
    (["--steps", "2.5"], "--steps: cannot read '2.5'; give an integer"),
    (["--aug", "mixup"], "--aug: cannot read 'mixup'; give one of 'none', 'ada', 'diffaug'"),
    (["--amp", "fp16"], "--amp: cannot read 'fp16'; give one of 'bf16' or null"),
    (["--grid", "1,2,3"], "--grid: cannot read '1,2,3'; give a list of 2 integers"),
    (["--d-lr", "nan"], "--d-lr: cannot read 'nan'; give a number"),
    (["--cond", "maybe"], "--cond: cannot read 'maybe'; give true or false or null"),
    (["--steps", "0"], "TrainConfig.steps must be >= 1, got 0"),
])
def test_a_bad_value_is_one_line(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.setattr("stylenat.train.train", lambda cfg: pytest.fail("should not train"))
    assert main(["train", "--preset", "tiny", *argv, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"stylenat train: error: {says}"


def test_the_docs_table_is_the_generated_one():
    page = ROOT / "docs" / "training.md"
    updated = runpy.run_path(str(ROOT / "docs" / "gen_train_flags.py"))["updated"]
    assert updated(page.read_text()) == page.read_text(), "the table is stale: run python docs/gen_train_flags.py"


def test_the_parser_does_not_import_torch():
    # `stylenat --help`, `models` and `download` need no TrainConfig: its import brings torch
    code = "import sys; from stylenat.cli import build_parser; build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
