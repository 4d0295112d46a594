"""Class-conditional G and D: zero classes change nothing; labels pick the image (given as ints, names,
numpy integers or tensors); mixing and interpolation by class; truncation moves toward each class's
mean w; D's projection term against its closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stylenat.models import build_discriminator, build_generator, get_preset, model_to_uint8, save_model, seeds_to_z
from stylenat.models.io import load_model
from stylenat.sampling import generate, interpolate, style_mix


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


def _forward(g, seeds, labels):
    """The generator's own forward z, c -> image: the oracle of the sampling functions."""
    with torch.no_grad():
        return model_to_uint8(g(seeds_to_z(seeds, g.style_dim), c=torch.as_tensor(labels)), g.config)


@pytest.mark.parametrize("labels", [[0, 2], ("cat", "fox"), torch.tensor([0, 2]), np.array([0, 2]), [np.int64(0), np.int32(2)],
                                    [torch.tensor(0), torch.tensor(2)], ["0", "fox"]])
def test_labels_as_tensors_numpy_and_sequences(g, labels):
    assert torch.equal(generate(g, [5, 6], labels=labels), _forward(g, [5, 6], [0, 2]))


@pytest.mark.parametrize("label", [1, "dog", "1", np.int64(1), np.uint8(1), torch.tensor(1), np.array(1), torch.tensor([1])[0]])
def test_one_label_for_every_seed_in_any_form(g, label):
    assert torch.equal(generate(g, [5, 6], labels=label), _forward(g, [5, 6], [1, 1]))


@pytest.mark.parametrize(("labels", "message"), [
    (torch.tensor([0.0, 1.0]), "a class is an index"), (1.0, "a class is an index"), (True, "a class is an index"),
    (np.float64(1), "a class is an index"), (torch.zeros(2, 1, dtype=torch.long), r"one class or one per image, got an array of shape \(2, 1\)"),
    ([0, 1, 2], "3 labels for 2 images"), (np.int64(3), "class 3 does not exist: this model has classes 0-2"),
    (torch.tensor([0, -1]), "class -1 does not exist")])
def test_labels_that_are_not_classes(g, labels, message):
    with pytest.raises(ValueError, match=message):
        generate(g, [5, 6], labels=labels)


def test_mix_and_interpolate_by_class(g):
    with torch.no_grad():
        w = g.mapping(seeds_to_z([1, 2, 3], g.style_dim), c=torch.full((3,), 2))  # class "fox"
    grid = style_mix(g, [1, 2], [3], [0, 1, 2], labels="fox")
    ws = w[:2, None].repeat(1, g.num_ws, 1)
    ws[:, :3] = w[2]
    with torch.no_grad():
        mixed = model_to_uint8(g.synthesis(ws), g.config)
    assert torch.equal(grid[1:, 1], mixed) and torch.equal(grid[1:, 0], _forward(g, [1, 2], [2, 2]))
    assert torch.equal(grid[0, 1], _forward(g, [3], [2])[0])
    assert not torch.equal(grid[0, 1], _forward(g, [3], [0])[0])  # the class matters
    frames = interpolate(g, [1, 2], 2, loop=False, labels=np.int64(2))
    assert torch.equal(frames[0], _forward(g, [1], [2])[0]) and torch.equal(frames[2], _forward(g, [2], [2])[0])
    with torch.no_grad():
        mid = model_to_uint8(g.synthesis(((w[0] + w[1]) / 2).expand(1, g.num_ws, -1)), g.config)[0]
    assert (frames[1].int() - mid.int()).abs().max() <= 1  # lerp and mean may round the last bit apart
    z_frames = interpolate(g, [1, 2], 2, loop=False, space="z", labels="fox")  # each frame mapped with the class
    assert (z_frames[0].int() - _forward(g, [1], [2])[0].int()).abs().max() <= 1


def test_class_mean_w_is_the_mean_over_the_class_seeded_latents(g):
    z = seeds_to_z(range(64), g.style_dim)
    for k in range(3):
        with torch.no_grad():
            w = g.mapping.embed(z, torch.full((64,), k))
        torch.testing.assert_close(g.mapping.class_w_avg[k], w.double().mean(0).float(), rtol=0, atol=1e-6)
    # psi = 0: every seed gives its class's mean image.
    mean_images = generate(g, [1, 2, 3], truncation_psi=0, labels=2)
    assert torch.equal(mean_images[0], mean_images[1])
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
