"""Adaptive discriminator augmentation (ADA): the 'bgc' pipeline and the controller of its strength p.

Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data": every image the
discriminator sees (reals and fakes alike) is augmented with probability ``p`` per transform, and
``p`` is steered so that r_t, the mean sign of the discriminator's outputs on reals, stays near a
target.

The transforms are ADA's 'bgc' set: pixel blitting (x-flip, quarter turns, whole-pixel translation),
general geometry (isotropic scale, rotation before and after an anisotropic scale, sub-pixel
translation) and colour (brightness, contrast, luma flip, hue rotation, saturation). As in ADA, all
the geometric transforms of one image are composed into one 3x3 homogeneous matrix and the image is
resampled once (reflect padding, 2x oversampling between low-pass filters, bilinear sampling), and
the colour transforms into one 4x4 matrix on [-1, 1] RGB. The filters are a symmetric biorthogonal
pair rather than ADA's orthogonal symlet: an orthogonal filter cannot be symmetric, and its phase
moves mirrored or turned images by a fraction of a pixel. An image whose composed matrix only
permutes pixels (it drew nothing but flips, quarter turns and whole-pixel shifts) is gathered
instead of resampled, so it comes out exactly permuted.

This is written by hand rather than with kornia because kornia draws its random parameters from
torch's global RNG on the tensors' device, which breaks the project's bitwise-exact resume and
per-rank random streams, and because it resamples once per transform rather than once per image
as ADA does. Here every draw comes from the draws passed to the call (a training step's
:class:`~stylenat.train.draws.StepDraws`, or a plain ``torch.Generator``); the pipeline holds no
random state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stylenat.errors import ConfigError, ModelFileError
from stylenat.train.draws import Draws, as_draws

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "TRANSFORMS",
    "AdaController",
    "AugmentParams",
    "AugmentPipe",
    "apply_colour",
    "apply_geometric",
    "colour_matrix",
    "geometric_matrix",
    "resample",
    "resamples",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

GEOMETRIC = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOUR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
TRANSFORMS = GEOMETRIC + COLOUR
_GROUPS = {"b": GEOMETRIC[:3], "g": GEOMETRIC[3:], "c": COLOUR}
PRESETS = ("none", "b", "g", "c", "bg", "bc", "gc", "bgc")

# ADA's parameter distributions. Scale factors are 2**N(0, std), i.e. lognormal with std*ln2.
XINT_MAX = 0.125  # whole-pixel shift: uniform within +-this fraction of the image size, rounded
SCALE_STD = 0.2  # isotropic scale: log2 standard deviation
ROTATE_MAX = 1.0  # rotation angle: uniform over this fraction of the full circle, centred on 0
ANISO_STD = 0.2  # anisotropic scale: log2 standard deviation
XFRAC_STD = 0.125  # sub-pixel shift: normal, standard deviation as a fraction of the image size
BRIGHTNESS_STD = 0.2  # brightness offset: normal, in [-1, 1] pixel units
CONTRAST_STD = 0.5  # contrast factor: log2 standard deviation
HUE_MAX = 1.0  # hue angle: uniform over this fraction of the full circle, centred on 0
SATURATION_STD = 1.0  # saturation factor: log2 standard deviation

_F64 = torch.float64
# Output-to-input maps of torch.rot90(x, k, dims=(-2, -1)) in (x right, y down) coordinates; exact
# integers, since cos(pi/2) in floating point is not 0 and would break the exact-permutation path.
_QUARTER_INV = torch.tensor([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]], dtype=_F64)
_GREY = torch.full((3, 3), 1 / 3, dtype=_F64)  # v v^T for the unit luma axis v = (1, 1, 1)/sqrt(3)
_LUMA_CROSS = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=_F64) / math.sqrt(3)  # v x (.)


@dataclass
class AugmentParams:
    """Per-image parameters of one draw: CPU float64 tensors of shape (batch,) or (batch, 2).

    A field is None when its transform is not enabled; an image that did not draw a transform holds
    its identity value (0 for flips, turns, shifts, angles and offsets; 1 for factors).

    Args:
        xflip: 1 to mirror the image horizontally, 0 to keep it.
        rotate90: quarter turns, in the sense of ``torch.rot90(x, k, dims=(-2, -1))``.
        xint: whole-pixel shift (x right, y down), pixels.
        scale: isotropic scale factor (> 1 enlarges the content).
        rotate_pre: rotation before the anisotropic scale, radians, counter-clockwise as displayed.
        aniso: anisotropic scale: x is scaled by this factor and y by its inverse.
        rotate_post: rotation after the anisotropic scale, radians, counter-clockwise as displayed.
        xfrac: sub-pixel shift (x right, y down), pixels.
        brightness: offset added to every channel, [-1, 1] pixel units.
        contrast: factor on every channel about mid-grey (0 in [-1, 1] units).
        lumaflip: 1 to reflect colours along the luma axis (1, 1, 1), 0 to keep them.
        hue: rotation of colours about the luma axis, radians.
        saturation: factor on each colour's distance from the luma axis.
    """

    xflip: Tensor | None = None
    rotate90: Tensor | None = None
    xint: Tensor | None = None
    scale: Tensor | None = None
    rotate_pre: Tensor | None = None
    aniso: Tensor | None = None
    rotate_post: Tensor | None = None
    xfrac: Tensor | None = None
    brightness: Tensor | None = None
    contrast: Tensor | None = None
    lumaflip: Tensor | None = None
    hue: Tensor | None = None
    saturation: Tensor | None = None


def _affine(batch: int, a: Tensor | float, b: Tensor | float, c: Tensor | float, d: Tensor | float,
            tx: Tensor | float = 0.0, ty: Tensor | float = 0.0) -> Tensor:
    """(batch, 3, 3) float64 matrices [[a, b, tx], [c, d, ty], [0, 0, 1]]."""
    m = torch.zeros(batch, 3, 3, dtype=_F64)
    for (i, j), v in zip(((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (1, 2)), (a, b, c, d, tx, ty)):
        m[:, i, j] = torch.as_tensor(v, dtype=_F64)
    m[:, 2, 2] = 1
    return m


def _rotation_inv(theta: Tensor) -> Tensor:
    # The forward rotation is [[cos, sin], [-sin, cos]] (counter-clockwise with y pointing down).
    c, s = torch.cos(theta), torch.sin(theta)
    return _affine(len(theta), c, -s, s, c)


def geometric_matrix(params: AugmentParams, batch: int) -> Tensor:
    """Compose an image's geometric transforms into the map from output to input pixel coordinates.

    Coordinates are in pixels about the image centre (x right, y down). The transforms act on the
    image in ADA's order: x-flip, quarter turns, whole-pixel shift, isotropic scale, pre-rotation,
    anisotropic scale, post-rotation, sub-pixel shift.

    Args:
        params: the per-image parameters (fields that are None are skipped).
        batch: number of images.

    Returns:
        (batch, 3, 3) float64 CPU tensor: homogeneous output-to-input maps.
    """
    inv = torch.eye(3, dtype=_F64).repeat(batch, 1, 1)
    steps = []  # inverse of each transform, in the order the transforms act on the image
    if params.xflip is not None:
        steps.append(_affine(batch, 1 - 2 * params.xflip, 0.0, 0.0, 1.0))
    if params.rotate90 is not None:
        q = _QUARTER_INV[params.rotate90.long() % 4]
        steps.append(_affine(batch, q[:, 0, 0], q[:, 0, 1], q[:, 1, 0], q[:, 1, 1]))
    if params.xint is not None:
        steps.append(_affine(batch, 1.0, 0.0, 0.0, 1.0, -params.xint[:, 0], -params.xint[:, 1]))
    if params.scale is not None:
        steps.append(_affine(batch, 1 / params.scale, 0.0, 0.0, 1 / params.scale))
    if params.rotate_pre is not None:
        steps.append(_rotation_inv(params.rotate_pre))
    if params.aniso is not None:
        steps.append(_affine(batch, 1 / params.aniso, 0.0, 0.0, params.aniso))
    if params.rotate_post is not None:
        steps.append(_rotation_inv(params.rotate_post))
    if params.xfrac is not None:
        steps.append(_affine(batch, 1.0, 0.0, 0.0, 1.0, -params.xfrac[:, 0], -params.xfrac[:, 1]))
    # out = T_n ... T_1 in, so in = T_1^-1 ... T_n^-1 out. Products of the blitting matrices
    # (entries 0, +-1 and whole pixels) are exact in float64.
    for step in steps:
        inv = inv @ step
    return inv


def colour_matrix(params: AugmentParams, batch: int) -> Tensor:
    """Compose an image's colour transforms into one homogeneous matrix on [-1, 1] RGB.

    The transforms act in ADA's order: brightness, contrast, luma flip, hue, saturation. Each
    factor is written so that its identity value gives the identity matrix exactly.

    Args:
        params: the per-image parameters (fields that are None are skipped).
        batch: number of images.

    Returns:
        (batch, 4, 4) float64 CPU tensor mapping (r, g, b, 1) in [-1, 1] units to the new colour.
    """
    eye3 = torch.eye(3, dtype=_F64)
    out = torch.eye(4, dtype=_F64).repeat(batch, 1, 1)

    def then(linear: Tensor | None = None, offset: Tensor | None = None) -> None:
        nonlocal out
        m = torch.eye(4, dtype=_F64).repeat(batch, 1, 1)
        if linear is not None:
            m[:, :3, :3] = linear
        if offset is not None:
            m[:, :3, 3] = offset
        out = m @ out

    col = lambda t: t.to(_F64).view(-1, 1, 1)
    if params.brightness is not None:
        then(offset=params.brightness.to(_F64).view(-1, 1).expand(batch, 3))
    if params.contrast is not None:
        then(col(params.contrast) * eye3)
    if params.lumaflip is not None:  # Householder reflection across the plane orthogonal to luma
        then(eye3 - 2 * col(params.lumaflip) * _GREY)
    if params.hue is not None:  # Rodrigues rotation about the luma axis
        c, s = col(torch.cos(params.hue)), col(torch.sin(params.hue))
        then(c * eye3 + s * _LUMA_CROSS + (1 - c) * _GREY)
    if params.saturation is not None:  # scales the chroma, keeps the luma
        then(eye3 + (col(params.saturation) - 1) * (eye3 - _GREY))
    return out


@functools.cache
def _filter_pair() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The CDF 9/7 biorthogonal low-pass pair (JPEG 2000's wavelet): (9-tap up filter, 7-tap down filter).

    Symmetric, so resampling has no phase error whatever the orientation: an orthogonal filter
    such as ADA's symlet cannot be symmetric, and moves a mirrored or turned image by a fraction of a
    pixel. Biorthogonal (sum_k up[k] down[k + 2m] = delta_m / 2), so upsampling with 2*up then
    downsampling with down is the identity, and the resampler reproduces an image up to rounding at
    integer transforms. The 7-tap filter has the stronger stop band, so it is the one that fights
    aliasing before decimation.

    Derivation: with y = sin^2(w/2) = (2 - z - 1/z)/4, Daubechies' (1 - y)^4 P(y), P(y) = 1 + 4y +
    10y^2 + 20y^3, is split as (1 - y)^2 (1 - y/r) for the real root r of P and (1 - y)^2 (1 - y/c)
    (1 - y/conj(c)) for its complex roots; each factor has unit gain at DC.
    """
    y_taps = np.array([-0.25, 0.5, -0.25])  # y as a symmetric filter in z

    def taps(y_poly: np.ndarray) -> tuple[float, ...]:
        out, power = np.zeros(2 * len(y_poly) - 1), np.ones(1)
        for coeff in y_poly:
            start = (len(out) - len(power)) // 2
            out[start:start + len(power)] += coeff * power
            power = np.convolve(power, y_taps)
        return tuple(float(v) for v in out)

    roots = np.roots([20.0, 10.0, 4.0, 1.0])
    real = float(roots[np.argmin(np.abs(roots.imag))].real)
    c = 1 / roots[np.argmax(roots.imag)]
    flat = np.array([1.0, -2.0, 1.0])  # (1 - y)^2
    return taps(np.convolve(flat, [1.0, -2 * c.real, abs(c) ** 2])), taps(np.convolve(flat, [1.0, -1 / real]))


def _reflect(index: Tensor, size: int) -> Tensor:
    """Fold indices into [0, size) by mirroring about the edge pixels (F.pad's 'reflect')."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def _source_of_first_pixel(inv: Tensor, height: int, width: int) -> Tensor:
    """(n, 2) input (column, row) index coordinates that output pixel (0, 0) reads."""
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=_F64)
    corner = torch.tensor([-(width - 1) / 2, -(height - 1) / 2, 1.0], dtype=_F64)
    return (inv @ corner)[:, :2] + centre


def _is_pixel_permutation(inv: Tensor, height: int, width: int) -> Tensor:
    """(n,) bool: the map sends pixel centres to pixel centres (signed axis permutation, whole shift)."""
    lin = inv[:, :2, :2]
    unit = ((lin == 0) | (lin.abs() == 1)).flatten(1).all(1)
    one_per_line = (lin.abs().sum(1) == 1).all(1) & (lin.abs().sum(2) == 1).all(1)
    affine = (inv[:, 2] == torch.tensor([0.0, 0.0, 1.0], dtype=_F64)).all(1)
    src = _source_of_first_pixel(inv, height, width)
    return unit & one_per_line & affine & (src == src.round()).all(1)


def _permute(images: Tensor, inv: Tensor) -> Tensor:
    """Apply pixel-permutation maps by gathering (bitwise exact), reflecting at the borders."""
    n, c, h, w = images.shape
    dev = images.device
    lin = inv[:, :2, :2].round().long().to(dev)
    src = _source_of_first_pixel(inv, h, w).round().long().to(dev)
    j = torch.arange(w, device=dev).view(1, 1, w)
    i = torch.arange(h, device=dev).view(1, h, 1)
    cols = lin[:, 0, 0].view(n, 1, 1) * j + lin[:, 0, 1].view(n, 1, 1) * i + src[:, 0].view(n, 1, 1)
    rows = lin[:, 1, 0].view(n, 1, 1) * j + lin[:, 1, 1].view(n, 1, 1) * i + src[:, 1].view(n, 1, 1)
    flat = (_reflect(rows, h) * w + _reflect(cols, w)).view(n, 1, h * w).expand(n, c, h * w)
    return images.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)


def resample(images: Tensor, inv: Tensor) -> Tensor:
    """Resample each image once through its geometric map, ADA style (always resamples).

    The image is reflect-padded far enough that no sample falls outside, upsampled 2x with a
    symmetric low-pass filter, sampled bilinearly on a 2x-oversampled output canvas, low-passed with
    the filter's biorthogonal partner and decimated 2x. At a transform that maps pixel centres to
    pixel centres every sample lands on an upsampled pixel and the two filters cancel, so the result
    equals the permuted image up to rounding.

    Args:
        images: (n, C, H, W) images, any floating dtype (float16/bfloat16 are resampled in float32).
        inv: (n, 3, 3) float64 CPU output-to-input maps in centred pixel coordinates.

    Returns:
        (n, C, H, W) resampled images, differentiable with respect to ``images``.
    """
    n, c, h, w = images.shape
    dev = images.device
    work = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    up_taps, down_taps = _filter_pair()
    cu, cd = len(up_taps) // 2, len(down_taps) // 2  # centre taps

    # Canvas sample k (per axis) sits at output pixel index (k - cd)/2, so that decimation centres
    # output pixel i on canvas sample 2i + cd; it reaches cd/2 pixels beyond the output frame.
    hc, wc = 2 * h + 2 * cd, 2 * w + 2 * cd
    ex, ey = (w - 1 + cd) / 2, (h - 1 + cd) / 2
    corners = torch.tensor([[-ex, ex, ex, -ex], [-ey, -ey, ey, ey], [1.0] * 4], dtype=_F64)
    src = inv @ corners  # (n, 3, 4) input centred coordinates the canvas corners read
    xs, ys = src[:, 0] + (w - 1) / 2, src[:, 1] + (h - 1) / 2
    reach = cu / 2 + 0.5  # the upsampling filter's half-width plus one bilinear neighbour, input pixels
    pad_l, pad_r = (max(0, math.ceil(float(v))) for v in (reach - xs.min(), xs.max() + reach - (w - 1)))
    pad_t, pad_b = (max(0, math.ceil(float(v))) for v in (reach - ys.min(), ys.max() + reach - (h - 1)))
    # Reflect padding by indexing, as F.pad's 'reflect' cannot pad by more than the image size.
    cols = _reflect(torch.arange(-pad_l, w + pad_r, device=dev), w)
    rows = _reflect(torch.arange(-pad_t, h + pad_b, device=dev), h)
    x = images.to(work).index_select(3, cols).index_select(2, rows)
    hp, wp = x.shape[-2:]

    # Zero insertion halves the mean, hence the gain of 2 per axis on the way up.
    up = 2 * torch.tensor(up_taps, dtype=work, device=dev)
    down = torch.tensor(down_taps, dtype=work, device=dev)
    x = x.reshape(n * c, 1, hp, wp)
    x = F.conv_transpose2d(x, up.view(1, 1, -1, 1), stride=(2, 1), padding=(cu, 0))
    x = F.conv_transpose2d(x, up.view(1, 1, 1, -1), stride=(1, 2), padding=(0, cu))
    hu, wu = 2 * hp - 1, 2 * wp - 1
    x = x.view(n, c, hu, wu)  # upsampled pixel m sits at padded-input index m/2

    to_output = torch.tensor([[0.5, 0, -cd / 2 - (w - 1) / 2], [0, 0.5, -cd / 2 - (h - 1) / 2], [0, 0, 1]],
                             dtype=_F64)
    # Input centred coordinate -> upsampled index m = 2 (x + (w-1)/2 + pad) -> grid_sample's
    # align_corners=False units (2m + 1)/size - 1.
    to_grid = torch.tensor([[4 / wu, 0, (4 * ((w - 1) / 2 + pad_l) + 1) / wu - 1],
                            [0, 4 / hu, (4 * ((h - 1) / 2 + pad_t) + 1) / hu - 1], [0, 0, 1]], dtype=_F64)
    theta = (to_grid @ inv @ to_output)[:, :2, :].to(device=dev, dtype=work)
    gy, gx = torch.meshgrid(torch.arange(hc, device=dev, dtype=work), torch.arange(wc, device=dev, dtype=work),
                            indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)  # (hc, wc, 3)
    grid = torch.einsum("hwk,njk->nhwj", base, theta)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    x = x.reshape(n * c, 1, hc, wc)
    x = F.conv2d(x, down.view(1, 1, -1, 1), stride=(2, 1))
    x = F.conv2d(x, down.view(1, 1, 1, -1), stride=(1, 2))
    return x.view(n, c, h, w).to(images.dtype)


def _apply_where(images: Tensor, selected: Tensor, fn: Callable[[Tensor, Tensor], Tensor], mats: Tensor) -> Tensor:
    """Replace the selected images by ``fn(those images, their matrices)``; the rest are untouched."""
    if not bool(selected.any()):
        return images
    if bool(selected.all()):
        return fn(images, mats)
    idx = selected.nonzero()[:, 0]
    idx_dev = idx.to(images.device)
    return images.index_copy(0, idx_dev, fn(images.index_select(0, idx_dev), mats[idx]))


def apply_geometric(images: Tensor, inv: Tensor) -> Tensor:
    """Apply per-image geometric maps: untouched at the identity, gathered when the map permutes pixels.

    Args:
        images: (n, C, H, W) images.
        inv: (n, 3, 3) float64 CPU output-to-input maps in centred pixel coordinates.

    Returns:
        (n, C, H, W) transformed images, differentiable with respect to ``images``.
    """
    _, _, h, w = images.shape
    identity = (inv == torch.eye(3, dtype=_F64)).flatten(1).all(1)
    permutation = _is_pixel_permutation(inv, h, w) & ~identity
    out = _apply_where(images, permutation, _permute, inv)
    return _apply_where(out, ~(identity | permutation), resample, inv)


def apply_colour(images: Tensor, matrix: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """Apply per-image colour matrices defined on [-1, 1] RGB to images in the model's space.

    With y = D x + e the [-1, 1] pixels of model-space x (D = diag(2 std), e = 2 mean - 1), the
    new x is D^-1 (A y + b - e): one affine map per image, folded on the CPU in float64.

    Args:
        images: (n, 3, H, W) images in the model's space, (pixel/255 - mean)/std per channel.
        matrix: (n, 4, 4) float64 CPU colour matrices on [-1, 1] RGB.
        mean: per-channel mean of the model's normalisation, in [0, 1] pixel units.
        std: per-channel standard deviation of the model's normalisation, in [0, 1] pixel units.

    Returns:
        (n, 3, H, W) images in the model's space; images with an identity matrix are untouched.
    """
    identity = (matrix == torch.eye(4, dtype=_F64)).flatten(1).all(1)
    if bool(identity.all()):
        return images
    if images.shape[1] != 3:
        raise ConfigError(f"colour augmentations need RGB images (3 channels), got {images.shape[1]} channels")
    d = 2 * torch.tensor(std, dtype=_F64)
    e = 2 * torch.tensor(mean, dtype=_F64) - 1

    def colour(x: Tensor, m: Tensor) -> Tensor:
        a, b = m[:, :3, :3], m[:, :3, 3]
        lin = a * d.view(1, 1, 3) / d.view(1, 3, 1)
        off = (a @ e + b - e) / d
        lin, off = lin.to(device=x.device, dtype=x.dtype), off.to(device=x.device, dtype=x.dtype)
        return torch.einsum("nij,njhw->nihw", lin, x) + off.view(-1, 3, 1, 1)

    return _apply_where(images, ~identity, colour, matrix)


def resamples(preset: str) -> bool:
    """Whether pipeline ``preset`` can resample images: its 'g' group (scale, rotation, anisotropy,
    sub-pixel shifts) goes through :func:`resample`, i.e. ``F.grid_sample``, whose backward has no
    deterministic CUDA kernel. Blitting ('b') gathers pixels and colour ('c') is a matrix product:
    both have deterministic kernels on CUDA."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return "g" in preset.replace("none", "")


def _check_probability(p: float, name: str = "p") -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a probability in [0, 1], got {p!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {p!r}")
    return value


class AugmentPipe(nn.Module):
    """ADA's augmentation pipeline; each transform applies to each image with probability p * multiplier.

    Args:
        preset: which groups are on (multiplier 1): any of 'b' (blitting), 'g' (geometry), 'c' (colour)
            in that order, e.g. 'bgc', or 'none'.
        mean: per-channel mean of the model's image normalisation, in [0, 1] pixel units.
        std: per-channel standard deviation of the model's image normalisation, in [0, 1] pixel units.
        **multipliers: per-transform probability multipliers (>= 0) overriding the preset, by name
            (xflip, rotate90, xint, scale, rotate, aniso, xfrac, brightness, contrast, lumaflip, hue,
            saturation); e.g. ``AugmentPipe("none", rotate90=1)`` only turns images by quarter turns.

    Images of W != H: every transform acts per axis in pixels (shifts scale with each axis), and
    ``rotate90`` draws half turns only, the turns that map such a frame onto itself.
    """

    def __init__(self, preset: str = "bgc", mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, **multipliers: float) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ConfigError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
        self.multipliers = {name: 0.0 for name in TRANSFORMS}
        for letter in preset.replace("none", ""):
            self.multipliers.update({name: 1.0 for name in _GROUPS[letter]})
        for name, value in multipliers.items():
            if name not in self.multipliers:
                raise ConfigError(f"unknown augmentation {name!r}; choose among {', '.join(TRANSFORMS)}")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"augmentation multiplier {name} must be a number >= 0, got {value!r}") from None
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"augmentation multiplier {name} must be a finite number >= 0, got {value!r}")
            self.multipliers[name] = value
        for arg, values in (("mean", mean), ("std", std)):
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ConfigError(f"{arg} must be 3 finite per-channel values, got {values!r}")
        if min(std) <= 0:
            raise ConfigError(f"std must be positive per channel, got {std!r}")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def extra_repr(self) -> str:
        on = ", ".join(f"{k}={v:g}" for k, v in self.multipliers.items() if v)
        return on or "none"

    def sample(self, batch: int, height: int, width: int, p: float, gen: Draws | torch.Generator) -> AugmentParams:
        """Draw one image batch's parameters from ``gen`` with ADA's distributions.

        Args:
            batch: number of images.
            height: image height, pixels (scales the vertical shifts).
            width: image width, pixels (scales the horizontal shifts).
            p: augmentation probability in [0, 1], multiplied by each transform's multiplier.
            gen: where every draw comes from: a step's draws, or a generator (its device is where
                the numbers are drawn).

        Returns:
            The parameters, on the CPU in float64.
        """
        p = _check_probability(p)
        m = self.multipliers
        size = torch.tensor([width, height], dtype=_F64)

        draws = as_draws(gen)

        def uniform(*shape: int) -> Tensor:
            return draws.rand(shape, dtype=_F64).cpu()

        def normal(*shape: int) -> Tensor:
            return draws.randn(shape, dtype=_F64).cpu()

        def gate(values: Tensor, prob: float, identity: float) -> Tensor:
            # The mask is drawn even at prob 1 so the stream does not depend on p.
            keep = (uniform(batch) < prob).view(-1, *([1] * (values.ndim - 1)))
            return torch.where(keep, values, torch.full_like(values, identity))

        out = AugmentParams()
        if m["xflip"]:
            out.xflip = gate(torch.floor(uniform(batch) * 2), p * m["xflip"], 0.0)
        if m["rotate90"]:
            # A quarter turn maps a W != H frame off itself: there only the half turn is drawn (the
            # same one number per image, so the stream does not depend on the shape).
            turns = torch.floor(uniform(batch) * 4) if width == height else 2 * torch.floor(uniform(batch) * 2)
            out.rotate90 = gate(turns, p * m["rotate90"], 0.0)
        if m["xint"]:
            out.xint = gate(torch.round((uniform(batch, 2) * 2 - 1) * XINT_MAX * size), p * m["xint"], 0.0)
        if m["scale"]:
            out.scale = gate(torch.exp2(normal(batch) * SCALE_STD), p * m["scale"], 1.0)
        # Two rotations, each with probability 1 - sqrt(1 - p), so that one or both happen with p.
        p_rot = 1 - math.sqrt(max(0.0, 1 - p * m["rotate"]))
        if m["rotate"]:
            out.rotate_pre = gate((uniform(batch) * 2 - 1) * math.pi * ROTATE_MAX, p_rot, 0.0)
        if m["aniso"]:
            out.aniso = gate(torch.exp2(normal(batch) * ANISO_STD), p * m["aniso"], 1.0)
        if m["rotate"]:
            out.rotate_post = gate((uniform(batch) * 2 - 1) * math.pi * ROTATE_MAX, p_rot, 0.0)
        if m["xfrac"]:
            out.xfrac = gate(normal(batch, 2) * XFRAC_STD * size, p * m["xfrac"], 0.0)
        if m["brightness"]:
            out.brightness = gate(normal(batch) * BRIGHTNESS_STD, p * m["brightness"], 0.0)
        if m["contrast"]:
            out.contrast = gate(torch.exp2(normal(batch) * CONTRAST_STD), p * m["contrast"], 1.0)
        if m["lumaflip"]:
            out.lumaflip = gate(torch.floor(uniform(batch) * 2), p * m["lumaflip"], 0.0)
        if m["hue"]:
            out.hue = gate((uniform(batch) * 2 - 1) * math.pi * HUE_MAX, p * m["hue"], 0.0)
        if m["saturation"]:
            out.saturation = gate(torch.exp2(normal(batch) * SATURATION_STD), p * m["saturation"], 1.0)
        return out

    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Apply given parameters: the geometric transforms (one resampling), then the colour ones.

        Args:
            images: (n, C, H, W) images in the model's space.
            params: per-image parameters, e.g. from :meth:`sample` or written by hand.

        Returns:
            (n, C, H, W) augmented images in the model's space, differentiable with respect to ``images``.
        """
        n = images.shape[0]
        for field in fields(params):
            value = getattr(params, field.name)
            if value is not None and value.shape[0] != n:
                raise ConfigError(f"params.{field.name} holds {value.shape[0]} images, the batch {n}")
        images = apply_geometric(images, geometric_matrix(params, n))
        return apply_colour(images, colour_matrix(params, n), self.mean, self.std)

    def forward(self, images: Tensor, p: float, gen: Draws | torch.Generator) -> Tensor:
        """Augment a batch; at p = 0 it returns ``images`` itself and draws nothing.

        Args:
            images: (n, C, H, W) images in the model's space, (pixel/255 - mean)/std.
            p: augmentation probability in [0, 1] (the controller's current value).
            gen: where every draw comes from: a training step's draws, or a ``torch.Generator``.

        Returns:
            (n, C, H, W) augmented images on the same device and dtype, differentiable w.r.t. ``images``.
        """
        p = _check_probability(p)
        if p == 0 or not any(self.multipliers.values()):
            return images
        if images.ndim != 4:
            raise ConfigError(f"images must be (batch, channels, height, width), got shape {tuple(images.shape)}")
        n, _, h, w = images.shape
        return self.apply(images, self.sample(n, h, w, p, gen))


def _sign(v: float) -> float:
    return float((v > 0) - (v < 0))


class AdaController:
    """Steers p so that r_t = E[sign(D(real))] stays near ``target`` (ADA's overfitting heuristic).

    Every ``interval`` steps, p moves by sign(r_t - target) * images / (kimg * 1000), where images is
    what D saw since the last update, then is clamped to [0, 1]. The accumulators stay on the
    logits' device until the update, so accumulating costs no host synchronisation.

    Args:
        p: initial augmentation probability, in [0, 1].
        target: target value of r_t, the mean sign of D's logits on reals, in [-1, 1].
        interval: update every this many steps (>= 1).
        kimg: thousands of images over which p can move from 0 to 1 (> 0).
    """

    def __init__(self, p: float = 0.0, target: float = 0.6, interval: int = 4, kimg: float = 500.0) -> None:
        self.p = _check_probability(p)
        if not (isinstance(target, (int, float)) and -1.0 <= target <= 1.0):
            raise ConfigError(f"ADA target must be a number in [-1, 1], got {target!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"ADA interval must be a whole number of steps >= 1, got {interval!r}")
        if not (isinstance(kimg, (int, float)) and math.isfinite(kimg) and kimg > 0):
            raise ConfigError(f"ADA kimg must be a positive number of thousands of images, got {kimg!r}")
        self.target = float(target)
        self.interval = interval
        self.kimg = float(kimg)
        self._stats: Tensor | None = None  # float64 [sum of signs, number of logits]

    def accumulate(self, real_logits: Tensor) -> None:
        """Add one batch of D's logits on (augmented) reals; no host synchronisation.

        Args:
            real_logits: D's outputs on real images, any shape; detached here.
        """
        logits = real_logits.detach()
        total = logits.sign().sum().to(_F64)
        stats = torch.stack([total, torch.full_like(total, logits.numel())])
        if self._stats is None:
            self._stats = stats
        else:
            self._stats = self._stats.to(stats.device) + stats

    def stats_tensor(self) -> Tensor:
        """The live accumulator, float64 [sum of signs, count]; an in-place all-reduce (sum) merges the ranks."""
        if self._stats is None:
            self._stats = torch.zeros(2, dtype=_F64)
        return self._stats

    def maybe_update(self, step: int, images_per_step: int,
                     reduce: Callable[[Tensor], Tensor | None] | None = None) -> float | None:
        """Update p when ``step`` is a multiple of ``interval``; reset the accumulators.

        Args:
            step: number of discriminator steps done, counting the current one.
            images_per_step: real images D sees per step, summed over all ranks.
            reduce: called on :meth:`stats_tensor` before the update to sum it across ranks; it may
                work in place and return None, or return the summed tensor.

        Returns:
            r_t (the mean sign of the real logits since the last update) when p was updated, else
            None (not an update step, or nothing accumulated).
        """
        if step <= 0 or step % self.interval:
            return None
        stats = self.stats_tensor()
        if reduce is not None:
            reduced = reduce(stats)
            stats = stats if reduced is None else reduced
        total, count = stats.tolist()  # the one host synchronisation per interval
        self._stats = None
        if count <= 0:
            return None
        r_t = total / count
        step_size = self.interval * images_per_step / (self.kimg * 1000)
        self.p = min(1.0, max(0.0, self.p + _sign(r_t - self.target) * step_size))
        return r_t

    def state_dict(self) -> dict[str, float]:
        """p and the accumulators as plain floats (JSON-safe; floats round-trip exactly)."""
        total, count = self._stats.tolist() if self._stats is not None else (0.0, 0.0)
        return {"p": self.p, "sum": float(total), "count": float(count)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore p and the accumulators from :meth:`state_dict`.

        Args:
            state: mapping with 'p' (probability), 'sum' (sum of signs) and 'count' (number of logits).
        """
        try:
            p, total, count = float(state["p"]), float(state["sum"]), float(state["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"ADA state must hold numbers p, sum and count, got {state!r}") from exc
        if not 0.0 <= p <= 1.0:
            raise ModelFileError(f"ADA state p must be in [0, 1], got {p!r}")
        self.p = p
        self._stats = torch.tensor([total, count], dtype=_F64) if count else None
