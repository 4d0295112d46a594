"""Runs interrupted every way a run can be, each resumed to bitwise the state of an uninterrupted run:
SIGKILL at random instants, torn log lines, SIGTERM/SIGINT (graceful stop), a signal to one
torchrun rank, time-based checkpoints, and a full disk during a checkpoint write."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stylenat.models.io import checkpoint_dirs, latest_checkpoint
from tests.train.helpers import ENV, MICRO, REFERENCE, STEPS, TRAIN, assert_bitwise_equal, checkpoint_step, cli, final_state

STOPPED = 75  # stylenat.train.signals.STOPPED_EXIT_STATUS, as documented


def _stats_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def _starts(run_dir: Path) -> int:
    """How many times a process reached the training loop (each writes one 'starting'/'resuming' line)."""
    log = run_dir / "log.txt"
    text = log.read_text(errors="replace") if log.is_file() else ""
    return text.count("] starting step") + text.count("] resuming at step")


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until predicate() holds; False if the process ended first."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)
    return True


def test_sigkill_at_random_instants_then_resume_is_bitwise_identical(reference_run, tmp_path):
    """Kill -9 at random moments: while starting, training, writing grids, logs or checkpoints;
    each time continue (resume, or start again when no config.json exists yet)."""
    rng = random.Random(1234)
    kills, finished, run_dir, done = 0, False, tmp_path / "run0", []
    for attempt in range(40):
        resumable = (run_dir / "config.json").is_file()
        cmd = [*TRAIN, "--resume", str(run_dir)] if resumable else [*TRAIN, *REFERENCE, "--run-dir", str(run_dir)]
        starts = _starts(run_dir)
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killing = kills < 10
        if killing:
            if kills % 4 == 0:
                time.sleep(rng.uniform(0.0, 2.0))  # somewhere in start-up: imports, config.json, reals.png
            elif _wait_for(lambda: _starts(run_dir) > starts, proc):
                time.sleep(rng.uniform(0.0, 0.6))  # somewhere in the training steps, grids and checkpoints
        if proc.poll() is None and killing:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        done.append(run_dir)
        if killing:
            # On a fast machine the run can end inside a wait before it was killed often enough: the
            # kills so far count, and a fresh run directory takes the rest.
            run_dir = tmp_path / f"run{attempt + 1}"
            continue
        finished = True
        break
    assert finished and kills >= 10, (finished, kills)
    for run_dir in done:  # every run that was killed and finished
        assert_bitwise_equal(final_state(run_dir), final_state(reference_run))
        assert _stats_steps(run_dir) == [5, 10, 15, 20]
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))
        assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary files of atomic writes


def test_torn_log_lines_are_dropped_on_resume(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    cli(*REFERENCE, "--steps", "10", "--run-dir", str(run_dir))
    # What a kill in the middle of two writes leaves: half a JSON record and half a log line.
    with open(run_dir / "stats.jsonl", "a") as f:
        f.write('{"step": 15, "kimg": 0.06, "d_lo')
    with open(run_dir / "log.txt", "a") as f:
        f.write("[2026-01-01 00:00:00] step 1")
    cli("--resume", str(run_dir), "--steps", str(STEPS))
    assert_bitwise_equal(final_state(run_dir), final_state(reference_run))
    assert _stats_steps(run_dir) == [5, 10, 15, 20]
    log = (run_dir / "log.txt").read_text()
    assert "log.txt: dropped a torn last line" in log
    assert "stats.jsonl: dropped 1 torn last line" in log
    assert all(line.startswith("[") for line in log.splitlines())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_with_a_checkpoint_then_resume_is_bitwise_identical(reference_run, tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*TRAIN, *REFERENCE, "--run-dir", str(run_dir)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Mid-run, between scheduled checkpoints: after the first one, before the end.
    assert _wait_for(lambda: latest_checkpoint(run_dir / "checkpoints") is not None, proc)
    time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED, err
    stopped_at = checkpoint_step(latest_checkpoint(run_dir / "checkpoints"))
    assert 5 <= stopped_at < STEPS
    assert f"stopped by {signal.Signals(sig).name} at step {stopped_at}" in err
    assert f"--resume {run_dir}" in err
    assert f"stopped by {signal.Signals(sig).name} at step {stopped_at}" in (run_dir / "log.txt").read_text()
    cli("--resume", str(run_dir))
    assert_bitwise_equal(final_state(run_dir), final_state(reference_run))


def test_second_signal_stops_at_once(tmp_path):
    # The mechanism on its own: the first SIGTERM is only recorded, the second ends the process.
    script = textwrap.dedent("""
        import os, signal, sys, time
        from stylenat.train.signals import GracefulStop
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            print("first:", stop.name, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("still alive", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "first: SIGTERM"
    assert proc.returncode == -signal.SIGTERM


def test_time_based_checkpoints_keep_the_run_exact(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    # 0.0002 minutes: a checkpoint after nearly every step, whatever the step count says.
    cli(*REFERENCE, "--checkpoint-minutes", "0.0002", "--keep", "100", "--run-dir", str(run_dir))
    steps = [checkpoint_step(p) for p in checkpoint_dirs(run_dir / "checkpoints")]
    assert len(steps) > 8 and any(s % 5 for s in steps)
    assert_bitwise_equal(final_state(run_dir), final_state(reference_run))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_pid(agent: int, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun worker ``rank`` (a child of the agent process with RANK=rank)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == agent and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no torchrun worker of rank {rank}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun workers through /proc")
def test_signal_to_one_torchrun_rank_stops_all_ranks_at_the_same_step(tmp_path):
    def torchrun(*args):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                "-m", "stylenat", "train", *args]

    common = [*MICRO, "--steps", "12", "--checkpoint-every", "4"]
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    done = subprocess.run(torchrun(*common, "--run-dir", str(ref)), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen(torchrun(*common, "--run-dir", str(run_dir)), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: latest_checkpoint(run_dir / "checkpoints") is not None, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only; rank 0 writes the checkpoints
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0  # torchrun reports its workers' status 75 as a failure
    assert "stopped by SIGTERM" in (run_dir / "log.txt").read_text()
    last = latest_checkpoint(run_dir / "checkpoints")
    meta = json.loads((last / "train_state.json").read_text())
    assert 4 <= meta["step"] < 12
    assert meta["rank_digests"][0] == meta["rank_digests"][1]  # both ranks saved the same step's weights

    resumed = subprocess.run([*torchrun("--resume", str(run_dir))], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(final_state(run_dir), final_state(ref))


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    cli(*REFERENCE, "--steps", "10", "--run-dir", str(run_dir))
    before = {p.name: (p / "model.safetensors").read_bytes() for p in checkpoint_dirs(run_dir / "checkpoints")}
    model_size = len(next(iter(before.values())))

    def limit_file_size():
        # Files may grow to half a model file: the next checkpoint cannot be written (EFBIG, as on a full disk).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (model_size // 2, model_size // 2))

    proc = subprocess.run([*TRAIN, "--resume", str(run_dir), "--steps", str(STEPS)], env=ENV, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("stylenat train: error: could not write the checkpoint of step 15")
    assert "step-000000010 is intact" in err and "resume" in err
    after = {p.name: (p / "model.safetensors").read_bytes() for p in checkpoint_dirs(run_dir / "checkpoints")}
    assert after == before
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    cli("--resume", str(run_dir))  # space again: the run goes on from step 10, exactly
    assert_bitwise_equal(final_state(run_dir), final_state(reference_run))
