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


def test_csv_labels_are_class_names_even_when_they_are_digits(folders, tmp_path):
    names = tmp_path / "names.csv"
    names.write_text("path,label,comment\ncat/c0.png,tabby,x\ncat/c1.png,siamese,y\ndog/d0.png,tabby,z\n")
    prepare_dataset(folders, tmp_path / "a", S, labels=names, progress=False)
    assert dataset_classes(tmp_path / "a") == ["siamese", "tabby"]
    assert sorted(_items(tmp_path / "a")) == [(10, 1), (11, 0), (200, 1)]
    digits = tmp_path / "digits.csv"  # names, not indices: no empty classes "1", "2", ... and "07" stays "07"
    digits.write_text("label,path\n10,cat/c0.png\n07,./cat/c1.png\n2,dog/d0.png\n")
    prepare_dataset(folders, tmp_path / "b", S, labels=digits, progress=False)
    assert dataset_classes(tmp_path / "b") == ["2", "07", "10"]  # digit runs compare as numbers
    assert sorted(_items(tmp_path / "b")) == [(10, 2), (11, 1), (200, 0)]


@pytest.mark.parametrize(("names", "classes"), [(["10", "20"], ["10", "20"]), (["01", "02"], ["01", "02"]),
                                                (["10", "2"], ["2", "10"]), (["b2", "b10", "a"], ["a", "b2", "b10"])])
def test_class_folders_with_digit_names_keep_their_names(tmp_path, names, classes):
    for i, name in enumerate(names):
        _image(tmp_path / "src" / name / "x.png", 10 * i)
    prepare_dataset(tmp_path / "src", tmp_path / "out", S, labels="folders", progress=False)
    assert dataset_classes(tmp_path / "out") == classes  # as many classes as folders, none empty
    ds = open_dataset(tmp_path / "out", S)
    assert {classes[label]: int(image[0, 0, 0]) for image, label in ds} == {name: 10 * i for i, name in enumerate(names)}


def test_dataset_json_integers_are_indices_and_strings_names(folders, tmp_path):
    (folders / "dataset.json").write_text(json.dumps({"labels": [["cat/c0.png", 3], ["cat/c1.png", 0], ["dog/d0.png", 3]]}))
    assert dataset_classes(folders) == ["0", "1", "2", "3"]  # StyleGAN: an index names the class, used or not
    assert sorted((int(x[0, 0, 0]), y) for x, y in open_dataset(folders, S)) == [(10, 3), (11, 0), (200, 3)]
    (folders / "dataset.json").write_text(json.dumps({"labels": [["cat/c0.png", "20"], ["cat/c1.png", "10"],
                                                                 ["dog/d0.png", "20"]]}))
    assert dataset_classes(folders) == ["10", "20"]
    assert sorted((int(x[0, 0, 0]), y) for x, y in open_dataset(folders, S)) == [(10, 1), (11, 0), (200, 1)]


def _one_line_prepare_error(capsys, src, dst, *extra) -> str:
    assert main(["prepare", str(src), str(dst), "--size", str(S), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("stylenat prepare: error:") and not dst.exists()
    return err


def test_csv_rows_without_a_label_are_named(folders, tmp_path, capsys):
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\ncat/c0.png,a\ncat/c1.png\ndog/d0.png,b\n")  # line 3 has no label column
    with pytest.raises(DataError, match=r"l.csv has 1 row\(s\) without a path or a label: line 3"):
        prepare_dataset(folders, tmp_path / "o1", S, labels=csv, progress=False)
    csv.write_text("path,label\ncat/c0.png,a\ncat/c1.png,  \ndog/d0.png,\n")  # empty label cells
    err = _one_line_prepare_error(capsys, folders, tmp_path / "o2", "--labels", str(csv))
    assert "l.csv has 2 row(s) without a path or a label: line 3, line 4" in err
    csv.write_text("path,label\n,a\ncat/c0.png,a\ncat/c1.png,a\ndog/d0.png,b\n")  # an empty path
    assert "without a path or a label: line 2" in _one_line_prepare_error(capsys, folders, tmp_path / "o3", "--labels", str(csv))


def test_a_file_labelled_twice_is_an_error_in_csv_and_dataset_json(folders, tmp_path, capsys):
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\ncat/c0.png,a\ncat/c1.png,a\n./cat/c0.png,b\ndog/d0.png,b\n")
    err = _one_line_prepare_error(capsys, folders, tmp_path / "o1", "--labels", str(csv))
    assert "l.csv labels 1 file(s) more than once: cat/c0.png (line 2, line 4)" in err
    entries = [["cat/c0.png", 0], ["cat/c1.png", 0], ["dog/d0.png", 1], ["cat/c1.png", 1]]
    (folders / "dataset.json").write_text(json.dumps({"labels": entries}))
    err = _one_line_prepare_error(capsys, folders, tmp_path / "o2")
    assert "dataset.json labels 1 file(s) more than once: cat/c1.png (entry 2, entry 4)" in err
    with pytest.raises(DataError, match="more than once"):
        open_dataset(folders, S)  # the raw folder, read for training, says the same


@pytest.mark.parametrize("label", ["", "  ", 1.5, True, None, [0, 1]])
def test_dataset_json_labels_that_are_not_a_class(folders, tmp_path, capsys, label):
    entries = [["cat/c0.png", "a"], ["cat/c1.png", "a"], ["dog/d0.png", label]]
    (folders / "dataset.json").write_text(json.dumps({"labels": entries}))
    err = _one_line_prepare_error(capsys, folders, tmp_path / "out")
    assert "dataset.json has 1 " in err and "dog/d0.png" in err
    assert "empty label" in err if isinstance(label, str) else repr(label) in err


def test_dataset_json_mixing_indices_and_names(folders, tmp_path, capsys):
    (folders / "dataset.json").write_text(json.dumps({"labels": [["cat/c0.png", 0], ["cat/c1.png", "a"], ["dog/d0.png", 1]]}))
    assert "not a mix of both" in _one_line_prepare_error(capsys, folders, tmp_path / "out")


def test_dataset_json_that_is_not_json(folders, tmp_path, capsys):
    (folders / "dataset.json").write_text('{"labels": [["cat/c0.png", 0],')
    err = _one_line_prepare_error(capsys, folders, tmp_path / "out")
    assert "dataset.json is not valid JSON" in err and str(folders) in err
    for read in (lambda: open_dataset(folders, S), lambda: dataset_classes(folders)):
        with pytest.raises(DataError, match="dataset.json is not valid JSON"):
            read()
    assert main(["train", "--preset", "tiny", "--data", str(folders), "--resolution", "16", "--steps", "1",
                 "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("stylenat train: error:") and "dataset.json is not valid JSON" in err


def test_re_preparing_a_prepared_dataset_keeps_its_labels(folders, tmp_path, capsys):
    prepare_dataset(folders, tmp_path / "first", S, labels="folders", progress=False)
    prepare_dataset(tmp_path / "first", tmp_path / "again", S, progress=False)
    assert dataset_classes(tmp_path / "again") == ["cat", "dog"]
    assert sorted(_items(tmp_path / "again")) == sorted(_items(tmp_path / "first"))
    _image(tmp_path / "first" / "extra.png", 77)  # a file added to the prepared dataset has no label there
    err = _one_line_prepare_error(capsys, tmp_path / "first", tmp_path / "again2")
    assert "has no label for 1 image(s) added to it: extra.png" in err


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
