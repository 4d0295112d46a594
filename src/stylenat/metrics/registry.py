"""Named metrics for a generator against a real image set, as stylegan2-ada names them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from stylenat.errors import ConfigError
from stylenat.metrics.features import Extractor, dataset_features, generator_features
from stylenat.metrics.fid import compare
from stylenat.metrics.inception import load_inception


@dataclass(frozen=True)
class MetricSpec:
    """num: generated images (the real set is used whole); kid: KID instead of FID."""

    num: int
    kid: bool = False


METRICS: dict[str, MetricSpec] = {
    "fid50k": MetricSpec(50000),
    "fid10k": MetricSpec(10000),
    "kid50k": MetricSpec(50000, kid=True),
    "kid10k": MetricSpec(10000, kid=True),
}


def calc_metric(name: str, g: torch.nn.Module, real: str | os.PathLike, extractor: Extractor | None = None,
                batch: int = 32, progress: bool = False) -> dict[str, float]:
    """{name: value} for one metric of METRICS (KID also gives {name + "_std"}).

    Args:
        name: a key of METRICS. g: generator. real: image folder or zip, read at g.resolution
            (statistics cached).
        extractor: Inception network, loaded once by a caller measuring often (the training
            loop); default load_inception() on g's device. batch: images per forward.
        progress: show a tick.
    """
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    spec = METRICS[name]
    extractor = extractor or load_inception(device=next(g.parameters()).device)
    real_stats = dataset_features(real, extractor, g.resolution, batch=batch, keep_features=spec.kid,
                                  progress=progress)
    fake_stats = generator_features(g, spec.num, batch, extractor=extractor, keep_features=spec.kid,
                                    progress=progress)
    result = compare(fake_stats, real_stats, kid=spec.kid)
    return {name: result["kid"], f"{name}_std": result["kid_std"]} if spec.kid else {name: result["fid"]}
