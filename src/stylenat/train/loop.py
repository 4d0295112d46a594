"""The training loop: one D step (plus lazy R1), one G step and an EMA update per step.

``train(config)`` starts a run directory, ``resume(run_dir)`` continues its newest checkpoint.
This module schedules the steps, logs and checkpoints; the set-up is :mod:`stylenat.train.setup`
and the loss terms :class:`stylenat.train.losses.RecipeLoss`.

A step's random numbers (latents, classes, augmentations) are a function of the seed and the step,
drawn for the whole step and sliced per rank and micro-batch (:mod:`stylenat.train.draws`), and the
data order is a seeded stream dealt the same way (``ShardedStream``). So a resumed run produces
bitwise the same weights as an uninterrupted one (same device type, process count and torch build;
see docs/robustness.md), and 2 processes x batch 4, accum 2 x batch 4 and batch 8 train on the same
images with the same numbers (equal weights up to float rounding: tests/train/test_equivalence.py;
when the process count divides the dataset and device batches hold a whole minibatch-stddev group).

Interruptions: SIGTERM, SIGINT or SIGUSR1 stop the run after the current step with a checkpoint
(:class:`TrainingStopped`; ``stylenat train`` exits with status 75); a kill at any other moment
loses only the steps since the last checkpoint (``checkpoint_every`` steps, or
``checkpoint_minutes``), and ``resume`` repairs the logs.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from stylenat.data import open_dataset, save_image_grid
from stylenat.errors import MissingFileError, UserError
from stylenat.metrics.registry import calc_metric, load_inception_for, needs_inception
from stylenat.models import GeneratorConfig, model_to_uint8, seeds_to_z, uint8_to_model
from stylenat.train import dist
from stylenat.train.ada import AdaController, AugmentPipe
from stylenat.train.augment import diffaugment
from stylenat.train.checkpoint import (
    TrainingState,
    capture_rng,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
    weights_digest,
)
from stylenat.train.config import TrainConfig
from stylenat.train.draws import StepDraws
from stylenat.train.ema import ema_beta, update_ema
from stylenat.train.losses import RecipeLoss
from stylenat.train.optim import lr_factor, requires_grad, set_lr_factor
from stylenat.train.runlog import RunLog, format_duration, peak_memory_gib
from stylenat.train.sampler import ShardedStream
from stylenat.train.setup import (
    build_networks,
    check_deterministic_support,
    check_metrics,
    load_init,
    resolve_config,
    use_deterministic_kernels,
)
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


def train(config: TrainConfig) -> Path:
    """Train into ``config.run_dir`` (which must hold no checkpoint yet), from scratch or from ``config.init``.

    Raises TrainingStopped when a signal stopped the run early (with a checkpoint written).
    """
    run_dir = Path(config.run_dir)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        raise UserError(f"{run_dir} already holds checkpoints; continue it with `stylenat train --resume {run_dir}` or pick a new --run-dir")
    check_metrics(config)
    init = None
    if config.init is not None:
        config, init = load_init(config)
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
    check_metrics(config)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return _Trainer(resolve_config(config), resume=True).run()
    init = None
    if config.init is not None:
        config, init = load_init(config)
    return _Trainer(resolve_config(config, init), resume=False, init=init).run()


class _Trainer:
    """One run from a resolved config: set up in ``__init__``, then :meth:`run`."""

    def __init__(self, cfg: TrainConfig, resume: bool, init: dict[str, nn.Module] | None = None):
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
            use_deterministic_kernels(self.device)
        self.g_cfg = GeneratorConfig.from_dict(cfg.generator)
        self.cond = self.g_cfg.num_classes > 0
        # A bad path fails before any file is written; a conditional run reads (image, label) pairs.
        self.dataset = open_dataset(cfg.data, self.g_cfg.resolution, xflip=cfg.xflip, labels=self.cond)
        self.nets = build_networks(cfg, self.device, init)
        self.G, self.D, self.G_ema = self.nets.G, self.nets.D, self.nets.G_ema
        self.g_opt, self.d_opt, self.d_params = self.nets.g_opt, self.nets.d_opt, self.nets.d_params
        self.state = TrainingState(world=self.info.world)
        self.skipped = 0  # steps skipped for a non-finite loss (on_nonfinite = "skip")
        self.pipe = self.ada = None
        if cfg.aug == "ada":
            self.pipe = AugmentPipe(cfg.aug_pipe, self.g_cfg.image_mean, self.g_cfg.image_std)
            if cfg.aug_p is None:
                self.ada = AdaController(0.0, cfg.ada_target, cfg.ada_interval, cfg.ada_kimg)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else nullcontext()
        self.loss = RecipeLoss(self.G, self.D, cfg, self._augment, self.autocast)

        self.log = RunLog(self.run_dir, self.info.is_main)
        # Loaded up front so that missing Inception weights stop the run before any training.
        self.inception = None
        if self.info.is_main and cfg.metrics and needs_inception(list(cfg.metrics)):
            self.inception = load_inception_for(list(cfg.metrics), cfg.inception, self.device)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            path = latest_checkpoint(self.ckpt_root)
            self.state = load_training_checkpoint(path, self.nets.modules(), self.nets.optimizers(), self.info.rank,
                                                  self.info.world, self.device)
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

        stream = ShardedStream(len(self.dataset), cfg.seed, self.info.rank, self.info.world, self.state.consumed_per_rank,
                               cfg.batch, cfg.accum)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch, sampler=stream, num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=cfg.workers > 0,
            worker_init_fn=ignore_stop_signals if cfg.workers > 0 else None,
            # Its own generator for worker seeds, so the global torch RNG (saved in checkpoints) is left alone.
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.info.rank),
        )
        self.batches = iter(loader)

    # ---- one step ------------------------------------------------------------------------------

    def _augment(self, x: torch.Tensor, draws) -> torch.Tensor:
        """What D sees of an image: the configured augmentation."""
        if self.pipe is not None:
            return self.pipe(x, self.ada.p if self.ada is not None else self.cfg.aug_p, draws)
        if self.cfg.aug == "diffaug":
            return diffaugment(x, draws)
        return x

    def _reals(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A micro-batch of real images in model space, and their class indices (None when unconditional)."""
        self.state.consumed_per_rank += self.cfg.batch
        batch = next(self.batches)
        images, labels = batch if self.cond else (batch, None)
        labels = labels.to(self.device, non_blocking=True) if labels is not None else None
        return uint8_to_model(images.to(self.device, non_blocking=True), self.g_cfg), labels

    def _latents(self, draws: StepDraws) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents of a micro-batch of fakes, and their classes drawn in the data's label proportions."""
        z = _to_device(draws.scope("z").randn((self.cfg.batch, self.g_cfg.style_dim)), self.device)
        if not self.cond:
            return z, None
        pick = draws.scope("c").randint(0, len(self.dataset.labels), (self.cfg.batch,))
        return z, _to_device(self.dataset.labels[pick], self.device)

    def _buffers(self) -> list[torch.Tensor]:
        """The floating buffers of G and D: forward passes in training mode move some (G's tracked
        w_avg, D's spectral-norm vectors); the rest are constants."""
        return [b for m in (self.G, self.D) for b in m.buffers() if b.is_floating_point()]

    def _accumulate(self, phase: str, micro) -> list:
        """``micro(k, draws)`` for every micro-batch k of the step's ``phase``, in order.

        Every micro-batch starts from the phase's buffers, and they end on the first micro-batch's
        plus the mean difference of each from it: the mean, as one batch of them all would leave
        them, and every bit of a buffer all micro-batches leave alike (constants, spectral-norm
        vectors), where a plain mean over 3 would round (as over ranks, dist.average_buffers).
        """
        cfg, info = self.cfg, self.info
        draws = [StepDraws.for_micro_batch(cfg.seed, (self.state.step, phase), cfg.batch, k, cfg.accum, info.rank, info.world)
                 for k in range(cfg.accum)]
        if cfg.accum == 1:
            return [micro(0, draws[0])]
        buffers, out = self._buffers(), []
        start = torch._foreach_mul(buffers, 1.0)  # a copy, one fused kernel on CUDA
        for k in range(cfg.accum):
            torch._foreach_copy_(buffers, start)
            out.append(micro(k, draws[k]))
            if k == 0:
                first, change = torch._foreach_mul(buffers, 1.0), torch._foreach_mul(buffers, 0.0)
            else:
                torch._foreach_add_(change, torch._foreach_sub(buffers, first))
        torch._foreach_div_(change, cfg.accum)
        torch._foreach_copy_(buffers, torch._foreach_add(first, change))
        return out

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

    def _d_step(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None]], dict]:
        """The logistic D loss with bCR on this step's reals (returned for R1) and fresh fakes."""
        gain = 1 / self.cfg.accum
        requires_grad(self.G, False)
        requires_grad(self.d_params, True)
        self.d_opt.zero_grad(set_to_none=True)
        reals = [self._reals() for _ in range(self.cfg.accum)]

        def micro(k, draws):
            terms = self.loss.d_micro(*reals[k], *self._latents(draws), draws, gain)
            if self.ada is not None:
                self.ada.accumulate(terms["real_logits"])
            return terms

        terms = self._accumulate("d", micro)
        d_loss, bcr = _mean(t["d_loss"] for t in terms), _mean(t["bcr"] for t in terms)
        norm = self._finish(self.d_opt, self.D, d_loss + bcr, "D loss", self.cfg.d_clip)
        # r_t = E[sign(D(real))], ADA's overfitting heuristic, logged for every run: over every micro-batch
        # of the step (equal sizes), the logits ADA's controller accumulates.
        return reals, {"d_loss": d_loss, "bcr": bcr, "d_grad_norm": norm,
                       "r_t": _mean(t["real_logits"].sign().float().mean() for t in terms),
                       "real_logits": _mean(t["real_logits"].float().mean() for t in terms),
                       "fake_logits": _mean(t["fake_logits"].float().mean() for t in terms)}

    def _r1_step(self, reals: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """Lazy R1 on the D step's reals, its own optimizer step."""
        self.d_opt.zero_grad(set_to_none=True)
        gain = 1 / len(reals)
        r1 = _mean(self._accumulate("r1", lambda k, draws: self.loss.r1_micro(*reals[k], draws, gain)))
        self._finish(self.d_opt, self.D, r1, "R1")
        return r1

    def _g_step(self) -> dict:
        """The non-saturating G loss through a frozen D."""
        gain = 1 / self.cfg.accum
        requires_grad(self.G, True)
        requires_grad(self.d_params, False)
        self.g_opt.zero_grad(set_to_none=True)
        loss = _mean(self._accumulate("g", lambda k, draws: self.loss.g_micro(*self._latents(draws), draws, gain)))
        return {"g_loss": loss, "g_grad_norm": self._finish(self.g_opt, self.G, loss, "G loss")}

    def step(self) -> dict:
        """One training step at the current lr factor; returns its statistics (device tensors)."""
        cfg, state = self.cfg, self.state
        reals, stats = self._d_step()
        if state.step % cfg.r1_interval == 0 and cfg.r1_gamma > 0:
            stats["r1"] = self._r1_step(reals)
        stats.update(self._g_step())
        dist.average_buffers(self._buffers())
        update_ema(self.G_ema, self.G, ema_beta(cfg.ema_half_life))
        shown = cfg.batch * cfg.accum * self.info.world  # real images of this step over all ranks
        state.step += 1
        state.images += shown
        if self.pipe is not None:
            stats["aug_p"] = self.ada.p if self.ada is not None else cfg.aug_p
        if self.ada is not None:
            self.ada.maybe_update(state.step, shown, reduce=dist.sum_)
        return stats

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> Path:
        together = False  # whether every rank leaves at this point (then they tear down together)
        try:
            with GracefulStop() as stop:
                self._loop(stop)
            together = True
        except (NonFiniteError, TrainingStopped) as exc:  # decided on every rank at the same step
            together = True
            if isinstance(exc, NonFiniteError):
                last = latest_checkpoint(self.ckpt_root)
                self.log.line(f"stopped: {exc}; the newest checkpoint is {last.name if last else 'none'}")
            raise
        finally:
            self.log.close()
            # Ranks leave together: tearing the process group down while another rank still writes
            # (the last checkpoint, the log) can abort that rank inside gloo. Not after an error on
            # one rank alone, where the others would wait for it until the timeout.
            if together:
                dist.barrier()
            dist.shutdown()
            torch.use_deterministic_algorithms(self._deterministic_before)
        return self.run_dir

    def _loop(self, stop: GracefulStop) -> None:
        cfg, state = self.cfg, self.state
        model = (f"preset {cfg.preset}" if cfg.preset is not None else f"model from {cfg.init}") + f" at {self.g_cfg.size_text}"
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
            stats = self.step()
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
                raise TrainingStopped(signame, state.step, saved)
            if self._metrics_due():
                self._metrics()
        self.log.line(f"done: {state.step} steps, {state.images:,} images" + (f", {self.skipped} skipped" if self.skipped else ""))

    def _tick(self, window: list[dict], sec_per_step: float, factor: float) -> None:
        # Every rank's statistics of its own images, averaged: the numbers of the whole batch.
        means = dist.mean_over_ranks(_window_means(window), self.device)
        if not self.info.is_main:
            return
        step, images = self.state.step, self.state.images
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
        rows, cols = self.cfg.grid
        if not self.cond:
            n = min(rows * cols, len(self.dataset))
            save_image_grid(torch.stack([self.dataset[i] for i in range(n)]), self.run_dir / "reals.png", self.cfg.grid)
            return
        # One row per class (the first classes when there are more than rows), black where a class runs out.
        classes = self._grid_classes()
        images = torch.zeros(len(classes) * cols, 3, *self.g_cfg.shape, dtype=torch.uint8)
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
            results = {}
            for name in self.cfg.metrics:
                results.update(calc_metric(name, self.G_ema, self.cfg.data, extractor=self.inception, batch=self.cfg.batch))
            self.log.stats({"step": self.state.step, "kimg": self.state.images / 1000, **results})
            self.log.line(f"step {self.state.step} metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        dist.barrier()

    def _save(self) -> Path | None:
        """Write a checkpoint of this step (collective: every rank's random state and weight digest)."""
        modules = self.nets.modules()
        if self.cond:  # the class means truncation moves toward, stored with the model (every rank: same weights)
            self.G.compute_class_w_avg()
            self.G_ema.compute_class_w_avg()
        gathered = dist.gather_objects((capture_rng(self.device), weights_digest(modules)))
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
                    path = save_training_checkpoint(self.ckpt_root, self.state, modules, self.nets.optimizers(), rng, digests,
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


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh CPU tensor on ``device``, without a host synchronization on CUDA.

    A blocking host-to-device copy waits for every kernel queued before it (cudaMemcpyAsync, then a
    stream synchronization); from pinned memory with ``non_blocking`` it is only queued (the caching
    host allocator keeps the pinned block until the copy has run). Elsewhere ``t.to(device)``.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _mean(values) -> torch.Tensor:
    """The mean of equal-weight values (micro-batches): the value itself for one."""
    values = list(values)
    return values[0] if len(values) == 1 else torch.stack(values).mean()


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
