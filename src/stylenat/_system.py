"""Small operating-system helpers shared by every layer: atomic file writes, the cache directory, a
progress line, peak memory, CPU name."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``.

    A crash or an exception leaves ``path`` as it was (and no temporary file behind).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux /proc/self/status's VmHWM: unlike getrusage's ru_maxrss, it restarts at exec, so a
    child process started from a big parent reports its own peak, not the parent's.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource  # POSIX only: imported here so that the rest of this module works on Windows

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux, bytes on macOS


def cpu_name() -> str:
    """The CPU model ("model name" in /proc/cpuinfo on Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """$STYLENAT_CACHE, else ~/.cache/stylenat (where weights, released models and dataset statistics live)."""
    return Path(os.environ.get("STYLENAT_CACHE") or Path.home() / ".cache" / "stylenat")


class Progress:
    """A one-line tick on stderr: rewritten in place on a terminal (at most 10 times a second), a
    line per ``every`` of the total otherwise (so logs of batch jobs stay short).

    ``show(done, total)`` formats the count (default "done/total"); ``note`` adds to it.
    """

    def __init__(self, label: str, total: int, enabled: bool = True, every: float = 0.1,
                 show: Callable[[int, int], str] | None = None):
        self.label, self.total, self.enabled = label, total, enabled
        self._steps = max(1, round(1 / every))  # lines per run when not on a terminal
        self.show = show or (lambda done, total: f"{done}/{total}")
        self._tty = sys.stderr.isatty()
        self._next_step = 1
        self._last_draw = 0.0

    def update(self, done: int, note: str = "") -> None:
        """Show ``done`` of the total, then ``note`` (e.g. ", loss 0.12, 3 s")."""
        if not self.enabled:
            return
        final = done >= self.total
        line = f"{self.label}: {self.show(done, self.total)}{note}"
        if self._tty:  # "\033[K" clears what a longer previous line left behind
            now = time.monotonic()
            if not final and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            sys.stderr.write(f"\r{line}\033[K" + ("\n" if final else ""))
        elif self.total > 0 and done * self._steps >= self._next_step * self.total:
            self._next_step = done * self._steps // self.total + 1
            sys.stderr.write(f"{line}\n")
        sys.stderr.flush()


def package_version() -> str:
    """The installed stylenat's version (from its metadata, so the package root need not be imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stylenat")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
