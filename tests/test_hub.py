"""Hub-style folders: export-hub writes them, load reads them back checked; hf:// against a fake Hub
endpoint on a loopback server (the headers huggingface_hub reads); push-hub against a stand-in HfApi."""

from __future__ import annotations

import hashlib
import json
import sys
import types

import pytest
import torch

import stylenat
from stylenat import hub, registry
from stylenat.cli import main
from stylenat.errors import DownloadError, ModelFileError, UserError
from stylenat.models import build_generator, get_preset
from stylenat.models.discriminator import Discriminator
from stylenat.models.io import save_model


@pytest.fixture
def tiny_model(tmp_path):
    """A stylenat model file of the tiny preset with g, g_ema and d (seeded random weights)."""
    torch.manual_seed(0)
    g, g_ema, d = build_generator("tiny"), build_generator("tiny"), Discriminator(get_preset("tiny")[1])
    path = tmp_path / "tiny.safetensors"
    save_model(path, {"g": g, "g_ema": g_ema, "d": d}, g.config, d.config)
    return path, g_ema.eval(), d.eval()


def _same_outputs(a, b) -> bool:
    z = torch.randn(3, a.config.style_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(z), b(z))


def test_export_hub_writes_a_folder_that_loads_back(tiny_model, tmp_path, capsys):
    path, g_ema, d = tiny_model
    out = tmp_path / "hubdir"
    assert main(["export-hub", str(path), str(out), "--license", "apache-2.0", "--dataset", "the demo faces"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "stylenat-hub/1" and config["library_name"] == "stylenat"
    assert config["modules"] == ["g_ema", "d"]  # g is not needed to sample or fine-tune
    assert config["generator"] == g_ema.config.to_dict() and config["discriminator"] == d.config.to_dict()
    assert config["parameters"]["g_ema"] == sum(p.numel() for p in g_ema.parameters())
    assert config["parameters"]["mapping"] + config["parameters"]["synthesis"] == config["parameters"]["g_ema"]
    assert config["parameters"]["d"] == sum(p.numel() for p in d.parameters())
    model = (out / "model.safetensors").read_bytes()
    assert config["files"]["model.safetensors"] == {"sha256": hashlib.sha256(model).hexdigest(), "size": len(model)}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: stylenat\npipeline_tag: unconditional-image-generation\n")
    assert f"| g_ema | {config['parameters']['g_ema']:,} |" in card and "the demo faces" in card
    assert _same_outputs(stylenat.load(out), g_ema)
    assert _same_outputs(stylenat.load(str(out)), g_ema)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(stylenat.load(out, which="d")(x), d(x))
    with pytest.raises(ModelFileError, match=r"holds modules \['d', 'g_ema'\], not 'g'"):
        stylenat.load(out, which="g")


def test_export_hub_metrics_and_modules(tiny_model, tmp_path):
    path, g_ema, _ = tiny_model
    (tmp_path / "metrics.json").write_text(json.dumps({"results": {"swd": 12.5, "num_fake_swd": 100}}))
    assert main(["export-hub", str(path), str(tmp_path / "h"), "--modules", "g_ema", "--metrics",
                 str(tmp_path / "metrics.json")]) == 0
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["modules"] == ["g_ema"] and config["discriminator"] is None
    assert config["metrics"] == {"swd": 12.5} and config["license"] == "other"
    assert "| swd | 12.5 |" in (tmp_path / "h" / "README.md").read_text()


def test_export_of_a_registered_model_carries_its_card(cache, server, official_dir, official_tag, tmp_path):
    meta = json.loads((official_dir / f"{official_tag}_meta.json").read_text())
    registry.register("small", server.add("/s.pt", (official_dir / f"{official_tag}_checkpoint.pt").read_bytes()),
                      meta={k: v for k, v in meta.items() if not k.endswith("params")}, fid=3.21, license="mit",
                      license_note="a test licence note", dataset="nothing real")
    hub.export_hub("small", tmp_path / "h")
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["license"] == "mit" and config["dataset"] == "nothing real" and config["source"]["registry"] == "small"
    card = (tmp_path / "h" / "README.md").read_text()
    assert "| fid50k (claimed by the authors) | 3.21 |" in card and "a test licence note" in card


def test_a_damaged_folder_is_refused(tiny_model, tmp_path):
    path, _, _ = tiny_model
    out = hub.export_hub(path, tmp_path / "h")
    raw = bytearray((out / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"model\.safetensors has sha256 .*, config\.json says .*: the file is damaged"):
        stylenat.load(out)
    hub.export_hub(path, out)
    config = json.loads((out / "config.json").read_text())
    config["generator"]["style_dim"] = 7
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"config\.json and model\.safetensors describe different generators"):
        stylenat.load(out)


# ---- hf:// -------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(server, tmp_path, monkeypatch):
    """A fake Hub endpoint serving folders as /OWNER/REPO/resolve/REV/FILE with the headers the Hub
    client reads (X-Repo-Commit; ETag: the file's sha256, as the Hub gives for LFS files), and an
    empty Hugging Face cache."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))

    def publish(folder, repo: str, revision: str = "main", commit: str = "c" * 40, files=None):
        for name in ("config.json", "model.safetensors"):
            path = f"/{repo}/resolve/{revision}/{name}"
            server.add(path, (files or {}).get(name) or (folder / name).read_bytes())
            server.extra_headers[path] = {"X-Repo-Commit": commit}

    return publish


def test_hf_model_downloads_checks_and_works_offline(cache, fake_hub, server, tiny_model, tmp_path, monkeypatch):
    path, g_ema, _ = tiny_model
    fake_hub(hub.export_hub(path, tmp_path / "h"), "me/tiny")
    assert _same_outputs(stylenat.load("hf://me/tiny"), g_ema)
    assert main(["generate", "hf://me/tiny", "--seeds", "0-1", "--out", str(tmp_path / "out")]) == 0
    served = len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _same_outputs(stylenat.load("hf://me/tiny"), g_ema)  # from the Hub cache, no request
    assert len(server.requests) == served
    with pytest.raises(DownloadError, match=r"hf://me/other: config\.json is not in the Hugging Face cache and downloads "
                                            r"are off"):
        stylenat.load("hf://me/other")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    server.stop()  # the Hub unreachable, no offline switch: the Hub client falls back to its cache
    assert _same_outputs(stylenat.load("hf://me/tiny"), g_ema)


def test_hf_revision(cache, fake_hub, tiny_model, tmp_path):
    path, g_ema, _ = tiny_model
    fake_hub(hub.export_hub(path, tmp_path / "h"), "me/tiny", revision="v1", commit="d" * 40)
    assert _same_outputs(stylenat.load("hf://me/tiny@v1"), g_ema)
    with pytest.raises(DownloadError, match=r"^hf://me/tiny: cannot get config\.json: \w+"):
        stylenat.load("hf://me/tiny")  # no main revision served


def test_hf_file_that_does_not_match_is_refused(cache, fake_hub, tiny_model, tmp_path):
    path, _, _ = tiny_model
    folder = hub.export_hub(path, tmp_path / "h")
    other = hub.export_hub(path, tmp_path / "h2", modules=("g_ema",))  # a valid model file, not the recorded one
    fake_hub(folder, "me/tiny", files={"model.safetensors": (other / "model.safetensors").read_bytes()})
    with pytest.raises(ModelFileError, match=r"has sha256 .*, config\.json says"):
        stylenat.load("hf://me/tiny")


def test_hf_errors(cache, fake_hub, monkeypatch):
    with pytest.raises(UserError, match=r"a Hub model is written hf://OWNER/REPO"):
        stylenat.load("hf://just-a-name")
    with pytest.raises(DownloadError, match=r"^hf://me/missing: cannot get config\.json: "):
        stylenat.load("hf://me/missing")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r'hf:// models need huggingface_hub: pip install "stylenat\[hub\]"'):
        stylenat.load("hf://me/tiny")


def test_push_hub_checks_the_folder_then_uploads(tiny_model, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    class FakeApi:
        def __init__(self, endpoint=None):
            calls.append(("init", endpoint))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"], sorted(kwargs["allow_patterns"])))
            return types.SimpleNamespace(commit_url="https://huggingface.co/me/tiny/commit/1")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    path, _, _ = tiny_model
    folder = hub.export_hub(path, tmp_path / "h")
    assert main(["push-hub", str(folder), "me/tiny", "--private"]) == 0
    assert calls == [("init", None), ("create_repo", "me/tiny", True, True),
                     ("upload_folder", "me/tiny", str(folder), ["README.md", "config.json", "model.safetensors"])]
    calls.clear()
    (folder / "model.safetensors").write_bytes(b"broken")
    assert main(["push-hub", str(folder), "me/tiny"]) == 2
    assert calls == []  # a damaged folder is never published


def test_hf_file_that_is_not_the_hubs_is_refused(cache, fake_hub, server, tiny_model, tmp_path):
    # config.json and model.safetensors agree, but the Hub's LFS sha256 (the ETag it names the blob after) differs.
    path, _, _ = tiny_model
    fake_hub(hub.export_hub(path, tmp_path / "h"), "me/tiny")
    server.extra_headers["/me/tiny/resolve/main/model.safetensors"]["X-Linked-Etag"] = '"' + "e" * 64 + '"'
    with pytest.raises(ModelFileError, match=r"has sha256 .*, the Hub says e{16}\.\.\."):
        stylenat.load("hf://me/tiny")


def test_export_hub_needs_a_generator_and_names_the_card(tiny_model, tmp_path, monkeypatch, capsys):
    path, _, _ = tiny_model
    assert main(["export-hub", str(path), str(tmp_path / "h"), "--modules", "d"]) == 2
    assert "a Hub folder needs a generator (g_ema or g)" in capsys.readouterr().err
    (tmp_path / "faces").mkdir()
    monkeypatch.chdir(tmp_path / "faces")
    hub.export_hub(path, ".")
    assert "\n# faces\n" in (tmp_path / "faces" / "README.md").read_text()
