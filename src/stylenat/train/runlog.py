"""What a run writes besides checkpoints: log.txt, stats.jsonl, TensorBoard events (optional)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from stylenat._system import peak_rss_bytes


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class RunLog:
    """Appends lines to ``log.txt`` (and stdout) and records to ``stats.jsonl``; a no-op off rank 0."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.log_path, self.stats_path = run_dir / "log.txt", run_dir / "stats.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                pass
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

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

    def truncate_after(self, step: int) -> None:
        """Drop stats recorded after ``step`` (written by a process killed before its next checkpoint)."""
        if self.enabled and self.stats_path.is_file():
            keep = [ln for ln in self.stats_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            self.stats_path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
