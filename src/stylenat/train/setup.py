"""A run's set-up, before its first step: the config resolved against the data and any init model,
the networks built (or loaded) with FreezeD applied, the optimizers, and the kernels' determinism.

:func:`resolve_config` turns what the user asked for into the full model configs a run directory
stores; the rest builds what :class:`stylenat.train.loop` then runs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import zipfile

import numpy as np
import torch
from torch import nn

from stylenat._system import file_sha256
from stylenat.data import dataset_classes, native_resolution
from stylenat.errors import ConfigError
from stylenat.metrics.registry import parse_metric
from stylenat.models import (FAMILIES, PRESETS, DiscriminatorConfig, GeneratorConfig, build_discriminator, build_generator,
                             get_preset, resolve_models)
from stylenat.models.config import family_advice, official_discriminator, parse_size, size_flag, size_text
from stylenat.models.loading import model_source_file
from stylenat.train import dist
from stylenat.train.ada import resamples
from stylenat.train.config import TrainConfig
from stylenat.train.optim import make_adam, requires_grad

_REQUIRED = {"generator": ("resolution", "channels", "heads", "kernels", "dilations"), "discriminator": ("resolution", "channels")}


def resolve_config(config: TrainConfig, init: dict[str, nn.Module] | None = None) -> TrainConfig:
    """The config with ``generator``/``discriminator`` filled with the full model configs and
    ``resolution`` set, checked against the data.

    The model configs come from ``init`` (the modules a fine-tuning run starts from), else from
    complete ``generator``/``discriminator`` dicts (a run's config.json), else from the preset
    (a family sized by ``resolution`` or by the data) with the dicts as overrides.
    """
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
            raise ConfigError(f"--resolution {size_flag(config.resolution)}: the model from --init {config.init} is "
                              f"{size_text(r)} and fine-tuning keeps its size; drop --resolution and use data at "
                              f"{size_text(r)} (stylenat prepare SRC DST --size {size_flag(r)})")
        if config.cbase is not None or config.cmax is not None:
            raise ConfigError(f"--cbase/--cmax shape a new family model; the model from --init {config.init} keeps its "
                              "width: drop them")
        # A preset with --init must describe the model (it then also picks the training recipe); an
        # official checkpoint read by preset name got its config from that preset (its head groups
        # adapted to the checkpoint's), so it is not compared again.
        preset = None
        if config.preset is not None and config.init_preset is None:
            preset = get_preset(config.preset, r if config.preset in FAMILIES else None, **_width(config))
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
        asked = {parse_size(r, where) for r, where in ((config.resolution, "--resolution"),
                                                      (g_over.pop("resolution", None), "--generator resolution"),
                                                      (d_over.pop("resolution", None), "--discriminator resolution"))
                 if r is not None}
        if len(asked) > 1:
            raise ConfigError(f"conflicting resolutions {', '.join(sorted(map(size_text, asked)))} (--resolution, "
                              "--generator, --discriminator)")
        resolution = asked.pop() if asked else None
        if config.preset in FAMILIES and resolution is None:
            if data_res is None or not binding:
                what = "the built-in demo" if str(config.data) == "demo" else \
                    f"its images are {size_text(data_res)}, not a model size" if data_res else "its images differ in size"
                raise ConfigError(f"cannot size the {config.preset} model from {config.data} ({what}): give --resolution "
                                  "N or WxH (images are then cropped and resized to it), or prepare the data with "
                                  "stylenat prepare --size N or WxH")
            resolution = data_res
        if config.preset not in FAMILIES and _width(config):
            raise ConfigError(f"--cbase/--cmax shape a family model; --preset {config.preset} has a fixed width: use "
                              "--preset ffhq or church")
        g_cfg, d_cfg = get_preset(config.preset, resolution, **_width(config))
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
        raise ConfigError(f"generator size {size_text(r)} differs from discriminator size {d_cfg.size_text}")
    if binding and data_res != r and init is not None:  # a fine-tuned model keeps its size: the data must fit it
        raise ConfigError(f"{config.data} holds {size_text(data_res)} images but the model is {size_text(r)} (from "
                          f"--init {config.init}), and fine-tuning keeps the model's size: prepare the data at "
                          f"{size_text(r)} (stylenat prepare SRC DST --size {size_flag(r)})")
    if binding and data_res != r:
        raise ConfigError(f"{config.data} holds {size_text(data_res)} images but the model is {size_text(r)}: prepare "
                          f"the data at {size_text(r)} (stylenat prepare SRC DST --size {size_flag(r)}), or train at the "
                          f"data's size ({family_advice('ffhq', data_res).removeprefix(f'for {size_text(data_res)} ')})")
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
        raise ConfigError(f"--freeze-d {config.freeze_d}: the {size_text(r)} discriminator has {d_cfg.num_blocks} blocks "
                          "before its output block")
    return config.replace(resolution=r, generator=g_cfg.to_dict(), discriminator=d_cfg.to_dict())


def _width(config: TrainConfig) -> dict:
    """The family width options given (cbase, cmax)."""
    return {k: getattr(config, k) for k in ("cbase", "cmax") if getattr(config, k) is not None}


def _check_init_preset(config: TrainConfig, model_cfg, preset_cfg, what: str) -> None:
    """ConfigError unless the init model's ``what`` config is the preset's (classes aside: a preset has none)."""

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


def check_metrics(config: TrainConfig) -> None:

    for name in config.metrics:
        parse_metric(name)


def load_init(config: TrainConfig) -> tuple[TrainConfig, dict[str, nn.Module]]:
    """The modules a fine-tuning run starts from, and the config recording their source and digest."""

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

    family = config.init_preset
    if family not in FAMILIES:
        return family
    size = config.resolution if config.resolution is not None else native_resolution(config.data)[0]
    named = [n for n in PRESETS if n.startswith(family)]
    if size is not None and f"{family}{size}" in PRESETS:
        return f"{family}{size}"
    where = (f"there is no named {family} preset at {size_text(size)}" if size is not None else
             f"the size is not known ({config.data} does not set it and --resolution is not given)")
    raise ConfigError(f"--preset {family} is a family, and an official checkpoint is read with the named preset it was "
                      f"trained with ({', '.join(named)}) or --meta META.json; {where}")


def check_deterministic_support(cfg: TrainConfig, device: str | torch.device) -> None:
    """ConfigError when ``cfg.deterministic`` asks ``device`` for a kernel torch does not have deterministically.

    The one case: ADA's geometric transforms (``aug_pipe`` with 'g') resample with ``F.grid_sample``,
    whose CUDA backward is nondeterministic only, so ``torch.use_deterministic_algorithms`` would make
    the first step that draws one raise, possibly hours into the run. Checked with the device the run
    will use (a string such as "cuda:0" works too, so it is testable without one).
    """

    device = torch.device(device)
    if not (cfg.deterministic and device.type == "cuda" and cfg.aug == "ada" and cfg.aug_p != 0):
        return
    if resamples(cfg.aug_pipe):
        raise ConfigError(f"--deterministic with --aug ada on {device}: ADA's geometric transforms (aug_pipe "
                          f"'{cfg.aug_pipe}' has 'g') resample with F.grid_sample, whose backward has no deterministic "
                          "CUDA kernel, so training would fail at the first augmented step; drop --deterministic, or "
                          f"use transforms without geometry (--set aug_pipe={cfg.aug_pipe.replace('g', '') or 'b'})")


def use_deterministic_kernels(device: torch.device) -> None:
    """Ask torch for deterministic kernels (an op without one then raises instead of varying)."""
    if device.type == "cuda":
        # cuBLAS reads this when its handle is created, i.e. before the first matrix product.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)




@dataclasses.dataclass
class Networks:
    """What a run trains: G and D (training mode), G_ema (eval mode, no gradients) on the run's
    device, the D parameters that train (all but FreezeD's blocks), and both Adam optimizers (D's
    with the lazy-R1 adjustment)."""

    G: nn.Module
    G_ema: nn.Module
    D: nn.Module
    d_params: list[nn.Parameter]
    g_opt: torch.optim.Adam
    d_opt: torch.optim.Adam

    def modules(self) -> dict[str, nn.Module]:
        return {"g": self.G, "g_ema": self.G_ema, "d": self.D}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g_opt": self.g_opt, "d_opt": self.d_opt}


def build_networks(cfg: TrainConfig, device: torch.device, init: dict[str, nn.Module] | None = None) -> Networks:
    """The networks of a resolved ``cfg``: initialized from ``cfg.seed`` (torch, numpy and Python
    ``random`` seeded), or loaded from ``init`` (fine-tuning: every module it has; a missing D
    stays fresh), then broadcast from rank 0."""
    # Every rank builds the same initial weights from the seed; rank 0's are broadcast anyway
    # so that no backend nondeterminism in initialization can make ranks differ.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    G = build_generator(GeneratorConfig.from_dict(cfg.generator))
    D = build_discriminator(DiscriminatorConfig.from_dict(cfg.discriminator))
    G_ema = copy.deepcopy(G)
    if init is not None:
        G.load_state_dict(init.get("g", init["g_ema"]).state_dict())
        G_ema.load_state_dict(init["g_ema"].state_dict())
        if "d" in init:
            D.load_state_dict(init["d"].state_dict())
    G, D, G_ema = G.to(device).train(), D.to(device).train(), G_ema.to(device).eval()
    for module in (G, D, G_ema):
        dist.broadcast_module(module)
    requires_grad(G_ema, False)
    # FreezeD: the first blocks from the input side keep their weights; in eval mode their
    # spectral-norm vectors stay put too, so they are bitwise unchanged.
    frozen = D.input_blocks(cfg.freeze_d)
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    d_params = [p for p in D.parameters() if id(p) not in frozen_ids]
    for m in frozen:
        m.eval()
        requires_grad(m, False)
    return Networks(G, G_ema, D, d_params, make_adam(G.parameters(), cfg.g_lr, cfg.betas),
                    make_adam(d_params, cfg.d_lr, cfg.betas, cfg.r1_interval))
