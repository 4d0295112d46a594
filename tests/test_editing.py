"""stylenat.editing: SeFa directions against an independent factorisation, edits that touch only the
chosen latents, rendering, and direction files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stylenat.editing import (
    edit,
    load_directions,
    render,
    render_edits,
    save_directions,
    sefa_directions,
    style_weights,
)
from stylenat.errors import ConfigError, ModelFileError
from stylenat.models import build_generator, model_to_uint8
from stylenat.projection import save_latent
from stylenat.sampling import seeds_to_w


@pytest.fixture(scope="module")
def g():
    torch.manual_seed(0)
    g = build_generator("tiny")
    for p in g.synthesis.to_rgbs.parameters():  # varied images, as in test_sampling
        torch.nn.init.normal_(p, std=0.3)
    for m in g.synthesis.modules():  # blocks that react to w (see test_projection.varied_tiny)
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    g.compute_w_avg(n=256)
    return g.eval()


def stacked_rows(g, ws_indices) -> torch.Tensor:
    """The SeFa matrix built by its own loop: per stage s and block j whose ws index 2s + j is chosen,
    the effective weights of norm1 then norm2, each row scaled to unit norm."""
    rows = []
    for s, stage in enumerate(g.synthesis.stages):
        for j, block in enumerate(stage.blocks):
            if 2 * s + j in ws_indices:
                for norm in (block.norm1, block.norm2):
                    w = norm.style.weight.detach().double() * norm.style.scale
                    assert w.shape == (2 * g.config.channels[s], g.style_dim)  # gamma and beta rows
                    rows.append(w)
    a = torch.cat(rows)
    return a / a.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("layers", [None, [0, 1], [5, 2]])
def test_directions_are_the_gram_eigenvectors(g, layers):
    chosen = range(g.num_ws) if layers is None else layers
    gram = stacked_rows(g, set(chosen)).T @ stacked_rows(g, set(chosen))
    directions, values = sefa_directions(g, layers)
    assert directions.shape == (g.style_dim, g.style_dim) and values.shape == (g.style_dim,)
    d = directions.double()
    assert torch.allclose(d @ d.T, torch.eye(g.style_dim, dtype=torch.float64), atol=1e-5)  # orthonormal rows
    assert torch.all(values[:-1] >= values[1:])  # descending
    assert torch.allclose(d @ gram, values.double()[:, None] * d, atol=1e-4 * float(values[0]))  # eigenvectors
    ref_values, ref_vectors = torch.linalg.eigh(gram)
    assert torch.allclose(values.double(), ref_values.flip(0), rtol=1e-4, atol=1e-5)
    top = ref_vectors[:, -1]  # the top eigenvalue is simple here, so its vector is unique up to sign
    assert torch.allclose((d[0] @ top).abs(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)


def test_style_weights_order_and_scale(g):
    rows = style_weights(g, [3])
    block = g.synthesis.stages[1].blocks[1]
    expected = torch.cat([block.norm1.style.weight * block.norm1.style.scale,
                          block.norm2.style.weight * block.norm2.style.scale])
    assert torch.equal(rows, expected.detach())


def test_strength_zero_is_the_identity(g):
    ws = seeds_to_w(g, [0, 1])[:, None].repeat(1, g.num_ws, 1)
    direction = sefa_directions(g)[0][0]
    edited = edit(g, ws, direction, [0.0, 3.0], layers=[0, 1])
    assert edited.shape == (2, 2, g.num_ws, g.style_dim)
    assert torch.equal(edited[:, 0], ws)
    # batch 1 on both sides: synthesis rounds differently with other batch sizes
    images = render_edits(g, ws, direction, [0.0, 3.0], layers=[0, 1], batch=1)
    plain = render(g, ws, batch=1)
    assert images.shape == (2, 2, 3, g.resolution, g.resolution) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], plain)
    assert not torch.equal(images[:, 1], plain)


def test_edit_moves_only_the_chosen_latents(g):
    ws = torch.randn(g.num_ws, g.style_dim)
    direction = sefa_directions(g, [2, 3])[0][1]
    strengths = torch.tensor([-2.0, 0.5, 4.0])
    edited = edit(g, ws, direction, strengths, layers=[2, 3])
    assert edited.shape == (3, g.num_ws, g.style_dim)
    others = [i for i in range(g.num_ws) if i not in (2, 3)]
    assert torch.equal(edited[:, others], ws[others].expand(3, -1, -1))
    moved = edited[:, [2, 3]] - ws[[2, 3]]
    assert torch.allclose(moved, strengths[:, None, None] * direction, atol=1e-6)
    w = ws[0]
    assert torch.equal(edit(g, w, direction, [0.0])[0], w[None].expand(g.num_ws, -1))  # one w, broadcast
    with pytest.raises(ConfigError, match="ws indices in 0-7"):
        edit(g, ws, direction, [1.0], layers=[8])


def test_render_matches_synthesis(g):
    ws = torch.randn(2, 3, g.num_ws, g.style_dim)
    with torch.no_grad():
        expected = model_to_uint8(g.synthesis(ws.flatten(0, 1)), g.config).view(2, 3, 3, g.resolution, g.resolution)
    assert torch.equal(render(g, ws, batch=6), expected)
    # other batch sizes give the same images up to float rounding (at most one level)
    assert (render(g, ws, batch=4).int() - expected.int()).abs().max() <= 1


def test_direction_file_round_trip_and_errors(g, tmp_path):
    directions, values = sefa_directions(g, [4, 5])
    path = save_directions(tmp_path / "sefa.safetensors", directions, values, g, [5, 4])
    d, v, layers = load_directions(path, g)
    assert torch.equal(d, directions) and torch.equal(v, values) and layers == [4, 5]
    other = build_generator(dataclasses.replace(g.config, style_dim=32))
    with pytest.raises(ModelFileError, match="for another model .style_dim 64, this model has 32") as info:
        load_directions(path, other)
    assert "\n" not in str(info.value)
    latent = save_latent(tmp_path / "latent.safetensors", torch.zeros(g.style_dim), g, "w")
    with pytest.raises(ModelFileError, match="not a stylenat directions file"):
        load_directions(latent, g)
    with pytest.raises(ConfigError, match="directions must be"):
        save_directions(tmp_path / "bad.safetensors", directions[:, :3], values, g, None)
