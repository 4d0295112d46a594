"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"), VGG16, version 0.1.

d(x, y) = sum over the 5 VGG16 stages l of mean over pixels of  w_l . (f_l(x) - f_l(y))**2, where
f_l is the relu1_2, relu2_2, relu3_3, relu4_3 or relu5_3 activation of the (shift/scale-normalised)
image, unit-normalised along channels, and w_l >= 0 is the learned 1x1 "lin" layer of stage l.
Images come in [-1, 1]; :func:`uint8_to_lpips` and :func:`model_to_lpips` convert to that.

Two weights files, never downloaded: torchvision's ImageNet VGG16 (``vgg16-397923af.pth``, the
trunk; its classifier is ignored) and the LPIPS lin layers (``weights/v0.1/vgg.pth`` of the lpips
package, stored here as ``lpips_vgg_v0.1.pth``). Parameter names are those of the two files
(``features.<i>.*`` and ``lin<l>.model.1.weight``) so both load as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from stylenat._system import cache_dir, file_sha256
from stylenat.errors import MissingFileError, ModelFileError
from stylenat.models.config import GeneratorConfig

__all__ = [
    "LPIPS",
    "VGG_NAME",
    "LIN_NAME",
    "find_lpips_weights",
    "load_lpips",
    "lpips_available",
    "uint8_to_lpips",
    "model_to_lpips",
]

VGG_NAME = "vgg16-397923af.pth"
VGG_URL = f"https://download.pytorch.org/models/{VGG_NAME}"
VGG_SHA256_PREFIX = "397923af"  # torchvision names its files after the first 8 hex digits of the sha256
VGG_ENV = "STYLENAT_LPIPS_VGG"
LIN_NAME = "lpips_vgg_v0.1.pth"
# sha256 of lpips/weights/v0.1/vgg.pth in the lpips 0.1.4 wheel on PyPI (7,289 bytes); it matches
# the hash that the wheel's RECORD lists for that file.
LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
LIN_SOURCE = ("lpips/weights/v0.1/vgg.pth inside the lpips package (pip download lpips==0.1.4 --no-deps, "
              "then unzip the wheel)")
LIN_ENV = "STYLENAT_LPIPS"

# torchvision's vgg16 `features` up to relu5_3: ints are 3x3 convs (output channels) each followed by
# a ReLU, "M" a 2x2 max pool. The pool after relu5_3 (index 30) is not needed.
_VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Index in `features` of the ReLU whose output is each LPIPS stage (relu1_2 ... relu5_3).
_TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's ScalingLayer: the ImageNet mean/std expressed for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # in the channel normalisation, as in LPIPS


def uint8_to_lpips(images: Tensor) -> Tensor:
    """uint8 images [B, 3, H, W] (0..255) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def model_to_lpips(raw: Tensor, cfg: GeneratorConfig) -> Tensor:
    """Raw generator output [B, 3, S, S] in the model's space -> float32 in [-1, 1] (not clamped)."""
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=raw.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=raw.device).view(1, 3, 1, 1)
    return (raw.float() * std + mean) * 2 - 1


def _vgg16_trunk() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for spec in _VGG16_LAYERS:
        if spec == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, spec, 3, padding=1), nn.ReLU()]
            cin = spec
    return nn.Sequential(*layers)


class _Lin(nn.Module):
    """LPIPS's NetLinLayer: (dropout, unused at inference) then a 1x1 conv to one channel, no bias.

    Args:
        channels: input channels of the stage.
    """

    def __init__(self, channels: int):
        super().__init__()
        # Identity stands in for the dropout so the conv keeps its name "model.1".
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG16): images [B, 3, H, W] in [-1, 1], twice -> distances [B].

    Build it with :func:`load_lpips`; a bare ``LPIPS()`` has random weights. For many comparisons
    against one image, compute its :meth:`features` once and use :meth:`distance_to`.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_trunk()
        for i, c in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _Lin(c))

    def features_of(self, images: Tensor) -> list[Tensor]:
        """The 5 channel-normalised VGG activations [B, C_l, H_l, W_l] of images in [-1, 1]."""
        x = (images.to(self.shift.device, torch.float32) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + _EPS))
        return out

    def distance_to(self, feats: list[Tensor], other: list[Tensor]) -> Tensor:
        """Distances [B] between two :meth:`features_of` results (batches equal or one of size 1)."""
        total = 0
        for i, (a, b) in enumerate(zip(feats, other)):
            total = total + getattr(self, f"lin{i}")((a - b).square()).mean(dim=(1, 2, 3))
        return total

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.distance_to(self.features_of(x), self.features_of(y))


# ---- weights ----------------------------------------------------------------------------------


def _torch_hub_vgg() -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME and $XDG_CACHE_HOME the way torchvision does.
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG_NAME


def _vgg_help() -> str:
    return (f"LPIPS needs torchvision's VGG16 weights {VGG_NAME} (528 MB): download {VGG_URL} and pass "
            f"it explicitly, set {VGG_ENV}=PATH, or put it at {cache_dir() / VGG_NAME} or {_torch_hub_vgg()}")


def _lin_help() -> str:
    return (f"LPIPS needs its v0.1 VGG lin weights (7 KB), which are {LIN_SOURCE}: pass that file explicitly, "
            f"set {LIN_ENV}=PATH, or copy it to {cache_dir() / LIN_NAME}")


def _first_file(explicit, env: str, defaults: list[Path], help_text: str) -> Path | None:
    """The explicit path, else $env, else the first existing default; a named but absent file raises."""
    named = explicit or os.environ.get(env)
    if named:
        path = Path(named)
        if not path.is_file():
            origin = "" if explicit else f" (from ${env})"
            raise MissingFileError(f"{path}{origin} does not exist. {help_text}.")
        return path
    return next((p for p in defaults if p.is_file()), None)


def _find_vgg(path) -> Path | None:
    return _first_file(path, VGG_ENV, [cache_dir() / VGG_NAME, _torch_hub_vgg()], _vgg_help())


def _find_lin(path) -> Path | None:
    return _first_file(path, LIN_ENV, [cache_dir() / LIN_NAME], _lin_help())


def find_lpips_weights(path_vgg: str | os.PathLike | None = None,
                       path_lin: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(VGG16 file, lin file); MissingFileError saying where to get and put whichever is missing.

    Args:
        path_vgg: torchvision's vgg16-397923af.pth; None looks at $STYLENAT_LPIPS_VGG, then
            <cache dir>/vgg16-397923af.pth, then torch hub's checkpoints/vgg16-397923af.pth.
        path_lin: the LPIPS v0.1 VGG lin file; None looks at $STYLENAT_LPIPS, then
            <cache dir>/lpips_vgg_v0.1.pth.
    """
    vgg, lin = _find_vgg(path_vgg), _find_lin(path_lin)
    if vgg is None:
        raise MissingFileError(f"{_vgg_help()}.")
    if lin is None:
        raise MissingFileError(f"{_lin_help()}.")
    return vgg, lin


def lpips_available(path_vgg: str | os.PathLike | None = None, path_lin: str | os.PathLike | None = None) -> bool:
    """Whether both weights files are found (their checksums are checked only by :func:`load_lpips`).

    A file named (argument or environment variable) but absent raises MissingFileError rather than
    answering False: a mistyped path must not quietly switch the caller to its fallback.

    Args:
        path_vgg, path_lin: as in :func:`find_lpips_weights`.
    """
    vgg, lin = _find_vgg(path_vgg), _find_lin(path_lin)  # both looked up: either may raise
    return vgg is not None and lin is not None


def _read_state(path: Path, what: str, help_text: str) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike mean "not a usable weights file"
        raise ModelFileError(f"{path} is not a readable {what} file ({type(exc).__name__}). {help_text}.") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} is not a {what} state dict. {help_text}.")
    return state


def _check_sha(path: Path, ok, expected: str, help_text: str) -> None:
    digest = file_sha256(path)
    if not ok(digest):
        raise ModelFileError(f"{path} has sha256 {digest[:16]}..., expected {expected[:16]}...: "
                             f"it is not the right file. {help_text}.")


def _pick(state: dict[str, Tensor], expected: dict[str, Tensor], optional_prefix: str | None,
          path: Path, help_text: str) -> dict[str, Tensor]:
    """The entries of ``state`` named in ``expected``, with exact shapes; extra keys only under optional_prefix."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(k for k in set(state) - set(expected) if not (optional_prefix and k.startswith(optional_prefix)))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or extra or wrong:
        first = (missing + extra + wrong)[0]
        raise ModelFileError(f"{path} does not have the expected layout ({len(missing)} missing keys, {len(extra)} "
                             f"unexpected, {len(wrong)} with wrong shapes; first: {first}). {help_text}.")
    return {k: state[k] for k in expected}


def load_lpips(path_vgg: str | os.PathLike | None = None, path_lin: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", verify: bool = True) -> LPIPS:
    """LPIPS v0.1 VGG16 with its weights, eval mode, no gradients to its parameters.

    Args:
        path_vgg: torchvision's vgg16-397923af.pth, or None to search (see find_lpips_weights).
        path_lin: the LPIPS v0.1 VGG lin file, or None to search.
        device: where the network runs.
        verify: check the files' sha256 (False for tests with random weights of the same layout).
    Never downloads: a missing file raises MissingFileError, a wrong one ModelFileError, each one
    line saying where to get the file and where to put it.
    """
    vgg_path, lin_path = find_lpips_weights(path_vgg, path_lin)
    if verify:
        _check_sha(vgg_path, lambda d: d.startswith(VGG_SHA256_PREFIX), VGG_SHA256_PREFIX, _vgg_help())
        _check_sha(lin_path, lambda d: d == LIN_SHA256, LIN_SHA256, _lin_help())
    model = LPIPS()
    expected = model.state_dict()
    trunk = {k: v for k, v in expected.items() if k.startswith("features.")}
    lins = {k: v for k, v in expected.items() if k.startswith("lin")}
    state = _pick(_read_state(vgg_path, "VGG16", _vgg_help()), trunk, "classifier.", vgg_path, _vgg_help())
    state |= _pick(_read_state(lin_path, "LPIPS lin", _lin_help()), lins, None, lin_path, _lin_help())
    model.load_state_dict(state)
    return model.eval().requires_grad_(False).to(device)
