"""Class labels of a dataset's images, from StyleGAN's dataset.json, class folders or a CSV file.

Sources (file paths are relative to the dataset's root, with "/" separators):

* StyleGAN's ``dataset.json`` in the root: ``{"labels": [["path/to/img.png", 3], ...]}``; integer
  labels 0..K-1 (the class names are "0".."K-1"); ``"labels": null`` means unlabelled.
* ``folders``: one class per first-level folder, named after it (classes in sorted name order).
* a CSV file with the columns ``path`` and ``label`` (a header row names them; other columns are
  ignored): labels that are all integers are used as class indices, otherwise the distinct names
  in sorted order are the classes.

Every image must get exactly one label: images without one and labels naming files that are not
images of the dataset are errors that name them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from stylenat.data.sources import FileSource
from stylenat.errors import ConfigError, DataError, MissingFileError

__all__ = ["Labels", "read_labels", "STYLEGAN_JSON"]

STYLEGAN_JSON = "dataset.json"


@dataclass(frozen=True)
class Labels:
    """labels: class index per image (in the given order). classes: the class names, by index."""

    labels: list[int]
    classes: list[str]


def _names(items: list[str], what: str, limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{len(items)} {what}: {shown}" + (", ..." if len(items) > limit else "")


def _clean(path: str) -> str:
    return path.replace("\\", "/").removeprefix("./")


def _match(files: list[str], by_path: dict[str, object], origin: str) -> list[object]:
    """The label of every file, in order; DataError naming files without a label and labels without a file."""
    missing = [f for f in files if f not in by_path]
    if missing:
        raise DataError(f"{origin} has no label for {_names(missing, 'image(s)')}; label every image or remove them")
    unknown = sorted(set(by_path) - set(files))
    if unknown:
        raise DataError(f"{origin} labels {_names(unknown, 'file(s) that are not images of the dataset')}; "
                        "fix the paths (relative to the dataset's root)")
    return [by_path[f] for f in files]


def _as_classes(values: list[object], origin: str) -> Labels:
    """Class indices and names of label values: integers as they are, anything else by sorted name."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise DataError(f"{origin}: class indices must be >= 0, got {min(values)}")
        return Labels(list(values), [str(i) for i in range(max(values) + 1)])
    if all(isinstance(v, str) for v in values):
        if all(v.strip().lstrip("-").isdigit() for v in values):
            return _as_classes([int(v) for v in values], origin)
        classes = sorted(set(values))
        index = {name: i for i, name in enumerate(classes)}
        return Labels([index[v] for v in values], classes)
    bad = next(v for v in values if not isinstance(v, (int, str)) or isinstance(v, bool))
    raise DataError(f"{origin}: a label must be a class index or a class name, got {bad!r}")


def _from_stylegan_json(source: FileSource, files: list[str]) -> Labels | None:
    try:
        meta = json.loads(source.read(STYLEGAN_JSON))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{source.path}/{STYLEGAN_JSON} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("labels") is None:
        return None
    try:
        by_path = {_clean(str(path)): label for path, label in meta["labels"]}
    except (TypeError, ValueError):
        raise DataError(f"{source.path}/{STYLEGAN_JSON}: 'labels' must be a list of [path, label] pairs") from None
    origin = f"{source.path}/{STYLEGAN_JSON}"
    return _as_classes(_match(files, by_path, origin), origin)


def _from_folders(source: FileSource, files: list[str]) -> Labels:
    loose = [f for f in files if "/" not in f]
    if loose:
        raise DataError(f"--labels folders: {_names(loose, 'image(s) outside a class folder')} in {source.path}")
    return _as_classes([f.split("/", 1)[0] for f in files], f"the class folders of {source.path}")


def _from_csv(path: Path, files: list[str]) -> Labels:
    if not path.is_file():
        raise MissingFileError(f"no label file at {path} (--labels expects 'folders' or a CSV file with columns path,label)")
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{path} needs a header row with the columns path and label")
    by_path = {}
    for row in rows:
        name = _clean(row["path"].strip())
        if name in by_path:
            raise DataError(f"{path} labels {name} twice")
        by_path[name] = row["label"].strip()
    return _as_classes(_match(files, by_path, str(path)), str(path))


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
