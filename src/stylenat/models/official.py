"""Import of checkpoints of the official StyleNAT code (github.com/SHI-Labs/StyleNAT, 8092724).

A released checkpoint is ``{'g', 'd', 'g_ema', 'args'}`` (``args`` an argparse.Namespace) of
state dicts. It is read with ``torch.load(weights_only=True)``, allowing argparse.Namespace only,
so a malicious file cannot run code.

What the official configuration means (its "meta", the terms of the fixtures' ``<tag>_meta.json``):

* The 4x4 stage ignores ``kernels[0]``/``dilations[0]``: it is full attention over 16 tokens with
  one [heads, 7, 7] bias table and an index buffer that reads it as
  ``rpb[h, key_y - q_y + 3, key_x - q_x + 3]``, i.e. exactly NA with kernel 4 on the 4x4 map.
  The importer checks the buffer holds that index, then drops it.
* ``legacy`` (the released FFHQ checkpoints): two head groups of heads/2 each, tables ``rpb0``,
  ``rpb1``; a one-element kernel or dilation list is used for both groups, extra entries ignored.
* Hydra: one group per kernel/dilation entry (a one-element list is broadcast to the other's
  length), tables ``rpb.<i>``; uneven head splits give the last groups one extra head.
* Fixed filters (FIR and Haar kernels) are compared with ours; the position-code dummy buffer
  ``_float_tensor`` is dropped. The discriminator's spectral norm state (weight_orig, u, v) is
  carried over, so eval-mode logits match.

``w_avg`` does not exist upstream; it is estimated from 10,000 seeded z after loading.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from stylenat.errors import MissingFileError, ModelFileError
from stylenat.models.config import DiscriminatorConfig, GeneratorConfig, get_preset, stage_resolutions
from stylenat.models.discriminator import Discriminator
from stylenat.models.generator import Generator

__all__ = ["load_official_checkpoint", "config_from_official", "official_meta", "map_official_state"]


def _per_res(table: dict, res: int):
    return table[str(res)] if str(res) in table else table[res]


def config_from_official(meta: dict) -> tuple[GeneratorConfig, DiscriminatorConfig]:
    """Our configs for an official configuration given in the fixtures' meta terms."""
    size = int(meta["size"])
    res = stage_resolutions(size)
    channels = tuple(int(_per_res(meta["generator_channels"], r)) for r in res)
    if "heads" in meta:
        heads = tuple(int(_per_res(meta["heads"], r)) for r in res)
    else:
        heads = tuple(max(c // 32, int(meta.get("min_heads", 4))) for c in channels)
    if len(meta["kernels"]) < len(res) or len(meta["dilations"]) < len(res):
        raise ModelFileError(f"official meta needs kernels and dilations for all {len(res)} stages")
    kernels, dilations = [(4,)], [(1,)]
    for s in range(1, len(res)):
        ks, ds = _official_groups(list(meta["kernels"][s]), list(meta["dilations"][s]), bool(meta.get("legacy", False)))
        if meta.get("legacy") and heads[s] % 2:
            raise ModelFileError(f"legacy two-group attention needs an even head count, stage {res[s]} has {heads[s]}")
        kernels.append(tuple(ks))
        dilations.append(tuple(ds))
    g = GeneratorConfig(
        resolution=size,
        channels=channels,
        heads=heads,
        kernels=tuple(kernels),
        dilations=tuple(dilations),
        style_dim=int(meta["style_dim"]),
        n_mlp=int(meta["n_mlp"]),
        lr_mlp=float(meta["lr_mlp"]),
        mlp_ratio=float(meta["mlp_ratio"]),
    )
    d_table = meta.get("discriminator_channels", meta["generator_channels"])
    d = DiscriminatorConfig(resolution=size, channels=tuple(int(_per_res(d_table, r)) for r in res))
    return g, d


def _official_groups(ks: list, ds: list, legacy: bool) -> tuple[list, list]:
    if legacy:
        return (ks * 2)[:2] if len(ks) == 1 else ks[:2], (ds * 2)[:2] if len(ds) == 1 else ds[:2]
    if len(ks) == 1:
        ks = ks * len(ds)
    if len(ds) == 1:
        ds = ds * len(ks)
    if len(ks) != len(ds):
        raise ModelFileError(f"official kernels {ks} and dilations {ds} differ in length")
    return ks, ds


def official_meta(preset: str, legacy: bool) -> dict:
    """The official configuration (meta terms) of one of our presets."""
    g, d = get_preset(preset)
    res = stage_resolutions(g.resolution)
    return {
        "size": g.resolution,
        "legacy": legacy,
        "generator_channels": {str(r): c for r, c in zip(res, g.channels)},
        "heads": {str(r): h for r, h in zip(res, g.heads)},
        "kernels": [[3]] + [list(k) for k in g.kernels[1:]],
        "dilations": [[1]] + [list(dl) for dl in g.dilations[1:]],
        "style_dim": g.style_dim,
        "n_mlp": g.n_mlp,
        "lr_mlp": g.lr_mlp,
        "mlp_ratio": g.mlp_ratio,
        "discriminator_channels": {str(r): d.channels_at(r) for r in res},
    }


def _hydra_groups_from_state(meta: dict, state: dict[str, Tensor]) -> dict:
    """Head groups per stage as a Hydra checkpoint holds them, where they differ from a preset's.

    The official Hydra FFHQ runs use one group at 8x8 where our presets (the released legacy
    layout) have two identical k7/d1 groups; the group count and kernels are in the rpb tables.
    Only stages whose preset groups are all alike can be adapted; others need an explicit meta.
    """
    meta = {**meta, "kernels": [list(k) for k in meta["kernels"]], "dilations": [list(d) for d in meta["dilations"]]}
    for s in range(1, len(meta["kernels"])):
        tables = {int(m.group(1)): v.shape for k, v in state.items()
                  if (m := re.fullmatch(rf"layers\.{s}\.blocks\.0\.attn\.rpb\.(\d+)", k))}
        ks, ds = _official_groups(meta["kernels"][s], meta["dilations"][s], legacy=False)
        if not tables or len(tables) == len(ks):
            continue
        if len(set(zip(ks, ds))) != 1:
            raise ModelFileError(f"the checkpoint has {len(tables)} head groups at stage {s} where the preset has "
                             f"{len(ks)} different ones; pass the configuration with --meta")
        meta["kernels"][s] = [(tables[i][-1] + 1) // 2 for i in sorted(tables)]
        meta["dilations"][s] = [ds[0]] * len(tables)
    return meta


# ---- key mapping ------------------------------------------------------------------------------

_G_RULES = [
    (re.compile(r"^style\.(\d+)\."), lambda m: f"mapping.layers.{int(m.group(1)) - 1}."),
    (re.compile(r"^input\.input$"), lambda m: "synthesis.const"),
    (re.compile(r"^layers\."), lambda m: "synthesis.stages."),
    (re.compile(r"^to_rgbs\."), lambda m: "synthesis.to_rgbs."),
    (re.compile(r"\.attn\.rpb(\d+)$"), lambda m: f".attn.rpb.{m.group(1)}"),
    (re.compile(r"\.attn\.rpb$"), lambda m: ".attn.rpb.0"),
]
_D_RULES = [
    (re.compile(r"\.weight_orig$"), lambda m: ".parametrizations.weight.original"),
    (re.compile(r"\.weight_u$"), lambda m: ".parametrizations.weight.0._u"),
    (re.compile(r"\.weight_v$"), lambda m: ".parametrizations.weight.0._v"),
]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


def _full_attention_index(n: int) -> Tensor:
    """The official 4x4 stage's index into its flattened [2k-1, 2k-1] table, k = sqrt(n)."""
    k = math.isqrt(n)
    y, x = torch.arange(n) // k, torch.arange(n) % k
    return (y[None, :] - y[:, None] + k - 1) * (2 * k - 1) + (x[None, :] - x[:, None] + k - 1)


def map_official_state(module: nn.Module, official: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict for ``module`` (a Generator or Discriminator) from an official state dict.

    Every official key is consumed: learned tensors are renamed and shape-checked, fixed buffers
    are compared with ours. Raises ValueError naming the first shape mismatch, or the missing and
    unexpected keys. Tensors on the meta device are checked by shape only.
    """
    rules = _G_RULES if isinstance(module, Generator) else _D_RULES
    ours = module.state_dict()
    fixed = dict(module.named_buffers())
    mapped, unexpected = {}, []
    for key, value in official.items():
        if key.endswith("sin_pos_embed._float_tensor"):
            continue  # a device/dtype marker of the official position-code module, no data
        if key.endswith("attn.relative_position_index"):
            _check_fixed(key, value, _full_attention_index(value.shape[0]))
            continue
        name = _rename(key, rules)
        if name in ours:
            if tuple(ours[name].shape) != tuple(value.shape):
                raise ModelFileError(
                    f"official key {key!r} has shape {list(value.shape)} but {name!r} expects {list(ours[name].shape)}; "
                    "the configuration (meta/preset) does not match this checkpoint"
                )
            mapped[name] = value
        elif name in fixed:
            _check_fixed(key, value, fixed[name])
        else:
            unexpected.append(key)
    missing = [k for k in ours if k not in mapped and not k.endswith("w_avg")]
    if missing or unexpected:
        raise ModelFileError(
            f"official checkpoint does not match the configuration: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    return mapped


def _check_fixed(key: str, value: Tensor, want: Tensor) -> None:
    if value.is_meta or want.is_meta:
        ok = tuple(value.shape) == tuple(want.shape)
    else:
        ok = value.shape == want.shape and torch.allclose(value.to(want), want, atol=1e-6)
    if not ok:
        raise ModelFileError(f"official fixed buffer {key!r} differs from this implementation's")


# ---- loading ----------------------------------------------------------------------------------


def load_official_checkpoint(path, meta: str | dict) -> dict[str, nn.Module]:
    """{'g', 'g_ema', 'd'} (those present; g_ema required) from an official checkpoint, eval mode.

    Args:
        path: the official ``.pt`` file.
        meta: a preset name (legacy or Hydra layout detected from the keys) or an official
            configuration dict (the fixtures' ``<tag>_meta.json`` terms).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no official checkpoint at {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelFileError(f"cannot read {path} as an official StyleNAT checkpoint: {exc}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dicts"), dict):  # the official trainer's newer layout
        ckpt = ckpt["state_dicts"]
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        raise ModelFileError(f"{path} is not in the official layout {{'g', 'd', 'g_ema', 'args'}}")
    if isinstance(meta, str):
        legacy = any(re.search(r"\.attn\.rpb\d+$", k) for k in ckpt["g_ema"])
        meta = official_meta(meta, legacy)
        if not legacy:
            meta = _hydra_groups_from_state(meta, ckpt["g_ema"])
    g_cfg, d_cfg = config_from_official(meta)
    out = {}
    for name in ("g", "g_ema", "d"):
        if name not in ckpt:
            continue
        module = Generator(g_cfg) if name.startswith("g") else Discriminator(d_cfg)
        module.load_state_dict(map_official_state(module, ckpt[name]), strict=False)
        if name.startswith("g"):
            module.compute_w_avg()
        out[name] = module.eval()
    return out
