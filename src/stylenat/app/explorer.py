"""The model side of the latent explorer: every action of the page as a method of one generator.

:class:`Explorer` holds the generator fixed at start, the request limits and one fair lock: each
action runs alone on the model (attention maps hook the model's layers, so two passes at once
would read each other's activations), and waiting requests are served in arrival order. A
projection runs in a thread of its own and gives its turn back after every step, so the page stays
usable while it runs. Nothing here knows about HTTP; :mod:`stylenat.app.server` maps it to routes.

Latents: a seed (an int, truncated by ``psi`` toward the mean w) or ws ``[num_ws, style_dim]``
given as data (e.g. a projection's result; used as they are), as :func:`stylenat.sampling.as_ws`
takes them; a seed gives the same image as ``stylenat generate``.

Images are uint8 [3, H, W] at the model's height and width (a 32x16 model: 16 high, 32 wide);
pixel positions are (y, x), y over the height and x over the width.
"""

from __future__ import annotations

import io
import secrets
import struct
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from stylenat.attention_maps import AttentionMap, attention_maps, render_attention_maps
from stylenat.data.images import to_rgb
from stylenat.editing import edit, render, sefa_directions
from stylenat.errors import ConfigError, DataError, UserError
from stylenat.models.config import as_shape
from stylenat.projection import ProjectionResult, project
from stylenat.sampling import as_ws, interpolate, style_mix

__all__ = ["Limits", "Busy", "FairLock", "Explorer", "ProjectionJob", "layer_groups", "class_names", "decode_upload"]

MAX_SEED = 2**32 - 1
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # Pillow's readers used for uploads; no other one is tried
UPLOAD_TYPES = "PNG, JPEG or WebP"
ATTENTION_CELL = 128  # heat-map edge in pixels: readable for every stage, small to send


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more is refused with a message naming the limit.

    max_upload_bytes: largest uploaded image file.
    max_upload_pixels: largest decoded upload (width * height), against decompression bombs.
    max_body_bytes: largest JSON request body (two ffhq1024 w+ latents take about 100 kB).
    max_grid: images in one seed grid.
    max_frames: frames of one interpolation.
    max_project_steps: steps of one projection.
    max_directions: SeFa directions offered as sliders.
    wait_s: seconds a request waits for the model before it is refused as busy.
    """

    max_upload_bytes: int = 10 * 2**20
    max_upload_pixels: int = 40_000_000
    max_body_bytes: int = 2**20
    max_grid: int = 64
    max_frames: int = 60
    max_project_steps: int = 1000
    max_directions: int = 8
    wait_s: float = 120.0


class Busy(UserError):
    """The model is taken (by a long request or a running projection); try again later."""


class FairLock:
    """A lock granted in arrival order, with a timeout.

    threading.Lock is not fair: a projection that releases it between steps and asks again at
    once would usually get it back before the waiting requests wake up.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = False

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for the lock (None: forever); False when ``timeout`` seconds passed first."""
        me = object()
        with self._cond:
            self._queue.append(me)
            if not self._cond.wait_for(lambda: not self._held and self._queue[0] is me, timeout):
                self._queue.remove(me)
                self._cond.notify_all()  # the next in line may be free to go now
                return False
            self._queue.popleft()
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def yield_turn(self) -> None:
        """Let everyone already waiting go first, then take the lock back."""
        self.release()
        self.acquire()

    @contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """The lock for a with-block; :class:`Busy` when it is not free within ``timeout`` seconds."""
        if not self.acquire(timeout):
            raise Busy(f"the model is busy with other requests (waited {timeout:g} s); try again")
        try:
            yield
        finally:
            self.release()


def class_names(g: nn.Module) -> list[str]:
    """Class names of a class-conditional generator ("0", "1", ... when it has none); [] otherwise."""
    return list(g.config.classes)


def layer_groups(g: nn.Module) -> dict[str, list[int]]:
    """ws indices of the coarse, middle and fine styles (empty groups left out).

    Models of 64 pixels and more (on the longer side) use StyleGAN's bands: coarse up to 8x8,
    middle 16x16 and 32x32, fine 64x64 and up (by stage: a 4x2 base is coarse, as 4x4 is). Smaller
    models have no fine band in that sense, so their stages are split into three runs instead. ws
    index 2s + j feeds block j of stage s (resolution 4 * 2**s for a square).
    """
    stages = list(range(g.num_ws // 2))
    if max(as_shape(g.resolution)) >= 64:
        bands = {"coarse": [s for s in stages if s <= 1], "middle": [s for s in stages if 2 <= s <= 3],
                 "fine": [s for s in stages if s >= 4]}
    else:
        bands = dict(zip(("coarse", "middle", "fine"), (list(a) for a in np.array_split(stages, 3))))
    return {name: [2 * int(s) + j for s in band for j in (0, 1)] for name, band in bands.items() if len(band)}


def _open_header(data: bytes) -> Image.Image:
    """The upload opened by Pillow's PNG, JPEG or WebP reader: its header read, its pixels not yet.

    Only those readers are tried (Image.open would try every format Pillow knows: TIFF, BMP, EPS
    through Ghostscript...), and with no decompression-bomb check: the caller checks the size
    against its own limit first (Image.open refuses large images with its own error before that).
    """
    Image.init()
    prefix = data[:16]  # what Image.open shows each reader's accept function
    for fmt in UPLOAD_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and (isinstance(accepted := accept(prefix), str) or not accepted):
            continue  # not this format (a str: this Pillow was built without its decoder)
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, ValueError, struct.error, OSError) as exc:
            raise DataError(f"the upload is a damaged {fmt} file ({type(exc).__name__}); "
                            f"upload a {UPLOAD_TYPES} file") from None
    raise DataError(f"the upload is not a {UPLOAD_TYPES} image; only those types are accepted")


def decode_upload(data: bytes, limits: Limits) -> Image.Image:
    """An uploaded image file as an upright RGB Pillow image; DataError saying why when it is refused.

    data: the file's bytes, a PNG, JPEG or WebP image. limits: max_upload_bytes, and
    max_upload_pixels, checked from the header before any pixel is decoded.
    """
    if len(data) > limits.max_upload_bytes:
        raise DataError(f"the upload is too large ({len(data) / 2**20:.1f} MB; the limit is "
                        f"{limits.max_upload_bytes / 2**20:g} MB)")
    with _open_header(data) as img:
        width, height = img.size
        if width * height > limits.max_upload_pixels:
            raise DataError(f"the image is {width}x{height} pixels; the limit is {limits.max_upload_pixels:,} pixels")
        try:
            img.load()  # the whole decode here, so truncated files fail now
            return to_rgb(ImageOps.exif_transpose(img))
        except Exception as exc:  # Pillow raises many types for truncated or corrupt files
            raise DataError(f"the upload is a damaged {img.format} file Pillow cannot decode "
                            f"({type(exc).__name__}); upload a {UPLOAD_TYPES} file") from None


@dataclass
class ProjectionJob:
    """A projection running in its own thread; the page polls it.

    id: random token naming the job. steps: steps asked for. label: the class projected into (an
    index; None for an unconditional model). step: steps done. loss: the last total loss. state:
    "queued", "running", "done", "failed" or "stopped". error: why it failed. result: the
    projection when done. stop: set to end it after the current step.
    """

    id: str
    steps: int
    label: int | None = None
    step: int = 0
    loss: float | None = None
    state: str = "queued"
    error: str | None = None
    result: ProjectionResult | None = None
    stop: threading.Event = field(default_factory=threading.Event, repr=False)


class _Stopped(Exception):
    """Raised from the projection's callback to end it early."""


class Explorer:
    """One generator and what the page can do with it, one action at a time.

    Args:
        g: a stylenat generator on the device to run on (eval mode; its weights are never changed).
        limits: the request limits.
    """

    def __init__(self, g: nn.Module, limits: Limits = Limits()) -> None:
        self.g = g.eval()
        self.limits = limits
        self.lock = FairLock()
        self.groups = layer_groups(g)
        self.classes = class_names(g)
        self.job: ProjectionJob | None = None
        self._directions = lru_cache(maxsize=None)(self._sefa)

    # ---- what the page needs to know ----

    def info(self) -> dict:
        """Model facts and limits for the page: sizes, stages and head groups, layer groups, classes.

        ``resolution`` is the config's (a square's edge, else [height, width]), ``width`` and
        ``height`` the image's. Each stage has its ``resolution`` too (its edge; [h, w] for a
        rectangle's stage, which also has ``width`` and ``height``), kernels and dilations.
        """
        g = self.g
        height, width = as_shape(g.resolution)
        stages = []
        for (h, w), stage in zip(g.config.stage_shapes(), g.synthesis.stages):
            attn = stage.blocks[0].attn
            size = {"resolution": h} if h == w else {"resolution": [h, w], "width": w, "height": h}
            stages.append({**size, "kernels": [list(k) for k in attn.kernel_sizes],
                           "dilations": [list(d) for d in attn.dilations]})
        return {"resolution": g.resolution, "width": width, "height": height, "num_ws": g.num_ws,
                "style_dim": g.style_dim, "stages": stages,
                "layer_groups": self.groups, "classes": self.classes, "device": str(g.w_avg.device),
                "limits": {k: getattr(self.limits, k) for k in ("max_upload_bytes", "max_grid", "max_frames",
                                                                  "max_project_steps", "max_directions")}}

    # ---- latents ----

    def check_seed(self, seed: int) -> int:
        """``seed`` if the app accepts it (0 .. 2**32 - 1), else ConfigError."""
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"a seed must be an integer in 0-{MAX_SEED}, got {seed!r}")
        return seed

    def _check_class(self, cls: int | None) -> None:
        if cls is None:
            return
        if not self.classes:
            raise ConfigError("this model is not class-conditional; leave the class out")
        if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < len(self.classes):
            raise ConfigError(f"class must be an index in 0-{len(self.classes) - 1}, got {cls!r}")

    def _label(self, cls: int | None) -> int | None:
        """The class to draw with: the one asked for (checked), class 0 of a conditional model by default."""
        self._check_class(cls)
        return 0 if cls is None and self.classes else cls

    def _seeds_ws(self, seeds: Sequence[int], psi: float, cls: int | None) -> Tensor:
        """ws [len(seeds), num_ws, style_dim] of seeds (of class ``cls`` for a conditional model)."""
        return as_ws(self.g, [self.check_seed(s) for s in seeds], psi, self._label(cls))

    def _ws(self, latent: int | Tensor, psi: float, cls: int | None) -> Tensor:
        """ws [num_ws, style_dim] of a seed (truncated by ``psi``) or of given ws (used as they are)."""
        if isinstance(latent, Tensor):
            if not torch.isfinite(latent).all():
                raise ConfigError("a latent must hold finite numbers")
            return as_ws(self.g, latent[None])[0]
        return self._seeds_ws([latent], psi, cls)[0]

    @contextmanager
    def _model(self) -> Iterator[None]:
        """Hold the model for one action (Busy after limits.wait_s)."""
        with self.lock.hold(self.limits.wait_s):
            yield

    # ---- actions ----

    def image(self, latent: int | Tensor, psi: float = 1.0, cls: int | None = None) -> Tensor:
        """The image of a seed or of ws [num_ws, style_dim]: uint8 [3, H, W]."""
        with self._model():
            return render(self.g, self._ws(latent, psi, cls)[None])[0]

    def grid(self, first_seed: int, count: int, psi: float = 1.0, cls: int | None = None) -> Tensor:
        """Images of seeds first_seed, first_seed + 1, ...: uint8 [count, 3, H, W]."""
        if not 1 <= count <= self.limits.max_grid:
            raise ConfigError(f"a grid holds 1-{self.limits.max_grid} images, got {count}")
        with self._model():
            return render(self.g, self._seeds_ws(range(first_seed, first_seed + count), psi, cls))

    def mix(self, a: int | Tensor, b: int | Tensor, layers: Sequence[int], psi: float = 1.0,
            cls: int | None = None) -> Tensor:
        """uint8 [3, 3, H, W]: a, b, and a with the ws indices ``layers`` from b (style_mix's convention)."""
        with self._model():
            grid = style_mix(self.g, self._ws(a, psi, cls)[None], self._ws(b, psi, cls)[None], layers)
        return torch.stack([grid[1, 0], grid[0, 1], grid[1, 1]])

    def interpolate(self, a: int | Tensor, b: int | Tensor, frames: int, psi: float = 1.0,
                    cls: int | None = None) -> Tensor:
        """uint8 [frames, 3, H, W]: linear steps in ws from a to b, both ends included."""
        if not 2 <= frames <= self.limits.max_frames:
            raise ConfigError(f"an interpolation has 2-{self.limits.max_frames} frames, got {frames}")
        with self._model():
            keys = torch.stack([self._ws(a, psi, cls), self._ws(b, psi, cls)])
            return interpolate(self.g, keys, frames - 1, loop=False)

    def attention(self, seed: int, pixel: tuple[int, int], resolutions: Sequence[int | str] | None = None,
                  psi: float = 1.0, cls: int | None = None) -> tuple[list[AttentionMap], np.ndarray, tuple[int, int]]:
        """Each head group's attention at ``pixel`` (y, x) of the seed's image (y in 0..H-1, x in 0..W-1).

        resolutions: the stages to read, as attention_maps takes them: a stage's longer side (a
        square stage's edge) or its "WxH"; None for all.

        Returns (the maps, as stylenat.attention_maps.attention_maps gives them; the drawn cells and
        their (rows, cols) grid, as render_attention_maps gives them: one row per stage and block,
        the marked image first).
        """
        with self._model():
            image, maps = attention_maps(self.g, self.check_seed(seed), pixel, resolutions, psi, self._label(cls))
        cells, grid = render_attention_maps(image, maps, pixel, ATTENTION_CELL)
        return maps, cells, grid

    def _group_layers(self, group: str) -> list[int] | None:
        if group == "all":
            return None
        if group not in self.groups:
            raise ConfigError(f"layer group must be one of all, {', '.join(self.groups)}; got {group!r}")
        return self.groups[group]

    def _sefa(self, group: str) -> Tensor:
        """The first max_directions SeFa directions of a layer group ("all" or a key of self.groups)."""
        return sefa_directions(self.g, self._group_layers(group))[0][: self.limits.max_directions]

    def edit(self, latent: int | Tensor, strengths: Sequence[float], group: str = "all", psi: float = 1.0,
             cls: int | None = None) -> Tensor:
        """The latent moved by strengths[i] (w units) along SeFa direction i of ``group``: uint8 [3, H, W]."""
        s = torch.as_tensor(list(strengths), dtype=torch.float32)
        with self._model():
            directions = self._directions(group)
            if s.ndim != 1 or not 1 <= len(s) <= len(directions) or not torch.isfinite(s).all():
                raise ConfigError(f"give 1-{len(directions)} finite strengths, got {list(strengths)!r}")
            direction = (s[:, None] * directions[: len(s)]).sum(0)  # edits add up: one combined step
            moved = edit(self.g, self._ws(latent, psi, cls), direction, [1.0], self._group_layers(group))
            return render(self.g, moved)[0]

    # ---- projection ----

    def start_projection(self, target, steps: int, cls: int | None = None) -> ProjectionJob:
        """Start projecting ``target`` (a Pillow image) in a thread; Busy while another one runs.

        cls: the target's class, required for a conditional model (the projection starts at that
        class's mean w, so there is no default class as for seeds); None for an unconditional one.
        """
        if not 1 <= steps <= self.limits.max_project_steps:
            raise ConfigError(f"a projection takes 1-{self.limits.max_project_steps} steps, got {steps}")
        self._check_class(cls)
        if cls is None and self.classes:
            raise ConfigError(f"this model is class-conditional: give the target's class (an index in "
                              f"0-{len(self.classes) - 1})")
        job = self.job
        if job is not None and job.state in ("queued", "running"):
            raise Busy(f"a projection is running (step {job.step} of {job.steps}); wait for it or stop it")
        self.job = job = ProjectionJob(id=secrets.token_hex(8), steps=steps, label=cls)
        threading.Thread(target=self._run_projection, args=(job, target), daemon=True).start()
        return job

    def _run_projection(self, job: ProjectionJob, target) -> None:
        def progress(step: int, steps: int, losses: dict[str, float]) -> None:
            job.step, job.loss = step, losses["total"]
            if job.stop.is_set():
                raise _Stopped
            self.lock.yield_turn()  # requests that came in during the step go first

        self.lock.acquire()
        try:
            job.state = "running"
            job.result = project(self.g, target, label=job.label, steps=job.steps, callback=progress)
            job.state = "done"
        except _Stopped:
            job.state = "stopped"
        except UserError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # a bug: keep the server up, say so on the page, and show it in the log
            job.state, job.error = "failed", f"internal error ({type(exc).__name__}: {exc})"
            raise
        finally:
            self.lock.release()

    def find_job(self, job_id: str) -> ProjectionJob:
        """The current projection job if ``job_id`` names it, else ConfigError."""
        if self.job is None or self.job.id != job_id:
            raise ConfigError("no such projection job (only the latest one is kept)")
        return self.job
