"""Class-conditional G and D: zero classes change nothing; labels pick the image; truncation moves
toward each class's mean w; D's projection term against its closed form."""

from __future__ import annotations

import pytest
import torch

from stylenat.models import build_discriminator, build_generator, get_preset, save_model, seeds_to_z
from stylenat.models.io import load_model
from stylenat.sampling import generate


@pytest.fixture(scope="module")
def g():
    cfg = get_preset("tiny")[0].replace(num_classes=3, class_names=("cat", "dog", "fox"))
    torch.manual_seed(0)
    g = build_generator(cfg).eval()
    for p in g.synthesis.to_rgbs.parameters():  # the 0.02-gain init gives near-constant images
        torch.nn.init.normal_(p, std=0.3)
    g.compute_class_w_avg(n=64)
    return g


def test_zero_classes_is_exactly_the_unconditional_model():
    g_cfg, d_cfg = get_preset("tiny")
    assert g_cfg.num_classes == 0 and d_cfg.num_classes == 0
    g, d = build_generator(g_cfg), build_discriminator(d_cfg)
    assert not any("label" in k or "class" in k for k in g.state_dict()) and not any("class" in k for k in d.state_dict())
    cond = build_generator(g_cfg.replace(num_classes=2))
    extra = set(cond.state_dict()) - set(g.state_dict())
    assert extra == {"mapping.label_embed.weight", "mapping.label_embed.bias", "mapping.class_w_avg"}


def test_labels_pick_the_image(g):
    same = generate(g, [5, 5, 5], labels=[1, 1, 2])
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], same[2])
    assert torch.equal(generate(g, [5], labels="dog"), generate(g, [5], labels=1))
    with pytest.raises(ValueError, match="class-conditional"):
        generate(g, [5])
    with pytest.raises(ValueError, match="unknown class 'wolf'"):
        generate(g, [5], labels="wolf")


def test_class_mean_w_is_the_mean_over_the_class_seeded_latents(g):
    z = seeds_to_z(range(64), g.style_dim)
    for k in range(3):
        with torch.no_grad():
            w = g.mapping.embed(z, torch.full((64,), k))
        torch.testing.assert_close(g.mapping.class_w_avg[k], w.double().mean(0).float(), rtol=0, atol=1e-6)
    # psi = 0: every seed gives its class's mean image.
    mean_images = generate(g, [1, 2, 3], truncation_psi=0, labels=2)
    assert torch.equal(mean_images[0], mean_images[1])
    from stylenat.models import model_to_uint8

    with torch.no_grad():
        expected = model_to_uint8(g.synthesis(g.mapping.class_w_avg[2][None, None].expand(1, g.num_ws, -1)), g.config)
    assert torch.equal(mean_images[:1], expected)


def test_discriminator_projection_term():
    d_cfg = get_preset("tiny")[1].replace(num_classes=3)
    torch.manual_seed(1)
    d = build_discriminator(d_cfg).eval()
    x, c = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 2])
    features = {}
    d.final_linear[1].register_forward_hook(lambda m, i, o: features.__setitem__("phi", o))
    logits = d(x, c)
    phi = features["phi"]
    unconditional = d.final_linear[2](phi)
    embed = d.class_embed.weight  # the spectrally normalized table
    torch.testing.assert_close(logits, unconditional + (embed[c] * phi).sum(1, keepdim=True))
    with pytest.raises(ValueError, match="needs class labels"):
        d(x)


def test_model_file_keeps_the_classes(g, tmp_path):
    path = save_model(tmp_path / "m.safetensors", {"g_ema": g}, g.config)
    g2 = load_model(path)
    assert g2.config.class_names == ("cat", "dog", "fox")
    assert torch.equal(g2.mapping.class_w_avg, g.mapping.class_w_avg)
    assert torch.equal(generate(g2, [3], labels="fox", truncation_psi=0.5), generate(g, [3], labels="fox", truncation_psi=0.5))
