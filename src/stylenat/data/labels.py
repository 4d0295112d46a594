"""Class labels of a dataset's images, from StyleGAN's dataset.json, class folders or a CSV file.

Sources (file paths are relative to the dataset's root, with "/" separators):

* StyleGAN's ``dataset.json`` in the root: ``{"labels": [["path/to/img.png", 3], ...]}``. JSON
  integer labels are class indices, as in StyleGAN: the classes are "0".."K-1" with K - 1 the
  largest index (an index no image has is a class without images); JSON string labels are class
  names. ``"labels": null`` means unlabelled.
* ``folders``: one class per first-level folder, named after it.
* a CSV file with the columns ``path`` and ``label`` (a header row names them; other columns are
  ignored): every label is a class name, digits included ("07" stays "07").

Class names (everything but dataset.json's integers) are kept as they are and ordered by name, with
runs of digits compared as numbers ("2" before "10"); only names that label an image become classes.

Every image must get exactly one label: images without one, files labelled twice, empty labels and
labels naming files that are not images of the dataset are errors that name them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from stylenat.data.sources import FileSource
from stylenat.errors import ConfigError, DataError, MissingFileError

__all__ = ["Labels", "listed", "read_labels", "read_dataset_json", "class_order", "STYLEGAN_JSON"]

STYLEGAN_JSON = "dataset.json"


@dataclass(frozen=True)
class Labels:
    """labels: class index per image (in the given order). classes: the class names, by index."""

    labels: list[int]
    classes: list[str]


def listed(items: list[str], what: str, limit: int = 5) -> str:
    """For messages: "3 image(s): a.png, b.png, c.png", naming the first ``limit`` items."""
    shown = ", ".join(items[:limit])
    return f"{len(items)} {what}: {shown}" + (", ..." if len(items) > limit else "")


def _clean(path: str) -> str:
    return path.replace("\\", "/").removeprefix("./")


def class_order(name: str) -> tuple:
    """Sort key of class names: by name, runs of digits compared as numbers ("2" < "10" < "a")."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def read_dataset_json(source: FileSource) -> object | None:
    """The parsed ``dataset.json`` in the root of ``source``, None when there is none; DataError when
    it is not valid JSON."""
    if STYLEGAN_JSON not in source.names:
        return None
    try:
        return json.loads(source.read(STYLEGAN_JSON))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{source.path}/{STYLEGAN_JSON} is not valid JSON ({exc}); fix it or remove it") from None


def _by_path(entries: list[tuple[str, object, str]], origin: str) -> dict[str, object]:
    """{path: label} of (path, label, where) entries; DataError naming the paths labelled more than once."""
    by_path: dict[str, object] = {}
    where: dict[str, list[str]] = {}
    for path, label, at in entries:
        by_path[path] = label
        where.setdefault(path, []).append(at)
    twice = [f"{path} ({', '.join(ats)})" for path, ats in where.items() if len(ats) > 1]
    if twice:
        raise DataError(f"{origin} labels {listed(twice, 'file(s) more than once')}; give every image one label")
    return by_path


def _match(files: list[str], by_path: dict[str, object], origin: str) -> list[object]:
    """The label of every file, in order; DataError naming files without a label and labels without a file."""
    missing = [f for f in files if f not in by_path]
    if missing:
        raise DataError(f"{origin} has no label for {listed(missing, 'image(s)')}; label every image or remove them")
    unknown = sorted(set(by_path) - set(files))
    if unknown:
        raise DataError(f"{origin} labels {listed(unknown, 'file(s) that are not images of the dataset')}; "
                        "fix the paths (relative to the dataset's root)")
    return [by_path[f] for f in files]


def _by_name(names: list[str]) -> Labels:
    """Classes named by ``names`` (one per image), in class_order."""
    classes = sorted(set(names), key=class_order)
    index = {name: i for i, name in enumerate(classes)}
    return Labels([index[n] for n in names], classes)


def _from_json_values(files: list[str], values: list[object], origin: str) -> Labels:
    """dataset.json labels of ``files``: JSON integers are class indices, strings class names (not both)."""
    bad = [f"{f} ({v!r})" for f, v in zip(files, values) if isinstance(v, bool) or not isinstance(v, (int, str))]
    if bad:
        what = "label(s) that are neither a class index (an integer) nor a class name (a string)"
        raise DataError(f"{origin} has {listed(bad, what)}")
    ints = [v for v in values if isinstance(v, int)]
    if ints and len(ints) != len(values):
        raise DataError(f"{origin}: labels must be all class indices (integers) or all class names (strings), "
                        "not a mix of both")
    if ints:
        negative = [f"{f} ({v})" for f, v in zip(files, values) if v < 0]
        if negative:
            raise DataError(f"{origin} has {listed(negative, 'negative class index(es)')}; indices start at 0")
        return Labels(list(ints), [str(i) for i in range(max(ints) + 1)])
    empty = [f for f, v in zip(files, values) if not v.strip()]
    if empty:
        raise DataError(f"{origin} has {listed(empty, 'image(s) with an empty label')}; name every image's class")
    return _by_name(values)


def _from_stylegan_json(source: FileSource, files: list[str]) -> Labels | None:
    meta = read_dataset_json(source)
    if not isinstance(meta, dict) or meta.get("labels") is None:
        return None
    origin = f"{source.path}/{STYLEGAN_JSON}"
    try:
        entries = [(_clean(str(path)), label, f"entry {i + 1}") for i, (path, label) in enumerate(meta["labels"])]
    except (TypeError, ValueError):
        raise DataError(f"{origin}: 'labels' must be a list of [path, label] pairs") from None
    return _from_json_values(files, _match(files, _by_path(entries, origin), origin), origin)


def _from_folders(source: FileSource, files: list[str]) -> Labels:
    loose = [f for f in files if "/" not in f]
    if loose:
        raise DataError(f"--labels folders: {listed(loose, 'image(s) outside a class folder')} in {source.path}")
    return _by_name([f.split("/", 1)[0] for f in files])


def _from_csv(path: Path, files: list[str]) -> Labels:
    if not path.is_file():
        raise MissingFileError(f"no label file at {path} (--labels expects 'folders' or a CSV file with columns path,label)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a UTF-8 text file ({exc}); save it as CSV text") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
        raise DataError(f"{path} needs a header row with the columns path and label")
    entries, incomplete = [], []
    try:
        for row in reader:
            name, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not name or not label:  # a short row leaves the missing cells None
                incomplete.append(f"line {reader.line_num}")
            else:
                entries.append((_clean(name), label, f"line {reader.line_num}"))
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file at line {reader.line_num} ({exc})") from None
    if incomplete:
        raise DataError(f"{path} has {listed(incomplete, 'row(s) without a path or a label')}; fill them in or remove them")
    return _by_name([str(v) for v in _match(files, _by_path(entries, str(path)), str(path))])


def read_labels(source: FileSource, files: list[str], spec: str | os.PathLike | None = None) -> Labels | None:
    """Labels of ``files`` (names of ``source``), or None for an unlabelled dataset.

    Args:
        source: the dataset's files. files: the images to label, in their order.
        spec: None: StyleGAN's dataset.json in the root when there is one, else unlabelled;
            "folders": class folders; "none": unlabelled; anything else: a CSV file's path.
    """
    if spec is None:
        return _from_stylegan_json(source, files) if STYLEGAN_JSON in source.names else None
    if str(spec) == "none":
        return None
    if str(spec) == "folders":
        return _from_folders(source, files)
    if str(spec) == "":
        raise ConfigError("--labels needs 'folders', 'none' or a CSV file")
    return _from_csv(Path(spec), files)
