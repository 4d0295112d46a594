"""benchmarks/gpu_check.py, the one-shot device check, run as CI can: its dry run on the CPU.

The dry run goes through every part with the tiny preset, so a typo in a code path the GPU run
shares cannot wait for a lent device to show; the second test checks that a failing or hanging
part is recorded as such and does not stop the parts after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ["env", "pytest", "na2d", "official", "graphs", "bench", "train"]
CUDA_ONLY = {"pytest"}  # the gpu-marked tests skip without CUDA; every other part has a CPU version


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_passes_every_part(tmp_path):
    out = tmp_path / "check"
    proc = _run(["--dry-run", "--out", str(out)], timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    statuses = {name: (p["status"], p.get("error", {}).get("message", "")[:500]) for name, p in report["parts"].items()}
    assert proc.returncode == 0, f"{statuses}\n{proc.stdout[-4000:]}"
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part.get("error"))
        if part["status"] == "skipped":
            assert name in CUDA_ONLY, (name, part["reasons"])
        assert part["seconds"] <= part["deadline_s"] + 10
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log"]  # nothing else comes back from a device
    log = (out / "gpu_check.log").read_text()
    assert "== parts ==" in log and log.rstrip().splitlines()[-1].startswith("gpu_check: ")
    assert proc.stdout.rstrip().splitlines()[-1] == log.rstrip().splitlines()[-1]  # the log is what was printed

    env = report["environment"]
    assert env["torch"] and env["stylenat"]["source_sha256"] and env["device"] == "cpu"
    na = report["parts"]["na2d"]["results"]
    assert na["units"] and not na["failed_units"] and not na["not_checked"]
    flex_checked = [u for u in na["units"].values() if (u["check"].get("flex") or {}).get("ok")]
    assert flex_checked, "the dry run checks the compiled flex forward at some shapes"
    for uid, u in na["units"].items():
        assert u["check"]["tiled"]["ok"] and set(u["check"]["tiled"]["errors"]) == {"out", "grad_q", "grad_k", "grad_v", "grad_rpb"}
        assert u["timing"]["fastest"] in ("flex", "tiled"), uid
    assert na["fastest"]
    official = report["parts"]["official"]["results"]
    assert official["natten_cases_tiled"] and all(r["ok"] for r in official["natten_cases_tiled"])
    graphs = report["parts"]["graphs"]["results"]
    assert graphs["losses_finite"] and graphs["after_resume"] == graphs["after_train"]
    bench = report["parts"]["bench"]["results"]["runs"]
    assert bench["paper_b1"]["img_per_s"] > 0 and bench["fast_b1"]["img_per_s"] > 0
    rows = report["parts"]["train"]["results"]["rows"]
    assert {r["precision"] for r in rows} == {"fp32", "bf16"} and all(r["img_per_s"] > 0 for r in rows)
    assert report["prewarm"] and all(p["status"] in ("exit 0", "stopped") for p in report["prewarm"])


def test_a_failing_or_hanging_part_is_recorded_and_later_parts_still_run(tmp_path):
    out = tmp_path / "check"
    start = time.time()
    proc = _run(["--dry-run", "--out", str(out), "--only", "env,pytest,official", "--no-carry", "--no-prewarm",
                 "--fail-part", "env", "--fail-part", "pytest:hang", "--budget", "pytest=3"], timeout=600)
    wall = time.time() - start
    assert proc.returncode == 1, proc.stdout[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["env", "pytest", "official"]
    assert parts["env"]["status"] == "failed"
    assert parts["env"]["error"]["type"] == "DeliberateFailure" and "Traceback" in parts["env"]["error"]["traceback_tail"]
    assert parts["env"]["results"]["deliberate_failure"] == "raise"  # what it recorded before failing is kept
    assert parts["pytest"]["status"] == "failed" and parts["pytest"]["error"]["type"] == "BudgetExceeded"
    assert parts["pytest"]["seconds"] < 3 + 5 + 15  # budget + grace + kill/start-up slack
    assert parts["official"]["status"] == "ok"
    assert report["summary"]["failed"] == ["env", "pytest"] and report["summary"]["ok"] == 1
    assert wall < 300
    assert "gpu_check: 1 ok, 2 failed (env, pytest)" in proc.stdout
