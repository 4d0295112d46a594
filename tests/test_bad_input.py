"""Bad input through the CLI: each is one line on stderr naming what is wrong and what to do, exit 2,
nothing lost; programming errors keep their traceback. docs/robustness.md lists every case with
the test that backs it (interruptions are in tests/train/test_interruptions.py)."""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.cli import main
from stylenat.models import build_discriminator, build_generator, save_model
from stylenat.train import get_train_preset


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"stylenat {command}: error: "), err
    return err


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    g, d = build_generator("tiny"), build_discriminator("tiny")
    return save_model(tmp_path_factory.mktemp("m") / "tiny.safetensors", {"g_ema": g, "d": d}, g.config, d.config)


# ---- model files -------------------------------------------------------------------------------


def test_truncated_model_file(model_file, tmp_path, capsys):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    assert main(["generate", str(bad), "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "not a readable stylenat model file" in _one_error_line(capsys, "generate")


def test_model_file_of_another_kind(tmp_path, capsys):
    bad = tmp_path / "notes.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{}" + b" " * 14)  # a valid, empty safetensors file
    assert main(["generate", str(bad), "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "not a stylenat model file" in _one_error_line(capsys, "generate")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    assert main(["generate", str(junk), "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "is not a model" in _one_error_line(capsys, "generate")


def test_model_file_whose_tensors_do_not_match_its_config(model_file, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(model_file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(model_file))
    tensors["g_ema.synthesis.const"] = torch.zeros(1, 2, 4, 4)
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata=meta)
    assert main(["generate", str(tmp_path / "t.safetensors"), "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "does not match its own config" in _one_error_line(capsys, "generate")


def test_missing_model(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in _one_error_line(capsys, "generate")


@pytest.mark.parametrize("command", ["convert-official", "train"])
def test_missing_or_broken_official_meta_file(tmp_path, capsys, command):
    """`convert-official ckpt.pt --meta missing.json out` once printed a traceback."""
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"g_ema": {"x": torch.zeros(1)}}, ckpt)
    (tmp_path / "broken.json").write_text("{not json")
    args = {"convert-official": lambda meta: ["convert-official", str(ckpt), "--meta", meta, str(tmp_path / "out.safetensors")],
            "train": lambda meta: ["train", "--init", str(ckpt), "--meta", meta, "--run-dir", str(tmp_path / "run")]}[command]
    assert main(args(str(tmp_path / "missing.json"))) == 2
    assert "missing.json" in _one_error_line(capsys, command)
    assert main(args(str(tmp_path / "broken.json"))) == 2
    assert "not valid JSON" in _one_error_line(capsys, command)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "run").exists()


class _Payload:
    """Unpickling this would run a shell command (what a malicious checkpoint carries)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_official_checkpoint_with_a_malicious_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": {"x": torch.zeros(1)}, "args": argparse.Namespace(), "hook": _Payload(marker)}, path)
    assert main(["generate", str(path), "--preset", "ffhq256", "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in _one_error_line(capsys, "generate")
    assert not marker.exists()


# ---- run directories, configs and data ----------------------------------------------------------


def test_corrupt_config_json_in_a_run_directory(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"preset": "tiny", "steps": ')
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "is not valid JSON" in _one_error_line(capsys, "train")


@pytest.mark.parametrize("setting, field, says", [
    ("betas=0.5", "betas", "must be a list of 2 numbers"),
    ("lr_decay_start=abc", "lr_decay_start", "must be an integer or null"),
    ("grid=[2]", "grid", "must be a list of 2 integers"),
    ("d_lr=-1", "d_lr", "must be >= 0"),
    ("stepz=10", "stepz", "did you mean 'steps'"),
])
def test_impossible_or_ill_typed_training_settings(tmp_path, capsys, setting, field, says):
    assert main(["train", "--preset", "tiny", "--steps", "1", "--set", setting, "--run-dir", str(tmp_path / "r")]) == 2
    err = _one_error_line(capsys, "train")
    assert field in err and says in err
    assert not (tmp_path / "r").exists()


def test_impossible_model_settings(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--steps", "1", "--generator", "kernels=[[4],[5],[17,5],[3,3]]", "--run-dir", str(tmp_path / "r")]) == 2
    assert "kernel 17 with dilation 1 does not fit" in _one_error_line(capsys, "train")
    assert main(["train", "--preset", "tiny", "--steps", "1", "--batch", "6", "--run-dir", str(tmp_path / "r")]) == 2
    assert "multiple of the discriminator's minibatch-stddev group 4" in _one_error_line(capsys, "train")
    assert not (tmp_path / "r").exists()


def test_missing_and_imageless_data(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--steps", "1", "--data", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "no such file or folder" in _one_error_line(capsys, "train")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello")
    assert main(["train", "--preset", "tiny", "--steps", "1", "--data", str(tmp_path / "docs"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "no images found" in _one_error_line(capsys, "train")
    (tmp_path / "plain.bin").write_bytes(b"1234")
    assert main(["train", "--preset", "tiny", "--steps", "1", "--data", str(tmp_path / "plain.bin"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "neither a folder nor a zip" in _one_error_line(capsys, "train")
    assert not (tmp_path / "r").exists()


def test_prepared_dataset_of_another_size(tmp_path, capsys):
    from stylenat.data import prepare_dataset

    (tmp_path / "src").mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "src" / "a.png")
    prepare_dataset(tmp_path / "src", tmp_path / "p16", 16, progress=False)
    assert main(["train", "--preset", "tiny", "--steps", "1", "--data", str(tmp_path / "p16"), "--run-dir", str(tmp_path / "r")]) == 2
    err = _one_error_line(capsys, "train")
    assert "holds 16x16 images but the model is 32x32" in err and "--resolution 16" in err and "--size 32" in err


def test_missing_inception_weights_stop_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STYLENAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STYLENAT_INCEPTION", raising=False)
    assert main(["train", "--preset", "tiny", "--steps", "1", "--metrics", "fid10k", "--run-dir", str(tmp_path / "r")]) == 2
    assert "pt_inception-2015-12-05" in _one_error_line(capsys, "train")
    assert not (tmp_path / "r" / "checkpoints").exists()


def _fake_checkpoint(run_dir, **meta_changes):
    """A run directory of the tiny preset with one real checkpoint (untrained), its train_state.json edited."""
    from stylenat.train.checkpoint import TrainingState, capture_rng, save_training_checkpoint
    from stylenat.train.loop import resolve_config
    from stylenat.train.optim import make_adam

    cfg = resolve_config(get_train_preset("tiny").replace(run_dir=str(run_dir)))
    run_dir.mkdir(parents=True)
    cfg.save(run_dir / "config.json")
    g, d = build_generator("tiny"), build_discriminator("tiny")
    optimizers = {"g_opt": make_adam(g.parameters(), 1e-3, (0, 0.99)), "d_opt": make_adam(d.parameters(), 1e-3, (0, 0.99))}
    path = save_training_checkpoint(run_dir / "checkpoints", TrainingState(step=5), {"g": g, "g_ema": copy.deepcopy(g), "d": d}, optimizers,
                                    [capture_rng(torch.device("cpu"))], ["-"], cfg.to_dict(), keep=3)
    meta = json.loads((path / "train_state.json").read_text())
    (path / "train_state.json").write_text(json.dumps({**meta, **meta_changes}))
    return path


def test_resume_with_another_process_count(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "run", world=2)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "written by 2 process(es); resume it with the same number (now 1)" in _one_error_line(capsys, "train")


def test_checkpoint_of_a_newer_format(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "run", version=99)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "newer or foreign program" in _one_error_line(capsys, "train")


def test_damaged_checkpoint_state(tmp_path, capsys):
    path = _fake_checkpoint(tmp_path / "run")
    (path / "train_state.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = _one_error_line(capsys, "train")
    assert "is damaged" in err and "to resume from the checkpoint before it" in err


# ---- bugs stay bugs ----------------------------------------------------------------------------


def test_programming_errors_keep_their_traceback(monkeypatch, tmp_path):
    import stylenat.sampling

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(stylenat.sampling, "generate", broken)
    g = build_generator("tiny")
    path = save_model(tmp_path / "g.safetensors", {"g_ema": g}, g.config)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["generate", str(path), "--seeds", "0", "--out", str(tmp_path / "o")])


def test_debug_shows_the_traceback_of_a_user_error(monkeypatch, tmp_path):
    from stylenat.errors import MissingFileError

    monkeypatch.setenv("STYLENAT_DEBUG", "1")
    with pytest.raises(MissingFileError):
        main(["generate", str(tmp_path / "nope"), "--seeds", "0", "--out", str(tmp_path / "o")])


def test_pickle_payload_class_really_runs_code(tmp_path):
    # Guards the malicious-checkpoint test: a plain unpickle of the payload does run the command.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_every_row_of_the_robustness_table_names_a_real_test():
    root = Path(__file__).resolve().parents[1]
    rows = [ln for ln in (root / "docs" / "robustness.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    refs = [ref for row in rows[1:] for ref in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row)]
    assert len(refs) >= 25
    missing = [f"{path}::{name}" for path, name in refs if f"def {name}(" not in (root / path).read_text()]
    assert not missing, missing
