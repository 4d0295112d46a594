"""LPIPS v0.1 VGG16: the weights files' layouts, the distance against a direct re-computation, and
finding, checking and refusing weights files (random weights of the real layouts; no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stylenat.errors import MissingFileError, ModelFileError
from stylenat.metrics import lpips as lp
from stylenat._system import file_sha256
from stylenat.models import build_generator, uint8_to_model

# torchvision's vgg16 state dict (vgg16-397923af.pth): conv index in `features` -> (out, in) channels.
VGG_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
             17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}
VGG_FEATURES = {**{f"features.{i}.weight": (o, c, 3, 3) for i, (o, c) in VGG_CONVS.items()},
                **{f"features.{i}.bias": (o,) for i, (o, _) in VGG_CONVS.items()}}
VGG_CLASSIFIER = {"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
                  "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
                  "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)}
VGG16_PARAMS = 138_357_544  # torchvision's documented parameter count of vgg16
# lpips 0.1.4, lpips/weights/v0.1/vgg.pth: one 1x1 conv per stage, no bias.
LIN_LAYOUT = {"lin0.model.1.weight": (1, 64, 1, 1), "lin1.model.1.weight": (1, 128, 1, 1),
              "lin2.model.1.weight": (1, 256, 1, 1), "lin3.model.1.weight": (1, 512, 1, 1),
              "lin4.model.1.weight": (1, 512, 1, 1)}
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's features
POOLS_BEFORE = {5, 10, 17, 24}  # a 2x2 max pool precedes these convs


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def random_vgg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """He-normal convs and small biases, so activations keep their scale through 13 layers."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in VGG_FEATURES.items():
        fan_in = _numel(shape[1:]) if len(shape) > 1 else 1
        scale = (2 / fan_in) ** 0.5 if key.endswith("weight") else 0.05
        state[key] = torch.randn(shape, generator=gen) * scale
    return state


def random_lin_state(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(shape, generator=gen) for k, shape in LIN_LAYOUT.items()}  # LPIPS's weights are >= 0


@pytest.fixture(autouse=True)
def no_weights_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("STYLENAT_LPIPS", raising=False)
    monkeypatch.delenv("STYLENAT_LPIPS_VGG", raising=False)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    vgg, lin = folder / "vgg.pth", folder / "lin.pth"
    # A small stand-in classifier: the loader must ignore the classifier of the real file.
    torch.save({**random_vgg_state(), "classifier.0.weight": torch.zeros(2, 2)}, vgg)
    torch.save(random_lin_state(), lin)
    return vgg, lin


@pytest.fixture(scope="module")
def model(weight_files):
    return lp.load_lpips(*weight_files, verify=False)


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference_lpips(vgg: dict, lin: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written out from its formula: sum_l mean_hw sum_c w_lc (xhat_lchw - yhat_lchw)^2."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        h, out = (img - shift) / scale, []
        for i in sorted(VGG_CONVS):
            if i in POOLS_BEFORE:
                h = F.max_pool2d(h, 2)
            h = torch.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            if i + 1 in TAPS:
                out.append(h)
        return out

    total = torch.zeros(len(x), dtype=torch.float64)
    for layer, (a, b) in enumerate(zip(taps(x), taps(y))):
        a, b = a.double(), b.double()
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lin[f"lin{layer}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


def test_layouts_match_the_real_files():
    state = {k: tuple(v.shape) for k, v in lp.LPIPS().state_dict().items()}
    assert state == {**VGG_FEATURES, **LIN_LAYOUT}
    # The table with torchvision's classifier is the whole of vgg16, by its documented size.
    assert sum(_numel(s) for s in {**VGG_FEATURES, **VGG_CLASSIFIER}.values()) == VGG16_PARAMS


def test_distance_properties(model):
    x, y = lp.uint8_to_lpips(images(3, 0)), lp.uint8_to_lpips(images(3, 1))
    with torch.no_grad():
        same, xy, yx = model(x, x), model(x, y), model(y, x)
    assert same.shape == (3,) and torch.all(same.abs() < 1e-6)
    assert torch.allclose(xy, yx, rtol=1e-6, atol=1e-7)
    assert torch.all(xy > 1e-3)


def test_matches_direct_computation(model, weight_files):
    vgg, lin = (torch.load(p, weights_only=True) for p in weight_files)
    x, y = lp.uint8_to_lpips(images(2, 2)), lp.uint8_to_lpips(images(2, 3))
    with torch.no_grad():
        ours = model(x, y).double()
    assert torch.allclose(ours, reference_lpips(vgg, lin, x, y), rtol=1e-4, atol=1e-6)
    # features once, then distances against them, is the same number
    with torch.no_grad():
        assert torch.allclose(model.distance_to(model.features_of(x), model.features_of(y)), ours.float())


def test_input_helpers():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert lp.uint8_to_lpips(x)[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    cfg = build_generator("tiny").config
    assert torch.allclose(lp.model_to_lpips(uint8_to_model(x, cfg), cfg), lp.uint8_to_lpips(x), atol=1e-6)


def test_missing_files_say_where_to_get_and_put_them(tmp_path, weight_files):
    assert not lp.lpips_available()
    with pytest.raises(MissingFileError, match=r"download https://download\.pytorch\.org/models/vgg16-397923af\.pth"):
        lp.load_lpips()
    with pytest.raises(MissingFileError) as info:
        lp.load_lpips(path_vgg=weight_files[0])
    message = str(info.value)
    assert "\n" not in message and "STYLENAT_LPIPS=PATH" in message and "pip download lpips==0.1.4" in message
    with pytest.raises(MissingFileError, match="nope.pth does not exist"):
        lp.load_lpips(path_vgg=tmp_path / "nope.pth", path_lin=weight_files[1])


def test_files_are_found_in_env_cache_and_torch_hub(tmp_path, monkeypatch, weight_files, isolated_cache):
    vgg, lin = weight_files
    monkeypatch.setenv("STYLENAT_LPIPS_VGG", str(vgg))
    monkeypatch.setenv("STYLENAT_LPIPS", str(lin))
    assert lp.find_lpips_weights() == (vgg, lin) and lp.lpips_available()
    monkeypatch.setenv("STYLENAT_LPIPS", str(tmp_path / "missing.pth"))
    with pytest.raises(MissingFileError, match=r"\$STYLENAT_LPIPS"):
        lp.find_lpips_weights()
    monkeypatch.delenv("STYLENAT_LPIPS_VGG")  # a named but missing file is an error, not "unavailable"
    with pytest.raises(MissingFileError, match=r"missing.pth \(from \$STYLENAT_LPIPS\)"):
        lp.lpips_available()
    monkeypatch.setenv("STYLENAT_LPIPS_VGG", str(vgg))
    monkeypatch.delenv("STYLENAT_LPIPS")
    monkeypatch.delenv("STYLENAT_LPIPS_VGG")
    hub = tmp_path / "torch_home" / "hub" / "checkpoints" / lp.VGG_NAME
    hub.parent.mkdir(parents=True)
    hub.write_bytes(vgg.read_bytes())
    isolated_cache.mkdir(parents=True, exist_ok=True)
    (isolated_cache / lp.LIN_NAME).write_bytes(lin.read_bytes())
    assert lp.find_lpips_weights() == (hub, isolated_cache / lp.LIN_NAME)
    (isolated_cache / lp.VGG_NAME).write_bytes(vgg.read_bytes())  # the project cache comes first
    assert lp.find_lpips_weights()[0] == isolated_cache / lp.VGG_NAME


def test_checksums_are_verified(weight_files, monkeypatch):
    vgg, lin = weight_files
    with pytest.raises(ModelFileError, match="expected 397923af") as info:
        lp.load_lpips(vgg, lin)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(lp, "VGG_SHA256_PREFIX", file_sha256(vgg)[:8])
    with pytest.raises(ModelFileError, match=f"expected {lp.LIN_SHA256[:16]}"):
        lp.load_lpips(vgg, lin)
    monkeypatch.setattr(lp, "LIN_SHA256", file_sha256(lin))
    assert isinstance(lp.load_lpips(vgg, lin), lp.LPIPS)  # both match: loads


def test_wrong_files_are_refused(tmp_path, weight_files):
    vgg, lin = weight_files
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="not a readable VGG16 file"):
        lp.load_lpips(junk, lin, verify=False)
    swapped = tmp_path / "swapped.pth"
    torch.save({**random_vgg_state(), "features.0.weight": torch.zeros(64, 3, 5, 5)}, swapped)
    with pytest.raises(ModelFileError, match="wrong shapes; first: features.0.weight"):
        lp.load_lpips(swapped, lin, verify=False)
    with pytest.raises(ModelFileError, match="missing keys"):
        lp.load_lpips(vgg, vgg, verify=False)  # the VGG file where the lin file belongs
