"""Metrics during training: computed on g_ema at the set interval, logged, and invisible to the
run's random streams (a run with metrics ends with bitwise the same weights as one without)."""

from __future__ import annotations

import json

import torch

from stylenat.cli import main
from tests.train.helpers import MICRO
from tests.train.helpers import assert_bitwise_equal as _assert_bitwise_equal
from tests.train.helpers import final_state as _final_state


class FakeInception(torch.nn.Module):
    """A fixed random projection of the pixels standing in for Inception (no weights file here)."""

    cache_key = "fake-projection-v1"

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(3 * 16 * 16, 8, generator=torch.Generator().manual_seed(0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float() / 255, size=(16, 16), mode="area")
        return x.flatten(1) @ self.proj


def test_metrics_logged_and_do_not_disturb_training(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLENAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("stylenat.metrics.registry.load_inception", lambda path=None, **kw: FakeInception())
    common = [*MICRO, "--steps", "6", "--checkpoint-every", "6", "--seed", "3"]
    assert main(["train", *common, "--run-dir", str(tmp_path / "plain")]) == 0
    assert main(["train", *common, "--metrics", "fid64", "--metrics-every", "3", "--run-dir", str(tmp_path / "fid")]) == 0

    records = [json.loads(line) for line in (tmp_path / "fid" / "stats.jsonl").read_text().splitlines()]
    fids = [(r["step"], r["fid64"]) for r in records if "fid64" in r]
    assert [step for step, _ in fids] == [3, 6]
    assert all(value > 0 and value == value for _, value in fids)
    _assert_bitwise_equal(_final_state(tmp_path / "plain"), _final_state(tmp_path / "fid"))


def test_unknown_metric_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *MICRO, "--steps", "2", "--metrics", "fid1m", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown metric 'fid1m'" in capsys.readouterr().err
