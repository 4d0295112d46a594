"""Generator/discriminator API, latents, truncation, the official init and the output space."""

from __future__ import annotations

import math
import resource
import time

import pytest
import torch

from stylenat.models import GeneratorConfig, build_discriminator, build_generator, get_preset, model_to_uint8, uint8_to_model


@pytest.fixture(scope="module")
def g():
    torch.manual_seed(0)
    return build_generator("tiny").eval()


def test_shapes_and_latent_count(g):
    z = torch.randn(4, g.style_dim)
    assert g.num_ws == 2 * 4 and g.mapping(z).shape == (4, g.style_dim)
    assert g(z).shape == (4, 3, 32, 32)
    assert build_discriminator("tiny")(torch.randn(4, 3, 32, 32)).shape == (4, 1)


def test_broadcast_ws_equal_forward_and_mixing_reads_block_latents(g):
    z = torch.randn(2, g.style_dim)
    with torch.no_grad():
        w = g.mapping(z)
        ws = w[:, None].repeat(1, g.num_ws, 1)
        assert torch.equal(g.synthesis(ws), g(z))
        mixed = ws.clone()
        mixed[:, 4:] = w.flip(0)[:, None]  # stages 16 and 32 read the other sample's w
        out = g.synthesis(mixed)
    assert not torch.allclose(out, g(z)) and not torch.allclose(out, g(z.flip(0)))


def test_truncation_closed_form(g):
    g.w_avg.copy_(torch.randn(g.style_dim))
    z = torch.randn(3, g.style_dim)
    with torch.no_grad():
        w = g.mapping(z)
        assert torch.allclose(g.mapping(z, truncation_psi=0.3), g.w_avg + 0.3 * (w - g.w_avg), atol=1e-6)
        avg_image = g.synthesis(g.w_avg.expand(1, g.num_ws, -1))
        assert torch.allclose(g(z, truncation_psi=0.0), avg_image.expand(3, -1, -1, -1), atol=1e-5)
        ws = w[:, None].repeat(1, g.num_ws, 1)
        ws[:, :2] = g.w_avg
        assert torch.allclose(g(z, truncation_psi=0.0, truncation_cutoff=2), g.synthesis(ws), atol=1e-6)


def test_w_avg_tracked_in_train_mode_only():
    g = build_generator("tiny")
    z = torch.randn(8, g.style_dim)
    g.eval()
    g.mapping(z)
    assert torch.count_nonzero(g.w_avg) == 0
    g.train()
    w = g.mapping(z).detach()
    assert torch.allclose(g.w_avg, 0.005 * w.mean(0), atol=1e-6)


def test_bad_inputs_raise(g):
    with pytest.raises(ValueError, match="z must have shape"):
        g(torch.randn(2, 3))
    with pytest.raises(ValueError, match="ws must have shape"):
        g.synthesis(torch.randn(2, 3, g.style_dim))


def test_init_follows_spec():
    torch.manual_seed(0)
    wide = {**get_preset("tiny")[0].to_dict(), "channels": [256, 256, 128, 64], "heads": [8, 8, 4, 2]}
    g = build_generator(GeneratorConfig.from_dict(wide))  # wide enough for stable std estimates
    block = g.synthesis.stages[1].blocks[0]
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002 and block.attn.qkv.bias.abs().max() == 0
    assert abs(torch.cat([t.flatten() for t in block.attn.rpb]).std().item() - 0.02) < 0.004
    rgb = g.synthesis.to_rgbs[0].conv.weight
    assert abs(rgb.std().item() / (0.02 * math.sqrt(2 / (rgb.shape[1] + 3))) - 1) < 0.2
    up = g.synthesis.stages[0].upsample
    assert up.alpha.item() == 0 and torch.all(up.norm.weight == 1) and torch.all(up.norm.bias == 0)
    # Equalized mapping layers store N(0, 1) / lr_mul.
    assert abs(g.mapping.layers[0].weight.std().item() * g.config.lr_mlp - 1) < 0.1


def test_output_space_round_trip():
    cfg = get_preset("tiny")[0]
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    raw = uint8_to_model(x, cfg)
    assert torch.equal(model_to_uint8(raw, cfg), x)
    assert torch.allclose(raw[:, 0], (x[:, 0] / 255 - 0.485) / 0.229)


@pytest.mark.slow
def test_ffhq256_forward_batch4_bounded_memory():
    g = build_generator("ffhq256").eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = g(torch.randn(4, 512))
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"ffhq256 batch 4 forward: {seconds:.1f} s, peak RSS {peak_gib:.2f} GiB")
    assert out.shape == (4, 3, 256, 256) and torch.isfinite(out).all()
    assert peak_gib < 8  # one dense (H*W)^2 score matrix of one head of one 256x256 image is 16 GiB
