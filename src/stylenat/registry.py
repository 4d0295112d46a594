"""Released models by name: ``stylenat generate ffhq256 ...`` downloads, checks, converts and caches.

An entry names where a model's file is (one URL or several mirrors), how an official ``.pt`` is
configured (a preset, or the official-config ``meta`` that ``--meta`` reads; a ``.safetensors``
model carries its own), and what is known of it (size, sha256, resolution, the FID its authors
claim, the licence). Where a MODEL is accepted, a local file or directory of that name wins over
the registry.

The cache (``$STYLENAT_CACHE/models/<name>/``, default ``~/.cache/stylenat``) holds, per model,
``model.safetensors`` (a stylenat model file: later loads never unpickle anything) and
``record.json`` (the URL, the downloaded file's size and sha256, whether the registry's sha256 was
checked, and the sha256 of ``model.safetensors``). A cached model whose file no longer matches its
record is refused, as is one whose record disagrees with the registry's sha256.

Where entries come from, later ones replacing earlier ones of the same name: the built-in
:data:`BUILTIN`, the JSON file named by ``$STYLENAT_REGISTRY``, then :func:`register` calls::

    {"NAME": {"url": "https://.../file.pt", "sha256": "<hex>", "preset": "ffhq256"}}

(``"url"`` may be a list of mirrors, ``"meta": {...}`` may stand instead of ``"preset"``; more
fields: see :class:`ModelEntry`). ``$STYLENAT_MIRROR`` (a base URL) replaces the hosts of every
URL: ``https://host/a/b.pt`` is fetched from ``$STYLENAT_MIRROR/a/b.pt``, then from
``$STYLENAT_MIRROR/b.pt``. ``$STYLENAT_OFFLINE=1`` (or ``$HF_HUB_OFFLINE=1``) fetches nothing: a
cached model works, and an official ``.pt`` placed by hand in the cache folder is converted there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import sys
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stylenat._download import download, offline, offline_switches
from stylenat._system import atomic_path, cache_dir, file_sha256, package_version
from stylenat.errors import ConfigError, DownloadError, ModelFileError, UserError, first_line
from stylenat.models.config import PRESETS, parse_size, size_text
from stylenat.models.io import MODEL_FILE, read_model_file, save_model

__all__ = ["ModelEntry", "BUILTIN", "register", "unregister", "entries", "get_entry", "is_registered", "fetch",
           "cached_model", "model_dir", "REGISTRY_ENV", "MIRROR_ENV"]

REGISTRY_ENV = "STYLENAT_REGISTRY"
MIRROR_ENV = "STYLENAT_MIRROR"
RECORD_FILE = "record.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelEntry:
    """A released model.

    Attributes:
        name: the name a MODEL argument uses (letters, digits, ``_ . + -``).
        urls: where the file is: mirrors of one file, tried in order (http, https or file URLs).
        sha256: the file's hex sha256 when known (checked), else None (computed and recorded).
        size: the file's size in bytes when known.
        preset: for an official ``.pt``: the preset it was trained with (e.g. "ffhq256").
        meta: for an official ``.pt`` instead of ``preset``: its configuration in official terms.
        resolution: the image size, for the table: an int (the side) for a square, else (height,
            width); a registry file may also write it as "WIDTHxHEIGHT" or [height, width].
        fid: the FID its authors report, for the table and model cards.
        dataset: what it was trained on.
        license: a licence identifier for model cards (e.g. "mit", "other").
        license_note: what the licence means for users (weights, code and training data may differ).
        description: what it reproduces.
    """

    name: str
    urls: tuple[str, ...]
    sha256: str | None = None
    size: int | None = None
    preset: str | None = None
    meta: dict | None = field(default=None, hash=False)
    resolution: int | tuple[int, int] | None = None
    fid: float | None = None
    dataset: str | None = None
    license: str | None = None
    license_note: str | None = None
    description: str | None = None

    @property
    def filename(self) -> str:
        """The file's name (the last part of the first URL's path)."""
        return Path(urllib.parse.urlparse(self.urls[0]).path).name

    @property
    def size_text(self) -> str | None:
        """The resolution as WIDTHxHEIGHT ("256x256", "512x384"), or None when unknown."""
        return None if self.resolution is None else size_text(self.resolution)

    @property
    def official(self) -> bool:
        """Whether the file is an official StyleNAT ``.pt`` (else a stylenat ``.safetensors`` model)."""
        return not self.filename.endswith(".safetensors")


_FFHQ_LICENSE = ("weights by SHI-Labs, released with the MIT-licensed official code; trained on FFHQ, whose images "
                 "are under CC BY-NC-SA 4.0 (NVIDIA): check both before commercial use")

BUILTIN: dict[str, ModelEntry] = {
    e.name: e for e in (
        ModelEntry("ffhq256", ("https://shi-labs.com/projects/stylenat/checkpoints/FFHQ256_940k_flip.pt",),
                   preset="ffhq256", resolution=256, fid=2.046, dataset="FFHQ 256x256 (70k faces, x-flips), 940k steps",
                   license="mit", license_note=_FFHQ_LICENSE,
                   description="the paper's FFHQ-256 model (48.92M generator parameters)"),
        ModelEntry("ffhq1024", ("https://shi-labs.com/projects/stylenat/checkpoints/FFHQ1024_700k.pt",),
                   preset="ffhq1024", resolution=1024, fid=4.174, dataset="FFHQ 1024x1024 (70k faces), 700k steps",
                   license="mit", license_note=_FFHQ_LICENSE,
                   description="the paper's FFHQ-1024 model (49.45M generator parameters)"),
    )
}

_registered: dict[str, ModelEntry] = {}
# (field, accepted types, how the error says it) of the entry fields that are not checked on their own.
_TYPES = (("size", (int,), "a positive whole number of bytes"),
          ("fid", (int, float), "a number"), ("preset", (str,), "a preset name"),
          ("dataset", (str,), "text"), ("license", (str,), "text"), ("license_note", (str,), "text"),
          ("description", (str,), "text"))
_FIELDS = {f.name for f in dataclasses.fields(ModelEntry)} - {"name", "urls"}


def _resolution(value, where: str) -> int | tuple[int, int] | None:
    """An entry's resolution: None, a positive int, or a rectangle as (height, width) from "WxH" or [h, w]."""
    if value is None:
        return None
    try:
        return parse_size(value, "resolution")
    except ConfigError:
        raise ConfigError(f"{where}: resolution must be a positive whole number (a square's side) or WIDTHxHEIGHT, "
                          f"got {value!r}") from None


def _entry(name: str, fields: dict, where: str) -> ModelEntry:
    """A checked entry from the registry-file form ({"url": ..., "sha256": ..., "preset" | "meta": ...})."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: {name!r} is not a usable model name (letters, digits and _ . + -, "
                          "starting with a letter or digit)")
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: entry {name!r} must be a JSON object with at least \"url\"")
    unknown = sorted(set(fields) - _FIELDS - {"url", "urls"})
    if unknown:
        raise ConfigError(f"{where}: entry {name!r} has unknown field {unknown[0]!r} (known: url, "
                          f"{', '.join(sorted(_FIELDS))})")
    urls = fields.get("url", fields.get("urls"))
    urls = [urls] if isinstance(urls, str) else urls
    if not urls or not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ConfigError(f"{where}: entry {name!r} needs \"url\": a URL or a list of mirror URLs")
    for url in urls:
        if urllib.parse.urlparse(url).scheme not in ("http", "https", "file") or not Path(urllib.parse.urlparse(url).path).name:
            raise ConfigError(f"{where}: entry {name!r}: {url!r} is not an http, https or file URL of a file")
    sha = fields.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha.lower())):
        raise ConfigError(f"{where}: entry {name!r}: sha256 must be 64 hex digits, got {sha!r}")
    for key, kinds, what in _TYPES:
        value = fields.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)
                                  or (kinds == (int,) and value < 1)):
            raise ConfigError(f"{where}: entry {name!r}: {key} must be {what}, got {value!r}")
    fields = {**fields, "resolution": _resolution(fields.get("resolution"), f"{where}: entry {name!r}")}
    entry = ModelEntry(name, tuple(urls), **{k: v for k, v in fields.items() if k in _FIELDS})
    entry = dataclasses.replace(entry, sha256=None if sha is None else sha.lower())
    if entry.official:
        if (entry.preset is None) == (entry.meta is None):
            raise ConfigError(f"{where}: entry {name!r} is an official .pt checkpoint: give exactly one of \"preset\" "
                              f"(one of {', '.join(PRESETS)}) or \"meta\" (its configuration in official terms)")
        if entry.preset is not None and entry.preset not in PRESETS:
            raise ConfigError(f"{where}: entry {name!r}: unknown preset {entry.preset!r} (known: {', '.join(PRESETS)})")
        if entry.meta is not None and not isinstance(entry.meta, dict):
            raise ConfigError(f"{where}: entry {name!r}: \"meta\" must be an object of official configuration terms")
    elif entry.preset is not None or entry.meta is not None:
        raise ConfigError(f"{where}: entry {name!r} is a .safetensors model, which carries its own configuration: "
                          "drop \"preset\"/\"meta\"")
    return entry


def register(name: str, url: str | list[str], sha256: str | None = None, preset: str | None = None,
             meta: dict | None = None, **fields) -> ModelEntry:
    """Add (or replace) a registry entry for this process; arguments as the fields of :class:`ModelEntry`
    (``url``: one URL or a list of mirrors). Returns the entry."""
    given = {"url": url, "sha256": sha256, "preset": preset, "meta": meta, **fields}
    entry = _entry(name, {k: v for k, v in given.items() if v is not None}, "stylenat.registry.register")
    _registered[name] = entry
    return entry


def unregister(name: str) -> None:
    """Drop an entry added with :func:`register` (built-in and file entries stay)."""
    _registered.pop(name, None)


def _user_entries() -> dict[str, ModelEntry]:
    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return {}
    where = f"${REGISTRY_ENV}={path}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} is not a readable JSON file ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object: {{\"NAME\": {{\"url\": ..., \"sha256\": ..., \"preset\": ...}}}}")
    return {name: _entry(name, fields, where) for name, fields in data.items()}


def entries() -> dict[str, ModelEntry]:
    """Every entry: built-in, then $STYLENAT_REGISTRY's, then registered ones (later names win)."""
    return {**BUILTIN, **_user_entries(), **_registered}


def is_registered(name: str) -> bool:
    """Whether ``name`` names a registry entry."""
    return isinstance(name, str) and name in entries()


def get_entry(name: str) -> ModelEntry:
    """The entry called ``name``; ConfigError with the known names (and the nearest) otherwise."""
    known = entries()
    if name not in known:
        near = difflib.get_close_matches(name, list(known), n=1)
        raise ConfigError(f"no registered model {name!r}{f' (did you mean {near[0]!r}?)' if near else ''}; "
                          f"known: {', '.join(known)}")
    return known[name]


def model_dir(name: str) -> Path:
    """The cache folder of model ``name``."""
    return cache_dir() / "models" / name


def _mirrored(urls: tuple[str, ...]) -> list[str]:
    base = os.environ.get(MIRROR_ENV, "").strip().rstrip("/")
    if not base:
        return list(urls)
    if urllib.parse.urlparse(base).scheme not in ("http", "https", "file"):
        raise ConfigError(f"${MIRROR_ENV}={base!r} is not a base URL: use http://..., https://... or file:///path")
    out = []
    for url in urls:
        path = urllib.parse.urlparse(url).path
        for candidate in (base + path, f"{base}/{Path(path).name}"):
            if candidate not in out:
                out.append(candidate)
    return out


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (so ranks of one job download a model once, not at once)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _check_cached(entry: ModelEntry) -> Path | None:
    """The cached model file of ``entry`` after checking it against its record; None when not cached."""
    folder = model_dir(entry.name)
    model, record_path = folder / MODEL_FILE, folder / RECORD_FILE
    if not record_path.is_file():
        return None
    redo = f"run `stylenat download {entry.name} --force` to fetch it again"
    try:
        record = json.loads(record_path.read_text())
        want = record["model_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelFileError(f"the cache record {record_path} is damaged; {redo}") from None
    if not model.is_file():
        raise ModelFileError(f"{model} is missing though {record_path} records it; {redo}")
    digest = file_sha256(model)
    if digest != want:
        raise ModelFileError(f"{model} no longer matches its record (sha256 {digest[:16]}..., recorded {want[:16]}...): "
                             f"it was changed or damaged; {redo}")
    if entry.sha256 is not None and record.get("sha256") != entry.sha256:
        raise ModelFileError(f"the cached {entry.name} came from a file with sha256 {str(record.get('sha256'))[:16]}..., "
                             f"the registry now expects {entry.sha256[:16]}...; {redo}")
    if entry.sha256 is None and record.get("url") not in entry.urls:
        raise ModelFileError(f"the cached {entry.name} came from {record.get('url')}, the registry now points at "
                             f"{entry.urls[0]}; {redo}")
    if record.get("config", _configuration(entry)) != _configuration(entry):
        raise ModelFileError(f"the cached {entry.name} was converted with another preset/meta than the registry's "
                             f"now; {redo}")
    return model


def _configuration(entry: ModelEntry):
    """What the cached model was converted with: the preset name or the official meta (None for .safetensors)."""
    return entry.meta if entry.meta is not None else entry.preset


def cached_model(name: str) -> Path | None:
    """The checked cached model file of ``name``, or None when it is not cached (errors as :func:`fetch`)."""
    return _check_cached(get_entry(name))


def fetch(name: str, force: bool = False, progress: bool = True) -> Path:
    """The model file of registry entry ``name``, downloaded, checked and converted on first use.

    Args:
        name: a registry name.
        force: fetch it again even when cached.
        progress: show download progress on stderr.
    Returns the cached ``model.safetensors``. Raises DownloadError (offline, HTTP errors, a wrong
    sha256: the file is deleted), ModelFileError (not a checkpoint, or not one of its preset).
    """
    entry = get_entry(name)
    folder = model_dir(name)
    with _locked(folder):
        if force:  # everything but a file placed by hand
            for stale in (RECORD_FILE, MODEL_FILE, f"{entry.filename}.partial", f"{entry.filename}.partial.json"):
                (folder / stale).unlink(missing_ok=True)
        cached = _check_cached(entry)
        if cached is not None:
            return cached
        source = folder / entry.filename
        if source.is_file():  # placed by hand (offline), or left by an interrupted conversion
            _say(f"{name}: using {source}")
            digest = file_sha256(source)
            if entry.sha256 is not None and digest != entry.sha256:
                source.unlink()
                raise DownloadError(f"{name}: {source} has sha256 {digest}, the registry expects {entry.sha256}; "
                                    "it was deleted")
        elif offline():
            raise DownloadError(f"{name} is not in the cache and {' and '.join(offline_switches())} forbids downloading: "
                                f"fetch {entry.urls[0]} "
                                f"elsewhere and place it at {source}")
        else:
            _say(f"{name}: downloading {entry.filename} into {folder}")
            digest = download(_mirrored(entry.urls), source, sha256=entry.sha256, size=entry.size, label=name,
                              progress=progress)
        checked, size = entry.sha256 is not None, source.stat().st_size
        _say(f"{name}: sha256 {digest} ({'matches the registry' if checked else 'not in the registry: recorded'})")
        model = _convert(entry, source, digest)
        record = {"name": name, "url": entry.urls[0], "file": entry.filename, "size": size,
                  "sha256": digest, "sha256_checked": checked, "config": _configuration(entry), "model_file": MODEL_FILE,
                  "model_sha256": file_sha256(model), "stylenat": package_version(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with atomic_path(folder / RECORD_FILE) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
        source.unlink(missing_ok=True)  # stored once, as the model file
        return model


def _convert(entry: ModelEntry, source: Path, digest: str) -> Path:
    """``model.safetensors`` beside ``source`` from the downloaded file, checked to be a model of the entry."""
    from stylenat.models.official import load_official_checkpoint  # lazy: it builds the networks (torch)

    model = source.with_name(MODEL_FILE)
    try:
        if entry.official:
            modules = load_official_checkpoint(source, entry.meta if entry.meta is not None else entry.preset)
            g, d = modules["g_ema"], modules.get("d")
            save_model(model, modules, g.config, None if d is None else d.config,
                       extra={"source": entry.urls[0], "registry": entry.name, "sha256": digest,
                              "official": entry.meta if entry.meta is not None else entry.preset})
        else:
            read_model_file(source)  # a stylenat model file already: checked, then used as it is
            os.replace(source, model)
    except UserError as exc:
        what = "official StyleNAT checkpoint" if entry.official else "stylenat model"
        reason = first_line(exc)
        reason = reason if len(reason) <= 300 else reason[:300] + "..."
        foreign = "cannot read" in reason or "not in the official layout" in reason
        if entry.official and zipfile.is_zipfile(source) and not foreign:
            # A readable checkpoint of another configuration: the entry is wrong, not the file; keep it.
            raise ModelFileError(f"{entry.name}: {source} does not fit the entry's preset/meta ({reason}); it is kept: "
                                 "fix the entry and run again") from None
        source.unlink(missing_ok=True)
        raise ModelFileError(f"{entry.name}: the file from {entry.urls[0]} is not a usable {what} ({reason}); "
                             "it was deleted") from None
    return model
