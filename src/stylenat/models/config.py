"""Model configurations (frozen dataclasses) and the named presets.

A configuration states every number the architecture needs, per synthesis stage. Stage s works on
a map of (bh * 2**s) x (bw * 2**s) pixels, from the base (bh, bw) up to the image; see
:func:`stage_shapes` for which image sizes exist. Presets are data: the official FFHQ/Church
models (the paper's FFHQ and LSUN Church configurations), the families that carry their rule to
any size and width, and ``tiny``, a model that trains visibly on a laptop CPU.

Sizes: text is WIDTHxHEIGHT (``512x384``), as image tools write it; a single number is a square.
In configs, tensors and every (y, x) pair (kernels, dilations) the order is (height, width); a
config's ``resolution`` is an int for a square, else ``[height, width]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stylenat._config import JsonConfig, param
from stylenat._size import as_shape, model_base, parse_size, size_flag, size_text
from stylenat.errors import ConfigError

__all__ = ["GeneratorConfig", "DiscriminatorConfig", "PRESETS", "FAMILIES", "FAMILY_RESOLUTIONS", "FAMILY_STAGES",
           "SIZE_RULE", "family_advice", "get_preset", "stage_resolutions", "stage_shapes", "parse_size", "size_text",
           "as_shape", "size_flag", "OFFICIAL_CBASE", "OFFICIAL_CMAX"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SIZE_RULE = ("a model's width and height are bw * 2^s and bh * 2^s, its base map bw x bh 4 to 7 on the longer "
             "side (4x4 for squares of a power of two; 4x2, 4x3, 6x4, ...)")


def stage_shapes(resolution, *, min_stages: int = 2, max_stages: int | None = None) -> list[tuple[int, int]]:
    """The (height, width) of every synthesis stage, base first, image last.

    ConfigError naming the rule (:data:`SIZE_RULE`) and the nearest allowed sizes unless the size
    is one, with between ``min_stages`` and ``max_stages`` stages.
    """
    base = model_base(resolution) if isinstance(resolution, (int, tuple)) else None
    stages = None if base is None else base[2] + 1
    if base is None or stages < min_stages or (max_stages is not None and stages > max_stages):
        if isinstance(resolution, (int, tuple)) and min(as_shape(resolution)) > 0:
            near = nearest_sizes(resolution, min_stages, max_stages)
            hint = f" (nearest: {' or '.join(size_text(n) for n in near)})" if near else ""
            span = f", in {min_stages}..{max_stages} stages" if max_stages else f", with at least {min_stages} stages"
            raise ConfigError(f"{size_text(resolution)} is not a model size: {SIZE_RULE}{span}{hint}")
        raise ConfigError(f"resolution must be N or a [height, width] pair, got {resolution!r}")
    bh, bw, s = base
    return [(bh << i, bw << i) for i in range(s + 1)]


def _allowed_sizes(min_stages: int, max_stages: int | None, square: bool):
    for s in range(min_stages - 1, (max_stages or 10)):
        for big in range(4, 8):
            for small in ([big] if square else range(1, big + 1)):
                yield (big << s, small << s)
                if small != big:
                    yield (small << s, big << s)


def nearest_sizes(resolution, min_stages: int = 2, max_stages: int | None = None, n: int = 3) -> list:
    """Up to ``n`` allowed sizes nearest to ``resolution`` (squares for a square), as config sizes."""
    h, w = as_shape(resolution)
    square = h == w
    scored = sorted(_allowed_sizes(min_stages, max_stages, square),
                    key=lambda hw: (abs(math.log(hw[0] / h)) + abs(math.log(hw[1] / w)), -hw[0] * hw[1]))
    if square:  # the nearest below and the nearest above
        below = [r for r in sorted({a for a, _ in scored}) if r < h]
        above = [r for r in sorted({a for a, _ in scored}) if r > h]
        return ([below[-1]] if below else []) + ([above[0]] if above else [])
    return [parse_size(hw) for hw in scored[:n]]


def stage_resolutions(resolution: int) -> list[int]:
    """4, 8, ..., resolution for a square of a power of two >= 8 (the official models' sizes)."""
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 8 or resolution & (resolution - 1):
        raise ConfigError(f"resolution must be a power of two >= 8, got {resolution!r}")
    return [2**i for i in range(2, int(math.log2(resolution)) + 1)]


def _check_len(cfg, name: str, n: int) -> None:
    if len(getattr(cfg, name)) != n:
        raise ConfigError(f"{cfg._where(name)} needs one entry per stage ({n} stages for {size_text(cfg.resolution)}), "
                          f"got {len(getattr(cfg, name))}")


def _canonical_pairs(groups) -> tuple:
    """Per stage, per head group: a (y, x) pair with equal entries becomes its int."""
    return tuple(tuple(v[0] if isinstance(v, tuple) and v[0] == v[1] else v for v in stage) for stage in groups)


def _yx(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


class _SizedConfig(JsonConfig):
    """What both configs know about their size."""

    def __post_init__(self):
        object.__setattr__(self, "resolution", parse_size(self.resolution, f"{type(self).__name__}.resolution")
                           if isinstance(self.resolution, (str, list, tuple)) else self.resolution)
        super().__post_init__()

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return as_shape(self.resolution)

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]

    @property
    def size_text(self) -> str:
        """WIDTHxHEIGHT."""
        return size_text(self.resolution)

    def stage_shapes(self) -> list[tuple[int, int]]:
        """(height, width) per stage, base first."""
        return stage_shapes(self.resolution, min_stages=self._MIN_STAGES)


@dataclass(frozen=True)
class GeneratorConfig(_SizedConfig):
    """Everything the generator's architecture needs.

    Args:
        resolution: the image size: an int for a square, else [height, width] (``parse_size``
            reads "WIDTHxHEIGHT"); :func:`stage_shapes` says which sizes exist.
        channels: feature channels per stage (base first).
        heads: attention heads per stage; channels must divide by them.
        kernels: per stage, one NA kernel per head group, an int or a (y, x) pair; a kernel equal
            to the stage's map is full attention (the 4x4 stage of a square: kernel 4).
        dilations: per stage, one dilation per head group (an int or a (y, x) pair; same length
            as that stage's kernels).
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

    resolution: int | tuple[int, int]
    channels: tuple[int, ...] = param(min=1)
    heads: tuple[int, ...] = param(min=1)
    kernels: tuple[tuple[int | tuple[int, int], ...], ...] = param(min=1)
    dilations: tuple[tuple[int | tuple[int, int], ...], ...] = param(min=1)
    style_dim: int = param(512, min=1)
    n_mlp: int = param(8, min=1)
    lr_mlp: float = param(0.01, gt=0)
    mlp_ratio: float = param(4.0, gt=0)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = param(IMAGENET_STD, gt=0)
    num_classes: int = param(0, min=0)
    class_names: tuple[str, ...] = ()

    _MIN_STAGES = 2

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "kernels", _canonical_pairs(self.kernels))
        object.__setattr__(self, "dilations", _canonical_pairs(self.dilations))

    def attention_layers(self) -> list[dict]:
        """One entry per (stage, head group): what each of its NA calls looks like.

        Keys: resolution (the map's edge for a square map, else its (height, width)), shape
        ((height, width)), heads (of the group), head_dim, kernel, dilation (ints, or (y, x)
        pairs where the axes differ), calls (NA calls of this shape per image: the stage's blocks).
        """
        from stylenat.nn.attention import split_heads

        layers = []
        for (h, w), c, heads, ks, ds in zip(self.stage_shapes(), self.channels, self.heads, self.kernels, self.dilations):
            for nh, k, d in zip(split_heads(heads, len(ks)), ks, ds):
                layers.append({"resolution": h if h == w else (h, w), "shape": (h, w), "heads": nh,
                               "head_dim": c // heads, "kernel": k, "dilation": d, "calls": 2})
        return layers

    def _check(self):
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(f"GeneratorConfig.class_names has {len(self.class_names)} names for {self.num_classes} classes")
        shapes = self.stage_shapes()
        for name in ("channels", "heads", "kernels", "dilations"):
            _check_len(self, name, len(shapes))
        for i, ((h, w), c, nh, ks, ds) in enumerate(zip(shapes, self.channels, self.heads, self.kernels, self.dilations)):
            where = f"GeneratorConfig stage {w}x{h}"
            if c % nh:
                raise ConfigError(f"{where}: {c} channels do not split into {nh} heads")
            if i > 0 and (c < 8 or c % 4):
                raise ConfigError(f"{where}: position codes need channels a multiple of 4 and >= 8, got {c}")
            if len(ks) != len(ds) or not ks:
                raise ConfigError(f"{where}: kernels {ks} and dilations {ds} need one entry per head group")
            if len(ks) > nh:
                raise ConfigError(f"{where}: {len(ks)} head groups but only {nh} heads")
            for k, d in zip(ks, ds):
                for kk, dd, n, axis in zip(_yx(k), _yx(d), (h, w), ("height", "width")):
                    if kk * dd > n or (kk % 2 == 0 and kk * dd != n):
                        raise ConfigError(
                            f"{where}: kernel {k} with dilation {d} does not fit the {axis} {n} "
                            f"(need odd kernel and kernel * dilation <= {n}, or kernel == {n} for full attention)"
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
class DiscriminatorConfig(_SizedConfig):
    """Everything StyleSwin's wavelet discriminator needs.

    Args:
        resolution: the input image size: an int for a square, else [height, width]; at least
            three stages (16x16 for a square of a power of two).
        channels: channels per stage of the generator's layout, base first (the official table:
            the first from-RGB at half the image uses the last entry; the block ending on stage i
            uses channels[i]; the output block works on the base map).
        stddev_group: minibatch-stddev group size (the batch must divide by min(batch, group)).
        num_classes: classes of a class-conditional discriminator (a projection of a learned class
            embedding onto its last features, Miyato & Koyama 2018); 0: unconditional.
    """

    resolution: int | tuple[int, int]
    channels: tuple[int, ...] = param(min=1)
    stddev_group: int = param(4, min=1)
    num_classes: int = param(0, min=0)

    # The wavelet input is already at half the image; with fewer stages no conv block is left before the base.
    _MIN_STAGES = 3

    def _check(self):
        _check_len(self, "channels", len(self.stage_shapes()))

    def channels_at(self, res: int) -> int:
        """Channels at the stage whose map is ``res`` on a square of a power of two (the official table's key)."""
        return self.channels[int(math.log2(res)) - 2]

    @property
    def num_blocks(self) -> int:
        """Blocks (from-RGB plus conv block, one per scale) before the output block on the base map."""
        return len(self.channels) - 2


# ---- presets ----------------------------------------------------------------------------------

# The official channel table (channel multiplier 2) is StyleGAN3's rule channels = min(cbase / r, cmax)
# with these two numbers, r the edge of the stage on a square of a power of two (4, 8, ..., 1024).
OFFICIAL_CBASE = 32768
OFFICIAL_CMAX = 512
_OFFICIAL_CHANNELS = {2**i: min(OFFICIAL_CBASE // 2**i, OFFICIAL_CMAX) for i in range(2, 11)}
FAMILY_STAGES = (3, 9)  # a family model has 3..9 stages: squares 16..1024 (powers of two), 4:3 up to 1024x768, ...


def _family_channels(stages: int, cbase: int, cmax: int) -> tuple[int, ...]:
    # Stage i has the channels of stage i of a square of a power of two: min(cbase / (4 * 2^i), cmax).
    return tuple(min(cbase // (4 << i), cmax) for i in range(stages))


def _official(resolution, min_heads: int, dilations_at, cbase: int = OFFICIAL_CBASE,
              cmax: int = OFFICIAL_CMAX) -> tuple[GeneratorConfig, DiscriminatorConfig]:
    """A family model at ``resolution`` (an int square or (height, width)).

    ``dilations_at(L)`` gives the head groups' dilations of a square stage of edge L; a stage of
    h x w takes those of its longer side L and scales them to each axis, max(1, d * side // L),
    so every group spans the same share of both axes (squares: exactly the official rule). NA
    kernels are 7 per axis, or the whole axis where it is shorter than 7 (full attention along
    it); the base stage is full attention. Channels are min(cbase / (4 * 2^i), cmax) at stage i
    (the official table at cbase 32768, cmax 512), heads max(channels / 32, min_heads), and w
    is min(cmax, 512) wide (512 for the official models).
    """
    shapes = stage_shapes(resolution, min_stages=FAMILY_STAGES[0], max_stages=FAMILY_STAGES[1])
    channels = _family_channels(len(shapes), cbase, cmax)
    for i, ((h, w), c) in enumerate(zip(shapes, channels)):
        heads = max(c // 32, min_heads)
        if c < 1 or (i > 0 and (c < 8 or c % 4)) or c % heads:
            raise ConfigError(f"cbase {cbase} and cmax {cmax} give {c} channels at stage {w}x{h} (min(cbase / {4 << i}, "
                              f"cmax)); the family needs a multiple of 4 and of its {heads} heads, at least 8: give "
                              f"powers of two with cbase >= {max(8, min_heads) * (4 << (len(shapes) - 1))} for "
                              f"{size_text(resolution)}")
    kernels, dilations = [], []
    for i, (h, w) in enumerate(shapes):
        if i == 0:
            kernels.append((h if h == w else (h, w),))
            dilations.append((1,))
            continue
        longer = max(h, w)
        ds = tuple(dilations_at(longer))
        kernels.append(tuple(_pair_or_int(min(7, h), min(7, w)) for _ in ds))
        dilations.append(tuple(_pair_or_int(max(1, d * h // longer), max(1, d * w // longer)) for d in ds))
    resolution = shapes[-1][0] if shapes[-1][0] == shapes[-1][1] else shapes[-1]
    g = GeneratorConfig(
        resolution=resolution,
        channels=channels,
        heads=tuple(max(c // 32, min_heads) for c in channels),
        kernels=tuple(kernels),
        dilations=tuple(dilations),
        style_dim=min(cmax, 512),
    )
    return g, DiscriminatorConfig(resolution=resolution, channels=channels)


def _pair_or_int(y: int, x: int):
    return y if y == x else (y, x)


def official_discriminator(resolution) -> DiscriminatorConfig:
    """The official discriminator at ``resolution`` (its channel table), e.g. for a model stored without one."""
    shapes = stage_shapes(resolution, min_stages=DiscriminatorConfig._MIN_STAGES)
    return DiscriminatorConfig(resolution=resolution, channels=_family_channels(len(shapes), OFFICIAL_CBASE, OFFICIAL_CMAX))


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


# Families: the official architecture rule at any allowed size (3..9 stages) and width (cbase, cmax).
FAMILIES = {
    "ffhq": lambda r, **width: _official(r, 4, _ffhq_dilations, **width),  # min 4 heads, groups with dilations 1 and L/8
    "church": lambda r, **width: _official(r, 8, _pyramid_dilations, **width),  # min 8 heads, dilations 1, 2, 4, ..., L/8
}
FAMILY_RESOLUTIONS = tuple(2**i for i in range(4, 11))  # the squares of a power of two a family has

PRESETS = {
    "ffhq256": lambda: FAMILIES["ffhq"](256),
    "ffhq1024": lambda: FAMILIES["ffhq"](1024),
    "church256": lambda: FAMILIES["church"](256),
    "tiny": _tiny,
}


def get_preset(name: str, resolution=None, *, cbase: int | None = None,
               cmax: int | None = None) -> tuple[GeneratorConfig, DiscriminatorConfig]:
    """(GeneratorConfig, DiscriminatorConfig) of a named preset, or of a family at ``resolution``.

    Args:
        name: a preset of PRESETS (fixed resolution) or a family of FAMILIES ("ffhq", "church").
        resolution: the size of a family model: N (a square), "WIDTHxHEIGHT" or (height, width);
            :func:`stage_shapes` says which exist (3..9 stages). For a named preset it may only
            repeat the preset's own size.
        cbase, cmax: a family's width, StyleGAN3's knobs: stage i has min(cbase / (4 * 2^i), cmax)
            channels (default 32768 and 512: the official models).
    """
    width = {k: v for k, v in (("cbase", cbase), ("cmax", cmax)) if v is not None}
    for key, value in width.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if resolution is not None:
        resolution = parse_size(resolution, "resolution")
    if name in FAMILIES:
        if resolution is None:
            # Reached by library calls and by official checkpoints (generate, convert-official, train --init):
            # `stylenat train` sizes a family itself (--resolution or the data) before it gets here.
            named = ", ".join(n for n in PRESETS if n.startswith(name))
            raise ConfigError(f"preset {name!r} is a family of models (any allowed size from "
                              f"{FAMILY_RESOLUTIONS[0]}x{FAMILY_RESOLUTIONS[0]}), not one model: use a named preset "
                              f"({named}), or in Python get_preset({name!r}, resolution); an official checkpoint needs "
                              "the named preset it was trained with, or --meta META.json")
        return FAMILIES[name](resolution, **width)
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS) + sorted(FAMILIES))}")
    if width:
        family = next((f for f in FAMILIES if name.startswith(f)), "ffhq")
        raise ConfigError(f"preset {name!r} has a fixed width; --cbase/--cmax shape a family: use --preset {family}")
    g, d = PRESETS[name]()
    if resolution is not None and resolution != g.resolution:
        family = next((f for f in FAMILIES if name.startswith(f)), "ffhq")
        raise ConfigError(f"preset {name!r} is {g.size_text}; {family_advice(family, resolution)}")
    return g, d


def family_advice(family: str, resolution) -> str:
    """What to train a model of ``resolution`` with: the family at that size where it exists, else
    the allowed sizes nearest to it (never advice that would be refused)."""
    resolution = parse_size(resolution, "resolution")
    try:
        stage_shapes(resolution, min_stages=FAMILY_STAGES[0], max_stages=FAMILY_STAGES[1])
    except ConfigError:
        near = " or ".join(size_flag(n) for n in nearest_sizes(resolution, *FAMILY_STAGES))
        return (f"no preset is {size_text(resolution)}: {SIZE_RULE}, in {FAMILY_STAGES[0]}..{FAMILY_STAGES[1]} "
                f"stages (nearest: {near}; stylenat prepare SRC DST --size {'N' if isinstance(resolution, int) else 'WxH'} "
                "resizes the data)")
    return f"for {size_text(resolution)} use --preset {family} --resolution {size_flag(resolution)}"
