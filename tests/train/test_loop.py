"""End-to-end runs of `stylenat train` on a micro model: exact resume after SIGKILL, seeding and
non-finite handling (two-process torchrun: test_equivalence.py)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import torch

import stylenat
from stylenat.models.io import checkpoint_dirs, latest_checkpoint, read_model_file
from tests.train.helpers import ENV, MICRO, REFERENCE, STEPS
from tests.train.helpers import assert_bitwise_equal as _assert_bitwise_equal
from tests.train.helpers import cli as _cli
from tests.train.helpers import final_state as _final_state


def test_run_directory_layout(reference_run):
    names = {p.name for p in reference_run.iterdir()}
    assert {"config.json", "log.txt", "stats.jsonl", "reals.png", "checkpoints"} <= names
    assert {"fakes_000000000.png", "fakes_000000010.png", "fakes_000000020.png"} <= names
    assert [p.name for p in checkpoint_dirs(reference_run / "checkpoints")] == [f"step-{s:09d}" for s in (10, 15, 20)]
    stats = [json.loads(line) for line in (reference_run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [5, 10, 15, 20]
    assert {"d_loss", "g_loss", "r1", "bcr", "lr_d", "lr_g", "img_per_s", "peak_mem_gib"} <= stats[-1].keys()
    config = json.loads((reference_run / "config.json").read_text())
    assert config["generator"]["resolution"] == 16 and config["generator"]["image_mean"]  # fully resolved
    saved = read_model_file(latest_checkpoint(reference_run / "checkpoints") / "model.safetensors")[1]["g_ema"]
    torch.testing.assert_close(stylenat.load(reference_run).state_dict(), saved, rtol=0, atol=0)


def test_sigkill_then_resume_is_bitwise_identical(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = [*REFERENCE, "--run-dir", str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "stylenat", "train", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(run_dir / "checkpoints") is None:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(run_dir / "checkpoints").name.split("-")[1])
    assert killed_at < STEPS, "the run finished before it was killed"
    _cli("--resume", str(run_dir))
    _assert_bitwise_equal(_final_state(run_dir), _final_state(reference_run))
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert steps_logged == [5, 10, 15, 20]  # lines past the resumed checkpoint were dropped, then rewritten


def test_seeds(reference_run, tmp_path):
    common = [*MICRO, "--steps", str(STEPS), "--checkpoint-every", str(STEPS)]
    _cli(*common, "--seed", "7", "--run-dir", str(tmp_path / "same"))
    _assert_bitwise_equal(_final_state(tmp_path / "same"), _final_state(reference_run))
    _cli(*common, "--seed", "8", "--run-dir", str(tmp_path / "other"))
    other, ref = _final_state(tmp_path / "other"), _final_state(reference_run)
    assert not any(torch.equal(other[k], ref[k]) for k in ref if k.startswith("g.") and k.endswith("weight"))


def test_nonfinite_stops_and_keeps_last_checkpoint(reference_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    last = latest_checkpoint(run_dir / "checkpoints")
    before = (last / "model.safetensors").read_bytes()
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "r1_gamma": float("inf"), "r1_interval": 1}))
    proc = _cli("--resume", str(run_dir), "--steps", "30", check=False)
    assert proc.returncode == 3, proc.stderr
    assert "non-finite R1" in proc.stderr and "step 20" in proc.stderr
    assert "non-finite R1" in (run_dir / "log.txt").read_text()
    assert latest_checkpoint(run_dir / "checkpoints") == last
    assert (last / "model.safetensors").read_bytes() == before

    (run_dir / "config.json").write_text(json.dumps({**config, "r1_gamma": float("inf"), "on_nonfinite": "skip"}))
    _cli("--resume", str(run_dir), "--steps", "24")
    final = _final_state(run_dir)
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-000000024"
    assert all(torch.isfinite(v).all() for k, v in final.items() if v.is_floating_point())
    assert "step skipped" in (run_dir / "log.txt").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bf16_autocast_with_gradient_accumulation(tmp_path):
    _cli(*MICRO, "--steps", "3", "--amp", "bf16", "--accum", "2", "--run-dir", str(tmp_path / "run"))
    meta = json.loads((latest_checkpoint(tmp_path / "run" / "checkpoints") / "train_state.json").read_text())
    assert meta["images"] == 3 * 4 * 2
    assert all(torch.isfinite(v).all() for v in _final_state(tmp_path / "run").values() if v.is_floating_point())


def test_user_errors_are_one_line(tmp_path, capsys):
    from stylenat.cli import main

    assert main(["train", "--preset", "tiny", "--set", "nope=1", "--run-dir", str(tmp_path / "a")]) == 2
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "no-such-folder"), "--run-dir", str(tmp_path / "b")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("stylenat train: error: ") for line in errors)
    assert "nope" in errors[0] and "config.json" in errors[1]
    assert not (tmp_path / "b").exists()  # nothing written for a run that could not start


def test_refuses_to_overwrite_a_run(reference_run):
    proc = _cli(*MICRO, "--steps", "3", "--run-dir", str(reference_run), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_deterministic_option_changes_nothing_on_cpu(reference_run, tmp_path):
    # CPU kernels are deterministic already: the option must not change a single bit there
    # (on CUDA it also switches attention to the tiled backend; see docs/robustness.md).
    _cli(*REFERENCE, "--deterministic", "--run-dir", str(tmp_path / "run"))
    _assert_bitwise_equal(_final_state(tmp_path / "run"), _final_state(reference_run))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["deterministic"] is True
