"""`train --metrics swd`: SWD needs no weights file, so a run measures itself on any machine; the
values in stats.jsonl are those of the checkpoint's G_ema against the training data."""

from __future__ import annotations

import json

import pytest
import torch

from stylenat.data import open_dataset
from stylenat.metrics.swd import swd_from_images
from stylenat.models import resolve_model
from stylenat.sampling import generate
from tests.train.helpers import ENV, MICRO, cli


def test_train_logs_swd_to_stats_jsonl(tmp_path):
    # No Inception weights anywhere: swd must not need them.
    env = {k: v for k, v in ENV.items() if k != "STYLENAT_INCEPTION"} | {"STYLENAT_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    cli(*MICRO, "--steps", "4", "--checkpoint-every", "4", "--metrics", "swd16", "--metrics-every", "2",
        "--run-dir", str(run), env=env)
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "swd16" in r}
    assert sorted(logged) == [2, 4]
    assert all({"swd16", "swd16_16"} <= r.keys() and r["swd16"] > 0 for r in logged.values())  # 16px: one level
    # The oracle: SWD computed directly between the final G_ema's first 16 seeds and the first 16
    # training images (the demo at 16px, as `measure` reads them: no flips).
    g = resolve_model(run, device="cpu")
    real = torch.stack([open_dataset("demo", 16)[i] for i in range(16)])
    expected = swd_from_images(generate(g, range(16)), real)
    assert logged[4]["swd16"] == pytest.approx(expected["swd_avg"], rel=1e-6)
    assert logged[4]["swd16_16"] == pytest.approx(expected["swd_16"], rel=1e-6)
    assert "step 4 metrics: swd16 " in (run / "log.txt").read_text()
