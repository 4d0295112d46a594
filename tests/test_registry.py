"""Released models by name: download (resumed, checked), conversion, cache, offline, mirrors, user
entries; every file served by a loopback server these tests start (127.0.0.1), nothing from the net."""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

import stylenat
from stylenat import _download, registry
from stylenat.cli import main
from stylenat.errors import ConfigError, DownloadError, MissingFileError, ModelFileError
from stylenat.models import build_generator
from stylenat.models.io import save_model
from stylenat.sampling import generate

from .conftest import official_shapes

shutil_usage = namedtuple("usage", "total used free")
from .train.helpers import ENV, cli



@pytest.fixture(scope="module")
def small(official_dir, official_tag):
    """(official checkpoint bytes, its meta, the official code's outputs) of a parity fixture."""
    tag = official_tag
    meta = json.loads((official_dir / f"{tag}_meta.json").read_text())
    expected = torch.load(official_dir / f"{tag}_expected.pt", weights_only=True)
    return (official_dir / f"{tag}_checkpoint.pt").read_bytes(), meta, expected


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _matches_official(model, expected) -> bool:
    with torch.no_grad():
        return _rel(stylenat.load(model)(expected["z"]), expected["image"]) < 1e-4


def _official_keys(meta: dict) -> dict:
    """An official-config meta without the fixture's bookkeeping (parameter counts)."""
    return {k: v for k, v in meta.items() if not k.endswith("params")}


def test_first_download_converts_checks_and_caches(cache, server, small, capsys):
    data, meta, expected = small
    url = server.add("/ckpt/small.pt", data)
    registry.register("small", url, meta=_official_keys(meta))
    path = registry.fetch("small")
    err = capsys.readouterr().err
    digest = hashlib.sha256(data).hexdigest()
    assert f"sha256 {digest} (not in the registry: recorded)" in err
    assert "100% of" in err  # the progress line (a line per 5 % off a terminal)
    assert path == cache / "models" / "small" / "model.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "model.safetensors", "record.json"]  # .pt stored once
    record = json.loads((path.parent / "record.json").read_text())
    assert record["sha256"] == digest and record["size"] == len(data) and not record["sha256_checked"]
    assert record["model_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _matches_official("small", expected)  # the converted weights are the official ones
    server.stop()  # cached reuse needs no server
    assert registry.fetch("small") == path
    assert _matches_official("small", expected)
    assert len(server.gets("/ckpt/small.pt")) == 1


def test_known_sha256_is_checked(cache, server, small, capsys):
    data, meta, _ = small
    registry.register("small", server.add("/a.pt", data), sha256=hashlib.sha256(data).hexdigest(), meta=_official_keys(meta))
    registry.fetch("small")
    assert "(matches the registry)" in capsys.readouterr().err


def test_wrong_sha256_deletes_the_file(cache, server, small):
    data, meta, _ = small
    registry.register("small", server.add("/a.pt", data), sha256="0" * 64, meta=_official_keys(meta))
    with pytest.raises(DownloadError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}; it was deleted"):
        registry.fetch("small")
    assert [p.name for p in (cache / "models" / "small").iterdir()] == [".lock"]


def test_resume_after_a_dropped_connection(cache, server, small):
    data, meta, expected = small
    half = len(data) // 2
    registry.register("small", server.add("/a.pt", data, cut_bytes=half, cuts_left=1), meta=_official_keys(meta))
    registry.fetch("small")
    first, second = server.gets("/a.pt")
    assert first.sent == half and "Range" not in first.headers
    assert second.headers["Range"] == f"bytes={half}-" and second.status == 206 and second.sent == len(data) - half
    assert second.headers["If-Range"] == '"' + hashlib.sha256(data).hexdigest() + '"'
    assert _matches_official("small", expected)


def test_a_later_try_resumes_what_an_interrupted_one_left(cache, server, small):
    data, meta, expected = small
    tries = 1 + len(_download.BACKOFF_S)
    registry.register("small", server.add("/a.pt", data, cut_bytes=1000, cuts_left=tries), meta=_official_keys(meta))
    with pytest.raises(DownloadError, match=r"a\.pt: the connection dropped at 4,000 bytes of .*; 4,000 bytes kept in "
                                            r".*a\.pt\.partial: run again to resume$"):
        registry.fetch("small")
    partial = cache / "models" / "small" / "a.pt.partial"
    assert partial.stat().st_size == tries * 1000  # every retry resumed where the last one stopped
    assert main(["download", "small"]) == 0
    last = server.gets("/a.pt")[-1]
    assert last.headers["Range"] == f"bytes={tries * 1000}-" and last.sent == len(data) - tries * 1000
    assert not partial.exists()
    assert _matches_official("small", expected)


def test_a_server_without_range_support_starts_over(cache, server, small):
    data, meta, expected = small
    registry.register("small", server.add("/a.pt", data, cut_bytes=500, cuts_left=1, ranges=False), meta=_official_keys(meta))
    registry.fetch("small")
    assert [r.status for r in server.gets("/a.pt")] == [200, 200]
    assert _matches_official("small", expected)


def test_a_misaligned_range_answer_starts_over(cache, server, small):
    data, meta, expected = small
    registry.register("small", server.add("/a.pt", data, cut_bytes=1000, cuts_left=1, range_shift=10),
                      meta=_official_keys(meta))
    registry.fetch("small")  # bytes 1010- sent for "bytes=1000-": thrown away, then the whole file
    assert [r.status for r in server.gets("/a.pt")] == [200, 206, 200]
    assert _matches_official("small", expected)


def test_a_file_changed_between_tries_is_not_mixed(cache, server, small):
    data, meta, expected = small
    other = bytes(reversed(data))  # same size, other bytes
    registry.register("small", server.add("/a.pt", other, cut_bytes=len(data) // 10, cuts_left=1 + len(_download.BACKOFF_S)),
                      meta=_official_keys(meta))
    with pytest.raises(DownloadError, match="run again to resume"):
        registry.fetch("small")
    server.add("/a.pt", data)  # the host replaced the file: If-Range sees another ETag
    registry.fetch("small")
    last = server.gets("/a.pt")[-1]
    assert last.headers["If-Range"] == '"' + hashlib.sha256(other).hexdigest() + '"' and last.status == 200
    assert _matches_official("small", expected)


def test_no_resume_without_a_validator_or_a_checksum(cache, server, small):
    data, meta, expected = small
    half = len(data) // 2
    registry.register("small", server.add("/a.pt", data, cut_bytes=half, cuts_left=1, etag=False), meta=_official_keys(meta))
    registry.fetch("small")  # nothing tells whether the file changed: the retry takes the whole file
    assert ["Range" in r.headers for r in server.gets("/a.pt")] == [False, False]
    registry.register("known", server.add("/b.pt", data, cut_bytes=half, cuts_left=1, etag=False),
                      sha256=hashlib.sha256(data).hexdigest(), meta=_official_keys(meta))
    registry.fetch("known")  # with a sha256 to check the result, resuming is safe
    assert server.gets("/b.pt")[1].headers["Range"] == f"bytes={half}-"
    assert _matches_official("known", expected)


def test_a_partial_that_is_already_complete_or_too_long(cache, server, small):
    data, meta, expected = small
    registry.register("small", server.add("/a.pt", data), sha256=hashlib.sha256(data).hexdigest(),
                      meta=_official_keys(meta))
    folder = cache / "models" / "small"
    folder.mkdir(parents=True)
    (folder / "a.pt.partial").write_bytes(data + b"extra")  # longer than the file: 416, then start over
    registry.fetch("small")
    assert [r.status for r in server.gets("/a.pt")] == [416, 200]
    (folder / "a.pt.partial").write_bytes(data)  # complete already: 416 "bytes */N" with N its size
    registry.fetch("small", force=False)
    assert len(server.gets("/a.pt")) == 2  # cached: no request at all
    registry.fetch("small", force=True)  # --force drops the partial too
    assert server.gets("/a.pt")[-1].status == 200 and not (folder / "a.pt.partial").exists()
    assert _matches_official("small", expected)


def test_not_enough_disk_space(cache, server, small, monkeypatch):
    data, meta, _ = small
    registry.register("small", server.add("/a.pt", data), meta=_official_keys(meta))
    monkeypatch.setattr(_download.shutil, "disk_usage", lambda path: shutil_usage(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(DownloadError, match=r"^not enough disk space for small: 4\.\d MiB to go, 1,000 bytes free in "
                                            r".* \(set \$STYLENAT_CACHE to another disk\)$"):
        registry.fetch("small")


def test_bad_mirror_and_offline_download_command(cache, server, small, monkeypatch, capsys):
    data, meta, _ = small
    registry.register("small", server.add("/a.pt", data), meta=_official_keys(meta))
    monkeypatch.setenv("STYLENAT_MIRROR", "/srv/mirror")
    with pytest.raises(ConfigError, match=r"STYLENAT_MIRROR='/srv/mirror' is not a base URL"):
        registry.fetch("small")
    monkeypatch.delenv("STYLENAT_MIRROR")
    monkeypatch.setenv("STYLENAT_OFFLINE", "true")
    assert main(["download", "small"]) == 2
    assert "small is not in the cache and $STYLENAT_OFFLINE forbids downloading" in capsys.readouterr().err
    assert server.requests == []


def test_404_names_the_url(cache, server, small, capsys):
    registry.register("small", server.url("/nothing.pt"), preset="ffhq256")
    assert main(["generate", "small", "--seeds", "0", "--out", str(cache / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"stylenat generate: error: could not download small: {server.url('/nothing.pt')}: HTTP 404 Not Found"


def test_a_file_that_is_not_a_checkpoint(cache, server, capsys):
    registry.register("junk", server.add("/junk.pt", b"not a checkpoint at all" * 100), preset="ffhq256")
    with pytest.raises(ModelFileError, match=r"^junk: the file from .*/junk\.pt is not a usable official StyleNAT "
                                             r"checkpoint \(cannot read .*\); it was deleted$"):
        registry.fetch("junk")
    assert not (cache / "models" / "junk" / "junk.pt").exists()
    registry.register("page", server.add("/page.pt", b"<!DOCTYPE html><html></html>", content_type="text/html"),
                      preset="ffhq256")
    with pytest.raises(DownloadError, match=r"answered with a web page \(text/html\), not the file: the host may have moved"):
        registry.fetch("page")


def test_a_checkpoint_of_another_configuration_is_refused_and_kept(cache, server, small):
    data, meta, expected = small
    registry.register("small", server.add("/a.pt", data), preset="ffhq256")  # the fixture is not an ffhq256 model
    kept = cache / "models" / "small" / "a.pt"
    with pytest.raises(ModelFileError, match=rf"^small: {kept} does not fit the entry's preset/meta \(the checkpoint has 3 "
                                             r"head groups .*\); it is kept: fix the entry and run again$"):
        registry.fetch("small")
    assert kept.read_bytes() == data  # the download was fine: no need to fetch it again
    registry.register("small", server.url("/a.pt"), meta=_official_keys(meta))
    assert _matches_official("small", expected)
    assert len(server.gets("/a.pt")) == 1


@pytest.mark.parametrize("switch", ["STYLENAT_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline(cache, server, small, monkeypatch, switch):
    data, meta, expected = small
    registry.register("small", server.add("/a.pt", data), meta=_official_keys(meta))
    monkeypatch.setenv(switch, "1")
    target = cache / "models" / "small" / "a.pt"
    with pytest.raises(DownloadError, match=rf"^small is not in the cache and \${switch} forbids downloading: fetch "
                                            rf"{server.url('/a.pt')} elsewhere and place it at {target}$"):
        registry.fetch("small")
    assert server.requests == []
    target.write_bytes(data)  # placed by hand, as the message says: converted without the network
    assert _matches_official("small", expected)
    assert not target.exists() and server.requests == []
    monkeypatch.delenv(switch)
    registry.fetch("small", force=True)  # online again: --force fetches anew
    monkeypatch.setenv(switch, "1")
    assert _matches_official("small", expected)  # the cache serves offline
    assert len(server.gets("/a.pt")) == 1


def test_mirror_replaces_the_host(cache, server, small, monkeypatch):
    data, meta, expected = small
    server.add("/projects/m/ckpt/small.pt", data)
    registry.register("small", "https://models.invalid/projects/m/ckpt/small.pt", meta=_official_keys(meta))
    monkeypatch.setenv("STYLENAT_MIRROR", server.url("/"))
    assert _matches_official("small", expected)
    registry.register("flat", "https://models.invalid/deep/path/flat.pt", meta=_official_keys(meta))
    server.add("/flat.pt", data)  # a mirror that keeps only file names
    assert _matches_official("flat", expected)
    assert [r.path for r in server.requests] == ["/projects/m/ckpt/small.pt", "/deep/path/flat.pt", "/flat.pt"]


def test_user_registry_file_with_mirrors(cache, server, small, monkeypatch, tmp_path, capsys):
    data, meta, expected = small
    good = server.add("/good/mine.pt", data)
    entries = {"mine": {"url": [server.url("/gone/mine.pt"), good], "sha256": hashlib.sha256(data).hexdigest(),
                        "meta": _official_keys(meta)}}
    (tmp_path / "reg.json").write_text(json.dumps(entries))
    monkeypatch.setenv("STYLENAT_REGISTRY", str(tmp_path / "reg.json"))
    assert main(["models"]) == 0
    assert "mine" in capsys.readouterr().out
    assert main(["generate", "mine", "--seeds", "0-1", "--out", str(tmp_path / "out")]) == 0
    assert [r.path for r in server.requests] == ["/gone/mine.pt", "/good/mine.pt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seed0000.png", "seed0001.png"]
    assert _matches_official("mine", expected)


def test_a_safetensors_entry_needs_no_configuration(cache, server, tmp_path):
    g = build_generator("tiny")
    save_model(tmp_path / "m.safetensors", {"g_ema": g}, g.config)
    registry.register("tinyone", server.add("/m.safetensors", (tmp_path / "m.safetensors").read_bytes()))
    z = torch.randn(2, g.config.style_dim)
    with torch.no_grad():
        assert torch.equal(stylenat.load("tinyone")(z), g.eval()(z))


def test_a_changed_cache_file_is_refused(cache, server, small):
    data, meta, _ = small
    registry.register("small", server.add("/a.pt", data), meta=_official_keys(meta))
    path = registry.fetch("small")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"no longer matches its record .* run `stylenat download small --force`"):
        stylenat.load("small")
    registry.fetch("small", force=True)
    assert stylenat.load("small") is not None


def test_a_changed_registry_sha256_is_noticed(cache, server, small):
    data, meta, _ = small
    registry.register("small", server.add("/a.pt", data), meta=_official_keys(meta))
    registry.fetch("small")
    registry.register("small", server.url("/a.pt"), sha256="1" * 64, meta=_official_keys(meta))
    with pytest.raises(ModelFileError, match=r"the registry now expects 1{16}\.\.\."):
        registry.fetch("small")


def test_a_re_pointed_entry_is_noticed(cache, server, small):
    data, meta, _ = small
    registry.register("small", server.add("/a.pt", data), meta=_official_keys(meta))
    registry.fetch("small")
    registry.register("small", server.add("/new/a.pt", data), meta=_official_keys(meta))
    with pytest.raises(ModelFileError, match=r"came from .*/a\.pt, the registry now points at .*/new/a\.pt"):
        stylenat.load("small")
    registry.register("small", server.url("/a.pt"), preset="ffhq256")
    with pytest.raises(ModelFileError, match=r"converted with another preset/meta"):
        stylenat.load("small")


def test_a_local_path_wins_over_the_registry(cache, tmp_path, monkeypatch):
    g = build_generator("tiny")
    monkeypatch.chdir(tmp_path)
    save_model(tmp_path / "ffhq256", {"g_ema": g}, g.config)  # a file named like a registry entry
    assert stylenat.load("ffhq256").config == g.config  # no download was tried: there is no network


def test_misspelt_names_and_bad_entries(cache, tmp_path, monkeypatch):
    with pytest.raises(MissingFileError, match=r"ffhq265 does not exist \(did you mean the registered 'ffhq256'\?\)"):
        stylenat.load("ffhq265")
    with pytest.raises(ConfigError, match=r"did you mean 'ffhq1024'"):
        registry.fetch("ffhq1023")
    bad = [({"url": "https://x/a.pt"}, r"give exactly one of \"preset\""),
           ({"url": "https://x/a.pt", "preset": "ffhq256", "meta": {}}, r"give exactly one of"),
           ({"url": "https://x/a.pt", "preset": "nope"}, r"unknown preset 'nope'"),
           ({"url": "https://x/a.pt", "preset": "ffhq256", "sha256": "abc"}, r"sha256 must be 64 hex digits"),
           ({"url": "https://x/a.pt", "preset": "ffhq256", "sha265": "0" * 64}, r"unknown field 'sha265'"),
           ({"url": "ftp://x/a.pt", "preset": "ffhq256"}, r"not an http, https or file URL"),
           ({"url": "https://x/a.safetensors", "preset": "ffhq256"}, r"carries its own configuration"),
           ({"preset": "ffhq256"}, r"needs \"url\""),
           ({"url": "https://x/a.pt", "preset": "ffhq256", "size": "1000"}, r"size must be a positive whole number"),
           ({"url": "https://x/a.pt", "preset": "ffhq256", "fid": "2.0"}, r"fid must be a number")]
    for fields, message in bad:
        (tmp_path / "reg.json").write_text(json.dumps({"mine": fields}))
        monkeypatch.setenv("STYLENAT_REGISTRY", str(tmp_path / "reg.json"))
        with pytest.raises(ConfigError, match=message):
            registry.entries()
    (tmp_path / "reg.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"STYLENAT_REGISTRY=.*reg\.json is not a readable JSON file"):
        registry.entries()
    with pytest.raises(ConfigError, match=r"'a/b' is not a usable model name"):
        registry.register("a/b", "https://x/a.pt", preset="ffhq256")


def test_file_urls_work_as_mirrors(cache, small, tmp_path):
    data, meta, expected = small
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "s.pt").write_bytes(data)
    registry.register("shared", [(tmp_path / "share" / "missing.pt").as_uri(), (tmp_path / "share" / "s.pt").as_uri()],
                      meta=_official_keys(meta))
    assert _matches_official("shared", expected)


def test_two_processes_fetching_at_once_download_once(cache, server, small):
    # Ranks of one job start together: the cache folder's lock makes the second wait for the first.
    data, meta, expected = small
    registry.register("small", server.add("/a.pt", data), meta=_official_keys(meta))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: registry.fetch("small", progress=False), range(2)))
    assert paths[0] == paths[1] and len(server.gets("/a.pt")) == 1
    assert _matches_official("small", expected)


def test_fine_tuning_from_a_registered_name(cache, server, small, tmp_path):
    data, meta, expected = small
    (tmp_path / "reg.json").write_text(json.dumps({"small": {"url": server.add("/a.pt", data),
                                                             "meta": _official_keys(meta)}}))
    env = {**ENV, "STYLENAT_REGISTRY": str(tmp_path / "reg.json"), "STYLENAT_CACHE": str(cache)}
    run = tmp_path / "ft"
    cli("--init", "small", "--data", "demo", "--batch", "4", "--set", "grid=[2,2]", "--steps", "1", "--set", "bcr_real=0",
        "--set", "bcr_fake=0", "--run-dir", str(run), env=env)
    model = cache / "models" / "small" / "model.safetensors"
    config = json.loads((run / "config.json").read_text())
    assert config["init"] == str(model.resolve())
    assert config["init_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    g = stylenat.load(model)
    assert _matches_official(model, expected)
    cells = generate(g, range(4), batch=4).permute(0, 2, 3, 1).numpy()
    grid = np.asarray(Image.open(run / "fakes_000000000.png"))
    s = g.resolution
    assert np.array_equal(np.stack([grid[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(2) for c in range(2)]), cells)


def _official_ffhq256(path, official_dir) -> None:
    """An official-layout (legacy, like FFHQ256_940k_flip.pt) ffhq256 checkpoint of random weights at full size."""
    shapes = official_shapes(official_dir)
    torch.manual_seed(0)

    def state(entry, kind):
        buffers = entry[f"{kind}_buffers"]
        return {k: torch.tensor(buffers[k]) if k in buffers else torch.randn(s) * 0.02
                for k, s in entry[f"{kind}_state"].items()}

    g = state(shapes["ffhq256_legacy"], "generator")
    torch.save({"g": g, "g_ema": g, "d": state(shapes["discriminator256"], "discriminator"),
                "args": argparse.Namespace(size=256)}, path)


@pytest.mark.slow
def test_generate_ffhq256_by_name_from_a_mirror_then_offline(cache, server, official_dir, tmp_path):
    ckpt = tmp_path / "FFHQ256_940k_flip.pt"
    _official_ffhq256(ckpt, official_dir)
    server.add("/projects/stylenat/checkpoints/FFHQ256_940k_flip.pt", ckpt.read_bytes())
    env = {**ENV, "STYLENAT_CACHE": str(cache), "STYLENAT_MIRROR": server.url("")}
    command = [sys.executable, "-m", "stylenat", "generate", "ffhq256", "--seeds", "0-3", "--device", "cpu"]
    first = subprocess.run([*command, "--out", str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "ffhq256: downloading FFHQ256_940k_flip.pt" in first.stderr and "100% of" in first.stderr
    assert (cache / "models" / "ffhq256" / "model.safetensors").is_file()
    server.stop()
    second = subprocess.run([*command, "--out", str(tmp_path / "y")], env={**env, "STYLENAT_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "downloading" not in second.stderr
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert names == [f"seed{s:04d}.png" for s in range(4)]
    for name in names:
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()
    g = stylenat.load("ffhq256")
    assert sum(p.numel() for p in g.parameters()) == official_shapes(official_dir)["ffhq256_legacy"]["generator_params"]
