"""Parity with the official StyleNAT code: fixtures made by running it, and its full-size key sets."""

from __future__ import annotations

import json

import pytest
import torch

from stylenat.cli import main
from stylenat.models import get_preset
from stylenat.models.discriminator import Discriminator
from stylenat.models.generator import Generator
from stylenat.models.official import config_from_official, load_official_checkpoint, map_official_state, official_meta

from ..conftest import load_official_archive, official_fixture_dir, official_shapes, official_tags

# The tags of the fixture directory in use (the committed compact set holds small32_hydra_uneven;
# the full set also small64_legacy); a directory without any is an error, not a skip.
TAGS = official_tags(official_fixture_dir())
assert TAGS, f"no <tag>_meta.json in {official_fixture_dir()}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=TAGS)
def fixture(request, official_dir):
    tag = request.param
    meta = json.loads((official_dir / f"{tag}_meta.json").read_text())
    modules = load_official_checkpoint(official_dir / f"{tag}_checkpoint.pt", meta)
    expected = torch.load(official_dir / f"{tag}_expected.pt", weights_only=True)
    # compact copies drop 'g' (and may drop 'd'): the loader returns the modules present
    stored = set(load_official_archive(official_dir / f"{tag}_checkpoint.pt")) - {"args"}
    return meta, modules, expected, stored


def test_fixture_outputs_match_official(fixture):
    meta, modules, e, stored = fixture
    g = modules["g_ema"]
    assert sum(p.numel() for p in g.parameters()) == meta["generator_params"]
    with torch.no_grad():
        assert _rel(g.mapping(e["z"]), e["w"]) < 1e-4
        assert _rel(g(e["z"]), e["image"]) < 1e-4
    if "d" in stored:
        d = modules["d"]
        assert sum(p.numel() for p in d.parameters()) == meta["discriminator_params"]
        with torch.no_grad():
            assert _rel(d(e["d_input"]), e["d_logits"]) < 1e-4
    assert set(modules) == stored and "g_ema" in stored and not any(m.training for m in modules.values())


def test_fixture_w_avg_is_mean_w(fixture):
    _, modules, _, _ = fixture
    g = modules["g_ema"]
    z = torch.randn(10000, g.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(g.w_avg, g.mapping.embed(z).mean(0), atol=1e-5)


def _fake_state(state: dict, buffers: dict) -> dict:
    """Official key -> tensor: the stored buffer values, meta tensors of the right shape otherwise."""
    return {k: torch.tensor(buffers[k]) if k in buffers else torch.empty(s, device="meta") for k, s in state.items()}


@pytest.fixture(scope="module")
def shapes(official_dir):
    return official_shapes(official_dir)  # plain or .json.gz


@pytest.mark.parametrize("tag", ["ffhq256_legacy", "ffhq256_hydra", "ffhq1024_legacy"])
def test_full_size_generator_keys_all_consumed(shapes, tag):
    entry = shapes[tag]
    meta = official_meta(f"ffhq{entry['size']}", legacy=entry["legacy"])
    if not entry["legacy"]:
        meta["kernels"][1], meta["dilations"][1] = [7], [1]  # Hydra layout: one group at 8x8
    g = Generator(config_from_official(meta)[0])
    mapped = map_official_state(g, _fake_state(entry["generator_state"], entry["generator_buffers"]))
    assert set(mapped) == set(g.state_dict()) - {"mapping.w_avg"}
    assert sum(p.numel() for p in g.parameters()) == entry["generator_params"]


@pytest.mark.parametrize("tag", ["discriminator256", "discriminator1024"])
def test_full_size_discriminator_keys_all_consumed(shapes, tag):
    entry = shapes[tag]
    d = Discriminator(get_preset(f"ffhq{entry['size']}")[1])
    mapped = map_official_state(d, _fake_state(entry["discriminator_state"], entry["discriminator_buffers"]))
    assert set(mapped) == set(d.state_dict())
    assert sum(p.numel() for p in d.parameters()) == entry["discriminator_params"]


def test_shape_mismatch_names_key_and_shapes(official_dir, official_tag):
    meta = json.loads((official_dir / f"{official_tag}_meta.json").read_text())
    s = meta["style_dim"]
    meta["style_dim"] = s // 2  # the checkpoint's mapping is s wide
    with pytest.raises(ValueError, match=rf"'style\.1\.weight' has shape \[{s}, {s}\] but 'mapping\.layers\.0\.weight' expects \[{s // 2}, {s // 2}\]"):
        load_official_checkpoint(official_dir / f"{official_tag}_checkpoint.pt", meta)


def test_missing_and_unexpected_keys_are_named(official_dir, official_tag, tmp_path):
    tag = official_tag
    ckpt = load_official_archive(official_dir / f"{tag}_checkpoint.pt")
    ckpt["g_ema"]["extra.weight"] = ckpt["g_ema"].pop("to_rgbs.0.bias")
    torch.save(ckpt, tmp_path / "bad.pt")
    meta = json.loads((official_dir / f"{tag}_meta.json").read_text())
    with pytest.raises(ValueError, match=r"missing \['synthesis\.to_rgbs\.0\.bias'\], unexpected \['extra\.weight'\]"):
        load_official_checkpoint(tmp_path / "bad.pt", meta)


def test_cli_convert_official(official_dir, official_tag, tmp_path, capsys):
    import stylenat

    out = tmp_path / "small.safetensors"
    tag = official_tag
    assert main(["convert-official", str(official_dir / f"{tag}_checkpoint.pt"), str(out),
                 "--meta", str(official_dir / f"{tag}_meta.json")]) == 0
    e = torch.load(official_dir / f"{tag}_expected.pt", weights_only=True)
    with torch.no_grad():
        assert _rel(stylenat.load(out)(e["z"]), e["image"]) < 1e-4
        if "d" in load_official_archive(official_dir / f"{tag}_checkpoint.pt"):
            assert _rel(stylenat.load(out, which="d")(e["d_input"]), e["d_logits"]) < 1e-4
    assert main(["convert-official", str(official_dir / f"{tag}_checkpoint.pt"), str(out)]) == 2
    assert "exactly one of --preset" in capsys.readouterr().err


def test_hydra_checkpoint_by_preset_name(shapes, tmp_path):
    # The official Hydra FFHQ-256 layout (one 16-head group at 8x8) loads with just "ffhq256",
    # also in the official trainer's newer {'args', 'state_dicts'} layout.
    def real(entry, kind):
        fake = _fake_state(entry[f"{kind}_state"], entry[f"{kind}_buffers"])
        return {k: torch.empty(v.shape).normal_(0, 0.02) if v.is_meta else v for k, v in fake.items()}

    entry = shapes["ffhq256_hydra"]
    state, d_state = real(entry, "generator"), real(shapes["discriminator256"], "discriminator")
    path = tmp_path / "hydra.pt"
    torch.save({"args": {"size": 256}, "state_dicts": {"g_ema": state, "d": d_state}}, path)
    modules = load_official_checkpoint(path, "ffhq256")
    g = modules["g_ema"]
    assert g.synthesis.stages[1].blocks[0].attn.group_heads == [16]
    assert sum(p.numel() for p in g.parameters()) == entry["generator_params"]
