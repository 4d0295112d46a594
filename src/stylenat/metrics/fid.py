"""FID and KID between a generator (or an image set) and a real image set.

Protocol (the paper's, after pytorch-fid): FID Inception pool features of uint8 images resized to
299x299 (bilinear, align_corners=False, no antialias) and scaled to [-1, 1]; 50k generated images
without truncation against the whole dataset; Frechet distance in float64.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stylenat.errors import ConfigError
from stylenat.metrics.distances import frechet_distance, kernel_inception_distance
from stylenat.metrics.features import FeatureStats, dataset_features, generator_features
from stylenat.metrics.inception import load_inception

__all__ = ["compare", "evaluate", "frechet_distance", "kernel_inception_distance", "load_inception"]


def compare(fake: FeatureStats, real: FeatureStats, kid: bool = False, kid_subsets: int = 100,
            kid_subset_size: int = 1000) -> dict[str, float]:
    """{"fid"} (and {"kid", "kid_std"} when kid) between two sets of statistics.

    Args:
        fake, real: statistics (with kept features for KID). kid_subsets, kid_subset_size: KID's
            subset draws (see kernel_inception_distance).
    """
    result = {"fid": frechet_distance(*fake.mean_cov(), *real.mean_cov())}
    if kid:
        result["kid"], result["kid_std"] = kernel_inception_distance(
            fake.features, real.features, kid_subsets, kid_subset_size)
    return result


def is_image_set(path: str | os.PathLike) -> bool:
    """True for "demo", a .zip file, or a folder that is not a training run (no config.json or
    checkpoints/); anything else is a model file (.pt files are zips too: not by content)."""
    path = Path(path)
    if path.is_dir():
        return not (path / "config.json").exists() and not (path / "checkpoints").is_dir()
    return str(path) == "demo" or path.suffix.lower() == ".zip"


def evaluate(first: str | os.PathLike | torch.nn.Module, real: str | os.PathLike, num: int = 50000,
             kid: bool = False, resolution: int | None = None, inception: str | os.PathLike | None = None,
             batch: int = 32, device: str = "cpu", workers: int = 0, progress: bool = True) -> dict[str, float]:
    """FID (and KID) of a generator or an image set against a real image set.

    Args:
        first: a generator module, an image folder/zip, or a model file or run directory.
        real: image folder or zip (or "demo"); its statistics are cached (see dataset_features).
        num: images of `first` (generated, or the first `num` of the set); the real set is used whole.
        kid: also compute KID (keeps all features in memory: num x 2048 floats per side).
        resolution: side both sets are read at; default the generator's, required for two image sets.
        inception: weights file (see load_inception). batch: images per forward. device: where
            networks run. workers: image-decoding processes. progress: show a tick.
    Returns {"fid", "num_fake", "num_real"} plus {"kid", "kid_std"} when kid.
    """
    extractor = load_inception(inception, device=device)
    first_is_images = not isinstance(first, torch.nn.Module) and is_image_set(first)
    if not first_is_images and not isinstance(first, torch.nn.Module):
        from stylenat.models.io import load_model

        first = load_model(first, which="g_ema", device=device)
    resolution = resolution or (None if first_is_images else first.resolution)
    if resolution is None:
        raise ConfigError("comparing two image sets needs a resolution to read both at (--resolution)")
    real_stats = dataset_features(real, extractor, resolution, None, batch, kid, workers=workers, progress=progress)
    if first_is_images:
        fake_stats = dataset_features(first, extractor, resolution, num, batch, kid, workers=workers, progress=progress)
    else:
        fake_stats = generator_features(first, num, batch, extractor=extractor, keep_features=kid, progress=progress)
    return {**compare(fake_stats, real_stats, kid), "num_fake": fake_stats.num, "num_real": real_stats.num}
