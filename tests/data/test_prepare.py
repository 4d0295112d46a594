"""The dataset tool against Pillow itself and closed forms: conversions, crops, filters, zips, reports."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylenat.cli import main
from stylenat.data import prepare, prepare_dataset
from stylenat.data.images import decode_image

S = 16
RNG = np.random.default_rng(0)


def noise(h: int, w: int, channels: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def read_output(dst: Path, index: int) -> np.ndarray:
    name = f"{index:08d}.png"
    if dst.suffix == ".zip":
        with zipfile.ZipFile(dst) as zf:
            return np.asarray(Image.open(io.BytesIO(zf.read(name))))
    return np.asarray(Image.open(dst / name))


def read_meta(dst: Path) -> dict:
    if dst.suffix == ".zip":
        with zipfile.ZipFile(dst) as zf:
            return json.loads(zf.read("dataset.json"))
    return json.loads((dst / "dataset.json").read_text())


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """One RGB (non-square), one grayscale (in a subfolder), one RGBA, one CMYK JPEG, a truncated
    PNG and a text file: exactly four images should come out and two files be reported."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(noise(30, 40)).save(src / "a_rgb.png")
    Image.fromarray(noise(S, S, 1)).save(src / "sub" / "b_gray.png")
    rgba = np.concatenate([np.full((S, S, 3), (200, 40, 10), np.uint8), np.full((S, S, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba).save(src / "c_rgba.png")
    Image.new("CMYK", (S, S), (20, 180, 60, 10)).save(src / "d_cmyk.jpg")
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buf, format="PNG")
    (src / "e_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (src / "f_notes.txt").write_text("not an image")
    return src


def test_mixed_folder_converts_good_files_and_reports_bad_ones(mixed_folder, tmp_path, pillow_center_resize):
    dst = tmp_path / "out"
    report = prepare_dataset(mixed_folder, dst, S, progress=False)
    assert report.count == 4
    assert [name for name, _ in report.skipped] == ["e_truncated.png", "f_notes.txt"]
    assert "truncated" in report.skipped[0][1] and "not an image" in report.skipped[1][1]
    meta = read_meta(dst)
    assert meta["size"] == S and meta["count"] == 4 and meta["filter"] == "lanczos" and meta["crop"] == "center"
    assert meta["sources"] == ["a_rgb.png", "c_rgba.png", "d_cmyk.jpg", "sub/b_gray.png"]
    assert [s["file"] for s in meta["skipped"]] == ["e_truncated.png", "f_notes.txt"]
    for i in range(4):
        out = read_output(dst, i)
        assert out.shape == (S, S, 3) and out.dtype == np.uint8

    np.testing.assert_array_equal(read_output(dst, 0), pillow_center_resize(Image.open(mixed_folder / "a_rgb.png"), S))
    # RGBA on white, closed form: c * a + 255 * (1 - a), a = 128/255.
    expected = np.rint(np.array([200, 40, 10]) * 128 / 255 + 255 * 127 / 255)
    np.testing.assert_allclose(read_output(dst, 1), np.broadcast_to(expected, (S, S, 3)), atol=1)
    cmyk = np.asarray(Image.open(mixed_folder / "d_cmyk.jpg").convert("RGB"))
    np.testing.assert_array_equal(read_output(dst, 2), cmyk)
    gray = np.asarray(Image.open(mixed_folder / "sub" / "b_gray.png"))
    np.testing.assert_array_equal(read_output(dst, 3), np.stack([gray] * 3, axis=2))


def test_zip_in_zip_out_matches_folder_in_folder_out(mixed_folder, tmp_path):
    src_zip = tmp_path / "src.zip"
    with zipfile.ZipFile(src_zip, "w") as zf:
        for path in sorted(mixed_folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(mixed_folder).as_posix())
    from_folder = prepare_dataset(mixed_folder, tmp_path / "a", S, progress=False)
    from_zip = prepare_dataset(src_zip, tmp_path / "b.zip", S, progress=False, workers=2)
    assert from_zip.count == from_folder.count == 4
    assert from_zip.skipped == from_folder.skipped
    with zipfile.ZipFile(tmp_path / "b.zip") as zf:
        assert sorted(zf.namelist()) == sorted(p.name for p in (tmp_path / "a").iterdir())
    for i in range(4):
        np.testing.assert_array_equal(read_output(tmp_path / "b.zip", i), read_output(tmp_path / "a", i))
    assert read_meta(tmp_path / "b.zip")["content_sha1"] == read_meta(tmp_path / "a")["content_sha1"]


UNSAFE = ["../x.png", "/abs.png", "a/../../y.png", "C:/drive.png", "a\\..\\..\\w.png"]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def zip_slip(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A zip of two good S x S images and the same kind of image under names escaping the archive."""
    good = {"good1.png": noise(S, S), "sub/good2.png": noise(S, S)}
    archive = tmp_path / "work" / "slip.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for name in [*good, *UNSAFE]:  # writestr keeps a name as given (ZipFile.write would clean it)
            zf.writestr(name, png(good[name] if name in good else noise(S, S)))
    return archive, good


@pytest.mark.parametrize("dst_name", ["out", "out.zip"])
def test_zip_entries_escaping_the_archive_are_skipped_and_reported(zip_slip, tmp_path, dst_name, capsys):
    archive, good = zip_slip
    dst = tmp_path / "work" / "deep" / dst_name
    report = prepare_dataset(archive, dst, S, progress=False)
    assert report.count == 2
    for i, name in enumerate(sorted(good)):
        np.testing.assert_array_equal(read_output(dst, i), good[name])  # S x S: stored unchanged
    unsafe = sorted(UNSAFE)
    assert report.skipped == [(n, "unsafe path in archive (absolute, drive letter or '..')") for n in unsafe]
    meta = read_meta(dst)
    assert meta["sources"] == sorted(good) and [s["file"] for s in meta["skipped"]] == unsafe
    assert "2 written, 5 skipped" in report.summary()
    # Nothing was written beside the destination, above it or at the absolute path.
    written = [f"deep/{dst_name}"] if dst.suffix == ".zip" else [f"deep/out/{n}" for n in ("00000000.png", "00000001.png",
                                                                                            "dataset.json")]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        sorted(f"work/{n}" for n in ["slip.zip", *written])
    assert not Path("/abs.png").exists()
    assert main(["prepare", str(archive), str(tmp_path / "cli"), "--size", str(S)]) == 0
    assert "2 written, 5 skipped" in capsys.readouterr().out


def test_a_zip_of_nothing_but_escaping_entries_says_so(tmp_path):
    archive = tmp_path / "slip.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../x.png", png(noise(S, S)))
    with pytest.raises(ValueError, match=r"no images found .*\.\./x\.png: unsafe path in archive"):
        prepare_dataset(archive, tmp_path / "out", S, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slip.zip"]


@pytest.mark.parametrize("name, resample", [("lanczos", Image.Resampling.LANCZOS), ("box", Image.Resampling.BOX),
                                            ("bicubic", Image.Resampling.BICUBIC)])
def test_filters_match_pillow_and_differ(tmp_path, name, resample, pillow_center_resize):
    src = tmp_path / "src"
    src.mkdir()
    img = Image.fromarray(noise(48, 72))
    img.save(src / "x.png")
    prepare_dataset(src, tmp_path / name, 12, filter=name, progress=False)
    out = read_output(tmp_path / name, 0)
    np.testing.assert_array_equal(out, pillow_center_resize(img, 12, resample))
    other = Image.Resampling.BOX if name != "box" else Image.Resampling.LANCZOS
    assert not np.array_equal(out, pillow_center_resize(img, 12, other))


def test_crop_none_letterboxes_non_square(tmp_path):
    """--crop none once skipped a non-square image; it now pads it (rectangle tests: test_resize.py)."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((20, 40, 3), (200, 30, 30), np.uint8)).save(src / "wide.png")
    Image.fromarray(noise(20, 20)).save(src / "square.png")
    report = prepare_dataset(src, tmp_path / "out", 10, crop="none", fill="#0000ff", progress=False)
    assert report.count == 2 and not report.skipped
    np.testing.assert_array_equal(read_output(tmp_path / "out", 0), np.asarray(Image.open(src / "square.png").resize(
        (10, 10), Image.Resampling.LANCZOS)))
    wide = read_output(tmp_path / "out", 1)  # 40x20 -> 10x5 at rows 2..6 (top (10 - 5) // 2), blue above and below
    assert (wide[:2] == (0, 0, 255)).all() and (wide[7:] == (0, 0, 255)).all()
    assert np.abs(wide[2:7].astype(int) - (200, 30, 30)).max() <= 1
    meta = read_meta(tmp_path / "out")
    assert meta["crop"] == "none" and meta["fill"] == "#0000ff" and meta["size"] == 10


def test_sixteen_bit_palette_exif_and_gif_conversions():
    def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0..65535 in 256 steps
    sixteen = decode_image(encode(Image.fromarray(values)))
    np.testing.assert_array_equal(np.asarray(sixteen)[..., 0], values // 257)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal_rgb = np.asarray(decode_image(encode(pal, transparency=0)))
    assert tuple(pal_rgb[0, 0]) == (255, 255, 255) and tuple(pal_rgb[1, 1]) == (255, 0, 0)

    arr = noise(6, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored image must be turned 90 degrees clockwise
    upright = decode_image(encode(Image.fromarray(arr), exif=exif.tobytes()))
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(arr, k=-1))

    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(decode_image(gif))[0, 0]) == (255, 0, 0)


def test_interrupted_run_leaves_no_destination(mixed_folder, tmp_path, monkeypatch):
    calls = []

    def failing_convert(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    real = prepare._convert
    monkeypatch.setattr(prepare, "_convert", failing_convert)
    for dst in (tmp_path / "out", tmp_path / "out.zip"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            prepare_dataset(mixed_folder, dst, S, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out", S)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files found"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", S)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found"):
        prepare_dataset(tmp_path / "junk", tmp_path / "out", S, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="already exists"):
        prepare_dataset(tmp_path / "junk", tmp_path / "empty", S)
    with pytest.raises(ValueError, match="unknown filter"):
        prepare_dataset(tmp_path / "junk", tmp_path / "out", S, filter="nearest")


def test_cli_prepare(mixed_folder, tmp_path, capsys):
    assert main(["prepare", str(mixed_folder), str(tmp_path / "out.zip"), "--size", str(S), "--filter", "box"]) == 0
    out = capsys.readouterr().out
    assert "4 written, 2 skipped" in out and "out.zip:dataset.json" in out
    assert read_meta(tmp_path / "out.zip")["filter"] == "box"
    assert main(["prepare", str(tmp_path / "missing"), str(tmp_path / "x"), "--size", "8"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_zip_entries_under_dot_slash_are_images_and_keep_their_class_folders(tmp_path):
    """`zip -r data.zip .` names entries "./cat/a.png": "." is the archive's own folder, not a hidden
    name (such entries were once dropped silently) nor a class."""
    pixels = [np.full((16, 16, 3), v, np.uint8) for v in (40, 200)]
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        for name, image in (("./cat/a.png", pixels[0]), ("./dog/./b.png", pixels[1])):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, "PNG")
            z.writestr(name, buf.getvalue())
    report = prepare_dataset(tmp_path / "data.zip", tmp_path / "out", 16, labels="folders", progress=False)
    assert not report.skipped
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["classes"] == ["cat", "dog"]
    written = sorted(p for p in (tmp_path / "out").iterdir() if p.suffix == ".png")
    assert [np.asarray(Image.open(p)).mean() for p in written] == [40, 200]


OLD_KEYS = ["format", "version", "size", "count", "filter", "crop", "source", "content_sha1", "sources", "skipped"]


def test_rectangles_wxh_is_width_by_height_and_the_meta_says_so(tmp_path, capsys):
    """--size 32x16: 32 wide, 16 high; dataset.json "size" [16, 32]; a square keeps its old keys."""
    src = tmp_path / "src"
    src.mkdir()
    img = Image.fromarray(noise(30, 50))  # 50 wide, 30 high
    img.save(src / "a.png")
    assert main(["prepare", str(src), str(tmp_path / "r.zip"), "--size", "32x16"]) == 0
    out = read_output(tmp_path / "r.zip", 0)
    assert out.shape == (16, 32, 3)  # 50 x 25 centred (top 2), resized: a square crop would differ
    np.testing.assert_array_equal(out, np.asarray(img.crop((0, 2, 50, 27)).resize((32, 16), Image.Resampling.LANCZOS)))
    meta = read_meta(tmp_path / "r.zip")
    assert meta["size"] == [16, 32] and meta["crop"] == "center" and "fill" not in meta
    assert list(meta) == OLD_KEYS

    assert main(["prepare", str(src), str(tmp_path / "lb"), "--size", "16x32", "--crop", "none", "--fill", "white"]) == 0
    out = read_output(tmp_path / "lb", 0)  # 50x30 fitted into 16 wide: 16x10 at top (32 - 10) // 2 = 11
    assert out.shape == (32, 16, 3) and (out[:11] == 255).all() and (out[21:] == 255).all()
    np.testing.assert_array_equal(out[11:21], np.asarray(img.resize((16, 10), Image.Resampling.LANCZOS)))
    meta = read_meta(tmp_path / "lb")
    assert meta["size"] == [32, 16] and meta["crop"] == "none" and meta["fill"] == "#ffffff"
    assert prepare_dataset(src, tmp_path / "sq", "16", progress=False).size == 16
    assert list(read_meta(tmp_path / "sq")) == OLD_KEYS and read_meta(tmp_path / "sq")["size"] == 16
    assert prepare_dataset(src, tmp_path / "sq2", "16x16", progress=False).size == 16  # a square pair is N
    capsys.readouterr()

    for args, message in ((["--size", "32y16"], "size: cannot read '32y16'; give N (a square) or WIDTHxHEIGHT"),
                          (["--size", "0x16"], "size must be positive, got 0x16"),
                          (["--size", "16", "--crop", "none", "--fill", "blurple"], "unknown colour 'blurple'")):
        assert main(["prepare", str(src), str(tmp_path / "bad"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and not (tmp_path / "bad").exists()
