"""Model configurations (frozen dataclasses) and the named presets.

A configuration states every number the architecture needs, per synthesis stage; stage s works at
resolution 4 * 2**s, from 4 up to ``resolution``. Presets are data: the official FFHQ/Church
models (the paper's FFHQ and LSUN Church configurations) and ``tiny``, a model that trains visibly on a laptop CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stylenat._config import JsonConfig, param
from stylenat.errors import ConfigError

__all__ = ["GeneratorConfig", "DiscriminatorConfig", "PRESETS", "FAMILIES", "FAMILY_RESOLUTIONS", "family_advice", "get_preset",
           "stage_resolutions"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def stage_resolutions(resolution: int) -> list[int]:
    """4, 8, ..., resolution; ConfigError unless resolution is a power of two >= 8."""
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 8 or resolution & (resolution - 1):
        raise ConfigError(f"resolution must be a power of two >= 8, got {resolution!r}")
    return [2**i for i in range(2, int(math.log2(resolution)) + 1)]


def _check_len(cfg, name: str, n: int) -> None:
    if len(getattr(cfg, name)) != n:
        raise ConfigError(f"{cfg._where(name)} needs one entry per stage (resolutions 4..{cfg.resolution}), i.e. {n}, "
                          f"got {len(getattr(cfg, name))}")


@dataclass(frozen=True)
class GeneratorConfig(JsonConfig):
    """Everything the generator's architecture needs.

    Args:
        resolution: output image edge in pixels (power of two >= 8).
        channels: feature channels per stage (resolutions 4, 8, ..., resolution).
        heads: attention heads per stage; channels must divide by them.
        kernels: per stage, one NA kernel per head group; a kernel equal to the stage
            resolution is full attention (the 4x4 stage: kernel 4).
        dilations: per stage, one dilation per head group (same length as that stage's kernels).
        style_dim: size of z and w.
        n_mlp: linear layers in the mapping network.
        lr_mlp: learning-rate multiplier of the mapping network (equalized lr).
        mlp_ratio: hidden width of each block's MLP over its channels.
        image_mean: per RGB channel, the mean of the model's output space (pixel = out*std + mean).
        image_std: per RGB channel, the std of the model's output space.
        num_classes: classes of a class-conditional model (a label embedding joins z in the
            mapping network); 0: unconditional, exactly the official architecture.
        class_names: the classes' names, by index (empty: "0", "1", ...).
    """

    resolution: int
    channels: tuple[int, ...] = param(min=1)
    heads: tuple[int, ...] = param(min=1)
    kernels: tuple[tuple[int, ...], ...] = param(min=1)
    dilations: tuple[tuple[int, ...], ...] = param(min=1)
    style_dim: int = param(512, min=1)
    n_mlp: int = param(8, min=1)
    lr_mlp: float = param(0.01, gt=0)
    mlp_ratio: float = param(4.0, gt=0)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = param(IMAGENET_STD, gt=0)
    num_classes: int = param(0, min=0)
    class_names: tuple[str, ...] = ()

    def attention_layers(self) -> list[dict]:
        """One entry per (stage, head group): what each of its NA calls looks like.

        Keys: resolution (map edge), heads (of the group), head_dim, kernel, dilation, calls (NA
        calls of this shape per image: the stage's blocks).
        """
        from stylenat.nn.attention import split_heads

        layers = []
        for r, c, heads, ks, ds in zip(stage_resolutions(self.resolution), self.channels, self.heads,
                                       self.kernels, self.dilations):
            for nh, k, d in zip(split_heads(heads, len(ks)), ks, ds):
                layers.append({"resolution": r, "heads": nh, "head_dim": c // heads, "kernel": k, "dilation": d,
                               "calls": 2})
        return layers

    def _check(self):
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(f"GeneratorConfig.class_names has {len(self.class_names)} names for {self.num_classes} classes")
        res = stage_resolutions(self.resolution)
        for name in ("channels", "heads", "kernels", "dilations"):
            _check_len(self, name, len(res))
        for r, c, h, ks, ds in zip(res, self.channels, self.heads, self.kernels, self.dilations):
            if c % h:
                raise ConfigError(f"GeneratorConfig stage {r}x{r}: {c} channels do not split into {h} heads")
            if r > 4 and (c < 8 or c % 4):
                raise ConfigError(f"GeneratorConfig stage {r}x{r}: position codes need channels a multiple of 4 and >= 8, got {c}")
            if len(ks) != len(ds) or not ks:
                raise ConfigError(f"GeneratorConfig stage {r}x{r}: kernels {ks} and dilations {ds} need one entry per head group")
            if len(ks) > h:
                raise ConfigError(f"GeneratorConfig stage {r}x{r}: {len(ks)} head groups but only {h} heads")
            for k, d in zip(ks, ds):
                if k * d > r or (k % 2 == 0 and k * d != r):
                    raise ConfigError(
                        f"GeneratorConfig stage {r}x{r}: kernel {k} with dilation {d} does not fit "
                        f"(need odd kernel and kernel * dilation <= {r}, or kernel == {r} for full attention)"
                    )

    @property
    def num_ws(self) -> int:
        """Latents the synthesis network reads: 2 per stage (one per block)."""
        return 2 * len(self.channels)

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, by index ("0", "1", ... when none were stored); empty when unconditional."""
        return self.class_names or tuple(str(i) for i in range(self.num_classes))



@dataclass(frozen=True)
class DiscriminatorConfig(JsonConfig):
    """Everything StyleSwin's wavelet discriminator needs.

    Args:
        resolution: input image edge in pixels (power of two >= 16).
        channels: channels per resolution 4, 8, ..., resolution (the official table: the first
            from-RGB at resolution/2 uses channels[resolution]; the block ending at r uses channels[r]).
        stddev_group: minibatch-stddev group size (the batch must divide by min(batch, group)).
        num_classes: classes of a class-conditional discriminator (a projection of a learned class
            embedding onto its last features, Miyato & Koyama 2018); 0: unconditional.
    """

    resolution: int
    channels: tuple[int, ...] = param(min=1)
    stddev_group: int = param(4, min=1)
    num_classes: int = param(0, min=0)

    def _check(self):
        _check_len(self, "channels", len(stage_resolutions(self.resolution)))
        if self.resolution < 16:
            # The wavelet input is already at resolution/2; below 16 no conv block is left before 4x4.
            raise ConfigError(f"DiscriminatorConfig.resolution must be at least 16, got {self.resolution}")

    def channels_at(self, res: int) -> int:
        return self.channels[int(math.log2(res)) - 2]

    @property
    def num_blocks(self) -> int:
        """Blocks (from-RGB plus conv block, one per scale) before the 4x4 output block."""
        return int(math.log2(self.resolution)) - 3


# ---- presets ----------------------------------------------------------------------------------

# Official channel table (channel multiplier 2), resolutions 4 .. 1024.
_OFFICIAL_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}


def _official(resolution: int, min_heads: int, dilations_at) -> tuple[GeneratorConfig, DiscriminatorConfig]:
    """Official model at ``resolution``; ``dilations_at(r)`` gives the head-group dilations of stage r."""
    res = stage_resolutions(resolution)
    channels = tuple(_OFFICIAL_CHANNELS[r] for r in res)
    dils = tuple((1,) if r == 4 else tuple(dilations_at(r)) for r in res)
    kernels = tuple((4,) if r == 4 else (7,) * len(d) for r, d in zip(res, dils))
    g = GeneratorConfig(
        resolution=resolution,
        channels=channels,
        heads=tuple(max(c // 32, min_heads) for c in channels),
        kernels=kernels,
        dilations=dils,
    )
    return g, official_discriminator(resolution)


def official_discriminator(resolution: int) -> DiscriminatorConfig:
    """The official discriminator at ``resolution`` (its channel table), e.g. for a model stored without one."""
    return DiscriminatorConfig(resolution=resolution, channels=tuple(_OFFICIAL_CHANNELS[r] for r in stage_resolutions(resolution)))


def _ffhq_dilations(r: int) -> tuple[int, int]:
    # The released FFHQ models use two head groups everywhere; at 8x8 both are dense (k7, d1).
    return (1, max(1, r // 8))


def _pyramid_dilations(r: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(int(math.log2(r // 8)) + 1))


def _tiny() -> tuple[GeneratorConfig, DiscriminatorConfig]:
    # 32x32 with Hydra groups at 16 and 32, sized so a G+D step at batch 16 takes about 0.3 s on
    # one CPU thread: the 32x32 attention dominates, hence few channels and k3 there.
    g = GeneratorConfig(
        resolution=32,
        channels=(64, 32, 32, 16),
        heads=(2, 2, 2, 2),
        kernels=((4,), (5,), (5, 5), (3, 3)),
        dilations=((1,), (1,), (1, 2), (1, 4)),
        style_dim=64,
        n_mlp=2,
    )
    return g, DiscriminatorConfig(resolution=32, channels=(64, 64, 32, 16))


# Families: the official architecture rule at any power-of-two resolution (16..1024).
FAMILIES = {
    "ffhq": lambda r: _official(r, 4, _ffhq_dilations),  # min 4 heads, groups with dilations 1 and r/8
    "church": lambda r: _official(r, 8, _pyramid_dilations),  # min 8 heads, dilations 1, 2, 4, ..., r/8
}
FAMILY_RESOLUTIONS = tuple(2**i for i in range(4, 11))

PRESETS = {
    "ffhq256": lambda: FAMILIES["ffhq"](256),
    "ffhq1024": lambda: FAMILIES["ffhq"](1024),
    "church256": lambda: FAMILIES["church"](256),
    "tiny": _tiny,
}


def get_preset(name: str, resolution: int | None = None) -> tuple[GeneratorConfig, DiscriminatorConfig]:
    """(GeneratorConfig, DiscriminatorConfig) of a named preset, or of a family at ``resolution``.

    Args:
        name: a preset of PRESETS (fixed resolution) or a family of FAMILIES ("ffhq", "church").
        resolution: image edge for a family (16..1024, a power of two); for a named preset it may
            only repeat the preset's own resolution.
    """
    if name in FAMILIES:
        if resolution is None:
            # Reached by library calls and by official checkpoints (generate, convert-official, train --init):
            # `stylenat train` sizes a family itself (--resolution or the data) before it gets here.
            named = ", ".join(n for n in PRESETS if n.startswith(name))
            raise ConfigError(f"preset {name!r} is a family of models ({FAMILY_RESOLUTIONS[0]}..{FAMILY_RESOLUTIONS[-1]} "
                              f"pixels), not one model: use a named preset ({named}), or in Python get_preset({name!r}, "
                              "resolution); an official checkpoint needs the named preset it was trained with, or --meta "
                              "META.json")
        if resolution not in FAMILY_RESOLUTIONS:
            raise ConfigError(f"preset {name!r} exists at resolutions {', '.join(map(str, FAMILY_RESOLUTIONS))}, "
                              f"not {resolution!r}{_nearest_sizes(resolution)}")
        return FAMILIES[name](resolution)
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS) + sorted(FAMILIES))}")
    g, d = PRESETS[name]()
    if resolution is not None and resolution != g.resolution:
        family = next((f for f in FAMILIES if name.startswith(f)), "ffhq")
        raise ConfigError(f"preset {name!r} is {g.resolution}x{g.resolution}; {family_advice(family, resolution)}")
    return g, d


def _nearest_sizes(resolution) -> str:
    if not isinstance(resolution, int):
        return ""
    below = [r for r in FAMILY_RESOLUTIONS if r < resolution]
    above = [r for r in FAMILY_RESOLUTIONS if r > resolution]
    near = ([str(below[-1])] if below else []) + ([str(above[0])] if above else [])
    return f" (nearest: {' or '.join(near)}; stylenat prepare SRC DST --size N resizes the data)" if near else ""


def family_advice(family: str, resolution: int) -> str:
    """What to train a model of ``resolution`` with: the family at that size where it exists, else
    the allowed sizes nearest to it (never advice that would be refused)."""
    if resolution in FAMILY_RESOLUTIONS:
        return f"for {resolution}x{resolution} use --preset {family} --resolution {resolution}"
    return (f"no preset is {resolution}x{resolution}: the {family} family exists at "
            f"{', '.join(map(str, FAMILY_RESOLUTIONS))}{_nearest_sizes(resolution)}")
