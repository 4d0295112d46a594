"""Projection (GAN inversion): find the latent whose image matches a target, as StyleGAN2 does.

The optimisation follows StyleGAN2-ADA's projector: start at the mean w (over ``w_avg_samples``
mapped z), Adam (betas 0.9, 0.999) on the latent, a learning rate that ramps up linearly over the
first ``lr_rampup`` of the steps and down along a half cosine over the last ``lr_rampdown``, and
Gaussian noise of std ``w_std * initial_noise * max(0, 1 - t / noise_ramp)**2`` added to the latent
while early (t = step / steps; w_std is the RMS distance of the sampled w from their mean).
StyleNAT has no noise inputs, so there is no noise-map regularisation. Loss per step:
perceptual distance + ``pixel_weight`` * MSE of the images in [-1, 1].

Latent spaces: "w" optimises one w [style_dim] read by every layer; "w+" one latent per ws index
[num_ws, style_dim], all starting at the mean w.

Class-conditional models: the target's class (``label``) is required, and the mean w and w_std are
those of that class (the same seeded z, all mapped with that label), so the optimisation starts at
the class's mean image and its noise has the class's spread. The latent found is a w (or w+) like
any other: it carries the class, and the synthesis network renders it without a label.

Perceptual distances ("distance" argument):
- "lpips": LPIPS v0.1 VGG16 (:mod:`stylenat.metrics.lpips`); its two weights files must be on disk
  (never downloaded). Images above 256 pixels are area-downsampled to 256 first, like StyleGAN2
  (a rectangle's longer side to 256, its aspect kept: VGG's features work on any H x W).
- "pyramid": a fixed multi-scale structural distance that needs no weights (:class:`PyramidDistance`),
  the fallback: the discriminator is not always at hand and its features move with training, so
  the fallback does not depend on any network.
- "auto": "lpips" when a loaded module is passed or both files are found, else "pyramid" (a file
  named by its environment variable but absent is an error, not a reason to fall back).
``ProjectionResult.distance`` names the one used ("lpips-vgg16" or "laplacian-pyramid").

Results are saved with :func:`save_latent` and read back with :func:`load_latent` (the latent file
format of :mod:`stylenat.models.latents`, re-exported here).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stylenat._system import atomic_path
from stylenat.errors import ConfigError, DataError, MissingFileError, first_line
from stylenat.metrics.lpips import LPIPS, load_lpips, lpips_available, model_to_lpips, uint8_to_lpips
from stylenat.models import model_to_uint8
from stylenat.models.config import as_shape, parse_size, size_text
from stylenat.models.latents import SPACES, load_latent, save_latent

__all__ = [
    "ProjectionResult",
    "PyramidDistance",
    "project",
    "load_target",
    "target_files",
    "save_projection",
    "w_stats",
    "resolve_label",
    "psnr",
    "save_latent",
    "load_latent",
    "LOSS_NAMES",
]

LOSS_NAMES = ("total", "perceptual", "pixel")
DISTANCES = ("auto", "lpips", "pyramid")
W_STATS_SEED = 123  # fixed like StyleGAN2's, so the starting point does not depend on `seed`
LPIPS_MAX_SIZE = 256  # VGG was trained on 224-pixel images; StyleGAN2 area-downsamples to 256


# ---- distances --------------------------------------------------------------------------------


def _binomial_blur(x: Tensor) -> Tensor:
    """5-tap binomial [1, 4, 6, 4, 1] / 16 blur per channel, reflect-padded (separable)."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


class PyramidDistance(nn.Module):
    """Weight-free multi-scale structural distance between images [B, 3, H, W] in [-1, 1] -> [B].

    Sum over the levels of a Laplacian pyramid (binomial blur, x2 steps, down to at least
    ``min_size`` pixels) of the mean absolute difference of the band-pass images, plus, at every
    level of the Gaussian pyramid, the mean absolute difference of the horizontal and vertical
    neighbour differences (local gradients, i.e. edges). Band-pass terms compare structure at each
    scale independent of the others (Lap1 of Bojanowski et al. 2018, per-pixel means weighted
    equally per level); gradient terms make edges and texture count as much as flat colour.
    Same interface as LPIPS: :meth:`features_of` once for the target, :meth:`distance_to` per step.

    Args:
        min_size: smallest pyramid level edge in pixels.
    """

    def __init__(self, min_size: int = 8):
        super().__init__()
        self.min_size = min_size

    def features_of(self, images: Tensor) -> list[Tensor]:
        """Laplacian bands (finest first, the last is the low-pass residual), then per-level gradients."""
        gauss = [images.float()]
        while min(gauss[-1].shape[-2:]) // 2 >= self.min_size:
            gauss.append(_binomial_blur(gauss[-1])[..., ::2, ::2])
        bands = [g - F.interpolate(g_next, size=g.shape[-2:], mode="bilinear", align_corners=False)
                 for g, g_next in zip(gauss[:-1], gauss[1:])]
        grads = [d for g in gauss for d in (g[..., :, 1:] - g[..., :, :-1], g[..., 1:, :] - g[..., :-1, :])]
        return bands + gauss[-1:] + grads

    def distance_to(self, feats: list[Tensor], other: list[Tensor]) -> Tensor:
        """Distances [B] between two :meth:`features_of` results (batches equal or one of size 1)."""
        return sum((a - b).abs().mean(dim=(1, 2, 3)) for a, b in zip(feats, other))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.distance_to(self.features_of(x), self.features_of(y))


def _lpips_input(images: Tensor) -> Tensor:
    """Images [B, 3, H, W] with the longer side area-downsampled to LPIPS_MAX_SIZE when above it (aspect kept)."""
    h, w = images.shape[-2:]
    longer = max(h, w)
    if longer > LPIPS_MAX_SIZE:
        size = (max(1, round(h * LPIPS_MAX_SIZE / longer)), max(1, round(w * LPIPS_MAX_SIZE / longer)))
        return F.interpolate(images, size=size, mode="area")
    return images


def _choose_distance(distance: str, lpips: nn.Module | None, device) -> tuple[nn.Module, str, Callable]:
    """(distance module, its name, the image preparation it needs)."""
    if distance not in DISTANCES:
        raise ConfigError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    if distance == "pyramid":
        return PyramidDistance(), "laplacian-pyramid", lambda x: x
    if lpips is None and (distance == "lpips" or lpips_available()):
        lpips = load_lpips(device=device)  # "lpips" with no files raises the where-to-get-it message
    if lpips is None:
        return PyramidDistance(), "laplacian-pyramid", lambda x: x
    return lpips.to(device), "lpips-vgg16", _lpips_input


# ---- targets ----------------------------------------------------------------------------------


def load_target(source, resolution) -> Tensor:
    """A target as uint8 [3, H, W], cropped and resized like ``stylenat prepare``.

    Args:
        source: uint8 tensor [3, H, W] (used as it is; it must have the model's size), a PIL image,
            or an image file path (decoded, EXIF-rotated and converted to RGB, centre-cropped to
            the largest region of the model's aspect, a square for a square model, then
            Lanczos-resized to W x H).
        resolution: the generator's image size, ``g.resolution``: an int for a square, else
            (height, width) (or WIDTHxHEIGHT text).
    """
    from PIL import Image

    from stylenat.data.images import decode_image, pil_to_tensor, resize_image, to_rgb

    resolution = parse_size(resolution, "resolution")
    if isinstance(source, Tensor):
        return _check_tensor_target(source, resolution)
    if isinstance(source, Image.Image):
        return pil_to_tensor(resize_image(to_rgb(source), resolution))
    path = Path(source)
    if not path.is_file():
        raise MissingFileError(f"target image {path} does not exist")
    try:
        img = decode_image(path.read_bytes())
    except Exception as exc:  # Pillow raises many types for foreign, truncated or corrupt files
        raise DataError(f"{path} is not a readable image ({type(exc).__name__}: {_without_reprs(first_line(exc))}); "
                        "use a PNG, JPEG or another format Pillow reads") from None
    return pil_to_tensor(resize_image(img, resolution))


def _without_reprs(text: str) -> str:
    """``text`` without object reprs like ``<_io.BytesIO object at 0x7f...>``: Pillow names the
    in-memory buffer it was given, which tells the user nothing (the message names the file)."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text).strip() or "unknown format"


def target_files(path: str | os.PathLike) -> list[Path]:
    """The image files a target path names: a file as it is (checked when loaded), or the image
    files of a folder (searched recursively, sorted; hidden files and other extensions left out).

    Args:
        path: an image file or a folder of images.
    """
    from stylenat.data.images import is_image_name
    from stylenat.data.sources import FileSource

    path = Path(path)
    if not path.is_dir():
        return [path]
    files = [path / name for name in FileSource(path).names if is_image_name(name)]
    if not files:
        raise DataError(f"no images found in {path}")
    return files


def _check_tensor_target(x: Tensor, resolution) -> Tensor:
    h, w = as_shape(resolution)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dtype != torch.uint8 or x.shape != (3, h, w):
        wide = "" if h == w else f" ({size_text(resolution)}: height {h}, width {w})"
        raise DataError(f"a target tensor must be uint8 [3, {h}, {w}]{wide} for this model, got "
                        f"{x.dtype} {list(x.shape)}; pass the image file or a PIL image to have it cropped and resized")
    return x.cpu()


# ---- the projector ----------------------------------------------------------------------------


@dataclass
class ProjectionResult:
    """What :func:`project` found.

    Attributes:
        latent: w [style_dim] (space "w") or ws [num_ws, style_dim] (space "w+"), float32, CPU.
        space: "w" or "w+".
        num_ws: latents the generator reads (for :attr:`ws`).
        image: the latent's image, uint8 [3, H, W].
        target: the target as it was compared, uint8 [3, H, W].
        losses: per step, "total", "perceptual" and "pixel" (MSE in [-1, 1]), float tensors [steps].
        psnr: PSNR of image vs target on uint8 pixels, in dB (inf when identical).
        distance: the perceptual distance used, "lpips-vgg16" or "laplacian-pyramid".
        frames: images of the latent after every ``record_every`` steps, uint8 [F, 3, H, W], or None.
        frame_steps: the step (1-based) of each frame.
        label: the class index the projection used (class-conditional models), else None.
    """

    latent: Tensor
    space: str
    num_ws: int
    image: Tensor
    target: Tensor
    losses: dict[str, Tensor]
    psnr: float
    distance: str
    frames: Tensor | None = None
    frame_steps: list[int] = field(default_factory=list)
    label: int | None = None

    @property
    def ws(self) -> Tensor:
        """The latent as ws [num_ws, style_dim] (w broadcast to every layer in space "w")."""
        return self.latent if self.latent.ndim == 2 else self.latent[None].repeat(self.num_ws, 1)


def resolve_label(g: nn.Module, label: int | str | None) -> int | None:
    """The class index of ``label`` for a conditional ``g`` (None for an unconditional one).

    ConfigError when a conditional model gets no label, an unconditional one gets one, or the
    class does not exist.

    Args:
        g: a stylenat generator.
        label: a class index or class name (see :func:`stylenat.sampling.class_index`), or None.
    """
    from stylenat.sampling import class_indices

    c = class_indices(g, label, 1, keyword="label")
    return None if c is None else int(c[0])


@torch.no_grad()
def w_stats(g: nn.Module, samples: int = 10000, seed: int = W_STATS_SEED, batch: int = 1000,
            label: int | str | None = None) -> tuple[Tensor, float]:
    """(mean w [style_dim], RMS distance of w from that mean) over ``samples`` z drawn with ``seed``.

    Args:
        g: a stylenat generator.
        samples: z drawn. seed: their seed. batch: z mapped per pass (memory only).
        label: for a class-conditional model, the class (index or name) every z is mapped with:
            the statistics are that class's. Required for such a model, refused for others.
    """
    from stylenat.sampling import class_indices

    index = resolve_label(g, label)
    gen = torch.Generator().manual_seed(seed)
    dev = g.w_avg.device
    chunks = []
    for i in range(0, samples, batch):
        z = torch.randn(min(batch, samples - i), g.style_dim, generator=gen).to(dev)
        chunks.append(g.mapping.embed(z, class_indices(g, index, len(z))))
    ws = torch.cat(chunks).double()
    avg = ws.mean(0)
    return avg.float(), float(((ws - avg).square().sum() / samples).sqrt())


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB between uint8 images of equal shape (peak 255); inf when they are equal."""
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _lr_at(t: float, lr: float, rampdown: float, rampup: float) -> float:
    """StyleGAN2's schedule at progress t in [0, 1): linear ramp-up, half-cosine ramp-down."""
    down = min(1.0, (1.0 - t) / rampdown) if rampdown > 0 else 1.0
    up = min(1.0, t / rampup) if rampup > 0 else 1.0
    return lr * (0.5 - 0.5 * math.cos(down * math.pi)) * up


@dataclass(frozen=True)
class _Settings:
    """The optimisation settings of :func:`project` (meanings in its docstring)."""

    steps: int
    space: str
    seed: int
    pixel_weight: float
    lr: float
    noise_ramp: float
    initial_noise: float
    lr_rampdown: float
    lr_rampup: float
    w_avg_samples: int
    record_every: int

    def lr_at(self, step: int) -> float:
        return _lr_at(step / self.steps, self.lr, self.lr_rampdown, self.lr_rampup)

    def noise_at(self, step: int, w_std: float) -> float:
        if self.noise_ramp <= 0:
            return 0.0
        return w_std * self.initial_noise * max(0.0, 1.0 - step / self.steps / self.noise_ramp) ** 2


def _check_args(steps: int, space: str, lr: float, pixel_weight: float, w_avg_samples: int, record_every: int) -> None:
    if space not in SPACES:
        raise ConfigError(f"space must be 'w' or 'w+', got {space!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if lr <= 0 or pixel_weight < 0:
        raise ConfigError(f"lr must be > 0 and pixel_weight >= 0, got lr={lr}, pixel_weight={pixel_weight}")
    if w_avg_samples < 2 or record_every < 0:
        raise ConfigError(f"w_avg_samples must be >= 2 and record_every >= 0, got {w_avg_samples}, {record_every}")


def project(
    g: nn.Module,
    target,
    *,
    label: int | str | None = None,
    steps: int = 1000,
    space: str = "w+",
    seed: int = 0,
    distance: str = "auto",
    lpips: LPIPS | None = None,
    pixel_weight: float = 1.0,
    lr: float = 0.1,
    noise_ramp: float = 0.75,
    initial_noise: float = 0.05,
    lr_rampdown: float = 0.25,
    lr_rampup: float = 0.05,
    w_avg_samples: int = 10000,
    stats: tuple[Tensor, float] | None = None,
    record_every: int = 0,
    callback: Callable[[int, int, dict[str, float]], None] | None = None,
) -> ProjectionResult:
    """Optimise a latent of ``g`` so that its image matches ``target`` (see the module docstring).

    Args:
        g: a stylenat generator, on the device to run on (its weights are not changed).
        target: uint8 tensor [3, H, W], a PIL image or an image path (see :func:`load_target`).
        label: class-conditional models: the target's class (index or name), required; the start
            point and noise scale are that class's (see the module docstring). None otherwise.
        steps: optimisation steps.
        space: "w" (one w for every layer) or "w+" (one latent per ws index).
        seed: seed of the latent noise; the result depends on it only (same seed, same result).
        distance: "auto", "lpips" or "pyramid" (see the module docstring).
        lpips: a loaded LPIPS module to use (with distance "auto" or "lpips") instead of the files.
        pixel_weight: weight of the pixel MSE (images in [-1, 1]) added to the perceptual distance.
        lr: peak Adam learning rate, in w units per step.
        noise_ramp: fraction of the steps over which the latent noise decays to zero.
        initial_noise: latent noise std at step 0, as a fraction of w_std.
        lr_rampdown: fraction of the steps, at the end, of the cosine learning-rate ramp-down.
        lr_rampup: fraction of the steps, at the start, of the linear learning-rate ramp-up.
        w_avg_samples: z samples for the mean w and w_std.
        stats: (mean w [style_dim], w_std) from ``w_stats(g, w_avg_samples, label=label)``, to reuse
            them over many targets of one model and class (they take 10,000 mapping passes); None
            computes them here.
        record_every: keep the latent's image every this many steps (0: no frames).
        callback: called after each step as callback(step, steps, {"total", "perceptual", "pixel"}).
    """
    _check_args(steps, space, lr, pixel_weight, w_avg_samples, record_every)
    settings = _Settings(steps, space, seed, pixel_weight, lr, noise_ramp, initial_noise, lr_rampdown, lr_rampup,
                         w_avg_samples, record_every)
    index = resolve_label(g, label)  # before the target: a missing class fails before any work
    target_u8 = load_target(target, g.resolution)
    dist, dist_name, prep = _choose_distance(distance, lpips, g.w_avg.device)
    w_avg, w_std = w_stats(g, w_avg_samples, label=index) if stats is None else _check_stats(g, stats)
    was_training = g.training
    g.eval()  # in train mode the mapping would move w_avg
    try:
        latent, losses, frames, frame_steps = _optimise(g, target_u8, dist, prep, settings, w_avg, w_std, callback)
        with torch.no_grad():
            image = _render(g, latent)
    finally:
        g.train(was_training)
    latent = latent[0, 0] if space == "w" else latent[0]
    return ProjectionResult(latent=latent.cpu(), space=space, num_ws=g.num_ws, image=image, target=target_u8,
                            losses=losses, psnr=psnr(image, target_u8), distance=dist_name,
                            frames=torch.stack(frames) if frames else None, frame_steps=frame_steps, label=index)


def _check_stats(g: nn.Module, stats) -> tuple[Tensor, float]:
    """``stats`` as (mean w [style_dim] on g's device, w_std float); ConfigError when they do not fit g."""
    try:
        avg, std = stats
        avg, std = torch.as_tensor(avg, dtype=torch.float32), float(std)
    except (TypeError, ValueError):
        raise ConfigError("stats must be (mean w, w_std) as returned by w_stats") from None
    if avg.shape != (g.style_dim,) or not math.isfinite(std) or std < 0:
        raise ConfigError(f"stats must be (mean w [{g.style_dim}], w_std >= 0) from w_stats of this model, got "
                          f"{list(avg.shape)} and {std}")
    return avg.to(g.w_avg.device), std


def _render(g: nn.Module, latent: Tensor) -> Tensor:
    """latent [1, 1 or num_ws, D] -> uint8 [3, H, W] on the CPU."""
    return model_to_uint8(g.synthesis(latent.expand(1, g.num_ws, -1)), g.config)[0].cpu()


def _optimise(g: nn.Module, target_u8: Tensor, dist: nn.Module, prep: Callable, s: _Settings, w_avg: Tensor,
              w_std: float, callback) -> tuple[Tensor, dict[str, Tensor], list[Tensor], list[int]]:
    """The optimisation loop from w_avg: (latent [1, 1 or num_ws, D], losses, frames, frame steps)."""
    dev = g.w_avg.device
    latent = w_avg.view(1, 1, -1).repeat(1, 1 if s.space == "w" else g.num_ws, 1).requires_grad_(True)
    opt = torch.optim.Adam([latent], lr=s.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(s.seed)  # noise is drawn on the CPU so every device sees the same
    target = uint8_to_lpips(target_u8[None]).to(dev)
    with torch.no_grad():
        target_feats = dist.features_of(prep(target))
    history = torch.zeros(s.steps, 3, dtype=torch.float64)
    frames, frame_steps = [], []
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = s.lr_at(step)
        noise = torch.randn(latent.shape, generator=gen).to(dev) * s.noise_at(step, w_std)
        image = model_to_lpips(g.synthesis((latent + noise).expand(1, g.num_ws, -1)), g.config)
        perceptual = dist.distance_to(dist.features_of(prep(image)), target_feats).sum()
        pixel = F.mse_loss(image, target)
        loss = perceptual + s.pixel_weight * pixel
        # autograd.grad, not backward: no gradients accumulate in g's parameters.
        (latent.grad,) = torch.autograd.grad(loss, [latent])
        opt.step()
        history[step] = torch.stack([loss.detach(), perceptual.detach(), pixel.detach()]).double().cpu()
        if s.record_every and (step + 1) % s.record_every == 0:
            with torch.no_grad():
                frames.append(_render(g, latent))
            frame_steps.append(step + 1)
        if callback is not None:
            callback(step + 1, s.steps, dict(zip(LOSS_NAMES, history[step].tolist())))
    losses = {name: history[:, i].float() for i, name in enumerate(LOSS_NAMES)}
    return latent.detach(), losses, frames, frame_steps


# ---- results on disk --------------------------------------------------------------------------


def save_projection(result: ProjectionResult, folder: str | os.PathLike, g: nn.Module, video: str | None = None,
                    fps: float = 30, info: dict | None = None) -> dict[str, Path]:
    """Write a projection's files into ``folder`` (created if needed); returns {kind: path}.

    Files: ``latent.safetensors`` (:func:`save_latent`), ``projected.png``, ``side_by_side.png``
    (target | projection, 2W x H), ``losses.json`` (distance, space, PSNR, per-step loss curves) and,
    with ``video``, ``optimization.gif`` or ``.mp4``: the recorded frames beside the target.

    Args:
        result: what :func:`project` returned.
        folder: output folder.
        g: the generator the latent belongs to.
        video: "gif" or "mp4" to write the recorded frames (project with record_every > 0), or None.
        fps: video frames per second.
        info: more fields for losses.json (e.g. the target's path, the seconds taken).
    """
    from stylenat.data.images import save_image_grid
    from stylenat.sampling import check_video_path, save_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"latent": folder / "latent.safetensors", "projected": folder / "projected.png",
             "side_by_side": folder / "side_by_side.png", "losses": folder / "losses.json"}
    if video is not None:
        files["video"] = check_video_path(folder / f"optimization.{video}")
        if result.frames is None:
            raise ConfigError("no frames were recorded for the video; project with record_every > 0")
    save_latent(files["latent"], result.latent, g, result.space)
    save_image_grid(result.image[None], files["projected"], (1, 1))
    save_image_grid(torch.stack([result.target, result.image]), files["side_by_side"], (1, 2))
    cls = {} if result.label is None else {"class": result.label, "class_name": g.config.classes[result.label]}
    report = {"distance": result.distance, "space": result.space, "steps": len(result.losses["total"]), **cls,
              "psnr_db": None if math.isinf(result.psnr) else result.psnr,  # JSON has no infinity
              **(info or {}), "losses": {name: curve.tolist() for name, curve in result.losses.items()}}
    with atomic_path(files["losses"]) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1) + "\n")
    if video is not None:
        beside = torch.cat([result.target.expand_as(result.frames), result.frames], dim=-1)  # [F, 3, H, 2W]
        save_video(beside, files["video"], fps=fps)
    return files
