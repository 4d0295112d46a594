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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stylenat.errors import ConfigError, MissingFileError, UserError
from stylenat.train import dist
from stylenat.train.augment import bcr_augment
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


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill ``generator``/``discriminator`` with the full model configs (preset + overrides)."""
    from stylenat.models import DiscriminatorConfig, GeneratorConfig, get_preset

    g_cfg, d_cfg = get_preset(config.preset)
    g_cfg = GeneratorConfig.from_dict({**g_cfg.to_dict(), **config.generator})
    d_cfg = DiscriminatorConfig.from_dict({**d_cfg.to_dict(), **config.discriminator})
    if g_cfg.resolution != d_cfg.resolution:
        raise ConfigError(f"generator resolution {g_cfg.resolution} differs from discriminator resolution {d_cfg.resolution}")
    group = min(config.batch, d_cfg.stddev_group)
    if config.batch % group:
        raise ConfigError(f"batch {config.batch} must be a multiple of the discriminator's minibatch-stddev group "
                          f"{group}; pick another --batch or --discriminator stddev_group=N")
    return config.replace(generator=g_cfg.to_dict(), discriminator=d_cfg.to_dict())


def _check_metrics(config: TrainConfig) -> None:
    from stylenat.metrics.registry import METRICS

    unknown = [m for m in config.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")


def train(config: TrainConfig) -> Path:
    """Train from scratch into ``config.run_dir`` (which must hold no checkpoint yet).

    Raises TrainingStopped when a signal stopped the run early (with a checkpoint written).
    """
    run_dir = Path(config.run_dir)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        raise UserError(f"{run_dir} already holds checkpoints; continue it with `stylenat train --resume {run_dir}` or pick a new --run-dir")
    _check_metrics(config)
    return _Trainer(resolve_config(config), resume=False).run()


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
    return _Trainer(resolve_config(config), resume=latest_checkpoint(run_dir / "checkpoints") is not None).run()


class _Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool):
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
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            _use_deterministic_kernels(self.device)
        self.g_cfg = GeneratorConfig.from_dict(cfg.generator)
        self.d_cfg = DiscriminatorConfig.from_dict(cfg.discriminator)
        self.dataset = open_dataset(cfg.data, self.g_cfg.resolution, xflip=cfg.xflip)  # a bad path fails before any file is written

        # Every rank builds the same initial weights from the seed; rank 0's are broadcast anyway
        # so that no backend nondeterminism in initialization can make ranks differ.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.G = build_generator(self.g_cfg).to(self.device).train()
        self.D = build_discriminator(self.d_cfg).to(self.device).train()
        dist.broadcast_module(self.G)
        dist.broadcast_module(self.D)
        self.G_ema = copy.deepcopy(self.G).eval()
        requires_grad(self.G_ema, False)
        self.g_opt = make_adam(self.G.parameters(), cfg.g_lr, cfg.betas)
        self.d_opt = make_adam(self.D.parameters(), cfg.d_lr, cfg.betas, cfg.r1_interval)
        # Latents and augmentations differ per rank (each rank is its own slice of the batch).
        rank_seed = cfg.seed * 1_000_003 + self.info.rank
        self.gen = torch.Generator().manual_seed(rank_seed)
        self.state = TrainingState(world=self.info.world)

        self.log = RunLog(self.run_dir, self.info.is_main)
        # Loaded up front so that missing Inception weights stop the run before any training.
        self.inception = None
        if cfg.metrics and self.info.is_main:
            from stylenat.metrics.inception import load_inception

            self.inception = load_inception(cfg.inception, device=self.device)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            path = latest_checkpoint(self.ckpt_root)
            self.state = load_training_checkpoint(path, self._modules(), self._optimizers(), self.info.rank,
                                                  self.info.world, self.gen, self.device)
        self.log.repair(self.state.step)  # torn lines, and records newer than the checkpoint: before any new line
        if resume:
            self.log.line(f"loaded {path}")
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

    def _reals(self) -> torch.Tensor:
        from stylenat.models import uint8_to_model

        self.state.consumed_per_rank += self.cfg.batch
        return uint8_to_model(next(self.batches).to(self.device, non_blocking=True), self.g_cfg)

    def _latents(self) -> torch.Tensor:
        return torch.randn(self.cfg.batch, self.g_cfg.style_dim, generator=self.gen).to(self.device)

    def _finish(self, opt: torch.optim.Optimizer, module: nn.Module, loss: torch.Tensor, what: str, clip: float | None = None) -> torch.Tensor:
        """Average gradients over ranks, clip, and step unless something is not finite."""
        dist.average_gradients(module)
        norm = nn.utils.clip_grad_norm_(module.parameters(), clip if clip is not None else math.inf)
        if dist.all_ranks_true(bool(torch.isfinite(loss) & torch.isfinite(norm)), self.device):
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
        requires_grad(self.D, True)
        self.d_opt.zero_grad(set_to_none=True)
        reals, total, bcr_total = [], 0.0, 0.0
        for _ in range(accum):
            real = self._reals()
            reals.append(real)
            with self.autocast:
                fake = self.G(self._latents())
                real_logits, fake_logits = self.D(real), self.D(fake)
                loss = d_logistic_loss(real_logits, fake_logits)
                bcr = real_logits.new_zeros(())
                if cfg.bcr_real:
                    aug = bcr_augment(real, self.gen, cfg.bcr_translation, cfg.bcr_cutout)
                    bcr = bcr + cfg.bcr_real * consistency_loss(self.D(aug), real_logits)
                if cfg.bcr_fake:
                    aug = bcr_augment(fake, self.gen, cfg.bcr_translation, cfg.bcr_cutout)
                    bcr = bcr + cfg.bcr_fake * consistency_loss(self.D(aug), fake_logits)
            ((loss + bcr) / accum).backward()
            total, bcr_total = total + loss.detach() / accum, bcr_total + bcr.detach() / accum
        norm = self._finish(self.d_opt, self.D, total + bcr_total, "D loss", cfg.d_clip)
        stats = {"d_loss": total, "bcr": bcr_total, "d_grad_norm": norm,
                 "real_logits": real_logits.detach().float().mean(), "fake_logits": fake_logits.detach().float().mean()}
        return reals, stats

    def _r1_step(self, reals: list[torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        self.d_opt.zero_grad(set_to_none=True)
        total = 0.0
        for real in reals:
            r1 = r1_penalty(self.D, real)  # fp32: the double backward is where bf16 would hurt most
            (cfg.r1_gamma / 2 * r1 * cfg.r1_interval / len(reals)).backward()
            total = total + r1.detach() / len(reals)
        self._finish(self.d_opt, self.D, total, "R1")
        return total

    def _g_step(self) -> torch.Tensor:
        accum = self.cfg.accum
        requires_grad(self.G, True)
        requires_grad(self.D, False)
        self.g_opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            with self.autocast:
                loss = g_nonsaturating_loss(self.D(self.G(self._latents())))
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
        self.log.line(f"{'resuming at' if state.step else 'starting'} step {state.step} of {cfg.steps}: preset {cfg.preset}, "
                      f"{len(self.dataset)} images ({cfg.data}), batch {cfg.batch} x accum {cfg.accum} x {self.info.world} "
                      f"rank(s) on {self.device}, G {_count(self.G):,} / D {_count(self.D):,} params")
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
        keys = sorted({k for s in window for k in s})
        means = {k: float(torch.stack([torch.as_tensor(s[k]).float().cpu() for s in window if k in s]).mean()) for k in keys}
        img_s = self.cfg.batch * self.cfg.accum * self.info.world / sec_per_step
        record = {"step": step, "kimg": images / 1000, **means,
                  "lr_d": self.d_opt.param_groups[0]["lr"], "lr_g": self.g_opt.param_groups[0]["lr"], "lr_factor": factor,
                  "img_per_s": img_s, "sec_per_step": sec_per_step, "peak_mem_gib": peak_memory_gib(self.device)}
        self.log.stats(record)
        eta = format_duration((self.cfg.steps - step) * sec_per_step)
        r1 = f" r1 {means['r1']:.4f}" if "r1" in means else ""
        self.log.line(f"step {step}/{self.cfg.steps} kimg {images / 1000:.1f} d {means['d_loss']:.3f} "
                      f"g {means['g_loss']:.3f} bcr {means['bcr']:.3f}{r1} | {img_s:.1f} img/s "
                      f"{record['peak_mem_gib']:.2f} GiB | eta {eta}")

    # ---- files ---------------------------------------------------------------------------------

    def _write_reals(self) -> None:
        if not self.info.is_main:
            return
        from stylenat.data import save_image_grid

        n = min(self.cfg.grid[0] * self.cfg.grid[1], len(self.dataset))
        save_image_grid(torch.stack([self.dataset[i] for i in range(n)]), self.run_dir / "reals.png", self.cfg.grid)

    @torch.no_grad()
    def _write_fakes(self) -> None:
        """g_ema on fixed latents: image i of the grid uses seed i (``stylenat.models.seeds_to_z``)."""
        if not self.info.is_main:
            return
        from stylenat.data import save_image_grid
        from stylenat.models import model_to_uint8, seeds_to_z

        z = seeds_to_z(range(self.cfg.grid[0] * self.cfg.grid[1]), self.g_cfg.style_dim)
        images = [model_to_uint8(self.G_ema(chunk.to(self.device)), self.g_cfg).cpu() for chunk in z.split(self.cfg.batch)]
        save_image_grid(torch.cat(images), self.run_dir / f"fakes_{self.state.step:09d}.png", self.cfg.grid)

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


def _use_deterministic_kernels(device: torch.device) -> None:
    """Ask torch for deterministic kernels (an op without one then raises instead of varying)."""
    if device.type == "cuda":
        # cuBLAS reads this when its handle is created, i.e. before the first matrix product.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
