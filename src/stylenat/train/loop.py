"""The training loop: one D step (plus lazy R1), one G step and an EMA update per step.

``train(config)`` starts a run directory, ``resume(run_dir)`` continues its newest checkpoint.
Every random draw (latents, augmentation) comes from one CPU generator per rank and the data
order from a seeded stream (``ShardedStream``); both states are in the checkpoints, so a resumed
run produces bitwise the same weights as an uninterrupted one (same device type, process count
and torch build; see docs/robustness.md).

Interruptions: SIGTERM, SIGINT or SIGUSR1 stop the run after the current step with a checkpoint
(:class:`TrainingStopped`; ``stylenat train`` exits with status 75); a kill at any other moment
loses only the steps since the last checkpoint (``checkpoint_every`` steps, or
``checkpoint_minutes``), and ``resume`` repairs the logs.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stylenat.errors import ConfigError, MissingFileError, UserError
from stylenat.train import dist
from stylenat.train.augment import bcr_augment, diffaugment
from stylenat.train.checkpoint import (
    TrainingState,
    capture_rng,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
    weights_digest,
)
from stylenat.train.config import TrainConfig
from stylenat.train.ema import ema_beta, update_ema
from stylenat.train.losses import consistency_loss, d_logistic_loss, g_nonsaturating_loss, r1_penalty
from stylenat.train.optim import lr_factor, make_adam, requires_grad, set_lr_factor
from stylenat.train.runlog import RunLog, format_duration, peak_memory_gib
from stylenat.train.sampler import ShardedStream
from stylenat.train.signals import GracefulStop, ignore_stop_signals


class NonFiniteError(RuntimeError):
    """A loss or gradient norm became NaN/inf; the run stopped without writing a checkpoint."""


class TrainingStopped(Exception):
    """The run stopped early on a signal after writing a checkpoint; ``resume`` continues it.

    signal: the signal's name (e.g. "SIGTERM"). step: the step reached. checkpoint: its directory.
    """

    def __init__(self, signal: str, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal} at step {step}; checkpoint {checkpoint}")
        self.signal, self.step, self.checkpoint = signal, step, checkpoint


_REQUIRED = {"generator": ("resolution", "channels", "heads", "kernels", "dilations"), "discriminator": ("resolution", "channels")}


def resolve_config(config: TrainConfig, init: dict[str, nn.Module] | None = None) -> TrainConfig:
    """The config with ``generator``/``discriminator`` filled with the full model configs and
    ``resolution`` set, checked against the data.

    The model configs come from ``init`` (the modules a fine-tuning run starts from), else from
    complete ``generator``/``discriminator`` dicts (a run's config.json), else from the preset
    (a family sized by ``resolution`` or by the data) with the dicts as overrides.
    """
    from stylenat.data import dataset_classes, native_resolution
    from stylenat.models import FAMILIES, DiscriminatorConfig, GeneratorConfig, get_preset
    from stylenat.models.config import official_discriminator

    data_res, binding = native_resolution(config.data)
    classes = dataset_classes(config.data) if config.cond is not False else []
    if config.cond and not classes:
        raise ConfigError(f"cond is true but {config.data} has no labels; prepare it with --labels (folders or a CSV file)")
    g_over, d_over = dict(config.generator), dict(config.discriminator)
    if init is None and "num_classes" not in g_over:  # a run's config.json already says (cond may have been false)
        g_over.update(num_classes=len(classes), class_names=classes)
        d_over.update(num_classes=len(classes))
    if init is not None:
        g_cfg = init["g_ema"].config
        r = g_cfg.resolution
        if config.resolution is not None and config.resolution != r:
            raise ConfigError(f"--resolution {config.resolution}: the model from --init {config.init} is {r}x{r} and "
                              f"fine-tuning keeps its size; drop --resolution and use data at {r}x{r} "
                              f"(stylenat prepare SRC DST --size {r})")
        # A preset with --init must describe the model (it then also picks the training recipe); an
        # official checkpoint read by preset name got its config from that preset (its head groups
        # adapted to the checkpoint's), so it is not compared again.
        preset = None
        if config.preset is not None and config.init_preset is None:
            preset = get_preset(config.preset, r if config.preset in FAMILIES else None)
            _check_init_preset(config, g_cfg, preset[0], "generator")
        if "d" in init:
            d_cfg = init["d"].config
            if preset is not None:
                _check_init_preset(config, d_cfg, preset[1], "discriminator")
        else:  # a fresh D: the preset's, else the official one at this resolution, or as the user shapes it
            fresh = (preset[1] if preset is not None else official_discriminator(r)).replace(num_classes=g_cfg.num_classes)
            d_cfg = DiscriminatorConfig.from_dict({**fresh.to_dict(), **d_over})
        for flag, cfg, over in (("--generator", g_cfg, g_over), ("--discriminator", d_cfg, d_over)):
            if over and type(cfg).from_dict({**cfg.to_dict(), **over}) != cfg:
                raise ConfigError(f"the model comes from --init {config.init}; its config cannot be changed "
                                  f"({flag} {', '.join(sorted(over))}): drop those overrides")
    elif all(k in g_over for k in _REQUIRED["generator"]) and all(k in d_over for k in _REQUIRED["discriminator"]):
        g_cfg, d_cfg = GeneratorConfig.from_dict(g_over), DiscriminatorConfig.from_dict(d_over)
    else:
        asked = {r for r in (config.resolution, g_over.pop("resolution", None), d_over.pop("resolution", None)) if r is not None}
        if len(asked) > 1:
            raise ConfigError(f"conflicting resolutions {sorted(asked)} (--resolution, --generator, --discriminator)")
        resolution = asked.pop() if asked else None
        if config.preset in FAMILIES and resolution is None:
            if data_res is None or not binding:
                what = "the built-in demo" if str(config.data) == "demo" else \
                    f"its images are {data_res}x{data_res}" if data_res else "its images differ in size or are not square"
                raise ConfigError(f"cannot size the {config.preset} model from {config.data} ({what}): give --resolution R "
                                  "(images are then cropped and resized to R), or prepare the data with stylenat prepare --size R")
            resolution = data_res
        g_cfg, d_cfg = get_preset(config.preset, resolution)
        g_cfg = GeneratorConfig.from_dict({**g_cfg.to_dict(), **g_over})
        d_cfg = DiscriminatorConfig.from_dict({**d_cfg.to_dict(), **d_over})
    if tuple(g_cfg.classes) != tuple(classes) and (init is not None or config.cond is not False):
        what = f"{len(classes)} classes ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})" if classes else "no labels"
        raise ConfigError(f"the model has {g_cfg.num_classes} classes but {config.data} has {what}; "
                          + ("train without labels with --cond false" if classes else "use data with the same classes"))
    if d_cfg.num_classes != g_cfg.num_classes:
        raise ConfigError(f"the generator has {g_cfg.num_classes} classes but the discriminator {d_cfg.num_classes}")
    r = g_cfg.resolution
    if d_cfg.resolution != r:
        raise ConfigError(f"generator resolution {r} differs from discriminator resolution {d_cfg.resolution}")
    if binding and data_res != r and init is not None:  # a fine-tuned model keeps its size: the data must fit it
        raise ConfigError(f"{config.data} holds {data_res}x{data_res} images but the model is {r}x{r} (from --init "
                          f"{config.init}), and fine-tuning keeps the model's size: prepare the data at {r} "
                          f"(stylenat prepare SRC DST --size {r})")
    if binding and data_res != r:
        raise ConfigError(f"{config.data} holds {data_res}x{data_res} images but the model is {r}x{r}: train at the "
                          f"data's size (--preset ffhq --resolution {data_res}) or prepare the data at {r} "
                          f"(stylenat prepare SRC DST --size {r})")
    group = min(config.batch, d_cfg.stddev_group)
    if config.batch % group:
        raise ConfigError(f"batch {config.batch} must be a multiple of the discriminator's minibatch-stddev group "
                          f"{group}; pick another --batch or --discriminator stddev_group=N")
    # FreezeD keeps blocks as they start: without trained ones to start from it would freeze random
    # weights for the whole run, which no one asks for on purpose (a resumed run has init set, init None).
    if config.freeze_d and config.init is None:
        raise ConfigError(f"--freeze-d {config.freeze_d} keeps the first discriminator blocks as they start, and "
                          "without --init they start random: add --init MODEL (fine-tuning) or drop --freeze-d")
    if config.freeze_d and init is not None and "d" not in init:
        raise ConfigError(f"--freeze-d {config.freeze_d}: {config.init} holds no discriminator, so D starts random "
                          "and frozen blocks would stay random: init from a model with a discriminator, or drop --freeze-d")
    if config.freeze_d > d_cfg.num_blocks:
        raise ConfigError(f"--freeze-d {config.freeze_d}: the {r}x{r} discriminator has {d_cfg.num_blocks} blocks "
                          "before its output block")
    return config.replace(resolution=r, generator=g_cfg.to_dict(), discriminator=d_cfg.to_dict())


def _check_init_preset(config: TrainConfig, model_cfg, preset_cfg, what: str) -> None:
    """ConfigError unless the init model's ``what`` config is the preset's (classes aside: a preset has none)."""
    import dataclasses

    have = model_cfg.replace(num_classes=0, **({"class_names": ()} if what == "generator" else {}))
    for f in dataclasses.fields(have):
        ours, theirs = getattr(have, f.name), getattr(preset_cfg, f.name)
        if ours != theirs:
            raise ConfigError(f"--preset {config.preset} does not describe the model from --init {config.init} (its {what}'s "
                              f"{f.name} is {_short(ours)}, the preset's {_short(theirs)}): drop --preset to fine-tune the "
                              "model as it is (--set FIELD=VALUE changes the training recipe)")


def _short(value) -> str:
    text = str(list(value) if isinstance(value, tuple) else value).replace(" ", "")
    return text if len(text) <= 40 else text[:37] + "..."


def _check_metrics(config: TrainConfig) -> None:
    from stylenat.metrics.registry import parse_metric

    for name in config.metrics:
        parse_metric(name)


def _load_init(config: TrainConfig) -> tuple[TrainConfig, dict[str, nn.Module]]:
    """The modules a fine-tuning run starts from, and the config recording their source and digest."""
    from stylenat._system import file_sha256
    from stylenat.models import resolve_models
    from stylenat.models.loading import model_source_file

    source = model_source_file(config.init).resolve()
    digest = file_sha256(source)
    if config.init_sha256 is not None and digest != config.init_sha256:
        raise ConfigError(f"{source} changed since this run started from it (sha256 {config.init_sha256[:12]}..., "
                          f"now {digest[:12]}...); restore it or start a new run")
    # Only an official checkpoint (a torch zip archive) needs its configuration named; a stylenat model
    # carries its own, and there --preset is just the training recipe (checked against the model later).
    official = zipfile.is_zipfile(source)
    if config.init_meta is not None and not official:
        raise ConfigError(f"--meta describes an official checkpoint, but {source} is a stylenat model with its own "
                          "configuration: drop --meta")
    init_preset = _official_init_preset(config) if official else None
    modules = resolve_models(source, init_preset, config.init_meta, device="cpu")
    if "g_ema" not in modules:
        modules["g_ema"] = modules["g"]
    return config.replace(init=str(source), init_sha256=digest, init_preset=init_preset), modules


def _official_init_preset(config: TrainConfig) -> str | None:
    """The named preset an official ``init`` checkpoint is read with: ``init_preset`` itself, or for a
    family (``--preset ffhq``) its named member at ``resolution`` or the data's size."""
    from stylenat.data import native_resolution
    from stylenat.models import FAMILIES, PRESETS

    family = config.init_preset
    if family not in FAMILIES:
        return family
    size = config.resolution if config.resolution is not None else native_resolution(config.data)[0]
    named = [n for n in PRESETS if n.startswith(family)]
    if size is not None and f"{family}{size}" in PRESETS:
        return f"{family}{size}"
    where = (f"there is no named {family} preset at {size}x{size}" if size is not None else
             f"the size is not known ({config.data} does not set it and --resolution is not given)")
    raise ConfigError(f"--preset {family} is a family, and an official checkpoint is read with the named preset it was "
                      f"trained with ({', '.join(named)}) or --meta META.json; {where}")


def train(config: TrainConfig) -> Path:
    """Train into ``config.run_dir`` (which must hold no checkpoint yet), from scratch or from ``config.init``.

    Raises TrainingStopped when a signal stopped the run early (with a checkpoint written).
    """
    run_dir = Path(config.run_dir)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        raise UserError(f"{run_dir} already holds checkpoints; continue it with `stylenat train --resume {run_dir}` or pick a new --run-dir")
    _check_metrics(config)
    init = None
    if config.init is not None:
        config, init = _load_init(config)
    return _Trainer(resolve_config(config, init), resume=False, init=init).run()


def resume(run_dir: str | Path, steps: int | None = None) -> Path:
    """Continue the run in ``run_dir`` from its newest checkpoint, optionally to a new step count.

    A run stopped before its first checkpoint starts again from step 0 with its config.json.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise MissingFileError(f"{run_dir / 'config.json'} not found; {run_dir} is not a run directory, or its run "
                               "was stopped before it started: start it again with the same command")
    config = TrainConfig.load(run_dir / "config.json")
    config = config.replace(run_dir=str(run_dir), steps=steps or config.steps)
    _check_metrics(config)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return _Trainer(resolve_config(config), resume=True).run()
    init = None
    if config.init is not None:
        config, init = _load_init(config)
    return _Trainer(resolve_config(config, init), resume=False, init=init).run()


class _Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool, init: dict[str, nn.Module] | None = None):
        from stylenat.data import open_dataset
        from stylenat.models import DiscriminatorConfig, GeneratorConfig, build_discriminator, build_generator

        self.cfg = cfg
        self.info = dist.init_distributed(cfg.device)
        self.device = self.info.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        check_deterministic_support(cfg, self.device)  # before anything is written, not hours into the run
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            _use_deterministic_kernels(self.device)
        self.g_cfg = GeneratorConfig.from_dict(cfg.generator)
        self.d_cfg = DiscriminatorConfig.from_dict(cfg.discriminator)
        self.cond = self.g_cfg.num_classes > 0
        # A bad path fails before any file is written; a conditional run reads (image, label) pairs.
        self.dataset = open_dataset(cfg.data, self.g_cfg.resolution, xflip=cfg.xflip, labels=self.cond)

        # Every rank builds the same initial weights from the seed; rank 0's are broadcast anyway
        # so that no backend nondeterminism in initialization can make ranks differ.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.G = build_generator(self.g_cfg)
        self.D = build_discriminator(self.d_cfg)
        self.G_ema = copy.deepcopy(self.G)
        if init is not None:  # fine-tuning: every module the model has; a missing D stays fresh
            self.G.load_state_dict(init.get("g", init["g_ema"]).state_dict())
            self.G_ema.load_state_dict(init["g_ema"].state_dict())
            if "d" in init:
                self.D.load_state_dict(init["d"].state_dict())
        self.G, self.D, self.G_ema = self.G.to(self.device).train(), self.D.to(self.device).train(), self.G_ema.to(self.device).eval()
        dist.broadcast_module(self.G)
        dist.broadcast_module(self.D)
        dist.broadcast_module(self.G_ema)
        requires_grad(self.G_ema, False)
        # FreezeD: the first blocks from the input side keep their weights; in eval mode their
        # spectral-norm vectors stay put too, so they are bitwise unchanged.
        frozen = self.D.input_blocks(cfg.freeze_d)
        frozen_ids = {id(p) for m in frozen for p in m.parameters()}
        self.d_params = [p for p in self.D.parameters() if id(p) not in frozen_ids]
        for m in frozen:
            m.eval()
            requires_grad(m, False)
        self.g_opt = make_adam(self.G.parameters(), cfg.g_lr, cfg.betas)
        self.d_opt = make_adam(self.d_params, cfg.d_lr, cfg.betas, cfg.r1_interval)
        # Latents and augmentations differ per rank (each rank is its own slice of the batch).
        rank_seed = cfg.seed * 1_000_003 + self.info.rank
        self.gen = torch.Generator().manual_seed(rank_seed)
        self.state = TrainingState(world=self.info.world)
        self.pipe = self.ada = None
        if cfg.aug == "ada":
            from stylenat.train.ada import AdaController, AugmentPipe

            self.pipe = AugmentPipe(cfg.aug_pipe, self.g_cfg.image_mean, self.g_cfg.image_std)
            if cfg.aug_p is None:
                self.ada = AdaController(0.0, cfg.ada_target, cfg.ada_interval, cfg.ada_kimg)

        self.log = RunLog(self.run_dir, self.info.is_main)
        # Loaded up front so that missing Inception weights stop the run before any training.
        self.inception = None
        if self.info.is_main and cfg.metrics:
            from stylenat.metrics.registry import load_inception_for, needs_inception

            if needs_inception(list(cfg.metrics)):
                self.inception = load_inception_for(list(cfg.metrics), cfg.inception, self.device)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            path = latest_checkpoint(self.ckpt_root)
            self.state = load_training_checkpoint(path, self._modules(), self._optimizers(), self.info.rank,
                                                  self.info.world, self.gen, self.device)
            if self.ada is not None:
                self.ada.load_state_dict(self.state.components["ada"])
        self.log.repair(self.state.step)  # torn lines, and records newer than the checkpoint: before any new line
        if resume:
            self.log.line(f"loaded {path}")
        elif init is not None:
            self.log.line(f"fine-tuning from {cfg.init} (sha256 {cfg.init_sha256[:12]}...): "
                          + ("G, G_ema and D" if "d" in init else "G and G_ema; D starts fresh (the model has none)")
                          + (f"; the first {cfg.freeze_d} D block(s) frozen" if cfg.freeze_d else ""))
        self.log.open_tensorboard(purge_step=self.state.step if resume else None)
        if self.info.is_main:
            cfg.save(self.run_dir / "config.json")

        self.stream = ShardedStream(len(self.dataset), cfg.seed, self.info.rank, self.info.world, self.state.consumed_per_rank)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch, sampler=self.stream, num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=cfg.workers > 0,
            worker_init_fn=ignore_stop_signals if cfg.workers > 0 else None,
            # Its own generator for worker seeds, so the global torch RNG (saved in checkpoints) is left alone.
            generator=torch.Generator().manual_seed(rank_seed),
        )
        self.batches = iter(loader)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else nullcontext()
        )

    def _modules(self) -> dict[str, nn.Module]:
        return {"g": self.G, "g_ema": self.G_ema, "d": self.D}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g_opt": self.g_opt, "d_opt": self.d_opt}

    # ---- one step ------------------------------------------------------------------------------

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of an image: the configured augmentation, drawn from the run's generator."""
        if self.pipe is not None:
            return self.pipe(x, self.ada.p if self.ada is not None else self.cfg.aug_p, self.gen)
        if self.cfg.aug == "diffaug":
            return diffaugment(x, self.gen)
        return x

    def _d(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return self.D(self._augment(x), c)

    def _reals(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of real images in model space, and their class indices (None when unconditional)."""
        from stylenat.models import uint8_to_model

        self.state.consumed_per_rank += self.cfg.batch
        batch = next(self.batches)
        images, labels = batch if self.cond else (batch, None)
        labels = labels.to(self.device, non_blocking=True) if labels is not None else None
        return uint8_to_model(images.to(self.device, non_blocking=True), self.g_cfg), labels

    def _latents(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents of a batch of fakes, and their class indices drawn from the data's label distribution."""
        z = _to_device(torch.randn(self.cfg.batch, self.g_cfg.style_dim, generator=self.gen), self.device)
        if not self.cond:
            return z, None
        pick = torch.randint(len(self.dataset.labels), (self.cfg.batch,), generator=self.gen)
        return z, _to_device(self.dataset.labels[pick], self.device)

    def _fakes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, c = self._latents()
        return self.G(z, c=c), c

    def _finish(self, opt: torch.optim.Optimizer, module: nn.Module, loss: torch.Tensor, what: str, clip: float | None = None) -> torch.Tensor:
        """Average gradients over ranks, clip, and step unless something is not finite (on any rank)."""
        dist.average_gradients(module)
        norm = nn.utils.clip_grad_norm_(module.parameters(), clip if clip is not None else math.inf)
        # The number of ranks where both are finite, summed on the device: reading it is this optimizer
        # step's one host synchronization (docs/gpu.md), the same verdict on every rank.
        finite = (torch.isfinite(loss) & torch.isfinite(norm)).to(torch.float32)
        dist.sum_(finite)
        if float(finite) == self.info.world:
            opt.step()
            return norm
        message = f"step {self.state.step}: non-finite {what} (loss {loss.item():.4g}, grad norm {norm.item():.4g})"
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteError(message)
        self.log.line(message + "; step skipped")
        self.skipped += 1
        return norm

    def _d_step(self) -> tuple[list[torch.Tensor], dict]:
        cfg, accum = self.cfg, self.cfg.accum
        requires_grad(self.G, False)
        requires_grad(self.d_params, True)
        self.d_opt.zero_grad(set_to_none=True)
        reals, total, bcr_total, signs = [], 0.0, 0.0, 0.0
        for _ in range(accum):
            real, real_c = self._reals()
            reals.append((real, real_c))
            with self.autocast:
                # G is frozen here and its images are only D's inputs (bCR on fakes needs gradients
                # w.r.t. D alone): no autograd state, and one grad mode less for compiled attention.
                with torch.no_grad():
                    fake, fake_c = self._fakes()
                real_logits, fake_logits = self._d(real, real_c), self._d(fake, fake_c)
                loss = d_logistic_loss(real_logits, fake_logits)
                bcr = real_logits.new_zeros(())
                if cfg.bcr_real:
                    aug = bcr_augment(real, self.gen, cfg.bcr_translation, cfg.bcr_cutout)
                    bcr = bcr + cfg.bcr_real * consistency_loss(self._d(aug, real_c), real_logits)
                if cfg.bcr_fake:
                    aug = bcr_augment(fake, self.gen, cfg.bcr_translation, cfg.bcr_cutout)
                    bcr = bcr + cfg.bcr_fake * consistency_loss(self._d(aug, fake_c), fake_logits)
            if self.ada is not None:
                self.ada.accumulate(real_logits)
            signs = signs + real_logits.detach().sign().float().mean() / accum
            ((loss + bcr) / accum).backward()
            total, bcr_total = total + loss.detach() / accum, bcr_total + bcr.detach() / accum
        norm = self._finish(self.d_opt, self.D, total + bcr_total, "D loss", cfg.d_clip)
        # r_t = E[sign(D(real))], ADA's overfitting heuristic, logged for every run: over every micro-batch
        # of the step (equal sizes), the logits ADA's controller accumulates.
        stats = {"d_loss": total, "bcr": bcr_total, "d_grad_norm": norm, "r_t": signs,
                 "real_logits": real_logits.detach().float().mean(), "fake_logits": fake_logits.detach().float().mean()}
        return reals, stats

    def _r1_step(self, reals: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        cfg = self.cfg
        self.d_opt.zero_grad(set_to_none=True)
        total = 0.0
        for real, c in reals:
            r1 = r1_penalty(lambda x: self._d(x, c), real)  # fp32: the double backward is where bf16 would hurt most
            (cfg.r1_gamma / 2 * r1 * cfg.r1_interval / len(reals)).backward()
            total = total + r1.detach() / len(reals)
        self._finish(self.d_opt, self.D, total, "R1")
        return total

    def _g_step(self) -> torch.Tensor:
        accum = self.cfg.accum
        requires_grad(self.G, True)
        requires_grad(self.d_params, False)
        self.g_opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            with self.autocast:
                loss = g_nonsaturating_loss(self._d(*self._fakes()))
            (loss / accum).backward()
            total = total + loss.detach() / accum
        self._finish(self.g_opt, self.G, total, "G loss")
        return total

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> Path:
        try:
            with GracefulStop() as stop:
                self._loop(stop)
        except NonFiniteError as exc:
            last = latest_checkpoint(self.ckpt_root)
            self.log.line(f"stopped: {exc}; the newest checkpoint is {last.name if last else 'none'}")
            raise
        finally:
            self.log.close()
            dist.shutdown()
            torch.use_deterministic_algorithms(self._deterministic_before)
        return self.run_dir

    def _loop(self, stop: GracefulStop) -> None:
        cfg, state = self.cfg, self.state
        beta = ema_beta(cfg.ema_half_life)
        self.skipped = 0
        model = f"preset {cfg.preset}" if cfg.preset is not None else f"model from {cfg.init}"
        self.log.line(f"{'resuming at' if state.step else 'starting'} step {state.step} of {cfg.steps}: {model}, "
                      f"{len(self.dataset)} images ({cfg.data}), batch {cfg.batch} x accum {cfg.accum} x {self.info.world} "
                      f"rank(s) on {self.device}, G {_count(self.G):,} / D {_count(self.D):,} params")
        if self.cond:
            names = self.g_cfg.classes
            shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
            self.log.line(f"class-conditional: {len(names)} classes ({shown}); fakes draw their classes in the "
                          "data's proportions")
        if state.step == 0:
            self._write_reals()
            self._write_fakes()
        elif self._metrics_due() and not self._metrics_logged():
            self._metrics()  # the run was stopped between this checkpoint and its metrics
        window, t_tick, step_at_tick = [], time.perf_counter(), state.step
        self.last_save = time.monotonic()
        while state.step < cfg.steps:
            factor = lr_factor(state.step, cfg.lr_decay_start, cfg.steps)
            set_lr_factor(self.d_opt, factor)
            set_lr_factor(self.g_opt, factor)
            reals, stats = self._d_step()
            if state.step % cfg.r1_interval == 0 and cfg.r1_gamma > 0:
                stats["r1"] = self._r1_step(reals)
            stats["g_loss"] = self._g_step()
            dist.average_buffers(self.G)
            dist.average_buffers(self.D)
            update_ema(self.G_ema, self.G, beta)
            state.step += 1
            state.images += cfg.batch * cfg.accum * self.info.world
            if self.pipe is not None:
                stats["aug_p"] = self.ada.p if self.ada is not None else cfg.aug_p
            if self.ada is not None:
                self.ada.maybe_update(state.step, cfg.batch * cfg.accum * self.info.world, reduce=dist.sum_)
            window.append(stats)

            if state.step % cfg.tick_every == 0 or state.step == cfg.steps:
                elapsed = time.perf_counter() - t_tick
                self._tick(window, elapsed / (state.step - step_at_tick), factor)
                window, t_tick, step_at_tick = [], time.perf_counter(), state.step
            if state.step % cfg.sample_every == 0 or state.step == cfg.steps:
                self._write_fakes()
            # One collective per step: every rank learns whether any rank got a stop signal and
            # whether rank 0's clock calls for a checkpoint, so all ranks act on the same step.
            time_due = cfg.checkpoint_minutes is not None and time.monotonic() - self.last_save >= 60 * cfg.checkpoint_minutes
            stopping, time_due = dist.any_rank([stop.requested, time_due and self.info.is_main], self.device)
            saved = None
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps or time_due or stopping:
                saved = self._save()
            if stopping:
                signame = next((n for n in dist.gather_objects(stop.name) if n), "a signal")
                self.log.line(f"stopped by {signame} at step {state.step}; resume with `stylenat train --resume {self.run_dir}`")
                dist.barrier()
                raise TrainingStopped(signame, state.step, saved)
            if self._metrics_due():
                self._metrics()
        self.log.line(f"done: {state.step} steps, {state.images:,} images" + (f", {self.skipped} skipped" if self.skipped else ""))
        # Ranks leave together: tearing the process group down while rank 0 still writes the last
        # checkpoint can abort the other ranks inside gloo.
        dist.barrier()

    def _tick(self, window: list[dict], sec_per_step: float, factor: float) -> None:
        if not self.info.is_main:
            return
        step, images = self.state.step, self.state.images
        means = _window_means(window)
        img_s = self.cfg.batch * self.cfg.accum * self.info.world / sec_per_step
        record = {"step": step, "kimg": images / 1000, **means,
                  "lr_d": self.d_opt.param_groups[0]["lr"], "lr_g": self.g_opt.param_groups[0]["lr"], "lr_factor": factor,
                  "img_per_s": img_s, "sec_per_step": sec_per_step, "peak_mem_gib": peak_memory_gib(self.device)}
        self.log.stats(record)
        eta = format_duration((self.cfg.steps - step) * sec_per_step)
        r1 = f" r1 {means['r1']:.4f}" if "r1" in means else ""
        r1 += f" r_t {means['r_t']:.2f}" + (f" aug p {means['aug_p']:.3f}" if "aug_p" in means else "")
        self.log.line(f"step {step}/{self.cfg.steps} kimg {images / 1000:.1f} d {means['d_loss']:.3f} "
                      f"g {means['g_loss']:.3f} bcr {means['bcr']:.3f}{r1} | {img_s:.1f} img/s "
                      f"{record['peak_mem_gib']:.2f} GiB | eta {eta}")

    # ---- files ---------------------------------------------------------------------------------

    def _write_reals(self) -> None:
        if not self.info.is_main:
            return
        from stylenat.data import save_image_grid

        rows, cols = self.cfg.grid
        if not self.cond:
            n = min(rows * cols, len(self.dataset))
            save_image_grid(torch.stack([self.dataset[i] for i in range(n)]), self.run_dir / "reals.png", self.cfg.grid)
            return
        # One row per class (the first classes when there are more than rows), black where a class runs out.
        classes = self._grid_classes()
        images = torch.zeros(len(classes) * cols, 3, self.g_cfg.resolution, self.g_cfg.resolution, dtype=torch.uint8)
        for r, k in enumerate(classes):
            members = (self.dataset.labels == k).nonzero().flatten()[:cols].tolist()
            for j, i in enumerate(members):
                images[r * cols + j] = self.dataset[i][0]
        save_image_grid(images, self.run_dir / "reals.png", (len(classes), cols))

    def _grid_classes(self) -> list[int]:
        """The class of each grid row of a conditional run: one row per class, 0, 1, ..., as many as the
        grid has rows (fewer rows than the grid when there are fewer classes)."""
        return list(range(min(self.cfg.grid[0], self.g_cfg.num_classes)))

    @torch.no_grad()
    def _write_fakes(self) -> None:
        """g_ema on fixed latents: image i of the grid uses seed i (``stylenat.models.seeds_to_z``)."""
        if not self.info.is_main:
            return
        from stylenat.data import save_image_grid
        from stylenat.models import model_to_uint8, seeds_to_z

        rows, cols = self.cfg.grid
        rows = len(self._grid_classes()) if self.cond else rows
        z = seeds_to_z(range(rows * cols), self.g_cfg.style_dim)
        c = torch.tensor(self._grid_classes()).repeat_interleave(cols) if self.cond else None
        images = [model_to_uint8(self.G_ema(z[i:i + self.cfg.batch].to(self.device),
                                            c=None if c is None else c[i:i + self.cfg.batch].to(self.device)), self.g_cfg).cpu()
                  for i in range(0, len(z), self.cfg.batch)]
        save_image_grid(torch.cat(images), self.run_dir / f"fakes_{self.state.step:09d}.png", (rows, cols))

    def _metrics_due(self) -> bool:
        step = self.state.step
        return bool(self.cfg.metrics) and step > 0 and (step % self.cfg.metrics_every == 0 or step == self.cfg.steps)

    def _metrics_logged(self) -> bool:
        records = self.log.records() if self.info.is_main else []
        done = any(r.get("step") == self.state.step and all(any(k.startswith(m) for k in r) for m in self.cfg.metrics)
                   for r in records)
        return dist.any_rank([done], self.device)[0]

    def _metrics(self) -> None:
        """Metrics of g_ema on rank 0; they draw from their own seeded generators, not the run's."""
        if self.info.is_main:
            from stylenat.metrics.registry import calc_metric

            results = {}
            for name in self.cfg.metrics:
                results.update(calc_metric(name, self.G_ema, self.cfg.data, extractor=self.inception, batch=self.cfg.batch))
            self.log.stats({"step": self.state.step, "kimg": self.state.images / 1000, **results})
            self.log.line(f"step {self.state.step} metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        dist.barrier()

    def _save(self) -> Path | None:
        """Write a checkpoint of this step (collective: every rank's random state and weight digest)."""
        modules = self._modules()
        if self.cond:  # the class means truncation moves toward, stored with the model (every rank: same weights)
            self.G.compute_class_w_avg()
            self.G_ema.compute_class_w_avg()
        gathered = dist.gather_objects((capture_rng(self.gen, self.device), weights_digest(modules)))
        path, error = None, None
        if self.info.is_main:
            rng, digests = [r for r, _ in gathered], [d for _, d in gathered]
            if len(set(digests)) > 1:  # cannot happen unless a collective misbehaves; say so loudly
                self.log.line(f"warning: ranks hold different weights at step {self.state.step}: {digests}")
            existing = latest_checkpoint(self.ckpt_root)
            if existing is not None and existing.name.endswith(f"{self.state.step:09d}"):
                path = existing  # e.g. a stop right after a scheduled checkpoint of the same step
            else:
                if self.ada is not None:
                    self.state.components["ada"] = self.ada.state_dict()
                try:
                    path = save_training_checkpoint(self.ckpt_root, self.state, modules, self._optimizers(), rng, digests,
                                                    self.cfg.to_dict(), self.cfg.keep)
                except UserError as exc:
                    error = exc
                else:
                    self.log.line(f"checkpoint {path}")
        # Every rank stops if rank 0 could not write, instead of waiting for it at the next collective.
        if not dist.any_rank([error is None], self.device, reduce="all")[0]:
            if error is not None:
                self.log.line(f"stopped: {error}")
                raise error
            raise UserError("rank 0 could not write a checkpoint; see its log")
        self.last_save = time.monotonic()
        return path


def check_deterministic_support(cfg: TrainConfig, device: str | torch.device) -> None:
    """ConfigError when ``cfg.deterministic`` asks ``device`` for a kernel torch does not have deterministically.

    The one case: ADA's geometric transforms (``aug_pipe`` with 'g') resample with ``F.grid_sample``,
    whose CUDA backward is nondeterministic only, so ``torch.use_deterministic_algorithms`` would make
    the first step that draws one raise, possibly hours into the run. Checked with the device the run
    will use (a string such as "cuda:0" works too, so it is testable without one).
    """
    from stylenat.train.ada import resamples

    device = torch.device(device)
    if not (cfg.deterministic and device.type == "cuda" and cfg.aug == "ada" and cfg.aug_p != 0):
        return
    if resamples(cfg.aug_pipe):
        raise ConfigError(f"--deterministic with --aug ada on {device}: ADA's geometric transforms (aug_pipe "
                          f"'{cfg.aug_pipe}' has 'g') resample with F.grid_sample, whose backward has no deterministic "
                          "CUDA kernel, so training would fail at the first augmented step; drop --deterministic, or "
                          f"use transforms without geometry (--set aug_pipe={cfg.aug_pipe.replace('g', '') or 'b'})")


def _use_deterministic_kernels(device: torch.device) -> None:
    """Ask torch for deterministic kernels (an op without one then raises instead of varying)."""
    if device.type == "cuda":
        # cuBLAS reads this when its handle is created, i.e. before the first matrix product.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh CPU tensor on ``device``, without a host synchronization on CUDA.

    A blocking host-to-device copy waits for every kernel queued before it (cudaMemcpyAsync, then a
    stream synchronization); from pinned memory with ``non_blocking`` it is only queued (the caching
    host allocator keeps the pinned block until the copy has run). Elsewhere ``t.to(device)``.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _window_means(window: list[dict]) -> dict[str, float]:
    """The mean of each statistic over a tick's steps, in float32 on the CPU.

    Every device tensor of the window comes to the host in one copy (each ``.cpu()`` is a host
    synchronization); the means are then those of the values one by one, bit for bit.
    """
    keys = sorted({k for s in window for k in s})
    entries = [(k, torch.as_tensor(s[k]).float()) for s in window for k in keys if k in s]
    on_device = [i for i, (_, v) in enumerate(entries) if v.device.type != "cpu"]
    if on_device:
        fetched = torch.stack([entries[i][1] for i in on_device]).cpu()
        for j, i in enumerate(on_device):
            entries[i] = (entries[i][0], fetched[j])
    values: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for k, v in entries:
        values[k].append(v)
    return {k: float(torch.stack(v).mean()) for k, v in values.items()}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
