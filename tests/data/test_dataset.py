"""open_dataset on prepared folders and zips, raw folders and the demo, checked against Pillow and torch.flip."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylenat.data import native_resolution, open_dataset, prepare_dataset
from stylenat.errors import DataError

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
    with pytest.raises(ValueError, match=r"holds 8x8 images but 16x16 was asked for; .*stylenat prepare SRC DST --size 16$"):
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


def centre_box(w: int, h: int, tw: int, th: int) -> tuple[int, int, int, int]:
    """The largest centred box of aspect tw:th, from floats (an oracle independent of crop_box)."""
    if w / h > tw / th:
        cw, ch = round(h * tw / th), h
    else:
        cw, ch = w, round(w * th / tw)
    return (w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch


@pytest.mark.parametrize("shape", [(8, 16), (16, 8)])
def test_raw_and_prepared_rectangles_are_h_by_w(raw_folder, tmp_path, shape):
    h, w = shape
    names = ("img0.png", "img1.png", "sub/img2.png")
    want = []
    for n in names:
        img = Image.open(raw_folder / n).convert("RGB")
        crop = img.crop(centre_box(*img.size, w, h)).resize((w, h), Image.Resampling.LANCZOS)
        want.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
    raw = open_dataset(raw_folder, shape)
    assert raw.resolution == shape and raw.shape == shape
    for item, expect in zip(raw, want):
        assert item.shape == (3, h, w)
        torch.testing.assert_close(item, expect, rtol=0, atol=0)
    prepare_dataset(raw_folder, tmp_path / "p.zip", f"{w}x{h}", progress=False)
    prepared = open_dataset(tmp_path / "p.zip", [h, w], xflip=True)  # a list reads like a tuple
    assert prepared.resolution == shape and len(prepared) == 6
    for i, expect in enumerate(want):
        torch.testing.assert_close(prepared[i], expect, rtol=0, atol=0)
        torch.testing.assert_close(prepared[3 + i], expect.flip(-1), rtol=0, atol=0)
    assert native_resolution(tmp_path / "p.zip") == (shape, True)
    assert open_dataset(raw_folder, shape).fingerprint() != open_dataset(raw_folder, shape[::-1]).fingerprint()

    with pytest.raises(DataError) as info:  # the transpose is another size, named width first
        open_dataset(tmp_path / "p.zip", shape[::-1])
    message = str(info.value)
    assert f"holds {w}x{h} images but {h}x{w} was asked for" in message and message.endswith(
        f"stylenat prepare SRC DST --size {h}x{w}") and "\n" not in message
    with pytest.raises(DataError, match=rf"holds {w}x{h} images but 8x8 was asked for.* --size 8$"):
        open_dataset(tmp_path / "p.zip", 8)


def test_an_old_square_dataset_json_still_opens(raw_folder, tmp_path):
    prepare_dataset(raw_folder, tmp_path / "p", S, progress=False)
    meta = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert meta["size"] == S and "fill" not in meta  # the format squares always had
    ds = open_dataset(tmp_path / "p", S)
    assert ds.resolution == S and ds[0].shape == (3, S, S)
    assert open_dataset(tmp_path / "p", (S, S)).fingerprint() == ds.fingerprint()
    assert native_resolution(tmp_path / "p") == (S, True)


def test_demo_rectangles_centre_the_square_face():
    square = open_dataset("demo", 16)
    wide, tall = open_dataset("demo", (16, 32)), open_dataset("demo", (32, 16))
    for i in (0, 5):
        assert wide[i].shape == (3, 16, 32) and tall[i].shape == (3, 32, 16)
        torch.testing.assert_close(wide[i][:, :, 8:24], square[i], rtol=0, atol=0)
        torch.testing.assert_close(tall[i][:, 8:24, :], square[i], rtol=0, atol=0)
    assert wide.fingerprint() != tall.fingerprint() != square.fingerprint()


@pytest.mark.parametrize("w, h, want", [
    (32, 16, ((16, 32), True)),    # base 4x2
    (16, 32, ((32, 16), True)),
    (64, 48, ((48, 64), True)),    # base 4x3
    (48, 48, (48, True)),          # base 6x6: a model size now
    (64, 64, (64, True)),
    (30, 20, ((20, 30), False)),   # no base 4..7 fits: cropped and resized to any model
    (24, 100, ((100, 24), False)),
    (20, 20, (20, True)),          # base 5x5
    (100, 100, (100, False)),
])
def test_native_resolution_of_raw_images_of_one_size(tmp_path, w, h, want):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(2):
        Image.new("RGB", (w, h), (i, 0, 0)).save(src / f"{i}.png")
    assert native_resolution(src) == want
    Image.new("RGB", (w + 1, h), 0).save(src / "other.png")
    assert native_resolution(src) == (None, False)
    assert native_resolution("demo") == (None, False)
