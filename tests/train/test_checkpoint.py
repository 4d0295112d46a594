"""Checkpoint files: atomic saves, optimizer and RNG state round trips, the data stream."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from stylenat.models.io import find_model_file
from stylenat.train.checkpoint import (
    capture_rng,
    checkpoint_dirs,
    latest_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
    save_checkpoint,
)
from stylenat.train.optim import make_adam
from stylenat.train.sampler import ShardedStream


def _write_text(content):
    def write(directory):
        (directory / "model.safetensors").write_text(content)

    return write


def test_keeps_last_k_and_points_to_latest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _write_text(str(step)), keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000000003", "step-000000004"]
    assert latest_checkpoint(tmp_path).name == "step-000000004"
    assert find_model_file(tmp_path).read_text() == "4"
    assert find_model_file(tmp_path / "step-000000003").read_text() == "3"


def test_failure_mid_save_leaves_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, _write_text("good"), keep=3)

    def failing(directory):
        (directory / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, failing, keep=3)
    assert latest_checkpoint(tmp_path).name == "step-000000001"
    assert (latest_checkpoint(tmp_path) / "model.safetensors").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001"]


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, _write_text("good"), keep=3)
    script = textwrap.dedent(f"""
        import time, pathlib
        from stylenat.train.checkpoint import save_checkpoint
        def slow(directory):
            (directory / "a").write_text("partial")
            (directory.parent / "started").touch()
            time.sleep(60)
        save_checkpoint(pathlib.Path({str(tmp_path)!r}), 2, slow, keep=3)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(tmp_path).name == "step-000000001"
    assert find_model_file(tmp_path).read_text() == "good"
    # The next save clears the half-written temporary directory.
    save_checkpoint(tmp_path, 3, _write_text("next"), keep=3)
    assert not list(tmp_path.glob(".tmp-*"))
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000000001", "step-000000003"]


def test_adam_state_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = make_adam(model.parameters(), 1e-2, (0.0, 0.99), reg_interval=4)

    def step(m, o, seed):
        o.zero_grad()
        m(torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        o.step()

    for s in range(3):
        step(model, opt, s)
    tensors, meta = optimizer_to_flat(opt, "opt")
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())

    clone = nn.Linear(4, 3)
    clone.load_state_dict(model.state_dict())
    opt2 = make_adam(clone.parameters(), 1.0, (0.5, 0.5))  # wrong hyper-parameters, overwritten by the load
    optimizer_from_flat(opt2, tensors, meta, "opt")
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    for s in range(3, 6):
        step(model, opt, s)
        step(clone, opt2, s)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_rng_round_trip():
    tensors, meta = capture_rng(torch.device("cpu"))
    expected = (torch.randn(3), np.random.rand(3), random.random())
    restore_rng(torch.device("cpu"), tensors, meta)
    again = (torch.randn(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_resumes_mid_epoch_and_shards_disjointly():
    full = _take(ShardedStream(10, seed=1), 25)
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    assert full[:10] != full[10:20]  # a new permutation every epoch
    assert _take(ShardedStream(10, seed=1, consumed=7), 18) == full[7:]
    ranks = [_take(ShardedStream(11, seed=2, rank=r, world=2), 5) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert _take(ShardedStream(10, seed=2), 10) != _take(ShardedStream(10, seed=3), 10)


def test_newest_complete_checkpoint_wins(tmp_path):
    # A resumed run must start from the newest complete checkpoint: saving it again would collide.
    for step in (5, 10):
        save_checkpoint(tmp_path, step, lambda d: (d / "model.safetensors").write_text(str(step)), keep=3)
    assert latest_checkpoint(tmp_path).name == "step-000000010"
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path, 10, lambda d: None, keep=3)
