"""The FID Inception network: layout of its weights, loading, preprocessing and features."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stylenat.metrics.inception import FIDInception, InceptionWeightsError, load_inception, preprocess

# The architecture written out as (module, in, out, kh, kw) per conv, independently of the module
# code: stem, then each Mixed block from its type and arguments (channel counts from the Inception-v3
# paper's figures as torchvision and the TF graph realise them). "x" is the block's input width.
STEM = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
BLOCK_CONVS = {
    "A": lambda x, p: [("branch1x1", x, 64, 1, 1), ("branch5x5_1", x, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),
                       ("branch3x3dbl_1", x, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3),
                       ("branch3x3dbl_3", 96, 96, 3, 3), ("branch_pool", x, p, 1, 1)],
    "B": lambda x, _: [("branch3x3", x, 384, 3, 3), ("branch3x3dbl_1", x, 64, 1, 1),
                       ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3)],
    "C": lambda x, c: [("branch1x1", x, 192, 1, 1), ("branch7x7_1", x, c, 1, 1), ("branch7x7_2", c, c, 1, 7),
                       ("branch7x7_3", c, 192, 7, 1), ("branch7x7dbl_1", x, c, 1, 1),
                       ("branch7x7dbl_2", c, c, 7, 1), ("branch7x7dbl_3", c, c, 1, 7),
                       ("branch7x7dbl_4", c, c, 7, 1), ("branch7x7dbl_5", c, 192, 1, 7),
                       ("branch_pool", x, 192, 1, 1)],
    "D": lambda x, _: [("branch3x3_1", x, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
                       ("branch7x7x3_1", x, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
                       ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)],
    "E": lambda x, _: [("branch1x1", x, 320, 1, 1), ("branch3x3_1", x, 384, 1, 1),
                       ("branch3x3_2a", 384, 384, 1, 3), ("branch3x3_2b", 384, 384, 3, 1),
                       ("branch3x3dbl_1", x, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
                       ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1),
                       ("branch_pool", x, 192, 1, 1)],
}
MIXED = [("Mixed_5b", "A", 192, 32), ("Mixed_5c", "A", 256, 64), ("Mixed_5d", "A", 288, 64),
         ("Mixed_6a", "B", 288, None), ("Mixed_6b", "C", 768, 128), ("Mixed_6c", "C", 768, 160),
         ("Mixed_6d", "C", 768, 160), ("Mixed_6e", "C", 768, 192), ("Mixed_7a", "D", 768, None),
         ("Mixed_7b", "E", 1280, None), ("Mixed_7c", "E", 2048, None)]
# torchvision documents inception_v3 (1000 classes, with its aux classifier) as 27,161,264 parameters;
# the aux classifier holds 3,326,696 and 8 more classes add 8 * 2048 + 8.
EXPECTED_PARAMS = 27_161_264 - 3_326_696 + 8 * 2048 + 8


def expected_state_shapes() -> dict[str, tuple[int, ...]]:
    convs = list(STEM)
    for name, kind, width, arg in MIXED:
        convs += [(f"{name}.{branch}", cin, cout, kh, kw)
                  for branch, cin, cout, kh, kw in BLOCK_CONVS[kind](width, arg)]
    shapes = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for prefix, cin, cout, kh, kw in convs:
        shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{stat}"] = (cout,)
        shapes[f"{prefix}.bn.num_batches_tracked"] = ()
    return shapes


def test_state_dict_matches_the_architecture_table():
    model = FIDInception()
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_state_shapes()
    assert sorted(set(actual) - set(expected)) == [] and sorted(set(expected) - set(actual)) == []
    assert actual == expected
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("with_counters", [True, False])
def test_random_weights_load_with_or_without_bn_counters(tmp_path, with_counters, random_weights):
    state = torch.load(random_weights, weights_only=True)
    if not with_counters:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "w.pth"
    torch.save(state, path)
    model = load_inception(path, verify=False)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest in model.cache_key


@pytest.mark.parametrize("edit", ["extra", "missing", "shape"])
def test_weights_of_another_layout_are_refused(tmp_path, random_weights, edit):
    state = torch.load(random_weights, weights_only=True)
    if edit == "extra":
        state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    elif edit == "missing":
        del state["Mixed_7c.branch_pool.bn.running_var"]
    else:
        state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(InceptionWeightsError, match="not an FID Inception state dict"):
        load_inception(tmp_path / "w.pth", verify=False)


def test_missing_weights_say_where_to_get_and_put_them(isolated_cache):
    with pytest.raises(InceptionWeightsError) as info:
        load_inception()
    message = str(info.value)
    url = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
    assert url in message
    assert "--inception" in message and "STYLENAT_INCEPTION" in message
    assert str(isolated_cache / "pt_inception-2015-12-05-6726825d.pth") in message


def test_weights_lookup_order(tmp_path, monkeypatch, random_weights, isolated_cache):
    monkeypatch.setenv("STYLENAT_INCEPTION", str(tmp_path / "absent.pth"))
    with pytest.raises(InceptionWeightsError, match="absent.pth"):
        load_inception()  # the env var wins over the cache dir
    assert load_inception(random_weights, verify=False) is not None  # an explicit path wins over both
    monkeypatch.delenv("STYLENAT_INCEPTION")
    isolated_cache.mkdir()
    (isolated_cache / "pt_inception-2015-12-05-6726825d.pth").write_bytes(open(random_weights, "rb").read())
    assert load_inception(verify=False) is not None


def test_wrong_hash_is_one_clear_error(random_weights):
    with pytest.raises(InceptionWeightsError) as info:
        load_inception(random_weights)
    message = str(info.value)
    assert "sha256" in message and "6726825d" in message and "pytorch-fid/releases" in message


def test_preprocess_scales_to_minus_one_one_and_resizes_bilinearly():
    # Constant images: resizing keeps the value, so the output is the closed form v / 255 * 2 - 1.
    values = torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8)
    flat = values.view(-1, 1, 1, 1).expand(-1, 3, 5, 7).contiguous()
    out = preprocess(flat)
    assert out.shape == (5, 3, 299, 299)
    torch.testing.assert_close(out.amax(dim=(1, 2, 3)), values.double().float() / 255 * 2 - 1, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.amin(dim=(1, 2, 3)), values.double().float() / 255 * 2 - 1, rtol=0, atol=1e-6)
    # A horizontal ramp 0, 10, ..., 70: bilinear with half-pixel centres samples source column
    # (j + 0.5) * 8 / 299 - 0.5, clamped to the image.
    ramp = (torch.arange(8) * 10).to(torch.uint8).view(1, 1, 1, 8).expand(1, 3, 4, 8).contiguous()
    cols = ((torch.arange(299, dtype=torch.float64) + 0.5) * 8 / 299 - 0.5).clamp(0, 7)
    torch.testing.assert_close(preprocess(ramp)[0, 0, 0].double(), 10 * cols / 255 * 2 - 1, rtol=0, atol=1e-5)
    # Any image: the same as F.interpolate (bilinear, align_corners=False, no antialias) then scaling.
    img = torch.randint(0, 256, (2, 3, 13, 21), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = F.interpolate(img.double(), size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(preprocess(img).double(), ref / 255 * 2 - 1, rtol=0, atol=1e-5)


def _bilinear_matrix(n: int, out: int = 299) -> np.ndarray:
    """[out, n] weights of a 1-D bilinear resize with half-pixel centres (align_corners=False)."""
    m = np.zeros((out, n))
    for i in range(out):
        src = max((i + 0.5) * n / out - 0.5, 0.0)
        lo = min(int(np.floor(src)), n - 1)
        hi, lam = min(lo + 1, n - 1), src - lo
        m[i, lo] += 1 - lam
        m[i, hi] += lam
    return m


def test_a_rectangle_is_squashed_whole_to_299x299():
    # 32 wide, 16 high: every row and every column of the image reaches the input (no crop, no
    # padding), each axis scaled by its own factor, as pytorch-fid, clean-fid and StyleGAN2-ADA do.
    img = torch.randint(0, 256, (1, 3, 16, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    rows, cols = _bilinear_matrix(16), _bilinear_matrix(32)
    want = np.einsum("yh,chw,xw->cyx", rows, img[0].double().numpy(), cols) / 255 * 2 - 1
    got = preprocess(img)[0].double().numpy()
    assert got.shape == (3, 299, 299)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # The transposed image gives the transposed input.
    np.testing.assert_allclose(preprocess(img.transpose(2, 3).contiguous())[0].double().numpy(),
                               want.transpose(0, 2, 1), rtol=0, atol=1e-5)


def test_preprocess_refuses_float_images():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(torch.zeros(1, 3, 8, 8))


def test_features_do_not_depend_on_batch_size(random_weights):
    # Each 299x299 forward costs ~6 GFLOP, so: one image alone against the same image in a batch.
    model = load_inception(random_weights, verify=False)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    together = model(images)
    alone = model(images[1:])
    assert together.shape == (2, 2048) and together.dtype == torch.float32
    assert together.std() > 1e-2  # the random weights give features of real size
    assert (together[0] - together[1]).abs().max() > 1e-2  # and different images differ
    torch.testing.assert_close(alone[0], together[1], rtol=1e-5, atol=1e-5 * together.abs().max().item())
