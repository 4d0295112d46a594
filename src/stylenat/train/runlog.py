"""What a run writes besides checkpoints: log.txt, stats.jsonl, TensorBoard events (optional).

Both text files are append-only, one line per record, so a process killed mid-write leaves at
most one torn last line. On resume :meth:`RunLog.repair` drops that line and every record newer
than the checkpoint the run continues from (the resumed run writes them again), rewriting
stats.jsonl atomically, and says what it dropped in the log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from stylenat._system import atomic_path, peak_rss_bytes


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _complete_lines(path: Path) -> tuple[list[str], bool]:
    """The newline-terminated lines of ``path`` and whether a torn (unterminated) tail followed."""
    data = path.read_bytes() if path.is_file() else b""
    body, sep, tail = data.rpartition(b"\n")
    return (body.decode("utf-8", errors="replace").split("\n") if sep else []), bool(tail)


class RunLog:
    """Appends lines to ``log.txt`` (and stdout) and records to ``stats.jsonl``; a no-op off rank 0.

    run_dir: the run directory. enabled: this process writes (rank 0). purge_step: the step a
    resumed run continues from; TensorBoard events after it are discarded.
    """

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.log_path, self.stats_path = run_dir / "log.txt", run_dir / "stats.jsonl"
        self.run_dir = run_dir
        self.tb = None

    def open_tensorboard(self, purge_step: int | None) -> None:
        """Start TensorBoard events if ``stylenat[tensorboard]`` is installed."""
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            return
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def line(self, text: str) -> None:
        if self.enabled:
            stamped = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
            print(stamped, flush=True)
            with open(self.log_path, "a") as f:
                f.write(stamped + "\n")

    def stats(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.stats_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def records(self) -> list[dict]:
        """The complete records of stats.jsonl."""
        lines, _ = _complete_lines(self.stats_path)
        out = []
        for ln in lines:
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
        return out

    def repair(self, step: int) -> None:
        """Make both files end at ``step`` (see the module docstring); says what was dropped."""
        if not self.enabled:
            return
        notes = []
        log_lines, log_torn = _complete_lines(self.log_path)
        if log_torn:
            with atomic_path(self.log_path) as tmp:
                Path(tmp).write_text("".join(ln + "\n" for ln in log_lines))
            notes.append("log.txt: dropped a torn last line")
        if self.stats_path.is_file():
            lines, torn = _complete_lines(self.stats_path)
            keep, bad, newer = [], 0, 0
            for ln in lines:
                try:
                    record = json.loads(ln)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    bad += 1
                elif record["step"] > step:
                    newer += 1
                else:
                    keep.append(ln)
            if torn or bad or newer:
                with atomic_path(self.stats_path) as tmp:
                    Path(tmp).write_text("".join(ln + "\n" for ln in keep))
                parts = [f"{int(torn)} torn last line"] * bool(torn) + [f"{bad} unreadable line(s)"] * bool(bad) + \
                        [f"{newer} record(s) after step {step}"] * bool(newer)
                notes.append("stats.jsonl: dropped " + ", ".join(parts))
        for note in notes:
            self.line(note)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

