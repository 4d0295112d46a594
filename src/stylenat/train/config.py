"""The training recipe as one frozen dataclass, with a preset per model preset.

The ffhq256 preset is the published FFHQ-256 recipe (the paper's section 4 and the official
code's defaults, docs/training.md "The published recipe"); the other official presets reuse it. ``tiny`` is tuned so the demo learns recognizable faces in minutes on a
laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stylenat._config import JsonConfig, param
from stylenat.errors import ConfigError
from stylenat.models.config import parse_size


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Every knob of a training run. Steps count optimizer steps of G (one D step each)."""

    preset: str | None = "ffhq256"
    """Model preset (``stylenat.models.PRESETS``: ffhq256, ffhq1024, church256, tiny) or family
    (``stylenat.models.FAMILIES``: ffhq, church, sized by ``resolution``) of the generator and discriminator.
    With ``init`` the model comes from the init model: None (``stylenat train --init`` without
    ``--preset``), or a preset that describes that model (a conflicting one is an error)."""
    resolution: int | tuple[int, int] | None = param(None, min=1)
    """Image size of a family preset: N (a square) or WIDTHxHEIGHT (``256x128``; stored as [height, width]);
    docs/models.md says which sizes exist. None: the data's (a prepared dataset's size, or its images' size).
    With ``init``: None or the init model's own size (fine-tuning never resizes a model)."""
    cbase: int | None = param(None, min=1)
    """Width of a family model, StyleGAN3's knob: stage i has min(cbase / (4 * 2^i), cmax) channels; None: 32768,
    the official models' (``--cbase 1024 --cmax 64`` makes a 64x64 model of about 0.5M parameters)."""
    cmax: int | None = param(None, min=1)
    """Most channels a stage of a family model has, and the width of w up to 512; None: 512, the official models'."""
    generator: dict = field(default_factory=dict)
    """Overrides of GeneratorConfig fields; the run directory stores the fully resolved config here."""
    discriminator: dict = field(default_factory=dict)
    """Overrides of DiscriminatorConfig fields, resolved like ``generator``."""
    data: str = "demo"
    """Dataset path (folder or zip) or ``demo`` for the built-in offline demo set."""
    run_dir: str = "runs/run"
    """Directory the run writes its config, logs, image grids and checkpoints to."""
    seed: int = param(0, min=0)
    """Seed of parameter initialization, data order, latents, augmentation and flips."""
    steps: int = param(1_000_000, min=1)
    """Train until this many steps are done; also where the lr decay reaches zero."""
    batch: int = param(8, min=1)
    """Images per device per micro-batch."""
    accum: int = param(1, min=1)
    """Micro-batches accumulated per optimizer step (images per step = batch * accum * world size)."""
    d_lr: float = param(2e-4, min=0)
    """Discriminator Adam learning rate, before the lazy-regularization adjustment."""
    g_lr: float = param(5e-5, min=0)
    """Generator Adam learning rate (TTUR: D lr / 4)."""
    betas: tuple[float, float] = param((0.0, 0.99), min=0, max=1)
    """Adam betas of both networks (D's are raised to the power c = r1_interval / (r1_interval + 1))."""
    lr_decay_start: int | None = param(775_000, min=0)
    """Step from which both learning rates decay linearly to 0 at ``steps``; None: constant."""
    r1_gamma: float = param(10.0, min=0)
    """Weight of the R1 penalty on real images: the loss is gamma / 2 * ||grad_x D(x)||^2."""
    r1_interval: int = param(16, min=1)
    """Lazy R1: applied every this many D steps as its own optimizer step, scaled by the interval."""
    bcr_real: float = param(10.0, min=0)
    """Balanced consistency regularization weight on reals: lambda * MSE(D(aug x), D(x)); 0 disables."""
    bcr_fake: float = param(10.0, min=0)
    """Balanced consistency regularization weight on fakes."""
    bcr_translation: float = param(0.125, min=0, max=1)
    """bCR augmentation: largest shift, as a fraction of the image size."""
    bcr_cutout: float = param(0.5, min=0, max=1)
    """bCR augmentation: edge of the zeroed square, as a fraction of the image size."""
    d_clip: float | None = param(5.0, gt=0)
    """Clip D's gradient to this global L2 norm; None: no clipping."""
    ema_half_life: float = param(10_000 / 32, gt=0)
    """Half-life of G_ema in steps: decay per step = 0.5 ** (1 / ema_half_life) (0.5 ** (32/10000) by default)."""
    xflip: bool = True
    """Flip each real image horizontally with probability 1/2."""
    amp: Literal["bf16"] | None = None
    """Autocast dtype for forward passes: None (fp32) or ``bf16``. R1 always runs in fp32."""
    tf32: bool = True
    """Allow TF32 matrix products and convolutions on CUDA."""
    device: str = "auto"
    """``auto`` (CUDA when available, one device per rank), ``cpu``, ``cuda`` or ``cuda:N``."""
    workers: int = param(0, min=0)
    """DataLoader worker processes per rank (0: load in the training process)."""
    checkpoint_every: int = param(5_000, min=1)
    """Write a checkpoint every this many steps (and at the end)."""
    keep: int = param(3, min=1)
    """Checkpoints kept; older ones are deleted after a newer one is safely written."""
    sample_every: int = param(5_000, min=1)
    """Write ``fakes_<step>.png`` from g_ema every this many steps (and at the start and end)."""
    grid: tuple[int, int] = param((8, 4), min=1)
    """Rows and columns of the image grids."""
    tick_every: int = param(100, min=1)
    """Print and log one line of statistics every this many steps."""
    metrics: tuple[str, ...] = ()
    """Metrics of ``stylenat.metrics.registry.METRICS`` (e.g. ``fid50k``) computed on g_ema against
    ``data`` every ``metrics_every`` steps and at the end; written to stats.jsonl and the log."""
    metrics_every: int = param(50_000, min=1)
    """Steps between metric evaluations."""
    inception: str | None = None
    """pt_inception-2015-12-05-6726825d.pth for the metrics (default: $STYLENAT_INCEPTION, then the cache dir)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """When a loss or D's gradient norm is not finite: ``stop`` (exit, last checkpoint intact) or ``skip`` the step."""

    init: str | None = None
    """Start G, G_ema and D from this model instead of random weights (fine-tuning): a run directory, a
    stylenat .safetensors model file, an export-hub folder, a registered name (e.g. ffhq256),
    hf://OWNER/REPO, or an official .pt (with ``init_preset`` or ``init_meta``). The
    model configs come from it; optimizers and counters start fresh; a missing D starts fresh."""
    init_preset: str | None = None
    """An official ``init`` checkpoint's configuration, by preset name (ffhq256, ffhq1024, church256); a
    family (ffhq, church) stands for its named preset at ``resolution`` or the data's size."""
    init_meta: dict | None = None
    """An official ``init`` checkpoint's configuration in official terms (see stylenat.models.official)."""
    init_sha256: str | None = None
    """Set by the trainer: SHA-256 of the model file the run started from (recorded, and checked on a restart)."""
    cond: bool | None = None
    """Class-conditional training: None (default) when the data has labels, False to ignore them,
    True to require them."""
    freeze_d: int = param(0, min=0)
    """FreezeD (Mo et al. 2020): the first this many discriminator blocks from the input side do not
    train (with ``init``, from a model that has a discriminator)."""
    aug: Literal["none", "ada", "diffaug"] = "none"
    """Augment every image D sees (reals and fakes; D, G and R1 steps): ``ada`` (adaptive, Karras et al.
    2020), ``diffaug`` (DiffAugment's colour, translation, cutout, always on) or ``none``."""
    aug_pipe: Literal["b", "g", "c", "bg", "bc", "gc", "bgc"] = "bgc"
    """ADA's transform groups: b(litting: flips, quarter turns, whole-pixel shifts), g(eometric), c(olour)."""
    aug_p: float | None = param(None, min=0, max=1)
    """With ``aug = ada``: a fixed augmentation probability instead of the adaptive one."""
    ada_target: float = param(0.6, gt=0, max=1)
    """ADA's target of r_t = E[sign(D(real))], the overfitting heuristic."""
    ada_interval: int = param(4, min=1)
    """Steps between adjustments of p."""
    ada_kimg: float = param(500.0, gt=0)
    """Speed of p: it can go from 0 to 1 in this many thousand real images."""
    checkpoint_minutes: float | None = param(None, gt=0)
    """Also write a checkpoint when this many minutes have passed since the last one; None: by steps only."""
    deterministic: bool = False
    """Deterministic kernels (``torch.use_deterministic_algorithms``; on CUDA also cuDNN and cuBLAS
    settings and the tiled attention backend instead of flex). CPU runs are bitwise reproducible
    without it; see docs/robustness.md, "Determinism"."""

    def __post_init__(self):
        if isinstance(self.resolution, (str, list, tuple)):  # "256x128", [128, 256] from JSON
            object.__setattr__(self, "resolution", parse_size(self.resolution, "TrainConfig.resolution"))
        super().__post_init__()

    def _check(self):
        if self.preset is None and self.init is None:
            raise ConfigError("TrainConfig.preset is null, which only a fine-tuning run (init = a model) may have: "
                              "name a preset")
        if self.init_preset is not None and self.init_meta is not None:
            raise ConfigError("give the official init checkpoint's configuration once: init_preset or init_meta")
        if self.aug_p is not None and self.aug != "ada":
            raise ConfigError(f"TrainConfig.aug_p (a fixed ADA probability) needs aug = 'ada', got aug = {self.aug!r}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ConfigError(f"TrainConfig.metrics lists a metric twice: {list(self.metrics)}")


TRAIN_PRESETS: dict[str, TrainConfig] = {
    "ffhq256": TrainConfig(),
    "ffhq": TrainConfig(preset="ffhq"),
    "church": TrainConfig(preset="church"),
    "ffhq1024": TrainConfig(preset="ffhq1024"),
    "church256": TrainConfig(preset="church256"),
    # A 32px model learning from the demo faces in minutes on a CPU (tuned by looking at the
    # grids): learning rates 5-40x the paper's (hundreds of steps, not a million) with G faster
    # than D, R1 gamma 0.3 (0.1 left checkerboard artifacts, 1.0 blurred the features), no bCR
    # (at this budget it slowed learning and cost two extra D passes), and an EMA half-life of
    # 100 steps so g_ema keeps up with G.
    "tiny": TrainConfig(
        preset="tiny",
        steps=1200,
        batch=16,
        d_lr=1e-3,
        g_lr=2e-3,
        lr_decay_start=None,
        r1_gamma=0.3,
        r1_interval=4,
        bcr_real=0.0,
        bcr_fake=0.0,
        ema_half_life=100,
        checkpoint_every=200,
        sample_every=100,
        grid=(8, 8),
        tick_every=50,
    ),
}


def get_train_preset(name: str) -> TrainConfig:
    """The TrainConfig preset of a model preset name."""
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[name]
