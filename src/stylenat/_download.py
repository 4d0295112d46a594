"""Downloads that survive bad networks: resumed with HTTP Range, size- and sha256-checked, moved
into place atomically.

A download writes ``<dest>.partial`` (and ``<dest>.partial.json``: the URL, the server's ETag or
Last-Modified date and the total size), so a dropped connection, a killed process or Ctrl-C loses
nothing: the next try asks for the rest with ``Range: bytes=N-`` and ``If-Range`` (a server that
changed the file in between answers with the whole new file, which then starts over). Within one
call a dropped connection is retried a few times before giving up; each mirror is tried in turn.
Only a complete file whose sha256 matches (when one is expected) is renamed onto ``dest``; a
mismatch deletes it, since resuming a wrong file can only stay wrong.

Plain ``urllib``: the job is one GET with two headers, no reason for a dependency. ``file://``
URLs work too (for mirrors on a shared file system).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from stylenat._system import Progress, file_sha256, package_version
from stylenat.errors import DownloadError

__all__ = ["download", "offline", "offline_switches", "OFFLINE_ENV"]

OFFLINE_ENV = ("STYLENAT_OFFLINE", "HF_HUB_OFFLINE")
CHUNK = 1 << 20
TIMEOUT_S = 30.0
# Pauses before the retries of a dropped or failed connection (so 1 + len tries per URL).
BACKOFF_S = (0.5, 2.0, 5.0)
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


def offline_switches() -> list[str]:
    """Those of $STYLENAT_OFFLINE and Hugging Face's $HF_HUB_OFFLINE that are set to 1/true/yes/on."""
    return [f"${n}" for n in OFFLINE_ENV if os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on")]


def offline() -> bool:
    """True when downloads are off: :func:`offline_switches` names a variable."""
    return bool(offline_switches())


class _Fatal(Exception):
    """This URL cannot give the file (404, a web page instead of the file, a wrong size): try the next."""


class _Dropped(Exception):
    """The connection failed or ended early: worth another try at the same URL."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _sidecar(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _read_sidecar(partial: Path) -> dict:
    try:
        return json.loads(_sidecar(partial).read_text())
    except (OSError, ValueError):
        return {}


def _discard(partial: Path) -> None:
    for path in (partial, _sidecar(partial)):
        path.unlink(missing_ok=True)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/total`` header (None where absent or "*")."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    first = span.split("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _strong(etag: str | None) -> str | None:
    """An ETag usable in If-Range (weak "W/..." ones are not, by RFC 9110)."""
    return etag if etag and not etag.startswith("W/") else None


def _resumable(state: dict, url: str, sha256: str | None) -> bool:
    """Whether the partial file described by ``state`` may be continued from ``url``: from its own URL
    when the server gave a validator (If-Range then guards against a changed file), from any mirror
    when the final sha256 is known (it then catches a mix of two files)."""
    if sha256 is not None:
        return True
    return state.get("url") == url and bool(_strong(state.get("etag")) or state.get("last_modified"))


def _fetch_once(url: str, partial: Path, size: int | None, sha256: str | None, progress: bool, label: str) -> None:
    """One GET of ``url`` into ``partial``, resuming what it holds; returns when the file is complete."""
    state = _read_sidecar(partial)
    have = partial.stat().st_size if partial.is_file() and _resumable(state, url, sha256) else 0
    if have == 0:
        _discard(partial)
        state = {}
    headers = {"User-Agent": f"stylenat/{package_version()}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = (_strong(state.get("etag")) or state.get("last_modified")) if state.get("url") == url else None
        if validator:
            headers["If-Range"] = validator
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            _, total = _content_range(exc.headers.get("Content-Range"))
            if have and total == have and state.get("total") in (None, have):
                return  # everything is already here
            _discard(partial)  # the partial file is not a prefix of what the server has
            raise _Dropped(f"{url}: the partial download did not fit the server's file; starting over") from None
        if exc.code in _RETRYABLE_STATUS:
            raise _Dropped(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise _Fatal(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(exc, ValueError) or url.startswith("file:"):
            raise _Fatal(f"{url}: {reason}") from None
        raise _Dropped(f"{url}: {reason}") from None
    with response:
        status = getattr(response, "status", None) or 200  # file:// responses have no status
        etag = response.headers.get("ETag") or (state.get("etag") if status == 206 else None)
        first, total = _content_range(response.headers.get("Content-Range"))
        if status == 206:
            changed = (state.get("total") is not None and total != state["total"]) or \
                      (state.get("url") == url and state.get("etag") and etag != state["etag"])
            if first != have or total is None or changed:  # not the rest of the file we hold
                _discard(partial)
                raise _Dropped(f"{url}: the server's file changed or it answered another range; starting over")
            mode = "ab"
        else:  # the whole file (no Range support, or If-Range saw a changed file): start over
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind in ("text/html", "application/xhtml+xml"):
            raise _Fatal(f"{url} answered with a web page ({kind}), not the file: the host may have moved it "
                         "(set $STYLENAT_MIRROR to another copy)")
        if size is not None and total is not None and total != size:
            raise _Fatal(f"{url} serves {total:,} bytes, expected {size:,}: not the file the registry describes")
        if total is not None:
            free = shutil.disk_usage(partial.parent).free
            if free < total - have:
                raise DownloadError(f"not enough disk space for {label}: {_mib(total - have)} to go, {_mib(free)} free "
                                    f"in {partial.parent} (set $STYLENAT_CACHE to another disk)")
        _sidecar(partial).write_text(json.dumps({"url": url, "total": total, "etag": etag,
                                                 "last_modified": response.headers.get("Last-Modified")}))
        _copy_body(response, partial, mode, have, total, url, progress, label)


def _copy_body(response, partial: Path, mode: str, have: int, total: int | None, url: str, progress: bool,
               label: str) -> None:
    """The response body into ``partial``: a network failure is a dropped connection (retried), a
    failed write is the disk's (not retried)."""
    done, start = have, time.monotonic()
    tick = Progress(label, total or 0, progress and total is not None, every=0.05,
                    show=lambda d, t: f"{100 * d / t:3.0f}% of {_mib(t)}")
    try:
        with open(partial, mode) as out:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                    raise _Dropped(f"{url}: the connection dropped at {_mib(done)}"
                                   f"{f' of {_mib(total)}' if total else ''} ({exc.__class__.__name__})") from None
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                rate = (done - have) / max(time.monotonic() - start, 1e-6)
                tick.update(done, f", {rate / 2**20:.1f} MiB/s")
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:  # the write side: a full disk, a file-size limit, a read-only cache
        raise DownloadError(f"cannot write {partial} ({exc.strerror or exc}); {_mib(done)} of {label} are kept there: "
                            "free some space (or set $STYLENAT_CACHE to another disk) and run again to resume") from None
    if total is not None and done != total:
        raise _Dropped(f"{url}: the connection dropped at {_mib(done)} of {_mib(total)}")


def download(urls: Sequence[str], dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             label: str | None = None, progress: bool = True) -> str:
    """Download the first URL of ``urls`` (mirrors of one file) that works to ``dest``; its sha256.

    Args:
        urls: where the file is, tried in order (http, https or file URLs).
        dest: the final path, written only once the file is complete and checked.
        sha256: the expected hex digest, or None to accept any (the digest is returned either way).
        size: the expected size in bytes, or None.
        label: the name shown in the progress line (default: the file name).
        progress: show a progress line on stderr.
    Raises DownloadError (one line, naming every URL tried) when no URL gave the file; the partial
    file stays for the next try unless it proved wrong. Offline mode ($STYLENAT_OFFLINE) refuses.
    """
    dest = Path(dest)
    label = label or dest.name
    if offline():
        raise DownloadError(f"{label}: downloads are off ({' and '.join(offline_switches())}); put the file at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    failures = []
    for url in urls:
        failure = _try_url(url, partial, size, sha256, progress, label)
        if failure is None:
            digest = file_sha256(partial)
            if sha256 is None or digest == sha256.lower():
                os.replace(partial, dest)
                _sidecar(partial).unlink(missing_ok=True)
                return digest
            _discard(partial)  # resuming a wrong file can only stay wrong
            failure = f"{url}: the file has sha256 {digest}, expected {sha256}; it was deleted"
        failures.append(failure)
    kept = f"; {_mib(partial.stat().st_size)} kept in {partial}: run again to resume" if partial.is_file() else ""
    raise DownloadError(f"could not download {label}: {'; '.join(failures)}{kept}")


def _try_url(url: str, partial: Path, size: int | None, sha256: str | None, progress: bool, label: str) -> str | None:
    """Fetch ``url`` into ``partial``, retrying dropped connections; None when complete, else why not."""
    for pause in (*BACKOFF_S, None):
        try:
            _fetch_once(url, partial, size, sha256, progress, label)
            return None
        except _Fatal as exc:
            return str(exc)
        except _Dropped as exc:
            if pause is None:
                return str(exc)
            time.sleep(pause)
