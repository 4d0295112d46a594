"""The "FID Inception" network: Inception-v3 as in TensorFlow's 2015-12-05 graph, in plain PyTorch.

It differs from torchvision's Inception3 in three ways that move FID, all kept here: a 1008-way
classifier, average pools that ignore padding (the A, C and first E blocks) and a max pool in the
last E block's pool branch. Parameter names are torchvision's, so the weights file that
pytorch-fid publishes (a torchvision state dict) loads as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stylenat._system import cache_dir, file_sha256
from stylenat.errors import MissingFileError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
FEATURE_DIM = 2048
# Everything besides the weights that shapes the features; part of the dataset-stats cache key.
FEATURE_SETTINGS = "fid-inception-v3:pool3-2048:resize-299-bilinear-align_corners0-noantialias:scale-x/255*2-1"


class InceptionWeightsError(MissingFileError):
    """The Inception weights are missing or are not the expected file."""


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's value) -> ReLU; torchvision's BasicConv2d names.

    Args:
        cin, cout: input and output channels.
        kernel: int or (kh, kw). stride: int. padding: int or (ph, pw).
    """

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool divides by the number of real (unpadded) pixels in the window.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _run(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avg-pool->1x1 (pool_features channels)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            _run(x, self.branch5x5_1, self.branch5x5_2),
            _run(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_avg_pool_same(x)),
        ], 1)


class BlockB(nn.Module):
    """35->17 reduction: stride-2 3x3 | 1x1->3x3->stride-2 3x3 | stride-2 max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            _run(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (c7 inner channels) and an avg-pool branch."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            _run(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _run(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5),
            self.branch_pool(_avg_pool_same(x)),
        ], 1)


class BlockD(nn.Module):
    """17->8 reduction: 1x1->stride-2 3x3 | 1x1->1x7->7x1->stride-2 3x3 | stride-2 max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            _run(x, self.branch3x3_1, self.branch3x3_2),
            _run(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs.

    Args:
        cin: input channels.
        pool: "avg" (padding-free average, the first E block) or "max" (the last E block: the
            2015 graph has a max pool there, unlike the paper).
    """

    def __init__(self, cin: int, pool: str):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.pool = {"avg": _avg_pool_same, "max": _max_pool_same}[pool]
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, **row)
        self.branch3x3_2b = ConvBN(384, 384, **col)
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, **row)
        self.branch3x3dbl_3b = ConvBN(384, 384, **col)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = _run(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(self.pool(x)),
        ], 1)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> float [B, 3, 299, 299] in [-1, 1], as pytorch-fid feeds them.

    Bilinear resize with align_corners=False and no antialiasing (F.interpolate's default for
    bilinear), then x / 255 * 2 - 1. Both steps are linear, so their order does not matter.
    An image of H != W is resized whole to 299x299, each axis by its own factor (squashed, not
    cropped or padded), as pytorch-fid, clean-fid (PIL resize to (299, 299)), torch-fidelity and
    StyleGAN2-ADA's Inception graph (tf.image.resize_bilinear to 299x299 inside it) all do, so FID
    of a 512x384 model is comparable with theirs.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
    x = images.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x / 255 * 2 - 1


class FIDInception(nn.Module):
    """uint8 images [B, 3, H, W] -> 2048-d pool features [B, 2048] (float32).

    `fc` (1008 classes) is kept only so the weights file loads with strict key matching; the
    features are taken before it. `cache_key` (set by load_inception) names the weights and the
    preprocessing, for caches of features.
    """

    cache_key = f"{FEATURE_SETTINGS}:unloaded"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, "avg")
        self.Mixed_7c = BlockE(2048, "max")
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images.to(self.fc.weight.device))
        x = _run(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = _run(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = _run(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                 self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                 self.Mixed_7c)
        return x.mean(dim=(2, 3))


def find_weights(path: str | os.PathLike | None = None, needed_by: Sequence[str] = ("FID",)) -> Path:
    """The weights file: `path`, else $STYLENAT_INCEPTION, else <cache dir>/WEIGHTS_NAME.

    needed_by: the metrics asking for it, named in the message when the file is missing.
    """
    candidate = Path(path or os.environ.get("STYLENAT_INCEPTION") or cache_dir() / WEIGHTS_NAME)
    if not candidate.is_file():
        names = list(needed_by) or ["FID"]
        who = names[0] + " needs" if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]} need"
        raise InceptionWeightsError(
            f"Inception weights not found at {candidate}. {who} {WEIGHTS_NAME} (about 92 MB): "
            f"download it from {WEIGHTS_URL} and either pass it with --inception PATH, set "
            f"STYLENAT_INCEPTION=PATH, or put it at {cache_dir() / WEIGHTS_NAME}."
        )
    return candidate


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load with exact key and shape matching; only BatchNorm's num_batches_tracked may be absent.

    That counter is unused in eval mode and exists in a torchvision state dict only if it was
    saved by PyTorch >= 0.4.1, so a file with or without it is the same network.
    """
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith(".num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise InceptionWeightsError(
            f"{source} is not an FID Inception state dict ({len(missing)} missing keys, "
            f"{len(unexpected)} unexpected, {len(wrong)} with wrong shapes; first: "
            f"{(missing + unexpected + wrong)[0]}). Use {WEIGHTS_NAME} from {WEIGHTS_URL}."
        )
    model.load_state_dict(state, strict=False)


def load_inception(path: str | os.PathLike | None = None, verify: bool = True,
                   device: str | torch.device = "cpu", needed_by: Sequence[str] = ("FID",)) -> FIDInception:
    """The FID Inception network with its weights, in eval mode, mapping uint8 [B,3,H,W] -> [B,2048].

    Args:
        path: weights file; None looks at $STYLENAT_INCEPTION, then the cache dir (see find_weights).
        verify: check that the file's sha256 starts with 6726825d (False for tests with random weights).
        device: where the network runs.
        needed_by: the metrics it is loaded for, named when the file is missing (see find_weights).
    Never downloads: a missing file raises one message saying where to get it and where to put it.
    """
    source = find_weights(path, needed_by)
    digest = file_sha256(source)
    if verify and not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise InceptionWeightsError(
            f"{source} has sha256 {digest[:16]}..., expected {WEIGHTS_SHA256_PREFIX}...: it is not "
            f"{WEIGHTS_NAME}. Download it again from {WEIGHTS_URL}."
        )
    model = FIDInception()
    _load_state(model, torch.load(source, map_location="cpu", weights_only=True), source)
    model.cache_key = f"{FEATURE_SETTINGS}:sha256={digest}"
    return model.eval().requires_grad_(False).to(device)
