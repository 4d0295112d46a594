"""One-shot device check: what a lent GPU has to show, in one command, within 8 minutes.

On the device (one H100/H200, torch with CUDA, numpy, pillow, safetensors, pytest; no package
registry), from the repository root, this one line (what the device tool's ``run`` is given):

    set -o pipefail; python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/check 2>&1 | tee $OUT/log

(``timeout_s`` 540: the parts are budgeted to 7 minutes in all, 8 with every grace period; run it
again at once, on the still-warm machine, and inductor's caches in /tmp make the compiles cheap).
Anywhere, the same parts on the CPU with the ``tiny`` preset, in about two minutes on 2 cores
(tests/test_gpu_check.py runs it, marked slow):

    python benchmarks/gpu_check.py --dry-run --out /tmp/check

It writes two files, and nothing else under DIR (the device returns at most 8 files):

* ``DIR/gpu_check.json``: the environment, then one entry per part: ``status`` (ok, failed,
  skipped), ``seconds``, ``budget_s`` (and ``deadline_s``, the budget plus what earlier parts left
  unused), ``results``, ``summary``, ``reasons`` and, on failure, ``error`` (type, message,
  traceback tail). It is rewritten while a part runs and after each part, so a kill keeps what
  finished.
* ``DIR/gpu_check.log``: everything printed (also echoed to stdout), ending with summary tables.

Every part runs in its own process (``--worker-job``) with its own time budget, killed (its
whole process group) when the budget is spent; what it recorded until then is kept, and a
failure, a crash or a kill of one part never stops the others. The parts, in order:

1. ``env``: GPU, capability, memory, driver, torch / CUDA / cuDNN / Triton / Python versions,
   stylenat (version, where imported from, git commit or a hash of the sources), flex settings.
2. ``pytest``: ``pytest -m gpu --runslow`` over every test file that uses the gpu mark
   (tests/nn/test_attention_cuda.py, ...), with pytest-xdist workers where installed; counts,
   failures and the output tail.
3. ``na2d``: at every NA layer shape of ffhq256 (batch 2), backends flex and tiled in float32
   (TF32 off) and bfloat16 against a float64 oracle (``reference`` up to 64x64, else ``tiled``),
   output and the gradients of q, k, v and the bias (relative error, thresholds 1e-4 and 2e-2),
   the flex block layout, and forward+backward time of both (CUDA events, median, batch 8, TF32
   still off):
   ``fastest`` per shape and dtype is what the auto backend choice is to be decided on. Units run
   in ``--na-workers`` processes at once (compiling is CPU-bound); the timings are taken one
   process at a time afterwards, in the processes that compiled them.
4. ``official``: the committed official parity fixtures (G, D) on the device in float32 with TF32
   off, with the auto and the tiled backend, and natten 0.17.5's NA cases through ``tiled``.
5. ``graphs``: compiled flex NA functions before and after 3 steps of the real trainer (D step,
   R1, G step, EMA, sample grids) and a resume by one step; FlexRecompileError and
   FlexGraphLimitError are failures.
6. ``bench``: ``stylenat bench`` in the paper's protocol (batch 1, fp32/TF32, 10 warm-up, 500
   timed passes), the fast mode (``--mode fast``) at batch 1 and 64 (and 128 if time is left), and
   the eager path at 64: img/s, ms/img, peak memory, fraction of the dense peak.
7. ``train``: the full ffhq256 recipe's img/s and peak memory at batch 8, 16 and 32, TF32 and
   bf16, through ``benchmarks/train.py``'s ``measure`` (6 steps, the first 2 not timed).

Compiling flex attention costs seconds per graph, so while the first parts run, background
processes (``--no-prewarm`` to leave them out) run one training step of each precision and the
fast bench once, to fill inductor's on-disk caches with the graphs parts 5-7 compile again; they
run at low priority and are stopped before the bench part starts timing.

Options: ``--only PART,...``, ``--budget-scale X`` (every budget times X), ``--budget PART=S``,
``--na-workers K``, ``--no-carry`` (no part gets the time earlier parts left), ``--no-prewarm``,
``--keep-scratch``, and for tests ``--fail-part PART[:hang]`` (the part raises, or hangs until
its budget kills it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()

PARTS = ("env", "pytest", "na2d", "official", "graphs", "bench", "train")

# Seconds per part on one H100/H200: 420 in all (7 minutes), flex compiles included.
GPU_BUDGETS = {"env": 15, "pytest": 55, "na2d": 110, "official": 35, "graphs": 50, "bench": 70, "train": 85}
# On a CPU with the tiny preset (caps, not targets: the dry run takes a minute or two).
DRY_BUDGETS = {"env": 60, "pytest": 90, "na2d": 180, "official": 90, "graphs": 150, "bench": 150, "train": 180}

GRACE_S = 5.0  # a part's process is killed this long after its deadline (it stops starting work at the deadline)
POLL_S = 5.0  # the JSON is rewritten this often while a part runs
PYTEST_MAXFAIL = 5  # not -x: one run on the device should show every failing test, within the budget

NA_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
NA_BATCH = 2  # correctness
NA_TIMING_BATCH = {"gpu": 8, "dry": 2}  # timing (a training batch; flex graphs take any batch >= 2)
NA_REFERENCE_MAX_TOKENS = 64 * 64  # float64 oracle: reference (dense) up to here, tiled beyond
NA_CHECK_SHARE = 0.7  # of the na2d budget, for the checks (and compiles) before timing starts
NA_DRY_FLEX_SHAPES = 2  # dry run: flex (CPU inductor, forward only) at this many shapes, float32

GRAPH_STEPS = {"gpu": 3, "dry": 2}  # R1 every 2 steps: at step 0 (and 2) of the run, at step 2 of a dry resume
TRAIN_BATCHES = {"gpu": (8, 16, 32), "dry": (2,)}
TRAIN_STEPS = {"gpu": (6, 2), "dry": (2, 1)}  # (steps, of which warm-up)


# ============================================================================================
# Small helpers (no torch)
# ============================================================================================


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def clean(obj):
    """JSON-safe copy: non-finite floats as strings, tensors/numpy scalars as numbers, rest as str."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item"):
        try:
            return clean(obj.item())
        except Exception:
            pass
    return str(obj)


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def exc_info(exc: BaseException) -> dict:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": type(exc).__name__, "message": str(exc)[:3000], "traceback_tail": tb[-4000:]}


def child_env(extra: dict | None = None) -> dict:
    """Environment of every child: the checkout's src first on the path (installed or not)."""
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "4")
    for key, value in (extra or {}).items():
        env[key] = str(value)
    return env


class Child:
    """A subprocess whose merged output is streamed line by line to ``emit`` (with a prefix)."""

    def __init__(self, cmd, emit, prefix="", env=None, new_session=False, stdin=False, on_line=None, nice=0):
        self.cmd = [str(c) for c in cmd]
        self.new_session = new_session
        self.tail = collections.deque(maxlen=80)
        self.start = time.time()
        self.timed_out = False
        if nice and shutil.which("nice"):
            self.cmd = ["nice", "-n", str(nice)] + self.cmd
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True, bufsize=1, errors="replace",
            start_new_session=new_session,
        )

        def pump():
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                self.tail.append(line)
                if on_line is not None:
                    on_line(line)
                emit(prefix + line)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def running(self) -> bool:
        return self.proc.poll() is None

    def send(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()

    def kill(self) -> None:
        if not self.running():
            return
        try:
            if self.new_session:
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                if self.new_session:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
                self.proc.wait(timeout=10)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass

    def wait(self, until: float, poll=None) -> int | None:
        """Wait until the process ends or the clock reaches ``until`` (then kill it); the exit status."""
        while True:
            left = until - time.time()
            if left <= 0:
                if self.running():
                    self.timed_out = True
                    self.kill()
                break
            try:
                self.proc.wait(timeout=min(POLL_S, left))
                break
            except subprocess.TimeoutExpired:
                if poll is not None:
                    poll()
        self.thread.join(timeout=5)
        return self.proc.poll()

    @property
    def seconds(self) -> float:
        return time.time() - self.start


def worker_cmd(job: dict) -> list:
    return [sys.executable, SCRIPT, "--worker-job", json.dumps(job)]


def job_result(job: dict) -> dict | None:
    return read_json(Path(job["scratch"]) / f"{job['id']}.json")


def outcome_of(job: dict, child: Child, rc: int | None) -> dict:
    """status/results/summary/reasons/error of a finished (or killed) job."""
    res = job_result(job) or {}
    out = {"status": res.get("status", "failed"), "results": res.get("results", {}), "summary": res.get("summary", ""),
           "reasons": res.get("reasons", []), "seconds": child.seconds}
    tail = "\n".join(list(child.tail)[-30:])
    if child.timed_out:
        out["status"] = "failed"
        out["error"] = {"type": "BudgetExceeded", "message": f"killed after {child.seconds:.0f} s: the budget was spent "
                        f"(results recorded until then are kept)", "traceback_tail": tail}
    elif res.get("error"):
        out["status"] = "failed"
        out["error"] = res["error"]
    elif rc != 0 or res.get("status") in (None, "running"):
        out["status"] = "failed"
        out["error"] = {"type": "WorkerCrashed", "message": f"exit status {rc} before the part finished",
                        "traceback_tail": tail}
    elif out["status"] == "failed":  # the part ran to its end and found problems
        out["error"] = {"type": "CheckFailed", "message": "; ".join(out["reasons"])[:3000] or "failed", "traceback_tail": ""}
    return out


# ============================================================================================
# Worker side: the context a part function gets
# ============================================================================================


class DeliberateFailure(RuntimeError):
    """Raised by --fail-part (tests of the check itself)."""


class Ctx:
    def __init__(self, job: dict):
        import torch

        self.job = job
        self.id = job["id"]
        self.dry = bool(job["dry"])
        self.deadline = float(job["deadline"])
        self.scratch = Path(job["scratch"])
        self.opts = job.get("opts", {})
        self.extra = job.get("extra", {})
        self.results: dict = {}
        self.summary = ""
        self.reasons: list[str] = []
        self.status = "running"
        self.error = None
        self._failed = False
        self._skipped = None
        self.cuda = bool(torch.cuda.is_available()) and not self.dry
        self.device = "cuda" if self.cuda else "cpu"
        self.preset = "tiny" if self.dry else "ffhq256"
        self.kind = "dry" if self.dry else "gpu"
        self.flush()

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def record(self, key: str, value) -> None:
        self.results[key] = value
        self.flush()

    def fail(self, reason: str) -> None:
        self._failed = True
        self.reasons.append(reason)
        self.log(f"FAILED: {reason}")
        self.flush()

    def skip(self, reason: str) -> None:
        self._skipped = reason
        self.reasons.append(reason)
        self.log(f"skipped: {reason}")

    def flush(self) -> None:
        write_json(self.scratch / f"{self.id}.json", {
            "id": self.id, "status": self.status, "results": self.results, "summary": self.summary,
            "reasons": self.reasons, "error": self.error})

    def finish(self) -> None:
        self.status = "failed" if self._failed else ("skipped" if self._skipped else "ok")
        self.flush()

    def sub_job(self, part: str, suffix: str, extra: dict, deadline: float | None = None) -> dict:
        return {"id": f"{self.id}.{suffix}", "part": part, "scratch": str(self.scratch), "dry": self.dry,
                "deadline": self.deadline if deadline is None else deadline, "opts": self.opts, "extra": extra}

    def need_cuda(self) -> bool:
        """False (and the part skipped) in a real run without CUDA."""
        if not self.cuda and not self.dry:
            self.skip("no CUDA device (run with --dry-run for the CPU version)")
            return False
        return True


def worker_main(job: dict) -> int:
    sys.path.insert(0, str(REPO / "src"))
    ctx = Ctx(job)
    try:
        fail = job.get("fail")
        if fail:
            ctx.record("deliberate_failure", fail)
            if fail == "hang":
                ctx.log("--fail-part: hanging until the budget kills this part")
                while True:
                    time.sleep(1)
            raise DeliberateFailure(f"--fail-part {job['part']}: deliberate failure")
        FUNCS[job["part"]](ctx)
        ctx.finish()
        return 0
    except BaseException as exc:  # recorded, then the process ends with an error
        ctx.error = exc_info(exc)
        ctx.status = "failed"
        ctx.flush()
        print(ctx.error["traceback_tail"], flush=True)
        return 1


# ============================================================================================
# Part 1: environment
# ============================================================================================


def _version(dist: str):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except Exception:
        return None


def _git() -> dict | None:
    if not (REPO / ".git").exists():
        return None
    out = {}
    for key, args in (("commit", ["rev-parse", "HEAD"]), ("status", ["status", "--porcelain"])):
        try:
            out[key] = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception as exc:
            out[key] = f"unavailable: {exc}"
    status = out.pop("status", "")
    out["changed_files"] = len(status.splitlines()) if isinstance(status, str) and not status.startswith("unavailable") else None
    return out


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((REPO / "src" / "stylenat").rglob("*.py")) + [SCRIPT]:
        h.update(str(p.relative_to(REPO)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _nvidia_smi() -> str | None:
    try:
        fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu,compute_mode"
        p = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=15)
        return (p.stdout or p.stderr).strip() or None
    except Exception as exc:
        return f"unavailable: {exc}"


def part_env(ctx: Ctx) -> None:
    import platform

    import torch

    r = ctx.results
    r.update({"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
              "cuda_available": torch.cuda.is_available(), "dry_run": ctx.dry, "device": ctx.device,
              "preset": ctx.preset, "time": now_iso()})
    r["versions"] = {d: _version(d) for d in ("triton", "numpy", "pillow", "safetensors", "pytest", "pytest-xdist",
                                              "onnxruntime", "setuptools")}
    import stylenat

    r["stylenat"] = {"version": getattr(stylenat, "__version__", None), "imported_from": str(Path(stylenat.__file__).parent),
                     "installed_version": _version("stylenat"), "git": _git(), "source_sha256": _source_hash()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        r["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 2),
                    "free_gib": round(free / 2**30, 2), "sm_count": p.multi_processor_count,
                    "device_count": torch.cuda.device_count()}
        r["nvidia_smi"] = _nvidia_smi()
    try:
        from stylenat.nn import flex as F
        from stylenat.nn.attention import available_backends, forced_backend

        dyn = torch._dynamo.config
        r["flex"] = {"graph_limit": F.FLEX_GRAPH_LIMIT,
                     "recompile_limit": getattr(dyn, "recompile_limit", getattr(dyn, "cache_size_limit", None)),
                     "available_backends": available_backends(ctx.device), "forced_backend": forced_backend(),
                     "STYLENAT_NA_BACKEND": os.environ.get("STYLENAT_NA_BACKEND")}
    except Exception as exc:
        ctx.fail(f"flex settings unreadable: {type(exc).__name__}: {exc}")
    try:
        import torch._functorch.config as fconf
        import torch._inductor.config as iconf

        r["compile"] = {"fx_graph_cache": getattr(iconf, "fx_graph_cache", None),
                        "autograd_cache": getattr(fconf, "enable_autograd_cache", None),
                        "compile_threads": getattr(iconf, "compile_threads", None),
                        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR") or _inductor_cache_dir()}
    except Exception as exc:
        r["compile"] = f"unreadable: {exc}"
    gpu = r.get("gpu")
    ctx.summary = (f"{gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']:.0f} GiB), " if gpu else "no CUDA, ") + \
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {r['python']}"
    ctx.log(ctx.summary)
    if not torch.cuda.is_available() and not ctx.dry:
        ctx.fail("no CUDA device: the parts that need one are skipped (on a CPU, use --dry-run)")


def _inductor_cache_dir():
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return cache_dir()
    except Exception:
        return None


# ============================================================================================
# Part 2: the gpu-marked tests
# ============================================================================================


def gpu_test_files() -> list[str]:
    found = []
    for p in sorted((REPO / "tests").rglob("test_*.py")):
        with contextlib.suppress(OSError):
            if re.search(r"mark\.gpu\b", p.read_text(errors="replace")):
                found.append(str(p.relative_to(REPO)))
    return found


def parse_junit(path: Path) -> dict | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                               "message": (el.get("message") or "")[:600], "seconds": float(case.get("time", 0))})
    counts["failed_tests"] = failed
    counts["slowest"] = sorted(({"test": f"{c.get('classname')}::{c.get('name')}", "seconds": float(c.get("time", 0))}
                                for c in root.iter("testcase")), key=lambda d: -d["seconds"])[:8]
    return counts


def part_pytest(ctx: Ctx) -> None:
    import importlib.util

    import torch

    files = gpu_test_files()
    ctx.record("files", files)
    if not files:
        ctx.fail("no test file uses the gpu mark")
        return
    xml = ctx.scratch / f"{ctx.id}_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "--runslow", "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--maxfail={PYTEST_MAXFAIL}", "--durations=10", f"--junitxml={xml}"]
    workers = 4 if torch.cuda.is_available() and importlib.util.find_spec("xdist") is not None else 0
    if workers:
        cmd += ["-n", str(workers)]
    cmd += files
    ctx.record("command", " ".join(cmd[1:]))
    ctx.record("xdist_workers", workers)
    child = Child(cmd, emit=ctx.log, prefix="  ", env=child_env({"TORCHINDUCTOR_COMPILE_THREADS": 2}))
    rc = child.wait(until=ctx.deadline - 2)
    counts = parse_junit(xml)
    tail = "\n".join(child.tail)
    ctx.results.update({"returncode": rc, "timed_out": child.timed_out, "seconds": child.seconds,
                        "counts": counts, "tail": tail[-4000:]})
    if counts is None:  # killed, or crashed before writing the report: the summary line, if any
        m = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)
        ctx.results["counts_from_output"] = {k: int(n) for n, k in m}
    ctx.flush()
    c = counts or {}
    ctx.summary = (f"{c.get('passed', '?')} passed, {c.get('failures', 0) + c.get('errors', 0) if counts else '?'} failed, "
                   f"{c.get('skipped', '?')} skipped in {child.seconds:.0f} s ({len(files)} files)")
    if child.timed_out:
        ctx.fail(f"pytest did not finish within the budget ({child.seconds:.0f} s)")
    elif rc == 0 and counts and counts["passed"] == 0 and counts["skipped"] > 0 and not torch.cuda.is_available():
        ctx.skip(f"no CUDA: {counts['skipped']} gpu tests skipped")
    elif rc == 5:
        ctx.fail("pytest collected no gpu test")
    elif rc != 0:
        ctx.fail(f"pytest exit status {rc}: " + ", ".join(f["test"] for f in c.get("failed_tests", [])[:5]))


# ============================================================================================
# Part 3: na2d on the device against a float64 oracle, and flex vs tiled timings
# ============================================================================================


def na_shapes(g_cfg) -> list[dict]:
    """Distinct NA layer shapes of a generator config, largest maps first (the priority order)."""
    from stylenat.models.config import stage_resolutions
    from stylenat.nn.attention import split_heads

    shapes: dict = {}
    for r, c, heads, ks, ds in zip(stage_resolutions(g_cfg.resolution), g_cfg.channels, g_cfg.heads, g_cfg.kernels,
                                   g_cfg.dilations):
        for nh, k, d in zip(split_heads(heads, len(ks)), ks, ds):
            key = (r, nh, c // heads, k, d)
            shapes[key] = shapes.get(key, 0) + 2  # two blocks per stage
    out = [{"id": f"{r}x{r}_h{nh}_hd{hd}_k{k}_dil{d}", "res": r, "heads": nh, "head_dim": hd, "kernel": k,
            "dilation": d, "calls_per_image": n} for (r, nh, hd, k, d), n in shapes.items()]
    return sorted(out, key=lambda s: (-s["res"], s["dilation"], s["kernel"], s["heads"]))


def na_units(ctx: Ctx) -> list[dict]:
    from stylenat.models.config import get_preset

    units = []
    for i, s in enumerate(na_shapes(get_preset(ctx.preset)[0])):
        for dtype in ("float32", "bfloat16"):
            flex = True if ctx.cuda else (i < NA_DRY_FLEX_SHAPES and dtype == "float32")
            units.append({"id": f"{s['id']}_{dtype}", "shape": s, "dtype": dtype, "flex": flex})
    return units


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _draw(shape: dict, batch: int, seed: int, device: str):
    """q, k, v, rpb, grad_out in float64, every value exact in bfloat16 (one oracle serves both dtypes)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    r, nh, hd, k = shape["res"], shape["heads"], shape["head_dim"], shape["kernel"]

    def draw(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(torch.bfloat16).to(torch.float64).to(device)

    q, kk, v, gout = (draw(batch, nh, r, r, hd) for _ in range(4))
    return q, kk, v, draw(nh, 2 * k - 1, 2 * k - 1), gout


def _na_run(q, k, v, rpb, gout, shape, backend: str, grad: bool):
    """(output, grads of q, k, v, rpb or None) of one na2d call."""
    import torch

    from stylenat.nn.attention import na2d

    kernel, dil = shape["kernel"], shape["dilation"]
    if not grad:
        with torch.no_grad():
            return na2d(q, k, v, kernel, dil, rpb=rpb, backend=backend), None
    leaves = [t.detach().requires_grad_() for t in (q, k, v, rpb)]
    out = na2d(*leaves[:3], kernel, dil, rpb=leaves[3], backend=backend)
    grads = torch.autograd.grad(out, leaves, gout)
    return out.detach(), grads


def _cuda_broken(exc: BaseException) -> bool:
    text = str(exc)
    return "CUDA error" in text or "illegal memory access" in text or "device-side assert" in text


def na_check_unit(ctx: Ctx, unit: dict) -> dict:
    import torch

    from stylenat.nn.attention import choose_backend, flex_layout_stats

    shape, dtype_name = unit["shape"], unit["dtype"]
    dtype = getattr(torch, dtype_name)
    dev, r = ctx.device, shape["res"]
    res: dict = {"batch": NA_BATCH, "tol": NA_TOL[dtype_name]}
    try:
        res["layout"] = flex_layout_stats(r, r, shape["kernel"], shape["dilation"])
        if ctx.cuda and dtype != torch.float32:  # CUDA's bf16 backward kernels use 64-token blocks
            res["layout_granule64"] = flex_layout_stats(r, r, shape["kernel"], shape["dilation"], granule=64)
    except Exception as exc:
        res["layout"] = {"error": exc_info(exc)}
    probe = torch.empty(1, shape["heads"], r, r, shape["head_dim"], device=dev, dtype=dtype)
    res["auto_now"] = choose_backend(probe)
    q, k, v, rpb, gout = _draw(shape, NA_BATCH, seed=r * 1000 + shape["dilation"], device=dev)
    res["oracle"] = "reference" if r * r <= NA_REFERENCE_MAX_TOKENS else "tiled"
    t = time.time()
    want, want_grads = _na_run(q, k, v, rpb, gout, shape, res["oracle"], grad=True)
    _sync(dev)
    res["oracle_s"] = time.time() - t
    ok = True
    for backend in ("flex", "tiled") if unit["flex"] else ("tiled",):
        grad = not (backend == "flex" and not ctx.cuda)  # CPU flex is inference only
        entry: dict = {"grad": grad}
        try:
            t = time.time()
            args = [x.to(dtype) for x in (q, k, v, rpb, gout)]
            out, grads = _na_run(*args, shape, backend, grad)
            _sync(dev)
            entry["first_call_s"] = time.time() - t
            errs = {"out": _rel(out, want)}
            if grads is not None:
                errs.update({f"grad_{n}": _rel(a, b) for n, a, b in zip("q k v rpb".split(), grads, want_grads)})
            entry["errors"] = errs
            entry["max_error"] = max(errs.values(), key=lambda e: e if e == e else math.inf)
            entry["ok"] = all(e < res["tol"] for e in errs.values())  # NaN fails
        except Exception as exc:
            entry.update(ok=False, error=exc_info(exc))
            if _cuda_broken(exc):
                res["cuda_broken"] = True
        ok = ok and entry["ok"]
        res[backend] = entry
        if res.get("cuda_broken"):
            break
    if not unit["flex"]:
        res["flex"] = {"ok": None, "note": "dry run: flex at the first shapes only"}
    res["ok"] = ok
    return res


def _time_fn(fn, warmup: int, reps: int, cuda: bool) -> tuple[float, list]:
    import torch

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), times


def _na_time_backend(ctx: Ctx, unit: dict, backend: str, batch: int) -> dict:
    import torch

    from stylenat.nn.attention import na2d

    shape, dtype = unit["shape"], getattr(torch, unit["dtype"])
    dev, cuda = ctx.device, ctx.cuda
    grad = cuda  # CUDA: forward+backward; CPU (flex is inference only there): forward without grad, both backends
    warmup, reps = (3, 10) if cuda else (1, 2)
    r, nh, hd, k = shape["res"], shape["heads"], shape["head_dim"], shape["kernel"]
    q, kk, v, gout = (torch.randn(batch, nh, r, r, hd, device=dev, dtype=dtype) for _ in range(4))
    rpb = torch.randn(nh, 2 * k - 1, 2 * k - 1, device=dev, dtype=dtype)
    leaves = [t.requires_grad_(grad) for t in (q, kk, v, rpb)]

    def forward():
        return na2d(*leaves[:3], shape["kernel"], shape["dilation"], rpb=leaves[3], backend=backend)

    def step():
        if grad:
            torch.autograd.grad(forward(), leaves, gout)
        else:
            with torch.no_grad():
                forward()

    entry: dict = {"batch": batch}
    t = time.time()
    step()
    _sync(dev)
    entry["first_call_s"] = time.time() - t
    entry["median_ms"], entry["times_ms"] = _time_fn(step, warmup, reps, cuda)
    if cuda:
        entry["fwd_ms"], _ = _time_fn(forward, 1, reps, cuda)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        entry["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return entry


def na_time_unit(ctx: Ctx, unit: dict) -> dict:
    """Median time of flex and tiled on one unit, at the timing batch (the check batch if flex fails there)."""
    backends = ("flex", "tiled") if unit["flex"] else ("tiled",)
    out: dict = {"basis": "fwd+bwd" if ctx.cuda else "fwd (no grad)"}
    batches = list(dict.fromkeys((NA_TIMING_BATCH[ctx.kind], NA_BATCH)))
    for n, batch in enumerate(batches):
        out["batch"] = batch
        retry = False
        for backend in backends:
            try:
                out[backend] = _na_time_backend(ctx, unit, backend, batch)
            except Exception as exc:
                out[backend] = {"batch": batch, "error": exc_info(exc)}
                # A flex graph from the check batch that cannot take this batch is a finding of its own:
                # keep it, and time both backends at the check batch instead.
                if backend == "flex" and n + 1 < len(batches) and not _cuda_broken(exc):
                    out[f"flex_error_at_batch_{batch}"] = out.pop(backend)["error"]
                    retry = True
                    break
        if not retry:
            break
    timed = {b: out[b]["median_ms"] for b in backends if "median_ms" in out.get(b, {})}
    if timed:
        out["fastest"] = min(timed, key=timed.get)
        if len(timed) == 2:
            out["slowdown_of_other"] = max(timed.values()) / min(timed.values())
    return out


def na2d_worker(ctx: Ctx) -> None:
    """Checks of its units, then (after '@@na2d-ready', on 'go' from stdin) their timings."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    units = ctx.extra["units"]
    table = {u["id"]: {"shape": u["shape"], "dtype": u["dtype"]} for u in units}
    ctx.record("units", table)
    broken = False
    for u in units:
        if broken:
            table[u["id"]]["check"] = {"ok": False, "not_run": "the CUDA context broke in an earlier unit"}
            continue
        if ctx.left() < (8 if ctx.cuda else 2):
            table[u["id"]]["check"] = {"ok": None, "not_reached": True}
            continue
        t = time.time()
        try:
            res = na_check_unit(ctx, u)
        except Exception as exc:
            res = {"ok": False, "error": exc_info(exc), "cuda_broken": _cuda_broken(exc)}
        res["seconds"] = time.time() - t
        broken = bool(res.get("cuda_broken"))
        table[u["id"]]["check"] = res
        ctx.log(f"{u['id']}: check {'ok' if res['ok'] else 'FAILED'} ({res['seconds']:.1f} s)"
                + "".join(f", {b} max err {res[b]['max_error']:.2e}" for b in ("flex", "tiled") if "max_error" in res.get(b, {})))
        ctx.flush()
    print("@@na2d-ready", flush=True)
    command = sys.stdin.readline().strip()
    if command != "go":
        ctx.record("timing", f"not started ({command or 'no go'})")
        return
    ctx.record("timing", "started")
    for u in units:
        if broken or ctx.left() < (3 if ctx.cuda else 1):
            table[u["id"]]["timing"] = {"not_reached": True}
            continue
        try:
            res = na_time_unit(ctx, u)
        except Exception as exc:
            res = {"error": exc_info(exc)}
        table[u["id"]]["timing"] = res
        ctx.log(f"{u['id']}: " + ", ".join(f"{b} {res[b]['median_ms']:.3f} ms" for b in ("flex", "tiled")
                                          if "median_ms" in res.get(b, {})) + f" -> {res.get('fastest')}")
        ctx.flush()
    ctx.record("timing", "done")


def part_na2d(ctx: Ctx) -> None:
    if not ctx.need_cuda():
        return
    units = na_units(ctx)
    k = int(ctx.opts.get("na_workers") or (4 if ctx.cuda else 2))
    k = max(1, min(k, len(units)))
    ctx.record("plan", {"device": ctx.device, "preset": ctx.preset, "batch": NA_BATCH,
                        "timing_batch": NA_TIMING_BATCH[ctx.kind], "tolerances": NA_TOL, "tf32": False,
                        "oracle": f"reference in float64 up to {NA_REFERENCE_MAX_TOKENS} tokens, else tiled in float64",
                        "inputs": "float64 values exact in bfloat16 (the same inputs for both dtypes)",
                        "metric": "||a - b|| / ||b|| per tensor", "workers": k, "units": len(units),
                        "flex_on_cpu": "inductor, forward only under no_grad (PyTorch's CPU flex has no backward)",
                        "timing": "in the checking process, after its checks, with the check's settings (TF32 off: "
                                  "switching it would recompile every flex unit, a FlexRecompileError); CUDA events, "
                                  "median of 10 after 3 warm-up calls; float32 timings are therefore IEEE float32"})
    shards = [units[i::k] for i in range(k)]
    children, jobs, ready = [], [], []
    lock = threading.Lock()
    start = time.time()

    def emit(line):
        with lock:
            print(line, flush=True)

    def watcher(flag):
        def on_line(line):
            if line.strip() == "@@na2d-ready":
                flag.set()
        return on_line

    check_until = start + NA_CHECK_SHARE * ctx.left()
    for i, shard in enumerate(shards):
        job = ctx.sub_job("na2d_worker", f"w{i}", {"units": shard})
        flag = threading.Event()
        jobs.append(job)
        ready.append(flag)
        children.append(Child(worker_cmd(job), emit=emit, prefix=f"  [w{i}] ", stdin=True, on_line=watcher(flag),
                              env=child_env({"TORCHINDUCTOR_COMPILE_THREADS": max(1, (os.cpu_count() or 2) // k)})))

    def merge():
        table: dict = {}
        for job in jobs:
            res = job_result(job) or {}
            table.update(res.get("results", {}).get("units", {}))
        ctx.results["units"] = table
        ctx.flush()
        return table

    # Phase 1: every worker checks its units (compiling as it goes), all at once.
    last = time.time()
    while time.time() < check_until and not all(f.is_set() or not c.running() for f, c in zip(ready, children)):
        time.sleep(0.5)
        if time.time() - last > POLL_S:
            merge()
            last = time.time()
    ctx.record("checks_s", round(time.time() - start, 1))
    # Phase 2: timings, one worker at a time (the ready ones first), in the processes that compiled.
    timing_log = []
    for i in sorted(range(k), key=lambda i: not ready[i].is_set()):
        child = children[i]
        while not ready[i].is_set() and child.running() and ctx.left() > 1:
            time.sleep(0.5)
        if not ready[i].is_set() or not child.running():
            continue
        others = sum(1 for j, c in enumerate(children) if j != i and c.running() and not ready[j].is_set())
        timing_log.append({"worker": i, "workers_still_checking": others, "started_s": round(time.time() - start, 1)})
        child.send("go")
        child.wait(until=ctx.deadline - 1, poll=merge)  # the worker stops starting units at the deadline itself
    for child in children:
        child.send("stop")
    for child in children:
        child.wait(until=time.time() + 3)
    ctx.record("timing_order", timing_log)
    table = merge()
    # Verdicts
    failed, not_checked, not_timed, choice = [], [], [], {}
    for uid, u in table.items():
        check, timing = u.get("check") or {}, u.get("timing") or {}
        if check.get("ok") is False:
            failed.append(uid)
        elif check.get("ok") is None and check.get("not_reached", True):
            not_checked.append(uid)
        if "fastest" in timing:
            choice.setdefault(u["shape"]["id"], {})[u["dtype"]] = timing["fastest"]
        elif not timing.get("error"):
            not_timed.append(uid)
    ctx.results.update({"failed_units": failed, "not_checked": not_checked, "not_timed": not_timed, "fastest": choice})
    n_ok = sum(1 for u in table.values() if (u.get("check") or {}).get("ok"))
    flex_wins = sum(1 for d in choice.values() for b in d.values() if b == "flex")
    ctx.summary = (f"{n_ok}/{len(units)} units ok ({len(failed)} failed, {len(not_checked)} not reached); "
                   f"timed {sum(len(d) for d in choice.values())}, flex fastest in {flex_wins}")
    for job, child in zip(jobs, children):
        res = job_result(job) or {}
        if res.get("error"):
            ctx.fail(f"worker {job['id']}: {res['error']['type']}: {res['error']['message'][:300]}")
        elif child.timed_out:
            ctx.fail(f"worker {job['id']} killed at the deadline")
    if failed:
        ctx.fail(f"{len(failed)} units above tolerance or raising: {', '.join(failed[:8])}")
    if not_checked or not_timed:
        ctx.fail(f"budget: {len(not_checked)} units not checked, {len(not_timed)} not timed")


# ============================================================================================
# Part 4: official parity fixtures on the device
# ============================================================================================


def official_fixture_dir() -> Path:
    """As tests/conftest.py: $STYLENAT_OFFICIAL_FIXTURES, ../shared/fixtures/official, the committed copies."""
    env = os.environ.get("STYLENAT_OFFICIAL_FIXTURES")
    if env:
        return Path(env)
    shared = REPO.parent / "shared" / "fixtures" / "official"
    return shared if shared.is_dir() else REPO / "tests" / "fixtures" / "official"


def _errors(got, want) -> dict:
    got, want = got.detach().double().cpu(), want.double()
    return {"rel": _rel(got, want), "max_abs": float((got - want).abs().max())}


def part_official(ctx: Ctx) -> None:
    import torch

    from stylenat.models.official import load_official_checkpoint
    from stylenat.nn.attention import choose_backend, na2d, na_backend

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = ctx.device
    fixdir = official_fixture_dir()
    tags = sorted(p.name[: -len("_meta.json")] for p in fixdir.glob("*_meta.json"))
    ctx.record("fixtures", {"dir": str(fixdir), "tags": tags, "device": dev, "tf32": False, "tol_rel": 1e-4})
    if not tags:
        ctx.fail(f"no <tag>_meta.json in {fixdir}")
    worst = 0.0
    for tag in tags:
        meta = json.loads((fixdir / f"{tag}_meta.json").read_text())
        modules = load_official_checkpoint(fixdir / f"{tag}_checkpoint.pt", meta)
        e = torch.load(fixdir / f"{tag}_expected.pt", weights_only=True)
        g = modules["g_ema"].to(dev)
        d = modules.get("d")
        d = d.to(dev) if d is not None else None
        z = e["z"].to(dev)
        entry = {"batch": int(z.shape[0]), "modules": sorted(modules)}
        entry["auto_backends"] = {s["id"]: choose_backend(torch.empty(1, s["heads"], s["res"], s["res"], s["head_dim"], device=dev))
                                  for s in na_shapes(g.config)}
        for backend in ("auto", "tiled") if ctx.cuda else ("tiled",):  # on the CPU auto is tiled
            t = time.time()
            with torch.no_grad(), na_backend(backend):
                errs = {"w": _errors(g.mapping(z), e["w"]), "image": _errors(g(z), e["image"])}
                if d is not None:
                    errs["d_logits"] = _errors(d(e["d_input"].to(dev)), e["d_logits"])
            _sync(dev)
            entry[backend] = {"errors": errs, "seconds": time.time() - t,
                              "ok": all(v["rel"] < 1e-4 for v in errs.values())}
            worst = max([worst] + [v["rel"] for v in errs.values()])
            ctx.log(f"{tag} {backend}: " + ", ".join(f"{k} rel {v['rel']:.2e} max {v['max_abs']:.2e}" for k, v in errs.items()))
            if not entry[backend]["ok"]:
                ctx.fail(f"{tag} with backend {backend}: relative error above 1e-4")
        ctx.record(tag, entry)
    # natten 0.17.5's NA cases, with gradients, through the tiled path on the device
    path = fixdir / "natten0175_na2d_cases.pt"
    if path.is_file():
        cases = torch.load(path, weights_only=True)
        rows = []
        for i, c in enumerate(cases):
            leaves = [c[n].to(dev, torch.float32).requires_grad_() if c.get(n) is not None else None for n in ("q", "k", "v", "rpb")]
            out = na2d(*leaves[:3], c["kernel_size"], c["dilation"], rpb=leaves[3], scale=c["scale"], backend="tiled")
            used = [t for t in leaves if t is not None]
            grads = torch.autograd.grad(out, used, c["grad_out"].to(dev, torch.float32))
            errs = {"out": _errors(out, c["out"])["rel"]}
            for n, gr in zip([n for n, t in zip("q k v rpb".split(), leaves) if t is not None], grads):
                errs[f"grad_{n}"] = _errors(gr, c[f"grad_{n}"])["rel"]
            rows.append({"case": i, "shape": [c["H"], c["W"]], "kernel": c["kernel_size"], "dilation": c["dilation"],
                         "errors": errs, "ok": all(v < 1e-4 for v in errs.values())})
        ctx.record("natten_cases_tiled", rows)
        if not all(r["ok"] for r in rows):
            ctx.fail("natten cases: tiled on the device above 1e-4")
        worst = max([worst] + [v for r in rows for v in r["errors"].values()])
    ctx.summary = f"{len(tags)} fixture(s) on {dev}, worst relative error {worst:.2e} (tolerance 1e-4)"


# ============================================================================================
# Part 5: compiled flex graphs of a short training
# ============================================================================================


def _stats(run_dir: Path) -> list[dict]:
    p = run_dir / "stats.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def _finite(stats: list[dict]) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for s in stats for v in s.values())


def part_graphs(ctx: Ctx) -> None:
    import dataclasses

    import torch

    from stylenat.nn import flex as F
    from stylenat.train import get_train_preset, resume, train

    if not ctx.need_cuda():
        return
    dyn = torch._dynamo.config
    r = ctx.results
    r.update({"limit": F.FLEX_GRAPH_LIMIT, "recompile_limit": getattr(dyn, "recompile_limit", getattr(dyn, "cache_size_limit", None)),
              "before": F.flex_graph_count(), "device": ctx.device, "preset": ctx.preset})
    run_dir = ctx.scratch / f"{ctx.id}_run"
    steps = GRAPH_STEPS[ctx.kind]
    cfg = dataclasses.replace(get_train_preset(ctx.preset), data="demo", run_dir=str(run_dir), steps=steps, batch=2,
                              r1_interval=2, sample_every=10**9, checkpoint_every=10**9, tick_every=1, grid=(2, 2),
                              lr_decay_start=None, metrics=(), device=ctx.device)
    r["config"] = {"steps": steps, "resume_to": steps + 1, "batch": 2, "r1_interval": 2, "grid": [2, 2], "amp": cfg.amp,
                   "tf32": cfg.tf32, "note": "R1 every 2nd step from step 0; sample grids at batch 2 at the start and the end"}
    # What to expect: per NA layer shape the auto choice sends to flex, one no-grad graph (D step fakes
    # and the grids, batch 2) and one G-step graph (docs/gpu.md); the 4x4 and 8x8 maps stay tiled.
    from stylenat.models.config import get_preset
    from stylenat.nn.attention import choose_backend

    flex_shapes = [s["id"] for s in na_shapes(get_preset(ctx.preset)[0])
                   if choose_backend(torch.empty(2, s["heads"], s["res"], s["res"], s["head_dim"], device=ctx.device)) == "flex"]
    r["expected_after_train"] = 2 * len(flex_shapes)
    r["flex_shapes"] = flex_shapes
    t = time.time()
    train(cfg)
    r["train_s"] = time.time() - t
    r["after_train"] = F.flex_graph_count()
    r["matches_expected"] = r["after_train"] == r["expected_after_train"]
    r["graphs_after_train"] = F.flex_graphs()
    ctx.flush()
    t = time.time()
    resume(run_dir, steps=steps + 1)
    r["resume_s"] = time.time() - t
    r["after_resume"] = F.flex_graph_count()
    r["graphs_added_by_resume"] = sorted(set(F.flex_graphs()) - set(r["graphs_after_train"]))
    stats = _stats(run_dir)
    r["steps"] = [{k: v for k, v in s.items() if k in ("step", "d_loss", "g_loss", "r1", "bcr", "sec_per_step", "peak_mem_gib")}
                  for s in stats]
    r["losses_finite"] = _finite(stats)
    ctx.flush()
    ctx.summary = (f"{r['after_train']} flex graphs after {steps} steps (expected {r['expected_after_train']}), "
                   f"{r['after_resume']} after resume (limit {r['limit']}); losses {'finite' if r['losses_finite'] else 'NOT finite'}")
    if ctx.cuda and r["after_train"] == 0:
        ctx.fail("no flex graph was compiled on CUDA: the auto backend did not pick flex")
    if r["after_resume"] != r["after_train"]:
        ctx.fail(f"resume compiled {r['after_resume'] - r['after_train']} new graphs")
    if not r["losses_finite"]:
        ctx.fail("non-finite losses")


# ============================================================================================
# Part 6: stylenat bench
# ============================================================================================


def bench_has_mode() -> bool:
    try:
        p = subprocess.run([sys.executable, "-m", "stylenat", "bench", "--help"], capture_output=True, text=True,
                           timeout=60, env=child_env(), cwd=REPO)
        return "--mode" in p.stdout
    except Exception:
        return False


def bench_cmd(preset: str, device: str, mode: str | None, batch: int, warmup: int, iters: int, out: Path) -> list:
    cmd = [sys.executable, "-m", "stylenat", "bench", preset, "--device", device, "--batch", str(batch),
           "--warmup", str(warmup), "--iters", str(iters), "--tf32", "--out", str(out)]
    return cmd + (["--mode", mode] if mode else [])


def part_bench(ctx: Ctx) -> None:
    if not ctx.need_cuda():
        return
    has_mode = bench_has_mode()
    big, extra = (4, 8) if ctx.dry else (64, 128)

    def it(w, n):
        return (1, 2) if ctx.dry else (w, n)

    # name, mode, batch, (warmup, iters), seconds kept back for the runs after it
    runs = [("paper_b1", "paper", 1, it(10, 500), 60), ("fast_b1", "fast", 1, it(10, 500), 40),
            ("fast_large", "fast", big, it(5, 50), 15), ("paper_large", "paper", big, it(3, 20), 0),
            ("fast_extra", "fast", extra, it(5, 30), 0)]
    ctx.record("plan", {"has_mode": has_mode, "preset": ctx.preset, "device": ctx.device,
                        "runs": [{"name": n, "mode": m, "batch": b, "warmup": w, "iters": i} for n, m, b, (w, i), _ in runs]})
    rows = {}
    for name, mode, batch, (warmup, iters), keep in runs:
        row = {"mode": mode, "batch": batch, "warmup": warmup, "iters": iters}
        rows[name] = row
        if mode == "fast" and not has_mode:
            row["error"] = "stylenat bench has no --mode (the fast mode is not there yet)"
            ctx.fail(f"{name}: {row['error']}")
            continue
        if ctx.dry and name in ("fast_large", "fast_extra"):
            row["skipped"] = "dry run: fast_b1 runs the same code, and CPU compiles of the generator are slow"
            continue
        if name == "fast_extra":
            ref = rows.get("fast_large", {})
            need = 1.5 * ref["wall_s"] if "img_per_s" in ref else math.inf
            if ctx.left() < need:
                row["skipped"] = f"not enough time left ({ctx.left():.0f} s < {need:.0f} s)"
                continue
        left = ctx.left()
        until = time.time() + max(left - (0 if ctx.dry else keep), 0.5 * left) - 1
        if until - time.time() < (2 if ctx.dry else 10):
            row["not_reached"] = True
            ctx.fail(f"{name}: not reached within the budget")
            continue
        out = ctx.scratch / f"{ctx.id}_{name}.json"
        cmd = bench_cmd(ctx.preset, ctx.device, mode if has_mode else None, batch, warmup, iters, out)
        row["command"] = " ".join(cmd[1:])
        child = Child(cmd, emit=ctx.log, prefix=f"  [{name}] ", env=child_env({"TORCHINDUCTOR_COMPILE_THREADS": 8}))
        rc = child.wait(until=until)
        row["wall_s"] = child.seconds
        report = read_json(out) if rc == 0 else None
        if report is None:
            row["error"] = ("killed at its time limit" if child.timed_out else f"exit status {rc}")
            row["tail"] = "\n".join(list(child.tail)[-20:])
            ctx.fail(f"{name}: {row['error']}")
        else:
            res = report["results"][0]
            row.update({k: res.get(k) for k in ("img_per_s", "ms_per_img", "ms_per_pass_median", "peak_fraction",
                                                 "achieved_tflops")})
            row["peak_mib"] = res.get("peak_memory_bytes", 0) / 2**20
            row["report"] = {k: v for k, v in report.items() if k != "results"}
            row["results"] = report["results"]
            ctx.log(f"{name}: {_fmt(row['img_per_s'])} img/s, {_fmt(row['ms_per_img'], '.3f')} ms/img, "
                    f"{_fmt(row['peak_mib'], '.0f')} MiB")
        ctx.record("runs", rows)
    parts = [f"{n} {_fmt(r['img_per_s'], '.1f')}" for n, r in rows.items() if r.get("img_per_s") is not None]
    ctx.summary = "img/s: " + (", ".join(parts) if parts else "none")


# ============================================================================================
# Part 7: training throughput
# ============================================================================================


def _train_bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stylenat_bench_train", REPO / "benchmarks" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure_with_stats(preset: str, batch: int, steps: int, device: str, amp: str | None) -> tuple[dict, list]:
    """benchmarks/train.py's ``measure``, keeping the run's per-step stats (and peak memory per run)."""
    import torch

    import stylenat.train as st

    bt = _train_bench_module()
    real = st.train
    captured: list = []

    def train_and_keep(cfg):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            return real(cfg)
        finally:
            captured.extend(_stats(Path(cfg.run_dir)))

    st.train = train_and_keep
    try:
        return bt.measure(preset, batch, steps, device, amp), captured
    finally:
        st.train = real


def train_worker(ctx: Ctx) -> None:
    import gc

    import torch

    amp = ctx.extra.get("amp")
    steps, warm = TRAIN_STEPS[ctx.kind]
    label = amp or ("fp32" if not ctx.cuda else "tf32")
    rows = []
    prev = None
    for batch in TRAIN_BATCHES[ctx.kind]:
        row = {"preset": ctx.preset, "batch": batch, "precision": label, "steps": steps, "warmup_steps": warm}
        rows.append(row)
        if prev is not None:
            sec, wall = prev["sec_per_step"], prev["wall_s"]
            predicted = max(0.0, wall - steps * sec) + steps * sec * batch / prev["batch"]
            row["predicted_s"] = predicted
            if predicted > ctx.left():
                row["not_reached"] = f"predicted {predicted:.0f} s > {ctx.left():.0f} s left"
                ctx.record("rows", rows)
                continue
        t = time.time()
        try:
            bench_row, stats = measure_with_stats(ctx.preset, batch, steps, ctx.device, amp)
        except Exception as exc:
            row["error"] = exc_info(exc)
            row["wall_s"] = time.time() - t
            ctx.fail(f"{label} batch {batch}: {type(exc).__name__}: {str(exc)[:200]}")
            ctx.record("rows", rows)
            gc.collect()
            if ctx.cuda:
                torch.cuda.empty_cache()
            if isinstance(exc, torch.OutOfMemoryError):
                break
            continue
        row["wall_s"] = time.time() - t
        secs = [s["sec_per_step"] for s in stats]
        timed = secs[warm:] or secs[-1:]
        row.update({"sec_per_step_all": secs, "sec_per_step": sum(timed) / len(timed),
                    "r1_steps": [s["step"] for s in stats if "r1" in s],
                    "peak_mem_gib": max((s["peak_mem_gib"] for s in stats), default=None),
                    "losses_finite": _finite(stats), "measure": bench_row})
        row["img_per_s"] = batch / row["sec_per_step"]
        row["gib_per_image"] = row["peak_mem_gib"] / batch if row["peak_mem_gib"] is not None else None
        ctx.log(f"{label} batch {batch}: {_fmt(row['img_per_s'])} img/s, {_fmt(row['sec_per_step'], '.3f')} s/step, "
                f"{_fmt(row['peak_mem_gib'])} GiB ({_fmt(row['gib_per_image'])} GiB/image); wall {row['wall_s']:.0f} s")
        if not row["losses_finite"]:
            ctx.fail(f"{label} batch {batch}: non-finite losses")
        prev = row
        ctx.record("rows", rows)
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


def part_train(ctx: Ctx) -> None:
    if not ctx.need_cuda():
        return
    amps = [None, "bf16"]
    rows = []
    lock = threading.Lock()

    def emit(line):
        with lock:
            print(line, flush=True)

    for i, amp in enumerate(amps):
        share = ctx.left() * (0.55 if i == 0 else 1.0)  # tf32 first: it compiles what bf16 shares (sample grids)
        job = ctx.sub_job("train_worker", f"{amp or 'tf32'}", {"amp": amp}, deadline=time.time() + share - GRACE_S)
        child = Child(worker_cmd(job), emit=emit, prefix=f"  [{amp or 'tf32'}] ")
        rc = child.wait(until=time.time() + share)
        out = outcome_of(job, child, rc)
        rows += out["results"].get("rows", [])
        ctx.record("rows", rows)
        if out["status"] != "ok":
            ctx.fail(f"{amp or 'tf32'}: " + (out.get("error", {}).get("message") or "; ".join(out["reasons"]))[:300])
    done = [r for r in rows if "img_per_s" in r]
    ctx.summary = ", ".join(f"{r['precision']} b{r['batch']} {_fmt(r['img_per_s'], '.1f')} img/s "
                            f"{_fmt(r['gib_per_image'])} GiB/img" for r in done) or "no configuration measured"


# ============================================================================================
# Background prewarm (fills inductor's caches for parts 5-7)
# ============================================================================================


def prewarm_train(ctx: Ctx) -> None:
    import dataclasses

    from stylenat.nn import flex as F
    from stylenat.train import get_train_preset, train

    amp = ctx.extra.get("amp")
    cfg = dataclasses.replace(get_train_preset(ctx.preset), data="demo", run_dir=str(ctx.scratch / f"{ctx.id}_run"),
                              steps=1, batch=2, amp=amp, tick_every=1, sample_every=10**9, checkpoint_every=10**9,
                              grid=(1, 1), lr_decay_start=None, metrics=(), device=ctx.device)
    t = time.time()
    train(cfg)
    ctx.results.update({"seconds": time.time() - t, "graphs": F.flex_graph_count()})


class Prewarm:
    def __init__(self, dry: bool, scratch: Path, deadline: float, has_mode: bool, say):
        self.items = []
        self.say = say
        jobs = [("train_tf32", None), ("train_bf16", "bf16")] if not dry else [("train_fp32", None)]
        for name, amp in jobs:
            job = {"id": f"prewarm_{name}", "part": "prewarm_train", "scratch": str(scratch), "dry": dry,
                   "deadline": deadline, "opts": {}, "extra": {"amp": amp}}
            self._start(name, worker_cmd(job), scratch)
        if has_mode and not dry:
            for batch in (1, 64):
                cmd = bench_cmd("ffhq256", "cuda", "fast", batch, 1, 1, scratch / f"prewarm_fast{batch}.json")
                self._start(f"bench_fast_b{batch}", cmd, scratch)
        say(f"prewarm: started {', '.join(i['name'] for i in self.items)} in the background (nice 10)")

    def _start(self, name, cmd, scratch):
        log = open(scratch / f"prewarm_{name}.log", "w")

        def emit(line, log=log):
            with contextlib.suppress(ValueError):
                log.write(line + "\n")
                log.flush()

        child = Child(cmd, emit=emit, new_session=True, nice=10, env=child_env({"TORCHINDUCTOR_COMPILE_THREADS": 4}))
        self.items.append({"name": name, "child": child, "log": log, "record": None})

    def stop(self, why: str) -> list[dict]:
        out = []
        for item in self.items:
            child = item["child"]
            if item["record"] is None:
                running = child.running()
                if running:
                    child.kill()
                child.thread.join(timeout=5)
                item["log"].close()
                item["record"] = {"name": item["name"], "status": "stopped" if running else f"exit {child.proc.poll()}",
                                  "seconds": round(child.seconds, 1), "stopped_because": why if running else None,
                                  "tail": "\n".join(list(child.tail)[-6:])}
                self.say(f"prewarm {item['name']}: {item['record']['status']} after {child.seconds:.0f} s")
            out.append(item["record"])
        return out


FUNCS = {"env": part_env, "pytest": part_pytest, "na2d": part_na2d, "official": part_official, "graphs": part_graphs,
         "bench": part_bench, "train": part_train, "na2d_worker": na2d_worker, "train_worker": train_worker,
         "prewarm_train": prewarm_train}


# ============================================================================================
# The driver
# ============================================================================================


class Log:
    def __init__(self, path: Path):
        self.file = open(path, "w")
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            with contextlib.suppress(ValueError):
                self.file.write(line + "\n")
                self.file.flush()


def _fmt(x, spec=".2f", missing="-"):
    try:
        return format(x, spec) if x is not None and not isinstance(x, str) else (x or missing)
    except (TypeError, ValueError):
        return str(x)


def summary_lines(report: dict) -> list[str]:
    lines = []
    parts = report["parts"]
    na = parts.get("na2d", {}).get("results", {})
    if na.get("units"):
        lines += ["", f"== na2d on {na.get('plan', {}).get('device')} (batch {NA_BATCH}; timing batch "
                      f"{na.get('plan', {}).get('timing_batch')}; max relative error over out and grads) ==",
                  f"{'unit':<34} {'flex err':>9} {'tiled err':>9} {'flex ms':>8} {'tiled ms':>8} {'fastest':>7} {'x':>5}"]
        for uid, u in na["units"].items():
            c, t = u.get("check") or {}, u.get("timing") or {}

            def err(b):
                e = c.get(b) or {}
                return _fmt(e.get("max_error"), ".1e") if "max_error" in e else ("ERR" if "error" in e else "-")

            mark = "" if c.get("ok") else ("  <- FAILED" if c.get("ok") is False else "  (not reached)")
            lines.append(f"{uid:<34} {err('flex'):>9} {err('tiled'):>9} {_fmt((t.get('flex') or {}).get('median_ms'), '.3f'):>8} "
                         f"{_fmt((t.get('tiled') or {}).get('median_ms'), '.3f'):>8} {t.get('fastest', '-'):>7} "
                         f"{_fmt(t.get('slowdown_of_other'), '.2f'):>5}{mark}")
    bench = parts.get("bench", {}).get("results", {}).get("runs")
    if bench:
        lines += ["", "== bench ==", f"{'run':<12} {'batch':>5} {'img/s':>9} {'ms/img':>8} {'peak MiB':>9} {'of peak':>8}  note"]
        for name, r in bench.items():
            frac = r.get("peak_fraction")
            note = r.get("error") or r.get("skipped") or ("not reached" if r.get("not_reached") else "")
            lines.append(f"{name:<12} {r['batch']:>5} {_fmt(r.get('img_per_s')):>9} {_fmt(r.get('ms_per_img'), '.3f'):>8} "
                         f"{_fmt(r.get('peak_mib'), '.0f'):>9} {(_fmt(100 * frac, '.1f') + '%') if isinstance(frac, (int, float)) and frac else '-':>8}  {note}")
    train = parts.get("train", {}).get("results", {}).get("rows")
    if train:
        lines += ["", "== train (img/s after warm-up; peak = max_memory_allocated) ==",
                  f"{'precision':<9} {'batch':>5} {'img/s':>8} {'s/step':>8} {'peak GiB':>9} {'GiB/img':>8}  note"]
        for r in train:
            note = r.get("not_reached") or (r.get("error", {}).get("type") if r.get("error") else "")
            lines.append(f"{r['precision']:<9} {r['batch']:>5} {_fmt(r.get('img_per_s')):>8} {_fmt(r.get('sec_per_step'), '.3f'):>8} "
                         f"{_fmt(r.get('peak_mem_gib')):>9} {_fmt(r.get('gib_per_image')):>8}  {note}")
    lines += ["", "== parts ==", f"{'part':<9} {'status':<8} {'seconds':>8} {'budget':>7}  summary"]
    for name, p in parts.items():
        why = p.get("summary") or ""
        if p.get("error"):
            why = f"{p['error']['type']}: {p['error']['message'][:150]}" + (f" | {why}" if why else "")
        elif p["status"] != "ok" and p.get("reasons"):
            why = f"{why} | {p['reasons'][0][:150]}"
        lines.append(f"{name:<9} {p['status']:<8} {_fmt(p.get('seconds'), '.1f'):>8} {_fmt(p.get('budget_s'), '.0f'):>7}  {why}")
    s = report["summary"]
    lines.append(f"gpu_check: {s['ok']} ok, {len(s['failed'])} failed{' (' + ', '.join(s['failed']) + ')' if s['failed'] else ''}, "
                 f"{len(s['skipped'])} skipped in {report.get('wall_s', 0):.0f} s -> {report['json']}")
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (gpu_check.json, gpu_check.log)")
    p.add_argument("--dry-run", action="store_true", help="the same parts on the CPU with the tiny preset")
    p.add_argument("--only", help=f"comma-separated parts, of {','.join(PARTS)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    p.add_argument("--budget", action="append", default=[], metavar="PART=S", help="one part's budget in seconds")
    p.add_argument("--na-workers", type=int, help="processes checking na2d units at once (default 4 on CUDA, 2 dry)")
    p.add_argument("--no-carry", action="store_true", help="a part gets only its own budget, not what earlier parts left")
    p.add_argument("--no-prewarm", action="store_true", help="no background cache-filling processes")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder (printed) for debugging")
    p.add_argument("--fail-part", action="append", default=[], metavar="PART[:hang]",
                   help="testing the check: PART raises (or hangs until its budget kills it)")
    p.add_argument("--worker-job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker_job and not args.out:
        p.error("--out is required")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker_job:
        return worker_main(json.loads(args.worker_job))

    parts = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(PARTS)
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    parts = [s for s in PARTS if s in parts]
    budgets = {k: v * args.budget_scale for k, v in (DRY_BUDGETS if args.dry_run else GPU_BUDGETS).items()}
    for item in args.budget:
        name, _, sec = item.partition("=")
        if name not in PARTS:
            sys.exit(f"--budget {item}: unknown part {name!r}")
        budgets[name] = float(sec)
    fails = {}
    for item in args.fail_part:
        name, _, mode = item.partition(":")
        fails[name] = mode or "raise"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = Log(out / "gpu_check.log")
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    json_path = out / "gpu_check.json"
    t0 = time.time()
    report = {"check": "stylenat benchmarks/gpu_check.py", "argv": sys.argv[1:] if argv is None else list(argv),
              "dry_run": args.dry_run, "started": now_iso(), "finished": None, "wall_s": 0.0, "json": str(json_path),
              "budgets_s": {k: budgets[k] for k in parts}, "budget_total_s": sum(budgets[k] for k in parts),
              "budget_scale": args.budget_scale, "carry": not args.no_carry, "environment": {}, "parts": {},
              "prewarm": None, "summary": {"ok": 0, "failed": [], "skipped": []}}

    def save():
        report["wall_s"] = time.time() - t0
        st = [p["status"] for p in report["parts"].values()]
        report["summary"] = {"ok": st.count("ok"), "failed": [n for n, p in report["parts"].items() if p["status"] == "failed"],
                             "skipped": [n for n, p in report["parts"].items() if p["status"] == "skipped"]}
        write_json(json_path, report)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    say(f"gpu_check {'(dry run, CPU, tiny preset) ' if args.dry_run else ''}parts {','.join(parts)}; "
        f"budget {report['budget_total_s']:.0f} s; scratch {scratch}")
    save()
    prewarm = None
    child = None
    try:
        if not args.no_prewarm and {"graphs", "bench", "train"} & set(parts):
            try:
                prewarm = Prewarm(args.dry_run, scratch, t0 + report["budget_total_s"],
                                  not args.dry_run and bench_has_mode(), say)
            except Exception as exc:
                report["prewarm"] = {"error": exc_info(exc)}
        planned = 0.0
        for name in parts:
            planned += budgets[name]
            start = time.time()
            deadline = start + budgets[name] if args.no_carry else max(start + budgets[name], t0 + planned)
            if name in ("bench", "train") and prewarm is not None:
                report["prewarm"] = prewarm.stop(f"the {name} part starts")
            say(f"---- {name}: budget {budgets[name]:.0f} s, deadline in {deadline - start:.0f} s ----")
            job = {"id": name, "part": name, "scratch": str(scratch), "dry": args.dry_run, "deadline": deadline,
                   "opts": {"na_workers": args.na_workers}, "extra": {}, "fail": fails.get(name)}
            record = {"status": "running", "seconds": 0.0, "budget_s": budgets[name], "deadline_s": deadline - start,
                      "results": {}, "summary": "", "reasons": []}
            report["parts"][name] = record

            def poll(job=job, record=record, start=start):
                res = job_result(job)
                if res:
                    record.update(results=res.get("results", {}), summary=res.get("summary", ""))
                record["seconds"] = time.time() - start
                save()

            child = Child(worker_cmd(job), emit=say, prefix=f"[{name}] ", new_session=True)
            rc = child.wait(until=deadline + GRACE_S, poll=poll)
            outcome = outcome_of(job, child, rc)
            child = None
            record.update(outcome)
            record["seconds"] = time.time() - start
            if name == "env":
                report["environment"] = record["results"]
            save()
            say(f"---- {name}: {record['status']} in {record['seconds']:.1f} s"
                + (f" ({record['error']['type']}: {record['error']['message'][:200]})" if record.get("error") else "")
                + (f"; {record['summary']}" if record.get("summary") else ""))
    except KeyboardInterrupt as exc:
        say(f"interrupted ({exc}): writing what finished")
        report["interrupted"] = str(exc)
    finally:
        if child is not None:
            child.kill()
        for name, record in report["parts"].items():
            if record["status"] == "running":
                record.update(status="failed", error={"type": "Interrupted", "message": report.get("interrupted", "?"),
                                                      "traceback_tail": ""})
        if prewarm is not None:
            report["prewarm"] = prewarm.stop("the check ended")
        report["finished"] = now_iso()
        save()
        try:
            for line in summary_lines(report):
                say(line)
        except Exception as exc:  # the JSON is written already; a table bug must not hide it
            say(f"summary table failed: {exc_info(exc)['traceback_tail']}")
        save()
        if args.keep_scratch:
            say(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if report["summary"]["failed"] or report.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
