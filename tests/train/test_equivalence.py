"""Training as a whole is independent of how a step's batch is split: 2 processes x batch 4,
1 process x accum 2 x batch 4 and 1 x batch 8 run the full recipe (D step with bCR, lazy R1, G step,
EMA, ADA augmentation at a fixed p) on the same images with the same random numbers.

What is equal and why:
* 2 x 4 against accum 2 x 4: bitwise, every weight, optimizer state and logged statistic but G's
  tracked w_avg (a float rounding of the same mean, and not an input of any loss). Every micro-batch
  computes the same numbers (same images, draws and batch size), and the gradient mean is exact
  either way: (g0 + g1) / 2 over ranks, g0 / 2 + g1 / 2 over micro-batches (halving is exact).
* 1 x 8 against both: within float rounding. The batch-8 kernels sum in another order, so
  weights agree to a few float32 ulps per step, far below the learning rate a step moves them by.
A sum in place of a mean fails both tests: summed gradients over ranks (dist.average_gradients
without its division) or a gain of 1 per micro-batch moved weights by up to 1.6e-3 against the
other runs (measured), and they double the logged gradient norms, which are compared too (Adam
is nearly blind to a gradient's scale, the norms are not).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.train.helpers import ENV, MICRO, assert_bitwise_equal, cli, final_state
from tests.train.test_loop import _free_port

STEPS = 4
RECIPE = [*MICRO, "--steps", str(STEPS), "--checkpoint-every", str(STEPS), "--tick-every", "1", "--seed", "11",
          "--set", "r1_interval=2", "--set", "bcr_real=10", "--set", "bcr_fake=5", "--aug", "ada", "--aug-p", "0.3"]
# Statistics the steps log: a sum in place of a mean shows in the gradient norms.
STATS = ("d_loss", "bcr", "g_loss", "r1", "d_grad_norm", "g_grad_norm", "r_t", "real_logits", "fake_logits")
# 1 x 8 against a split batch: |difference| <= ATOL + RTOL * |value|. The learning rates are 1e-3 and
# 2e-3, so a real difference in what a step computes would move weights by ~1e-3.
ATOL, RTOL = 2e-6, 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "stylenat", "train", *RECIPE, "--batch", "4", "--run-dir", str(root / "2x4")],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cli(*RECIPE, "--batch", "4", "--accum", "2", "--run-dir", str(root / "accum2x4"))
    cli(*RECIPE, "--batch", "8", "--run-dir", str(root / "1x8"))
    out, _ = torchrun.communicate(timeout=300)
    assert torchrun.returncode == 0, out
    return root


def _stats(run_dir) -> list[dict]:
    lines = (run_dir / "stats.jsonl").read_text().splitlines()
    return [{k: r[k] for k in STATS if k in r} for r in map(json.loads, lines) if "d_loss" in r]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in final_state(run_dir).items() if k.split(".")[0] in ("g", "g_ema", "d")}


def test_two_processes_equal_accumulation_bitwise(runs):
    # Weights and optimizer states; each process's global random states are its own (and unused).
    a, b = ({k: v for k, v in final_state(runs / run).items() if not k.startswith("rng.")} for run in ("2x4", "accum2x4"))
    rounding = [k for k in a if k.endswith("w_avg")]
    assert rounding and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in rounding)
    assert_bitwise_equal({k: v for k, v in a.items() if k not in rounding}, {k: v for k, v in b.items() if k not in rounding})
    assert _stats(runs / "2x4") == _stats(runs / "accum2x4")
    assert len(_stats(runs / "2x4")) == STEPS and sum("r1" in s for s in _stats(runs / "2x4")) == 2


@pytest.mark.parametrize("split", ["2x4", "accum2x4"])
def test_batch_8_equals_a_split_batch_within_float_rounding(runs, split):
    whole, parts = _weights(runs / "1x8"), _weights(runs / split)
    assert whole.keys() == parts.keys()
    far = {k: (whole[k] - parts[k]).abs().max().item() for k in whole
           if not torch.allclose(whole[k], parts[k], rtol=RTOL, atol=ATOL)}
    assert not far, f"{len(far)} tensors differ beyond float rounding: {dict(list(far.items())[:5])}"
    for a, b in zip(_stats(runs / "1x8"), _stats(runs / split), strict=True):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=RTOL, abs=ATOL) for k in a), (a, b)


def test_two_processes_write_once_with_equal_ranks(runs):
    meta = json.loads((runs / "2x4" / "checkpoints" / f"step-{STEPS:09d}" / "train_state.json").read_text())
    assert meta["world"] == 2 and meta["images"] == STEPS * 8
    assert len(meta["rank_digests"]) == 2 and meta["rank_digests"][0] == meta["rank_digests"][1]
    assert (runs / "2x4" / "log.txt").read_text().count("done:") == 1  # only rank 0 writes
    assert not list((runs / "2x4" / "checkpoints").glob(".tmp-*"))


def test_accum_3_resumes_bitwise_and_leaves_constant_buffers_alone(tmp_path):
    """A mean over 3 micro-batches rounds (x + x + x) / 3; the loop averages buffer changes, so
    buffers no pass moves (position codes, frozen D blocks' spectral-norm vectors) keep every bit
    and a resumed run stays exact with an accumulation that is not a power of two."""
    run = [*MICRO, "--accum", "3", "--checkpoint-every", "3", "--seed", "2"]
    cli(*run, "--steps", "6", "--run-dir", str(tmp_path / "straight"))
    cli(*run, "--steps", "3", "--run-dir", str(tmp_path / "resumed"))
    cli("--resume", str(tmp_path / "resumed"), "--steps", "6")
    assert_bitwise_equal(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))
    cli("--data", "demo", "--batch", "4", "--accum", "3", "--steps", "2", "--set", "grid=[1,1]", "--init",
        str(tmp_path / "straight"), "--freeze-d", "1", "--run-dir", str(tmp_path / "frozen"))
    before, after = final_state(tmp_path / "straight"), final_state(tmp_path / "frozen")
    frozen = [k for k in before if k.startswith(("d.from_rgbs.0.", "d.convs.0."))]
    assert any(k.endswith("._u") for k in frozen)
    assert_bitwise_equal({k: before[k] for k in frozen}, {k: after[k] for k in frozen})
