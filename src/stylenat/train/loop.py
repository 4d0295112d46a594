"""The training loop: one D step (plus lazy R1), one G step and an EMA update per step.

``train(config)`` starts a run directory, ``resume(run_dir)`` continues the latest checkpoint of
one. Every random draw (latents, bCR augmentation) comes from one CPU generator per rank and the
data order from a seeded stream (``ShardedStream``); both states are in the checkpoints, so a
resumed run produces bitwise the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import dataclasses
import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stylenat.models.io import read_model_file, save_model
from stylenat.train import dist
from stylenat.train.augment import bcr_augment
from stylenat.train.checkpoint import (
    MODEL_FILE,
    capture_rng,
    latest_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
    save_checkpoint,
)
from stylenat.train.config import TrainConfig
from stylenat.train.ema import ema_beta, update_ema
from stylenat.train.losses import consistency_loss, d_logistic_loss, g_nonsaturating_loss, r1_penalty
from stylenat.train.optim import lr_factor, make_adam, requires_grad, set_lr_factor
from stylenat.train.runlog import RunLog, format_duration, peak_memory_gib
from stylenat.train.sampler import ShardedStream

STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"


class NonFiniteError(RuntimeError):
    """A loss or gradient norm became NaN/inf; the run stopped without writing a checkpoint."""


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill ``generator``/``discriminator`` with the full model configs (preset + overrides)."""
    from stylenat.models import DiscriminatorConfig, GeneratorConfig, get_preset

    g_cfg, d_cfg = get_preset(config.preset)
    g_cfg = GeneratorConfig.from_dict({**g_cfg.to_dict(), **config.generator})
    d_cfg = DiscriminatorConfig.from_dict({**d_cfg.to_dict(), **config.discriminator})
    if g_cfg.resolution != d_cfg.resolution:
        raise ValueError(f"generator resolution {g_cfg.resolution} differs from discriminator resolution {d_cfg.resolution}")
    return dataclasses.replace(config, generator=g_cfg.to_dict(), discriminator=d_cfg.to_dict())


def train(config: TrainConfig) -> Path:
    """Train from scratch into ``config.run_dir`` (which must hold no checkpoint yet)."""
    run_dir = Path(config.run_dir)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; continue it with `stylenat train --resume {run_dir}` or pick a new --run-dir")
    return _Trainer(resolve_config(config), resume=False).run()


def resume(run_dir: str | Path, steps: int | None = None) -> Path:
    """Continue the run in ``run_dir`` from its latest checkpoint, optionally to a new step count."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.json'} not found; is {run_dir} a run directory?")
    config = TrainConfig.load(run_dir / "config.json")
    config = dataclasses.replace(config, run_dir=str(run_dir), steps=steps or config.steps)
    return _Trainer(config, resume=True).run()


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
        self.step, self.images, self.consumed = 0, 0, 0

        self.log = RunLog(self.run_dir, self.info.is_main)
        # Loaded up front so that missing Inception weights stop the run before any training.
        self.inception = None
        if cfg.metrics and self.info.is_main:
            from stylenat.metrics.inception import load_inception

            self.inception = load_inception(cfg.inception, device=self.device)
        if resume:
            self._load(latest_checkpoint(self.ckpt_root))
        elif self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.info.is_main:
            cfg.save(self.run_dir / "config.json")

        self.stream = ShardedStream(len(self.dataset), cfg.seed, self.info.rank, self.info.world, self.consumed)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch, sampler=self.stream, num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=cfg.workers > 0,
            # Its own generator for worker seeds, so the global torch RNG (saved in checkpoints) is left alone.
            generator=torch.Generator().manual_seed(rank_seed),
        )
        self.batches = iter(loader)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else nullcontext()
        )

    # ---- one step ------------------------------------------------------------------------------

    def _reals(self) -> torch.Tensor:
        from stylenat.models import uint8_to_model

        self.consumed += self.cfg.batch
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
        message = f"step {self.step}: non-finite {what} (loss {loss.item():.4g}, grad norm {norm.item():.4g})"
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
            self._loop()
        except NonFiniteError as exc:
            self.log.line(f"stopped: {exc}; no checkpoint written since step {self.step - self.step % self.cfg.checkpoint_every}")
            raise
        finally:
            self.log.close()
            dist.shutdown()
        return self.run_dir

    def _loop(self) -> None:
        cfg = self.cfg
        beta = ema_beta(cfg.ema_half_life)
        self.skipped = 0
        if self.info.is_main:
            self.log.line(f"{'resuming at' if self.step else 'starting'} step {self.step} of {cfg.steps}: preset {cfg.preset}, "
                          f"{len(self.dataset)} images ({cfg.data}), batch {cfg.batch} x accum {cfg.accum} x {self.info.world} "
                          f"rank(s) on {self.device}, G {_count(self.G):,} / D {_count(self.D):,} params")
            if self.step == 0:
                self._write_reals()
                self._write_fakes()
        window, t_tick, step_at_tick = [], time.perf_counter(), self.step
        while self.step < cfg.steps:
            factor = lr_factor(self.step, cfg.lr_decay_start, cfg.steps)
            set_lr_factor(self.d_opt, factor)
            set_lr_factor(self.g_opt, factor)
            reals, stats = self._d_step()
            if self.step % cfg.r1_interval == 0 and cfg.r1_gamma > 0:
                stats["r1"] = self._r1_step(reals)
            stats["g_loss"] = self._g_step()
            dist.average_buffers(self.G)
            dist.average_buffers(self.D)
            update_ema(self.G_ema, self.G, beta)
            self.step += 1
            self.images += cfg.batch * cfg.accum * self.info.world
            window.append(stats)

            if self.step % cfg.tick_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - t_tick
                self._tick(window, elapsed / (self.step - step_at_tick), factor)
                window, t_tick, step_at_tick = [], time.perf_counter(), self.step
            if self.step % cfg.sample_every == 0 or self.step == cfg.steps:
                self._write_fakes()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self._save()
            if cfg.metrics and (self.step % cfg.metrics_every == 0 or self.step == cfg.steps):
                self._metrics()
        self.log.line(f"done: {self.step} steps, {self.images:,} images" + (f", {self.skipped} skipped" if self.skipped else ""))
        # Ranks leave together: tearing the process group down while rank 0 still writes the last
        # checkpoint can abort the other ranks inside gloo.
        dist.barrier()

    def _tick(self, window: list[dict], sec_per_step: float, factor: float) -> None:
        if not self.info.is_main:
            return
        keys = sorted({k for s in window for k in s})
        means = {k: float(torch.stack([torch.as_tensor(s[k]).float().cpu() for s in window if k in s]).mean()) for k in keys}
        img_s = self.cfg.batch * self.cfg.accum * self.info.world / sec_per_step
        record = {"step": self.step, "kimg": self.images / 1000, **means,
                  "lr_d": self.d_opt.param_groups[0]["lr"], "lr_g": self.g_opt.param_groups[0]["lr"], "lr_factor": factor,
                  "img_per_s": img_s, "sec_per_step": sec_per_step, "peak_mem_gib": peak_memory_gib(self.device)}
        self.log.stats(record)
        eta = format_duration((self.cfg.steps - self.step) * sec_per_step)
        r1 = f" r1 {means['r1']:.4f}" if "r1" in means else ""
        self.log.line(f"step {self.step}/{self.cfg.steps} kimg {self.images / 1000:.1f} d {means['d_loss']:.3f} "
                      f"g {means['g_loss']:.3f} bcr {means['bcr']:.3f}{r1} | {img_s:.1f} img/s "
                      f"{record['peak_mem_gib']:.2f} GiB | eta {eta}")

    # ---- files ---------------------------------------------------------------------------------

    def _write_reals(self) -> None:
        from stylenat.data import save_image_grid

        n = min(self.cfg.grid[0] * self.cfg.grid[1], len(self.dataset))
        save_image_grid(torch.stack([self.dataset[i] for i in range(n)]), self.run_dir / "reals.png", self.cfg.grid)

    @torch.no_grad()
    def _write_fakes(self) -> None:
        """g_ema on fixed latents: image i of the grid uses torch.Generator seeded with i."""
        if not self.info.is_main:
            return
        from stylenat.data import save_image_grid
        from stylenat.models import model_to_uint8

        n = self.cfg.grid[0] * self.cfg.grid[1]
        z = torch.cat([torch.randn(1, self.g_cfg.style_dim, generator=torch.Generator().manual_seed(i)) for i in range(n)])
        images = [model_to_uint8(self.G_ema(chunk.to(self.device)), self.g_cfg).cpu() for chunk in z.split(self.cfg.batch)]
        save_image_grid(torch.cat(images), self.run_dir / f"fakes_{self.step:09d}.png", self.cfg.grid)

    def _metrics(self) -> None:
        """Metrics of g_ema on rank 0; they draw from their own seeded generators, not the run's."""
        if self.info.is_main:
            from stylenat.metrics.registry import calc_metric

            results = {}
            for name in self.cfg.metrics:
                results.update(calc_metric(name, self.G_ema, self.cfg.data, extractor=self.inception, batch=self.cfg.batch))
            self.log.stats({"step": self.step, "kimg": self.images / 1000, **results})
            self.log.line(f"step {self.step} metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        dist.barrier()

    def _save(self) -> None:
        modules = {"g": self.G, "g_ema": self.G_ema, "d": self.D}
        gathered = dist.gather_objects((capture_rng(self.gen, self.device), weights_digest(modules)))
        if not self.info.is_main:
            return
        rng, digests = [r for r, _ in gathered], [d for _, d in gathered]
        if len(set(digests)) > 1:  # cannot happen unless a collective misbehaves; say so loudly
            self.log.line(f"warning: ranks hold different weights at step {self.step}: {digests}")
        g_flat, g_meta = optimizer_to_flat(self.g_opt, "g_opt")
        d_flat, d_meta = optimizer_to_flat(self.d_opt, "d_opt")
        state = {**g_flat, **d_flat}
        for rank, (tensors, _) in enumerate(rng):
            state.update({f"rng.{rank}.{k}": v for k, v in tensors.items()})
        meta = {"step": self.step, "images": self.images, "consumed_per_rank": self.consumed, "world": self.info.world, "rank_digests": digests,
                "optimizers": {"g_opt": g_meta, "d_opt": d_meta}, "rng": [m for _, m in rng], "config": self.cfg.to_dict()}

        def write(directory: Path) -> None:
            save_model(directory / MODEL_FILE, modules, self.g_cfg, self.d_cfg,
                       extra={"step": self.step, "images": self.images})
            save_file(state, str(directory / STATE_FILE))
            (directory / STATE_JSON).write_text(json.dumps(meta))

        path = save_checkpoint(self.ckpt_root, self.step, write, self.cfg.keep)
        self.log.line(f"checkpoint {path}")

    def _load(self, path: Path | None) -> None:
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.ckpt_root}; start the run again without --resume")
        meta = json.loads((path / STATE_JSON).read_text())
        if meta["world"] != self.info.world:
            raise ValueError(f"{path} was written by {meta['world']} process(es); resume it with the same number "
                             f"(now {self.info.world}) so data order and random streams continue exactly")
        _, weights = read_model_file(path / MODEL_FILE)
        for name, module in (("g", self.G), ("g_ema", self.G_ema), ("d", self.D)):
            module.load_state_dict(weights[name])
        state = load_file(str(path / STATE_FILE))
        optimizer_from_flat(self.g_opt, state, meta["optimizers"]["g_opt"], "g_opt")
        optimizer_from_flat(self.d_opt, state, meta["optimizers"]["d_opt"], "d_opt")
        prefix = f"rng.{self.info.rank}."
        restore_rng(self.gen, self.device, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                    meta["rng"][self.info.rank])
        self.step, self.images, self.consumed = meta["step"], meta["images"], meta["consumed_per_rank"]
        self.log.truncate_after(self.step)
        self.log.line(f"loaded {path}")


def weights_digest(modules: dict[str, nn.Module]) -> str:
    """SHA-256 of every parameter and buffer, in state-dict order (equal digests: bitwise-equal weights)."""
    h = hashlib.sha256()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            h.update(f"{name}.{key}".encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
