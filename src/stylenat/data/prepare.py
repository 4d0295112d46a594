"""The dataset tool: any folder or zip of images -> a clean folder or zip of RGB PNGs of one size.

The output holds `00000000.png`, `00000001.png`, ... (sources in sorted relative-path order) and a
`dataset.json` describing it (size, count, filter, crop, fill, source, the source of every output
and the files skipped with the reason). Its "size" is N for a square and [height, width] otherwise
(read it with :func:`meta_size`); "fill" ("#rrggbb", the letterbox colour) is there when crop is
"none". It is built under a temporary name beside DST and renamed into
place at the end, so an interrupted run never leaves a DST that looks complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import UnidentifiedImageError

from stylenat.data.images import check_resize_options, decode_image, fill_text, is_image_name, parse_fill, resize_image
from stylenat.data.labels import Labels, listed, read_dataset_json, read_labels
from stylenat._size import parse_size
from stylenat.data.sources import UNSAFE_REASON, FileSource
from stylenat.errors import ConfigError, DataError

DATASET_FORMAT = "stylenat-dataset"
DATASET_JSON = "dataset.json"


def output_name(index: int) -> str:
    """File name of image `index` inside a prepared dataset."""
    return f"{index:08d}.png"


@dataclass
class PrepareReport:
    """What `prepare_dataset` did: where, how many images, and which files it skipped and why."""

    dst: Path
    size: int | tuple[int, int]  # an int for a square, else (height, width)
    count: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative source name, reason)
    classes: list[str] = field(default_factory=list)  # class names of a labelled dataset

    @property
    def report_path(self) -> str:
        """Where the dataset.json listing the skipped files is ("archive.zip:dataset.json" in a zip)."""
        return f"{self.dst}:{DATASET_JSON}" if _is_zip_path(self.dst) else str(self.dst / DATASET_JSON)

    def summary(self) -> str:
        labelled = f" in {len(self.classes)} classes" if self.classes else ""
        return f"{self.count} written{labelled}, {len(self.skipped)} skipped; report: {self.report_path}"


def _is_zip_path(path: Path) -> bool:
    return path.suffix.lower() == ".zip"


def _skip_reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (format not recognised)"
    return f"unreadable ({type(exc).__name__}: {exc})"


def _convert(source: FileSource, size, filter: str, crop: str, fill, name: str) -> tuple[bytes | None, str]:
    """PNG bytes of source file `name` cropped or letterboxed to `size`, or (None, why it was skipped)."""
    try:
        img = resize_image(decode_image(source.read(name)), size, filter, crop, fill)
    except Exception as exc:  # a bad file of any kind must be reported, not end the run
        return None, _skip_reason(exc)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), ""


class _Progress:
    """One-line progress on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def tick(self, done: int, skipped: int) -> None:
        now = time.monotonic()
        final = done == self.total
        if not self.enabled or (not final and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = f"prepare: {done}/{self.total} files ({100 * done / self.total:.0f}%), {skipped} skipped, {rate:.0f} files/s"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


class _Writer:
    """Writes the output under a temporary sibling path and moves it onto `dst` only in `commit`."""

    def __init__(self, dst: Path):
        self.dst = dst
        self.tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
        self.is_zip = _is_zip_path(dst)
        if self.is_zip:
            # PNG data is already deflated; storing it avoids paying for compression twice.
            self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED)
        else:
            self.tmp.mkdir()

    def write(self, name: str, data: bytes) -> None:
        if self.is_zip:
            self.zip.writestr(name, data)
        else:
            (self.tmp / name).write_bytes(data)

    def commit(self) -> None:
        if self.is_zip:
            self.zip.close()
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(self.tmp, self.dst)

    def abort(self) -> None:
        if self.is_zip:
            self.zip.close()
            self.tmp.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def _ordered_map(workers: int):
    """A `map` that keeps input order: the builtin when workers <= 1, else over `workers` processes."""
    if workers <= 1:
        yield map
        return
    pool = ProcessPoolExecutor(workers)
    try:
        yield functools.partial(pool.map, chunksize=16)
    finally:
        # On an error or Ctrl-C, queued files are dropped instead of being converted for nothing.
        pool.shutdown(cancel_futures=True)


def prepared_meta(source: FileSource) -> dict | None:
    """The dataset.json of a dataset made by this tool; None for any other source (raw images, with
    or without StyleGAN's dataset.json)."""
    meta = read_dataset_json(source)
    return meta if isinstance(meta, dict) and meta.get("format") == DATASET_FORMAT else None


def meta_size(source: FileSource, meta: dict) -> int | tuple[int, int]:
    """The image size a prepared dataset's dataset.json states: an int for a square, else (height, width)."""
    return parse_size(meta.get("size"), f"{source.path}/{DATASET_JSON} 'size'")


def _source_labels(source: FileSource, images: list[str], spec) -> Labels | None:
    """Labels of the source's image files; a dataset made by this tool keeps its own."""
    meta = prepared_meta(source) if spec is None else None
    if meta is not None:
        if meta.get("labels") is None:
            return None
        labels, classes = meta["labels"], meta.get("classes")
        if not isinstance(labels, list) or not isinstance(classes, list) or \
                not all(isinstance(k, int) and 0 <= k < len(classes) for k in labels):
            raise DataError(f"{source.path}/{DATASET_JSON}: its 'labels' and 'classes' do not fit together; "
                            "prepare the dataset again from the original images")
        by_name = {output_name(i): label for i, label in enumerate(labels)}
        extra = [n for n in images if n not in by_name]
        if extra:
            raise DataError(f"{source.path} is a prepared dataset and its {DATASET_JSON} has no label for "
                            f"{listed(extra, 'image(s) added to it')}; remove them, or prepare from the original images")
        return Labels([by_name[n] for n in images], [str(c) for c in classes])
    return read_labels(source, images, spec)


def prepare_dataset(src: str | os.PathLike, dst: str | os.PathLike, size, filter: str = "lanczos",
                    crop: str = "center", *, fill="black", labels: str | os.PathLike | None = None, workers: int = 1,
                    progress: bool = True) -> PrepareReport:
    """Convert every image under `src` into an RGB PNG dataset of one size at `dst`.

    src: folder (searched recursively) or zip of images in any format Pillow reads;
    dst: output folder, or a zip file when it ends in ".zip"; must not exist yet;
    size: N (a square), "WIDTHxHEIGHT" or (height, width); filter: resampling filter, "lanczos",
    "box" or "bicubic"; crop: "center" (the largest centred region of the target's aspect, resized)
    or "none" (the whole image resized to fit inside, padded centred with `fill`: a letterbox);
    fill: the padding colour of crop "none", a colour name Pillow knows or "#rrggbb";
    labels: class labels (see stylenat.data.labels): None reads StyleGAN's dataset.json in `src` when
    there is one, "folders" takes one class per first-level folder, "none" ignores labels, anything
    else is a CSV file with the columns path,label; the output stores them with the class names;
    workers: processes decoding in parallel (1 = in this process); progress: print progress to stderr.
    Files that are not images or fail to decode, and zip entries whose names point outside the
    archive (never extracted: outputs are named by index), are skipped and listed in the report.
    """
    size = check_resize_options(size, filter, crop, fill)
    fill = parse_fill(fill)
    source = FileSource(src)
    label_file = Path(labels).resolve() if labels not in (None, "folders", "none") else None
    names = [n for n in source.names if n != DATASET_JSON and
             not (label_file is not None and not source.is_zip and (source.path / n).resolve() == label_file)]
    if not names and not source.unsafe:
        raise DataError(f"no files found in {source.path}")
    dst = Path(dst)
    if dst.exists():
        raise ConfigError(f"{dst} already exists; remove it or choose another destination")
    images = [n for n in names if is_image_name(n)]
    found = _source_labels(source, images, labels)  # label errors come before any work
    label_of = dict(zip(images, found.labels)) if found is not None else {}
    dst.parent.mkdir(parents=True, exist_ok=True)

    convert = functools.partial(_convert, source, size, filter, crop, fill)
    report = PrepareReport(dst=dst, size=size, count=0, skipped=[(n, UNSAFE_REASON) for n in source.unsafe])
    sources, digest = [], hashlib.sha1()
    ticker = _Progress(len(names), progress)
    writer = _Writer(dst)
    try:
        with _ordered_map(workers) as pmap:
            results = pmap(convert, names)
            for done, (name, (png, reason)) in enumerate(zip(names, results), 1):
                if png is None:
                    report.skipped.append((name, reason))
                else:
                    writer.write(output_name(report.count), png)
                    digest.update(png)
                    sources.append(name)
                    report.count += 1
                ticker.tick(done, len(report.skipped))
        if report.count == 0:
            raise DataError(f"no images found in {source.path} "
                            f"({listed([f'{n}: {r}' for n, r in report.skipped], 'files skipped', limit=3)})")
        meta = {
            "format": DATASET_FORMAT, "version": 1, "size": size if isinstance(size, int) else list(size),
            "count": report.count, "filter": filter, "crop": crop,
            **({"fill": fill_text(fill)} if crop == "none" else {}),  # the letterbox colour
            "source": str(source.path.resolve()), "content_sha1": digest.hexdigest(), "sources": sources,
            "skipped": [{"file": n, "reason": r} for n, r in report.skipped],
        }
        if found is not None:
            report.classes = meta["classes"] = found.classes
            meta["labels"] = [label_of[n] for n in sources]
        writer.write(DATASET_JSON, json.dumps(meta, indent=1).encode())
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return report

