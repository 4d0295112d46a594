"""Class labels from StyleGAN's dataset.json, class folders and CSV files, through `prepare` and
`open_dataset`, with the error cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylenat.cli import main
from stylenat.data import dataset_classes, open_dataset, prepare_dataset
from stylenat.errors import DataError, MissingFileError

S = 8


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((S, S, 3), value, np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path) -> Path:
    """cat/ (2 images), dog/ (1), each image a flat grey whose level encodes its class and index."""
    root = tmp_path / "animals"
    _image(root / "dog" / "d0.png", 200)
    _image(root / "cat" / "c0.png", 10)
    _image(root / "cat" / "c1.png", 11)
    return root


def _items(dst) -> list[tuple[int, int]]:
    """(grey level, label) of every item of a dataset."""
    return [(int(image[0, 0, 0]), label) for image, label in open_dataset(dst, S)]


def test_class_folders(folders, tmp_path):
    report = prepare_dataset(folders, tmp_path / "out.zip", S, labels="folders", progress=False)
    assert report.classes == ["cat", "dog"] and "in 2 classes" in report.summary()
    assert sorted(_items(tmp_path / "out.zip")) == [(10, 0), (11, 0), (200, 1)]
    assert dataset_classes(tmp_path / "out.zip") == ["cat", "dog"]
    plain = open_dataset(tmp_path / "out.zip", S, labels=False)
    assert plain[0].shape == (3, S, S) and plain.num_classes == 2


def test_stylegan_dataset_json_is_read_by_default(folders, tmp_path):
    labels = [["cat/c0.png", 2], ["cat/c1.png", 0], ["dog/d0.png", 1]]
    (folders / "dataset.json").write_text(json.dumps({"labels": labels}))
    prepare_dataset(folders, tmp_path / "out", S, progress=False)
    assert sorted(_items(tmp_path / "out")) == [(10, 2), (11, 0), (200, 1)]
    assert dataset_classes(tmp_path / "out") == ["0", "1", "2"]
    # The raw folder with its dataset.json is labelled too, without the json warned about as a non-image.
    assert sorted((int(x[0, 0, 0]), y) for x, y in open_dataset(folders, S)) == [(10, 2), (11, 0), (200, 1)]
    (folders / "dataset.json").write_text(json.dumps({"labels": None}))
    prepare_dataset(folders, tmp_path / "plain", S, progress=False)
    assert open_dataset(tmp_path / "plain", S).num_classes == 0 and not isinstance(open_dataset(tmp_path / "plain", S)[0], tuple)


def test_csv_with_names_and_with_indices(folders, tmp_path):
    names = tmp_path / "names.csv"
    names.write_text("path,label,comment\ncat/c0.png,tabby,x\ncat/c1.png,siamese,y\ndog/d0.png,tabby,z\n")
    prepare_dataset(folders, tmp_path / "a", S, labels=names, progress=False)
    assert dataset_classes(tmp_path / "a") == ["siamese", "tabby"]
    assert sorted(_items(tmp_path / "a")) == [(10, 1), (11, 0), (200, 1)]
    indices = tmp_path / "indices.csv"
    indices.write_text("label,path\n3,cat/c0.png\n0,./cat/c1.png\n1,dog/d0.png\n")
    prepare_dataset(folders, tmp_path / "b", S, labels=indices, progress=False)
    assert dataset_classes(tmp_path / "b") == ["0", "1", "2", "3"]
    assert sorted(_items(tmp_path / "b")) == [(10, 3), (11, 0), (200, 1)]


def test_unreadable_images_drop_their_labels(folders, tmp_path):
    (folders / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    prepare_dataset(folders, tmp_path / "out", S, labels="folders", progress=False)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["skipped"][0]["file"] == "cat/broken.png" and len(meta["labels"]) == meta["count"] == 3
    assert sorted(_items(tmp_path / "out")) == [(10, 0), (11, 0), (200, 1)]


def test_missing_and_unknown_labels_are_named(folders, tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\ncat/c0.png,a\ndog/d0.png,b\n")
    with pytest.raises(DataError, match=r"no label for 1 image\(s\): cat/c1.png"):
        prepare_dataset(folders, tmp_path / "o1", S, labels=csv, progress=False)
    csv.write_text("path,label\ncat/c0.png,a\ncat/c1.png,a\ndog/d0.png,b\nbird/b0.png,c\n")
    with pytest.raises(DataError, match=r"1 file\(s\) that are not images of the dataset: bird/b0.png"):
        prepare_dataset(folders, tmp_path / "o2", S, labels=csv, progress=False)
    csv.write_text("file,class\ncat/c0.png,a\n")
    with pytest.raises(DataError, match="header row with the columns path and label"):
        prepare_dataset(folders, tmp_path / "o3", S, labels=csv, progress=False)
    with pytest.raises(MissingFileError, match="no label file"):
        prepare_dataset(folders, tmp_path / "o4", S, labels=tmp_path / "nope.csv", progress=False)
    (folders / "dataset.json").write_text(json.dumps({"labels": [["cat/c0.png", 0], ["dog/d0.png", 1]]}))
    with pytest.raises(DataError, match="dataset.json has no label for 1 image"):
        prepare_dataset(folders, tmp_path / "o5", S, progress=False)
    _image(folders / "loose.png", 50)
    with pytest.raises(DataError, match=r"1 image\(s\) outside a class folder: loose.png"):
        prepare_dataset(folders, tmp_path / "o6", S, labels="folders", progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))  # nothing written


def test_unlabelled_data_stays_as_it_is(folders, tmp_path):
    prepare_dataset(folders, tmp_path / "out", S, progress=False)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert "labels" not in meta and "classes" not in meta
    ds = open_dataset(tmp_path / "out", S)
    assert ds.num_classes == 0 and ds[0].shape == (3, S, S)


def test_cli_prepare_with_labels(folders, tmp_path, capsys):
    assert main(["prepare", str(folders), str(tmp_path / "out"), "--size", str(S), "--labels", "folders"]) == 0
    assert "3 written in 2 classes" in capsys.readouterr().out
    shutil.rmtree(folders / "dog")
    _image(folders / "x.png", 1)
    assert main(["prepare", str(folders), str(tmp_path / "out2"), "--size", str(S), "--labels", "folders"]) == 2
    assert "outside a class folder" in capsys.readouterr().err
