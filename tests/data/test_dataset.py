"""open_dataset on prepared folders and zips, raw folders and the demo, checked against Pillow and torch.flip."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.data import open_dataset, prepare_dataset

S = 8


@pytest.fixture
def raw_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    src = tmp_path / "raw"
    (src / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate([(20, 30), (24, 24), (30, 18)]):
        folder = src / "sub" if i == 2 else src
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return src


@pytest.fixture
def expected(raw_folder, pillow_center_resize) -> list[torch.Tensor]:
    """The raw images through Pillow's centre crop + Lanczos resize, as [3, S, S] tensors."""
    names = ("img0.png", "img1.png", "sub/img2.png")
    return [torch.from_numpy(pillow_center_resize(Image.open(raw_folder / n), S).copy()).permute(2, 0, 1) for n in names]


def check_items(ds, expected: list[torch.Tensor]) -> None:
    assert len(ds) == len(expected) and ds.resolution == S
    for item, want in zip(ds, expected):
        assert item.dtype == torch.uint8 and item.shape == (3, S, S)
        torch.testing.assert_close(item, want, rtol=0, atol=0)


@pytest.mark.parametrize("dst_name", ["prepared", "prepared.zip"])
def test_prepared_dataset(raw_folder, tmp_path, dst_name, expected):
    prepare_dataset(raw_folder, tmp_path / dst_name, S, progress=False)
    check_items(open_dataset(tmp_path / dst_name, S), expected)


def test_raw_folder_and_zip(raw_folder, tmp_path, expected):
    check_items(open_dataset(raw_folder, S), expected)
    archive = shutil.make_archive(str(tmp_path / "raw"), "zip", raw_folder)
    check_items(open_dataset(archive, S), expected)


def test_raw_zip_skips_entries_escaping_the_archive_with_a_warning(raw_folder, tmp_path, expected):
    archive = Path(shutil.make_archive(str(tmp_path / "raw"), "zip", raw_folder))
    with zipfile.ZipFile(archive, "a") as zf:
        for name in ("../x.png", "/abs.png", "a/../../y.png"):
            zf.writestr(name, (raw_folder / "img1.png").read_bytes())
    with pytest.warns(UserWarning, match=r"ignoring 3 entries with an unsafe path in archive .*: "
                                         r"\.\./x\.png, /abs\.png, a/\.\./\.\./y\.png$"):
        ds = open_dataset(archive, S)
    check_items(ds, expected)
    # A folder's file names are its own: one named like a drive is data, not an escape.
    (raw_folder / "C:img3.png").write_bytes((raw_folder / "img1.png").read_bytes())
    assert len(open_dataset(raw_folder, S)) == 4


def test_raw_folder_warns_about_non_images_and_skips_corrupt_files(raw_folder, expected):
    (raw_folder / "notes.txt").write_text("x")
    (raw_folder / "img0b.png").write_bytes((raw_folder / "img0.png").read_bytes()[:60])  # truncated
    with pytest.warns(UserWarning, match="notes.txt"):
        ds = open_dataset(raw_folder, S)
    assert len(ds) == 4  # the truncated file is only found out when read
    with pytest.warns(UserWarning, match="img0b.png"):
        torch.testing.assert_close(ds[1], expected[1], rtol=0, atol=0)  # img0b -> next good image, img1


def test_xflip_mirrors_with_torch_flip(raw_folder):
    plain = open_dataset(raw_folder, S)
    flipped = open_dataset(raw_folder, S, xflip=True)
    n = len(plain)
    assert len(flipped) == 2 * n
    for i in range(n):
        torch.testing.assert_close(flipped[i], plain[i], rtol=0, atol=0)
        torch.testing.assert_close(flipped[n + i], torch.flip(plain[i], dims=[2]), rtol=0, atol=0)
    with pytest.raises(IndexError):
        flipped[2 * n]


def test_fingerprint_is_stable_and_tracks_settings(raw_folder, tmp_path):
    prepare_dataset(raw_folder, tmp_path / "p", S, progress=False)
    shutil.copytree(tmp_path / "p", tmp_path / "copy")
    fp = open_dataset(tmp_path / "p", S).fingerprint()
    assert open_dataset(tmp_path / "copy", S).fingerprint() == fp  # content, not location
    assert open_dataset(tmp_path / "p", S, xflip=True).fingerprint() != fp
    assert open_dataset(raw_folder, S).fingerprint() != open_dataset(raw_folder, 2 * S).fingerprint()
    assert open_dataset("demo", S).fingerprint() == open_dataset("demo", S).fingerprint()


def test_zip_dataset_in_dataloader_workers(raw_folder, tmp_path):
    prepare_dataset(raw_folder, tmp_path / "p.zip", S, progress=False)
    ds = open_dataset(tmp_path / "p.zip", S, xflip=True)
    ds[0]  # opens the zip in this process first, as a training loop would when logging reals
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = torch.cat(list(loader))
    torch.testing.assert_close(batches, torch.stack([ds[i] for i in range(len(ds))]), rtol=0, atol=0)


def test_user_errors(raw_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_dataset(tmp_path / "missing", S)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in"):
        open_dataset(tmp_path / "empty", S)
    prepare_dataset(raw_folder, tmp_path / "p", S, progress=False)
    with pytest.raises(ValueError, match=r"holds 8x8 images but resolution 16 .* --size 16"):
        open_dataset(tmp_path / "p", 16)
    (tmp_path / "not.zip").write_text("x")
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        open_dataset(tmp_path / "not.zip", S)


def test_demo_dataset():
    ds = open_dataset("demo", 32, xflip=True)
    assert len(ds) == 2 * 4096 and ds.resolution == 32
    x = ds[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    torch.testing.assert_close(open_dataset("demo", 32)[5], x, rtol=0, atol=0)  # same index, same face
    assert not torch.equal(ds[6], x)
    torch.testing.assert_close(ds[4096 + 5], torch.flip(x, dims=[2]), rtol=0, atol=0)
    assert x.float().std() > 20  # real content, not a flat colour
