"""Inception features of an image set or a generator, their statistics and the on-disk stats cache."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from stylenat._system import atomic_path
from stylenat.data import open_dataset
from stylenat.errors import DataError
from stylenat.metrics.inception import cache_dir, load_inception

Extractor = Callable[[torch.Tensor], torch.Tensor]  # uint8 [B,3,H,W] -> features [B,D]; has .cache_key


class FeatureStats:
    """Running float64 mean and covariance of features; keeps the features too if asked (for KID).

    Args:
        keep_features: also store every feature vector (float32), as KID needs them.
    """

    def __init__(self, keep_features: bool = False):
        self.keep_features = keep_features
        self.num = 0
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None
        self._kept: list[np.ndarray] = []

    def append(self, feats: np.ndarray) -> None:
        """Add features [B, D]."""
        f = np.asarray(feats, dtype=np.float64)
        if self._sum is None:
            self._sum, self._outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self._sum += f.sum(0)
        self._outer += f.T @ f
        self.num += len(f)
        if self.keep_features:
            self._kept.append(f.astype(np.float32))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]); sigma with the n - 1 divisor, as numpy.cov and pytorch-fid use."""
        if self.num < 2:
            raise DataError(f"statistics need at least 2 images, got {self.num}")
        mu = self._sum / self.num
        return mu, (self._outer - self.num * np.outer(mu, mu)) / (self.num - 1)

    @property
    def features(self) -> np.ndarray:
        """All features [N, D] (only when keep_features)."""
        if not self.keep_features:
            raise ValueError("features were not kept; create FeatureStats(keep_features=True)")
        return np.concatenate(self._kept)

    def save(self, path: Path) -> None:
        """Write sums (and features) to an .npz atomically: temp file, fsync, then rename."""
        arrays = {"num": np.array(self.num), "sum": self._sum, "outer": self._outer}
        if self.keep_features:
            arrays["features"] = self.features
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        with np.load(path) as data:
            stats = cls(keep_features="features" in data)
            stats.num, stats._sum, stats._outer = int(data["num"]), data["sum"], data["outer"]
            if stats.keep_features:
                stats._kept = [data["features"]]
        return stats


class Progress:
    """A one-line tick on stderr: rewritten in place on a terminal, every 10% otherwise."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled
        self._tty = sys.stderr.isatty()
        self._next_decile = 1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self._tty:
            sys.stderr.write(f"\r{self.label}: {done}/{self.total}" + ("\n" if done >= self.total else ""))
        elif done * 10 >= self._next_decile * self.total:
            self._next_decile = done * 10 // self.total + 1
            sys.stderr.write(f"{self.label}: {done}/{self.total}\n")
        sys.stderr.flush()


def extract(batches: Iterable[torch.Tensor], extractor: Extractor, total: int, keep_features: bool = False,
            label: str = "features", progress: bool = True) -> FeatureStats:
    """Run `extractor` over uint8 image batches and accumulate their statistics.

    Args:
        batches: uint8 tensors [B, 3, H, W]. total: images expected (for the tick).
        extractor: see Extractor. keep_features: see FeatureStats. label, progress: the tick.
    """
    stats, tick = FeatureStats(keep_features), Progress(label, total, progress)
    for images in batches:
        stats.append(extractor(images).double().cpu().numpy())
        tick.update(stats.num)
    return stats


def dataset_features(path: str | os.PathLike, extractor: Extractor, resolution: int, num: int | None = None,
                     batch: int = 64, keep_features: bool = False, cache: bool = True,
                     workers: int = 0, progress: bool = True) -> FeatureStats:
    """Statistics of the first `num` images (all when None) of a dataset, cached on disk.

    Args:
        path: image folder or zip (prepared or raw), or "demo" (see stylenat.data.open_dataset).
        extractor: see Extractor (its `cache_key` names the network, its weights and its
            preprocessing). resolution: side the images are read at (raw sets are cropped and
            resized to it). num: images to use. batch: images per forward.
        keep_features: keep features for KID. cache: read/write <cache dir>/stats/<name>-<key>.npz,
            the key hashing the dataset's fingerprint, the resolution, the image count and the
            extractor's cache_key.
        workers: DataLoader processes decoding images. progress: show the tick.
    """
    dataset = open_dataset(path, resolution)
    count = len(dataset) if num is None else min(num, len(dataset))
    key = json.dumps({"dataset": dataset.fingerprint(), "resolution": resolution, "num": count,
                      "extractor": extractor.cache_key}, sort_keys=True)
    cached = cache_dir() / "stats" / f"{Path(path).name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    if cache and cached.is_file():
        stats = FeatureStats.load(cached)
        if stats.keep_features or not keep_features:
            return stats
    # Its own generator: a DataLoader otherwise draws its worker seed from the global torch RNG,
    # which would make measuring during training change the run's saved random state.
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=batch,
                                         num_workers=workers, generator=torch.Generator().manual_seed(0))
    stats = extract(loader, extractor, count, keep_features, f"features of {Path(path).name}", progress)
    if cache:
        stats.save(cached)
    return stats


def seeded_features(make_images: Callable[[Sequence[int]], torch.Tensor], num: int, batch: int,
                    extractor: Extractor, seed: int = 0, keep_features: bool = False,
                    progress: bool = True) -> FeatureStats:
    """Statistics of images made from seeds seed, seed+1, ..., seed+num-1.

    Args:
        make_images: seeds -> uint8 images [len(seeds), 3, H, W]. num: images. batch: seeds per call.
        extractor, keep_features, progress: as in `extract`.
    """
    batches = (make_images(range(start, min(start + batch, seed + num))) for start in range(seed, seed + num, batch))
    return extract(batches, extractor, num, keep_features, "features of generated images", progress)


@torch.no_grad()
def generator_features(g: torch.nn.Module, num: int, batch: int = 32, seed: int = 0, truncation_psi: float = 1.0,
                       extractor: Extractor | None = None, keep_features: bool = False,
                       progress: bool = True) -> FeatureStats:
    """Statistics of `num` images of generator `g` (z from seeds seed..seed+num-1), for FID during
    training or after it.

    Args:
        g: a stylenat generator (g(z, truncation_psi) -> raw images, g.config, g.style_dim).
        num: images. batch: images per forward. seed: first seed. truncation_psi: 1.0 = none (FID).
        extractor: default: load_inception() on g's device. keep_features, progress: as in `extract`.
    """
    from stylenat.models import model_to_uint8, seeds_to_z

    device = next(g.parameters()).device
    extractor = extractor or load_inception(device=device)
    was_training = g.training
    g.eval()  # train mode would update g's tracked w_avg while it is being measured

    def make_images(seeds: Sequence[int]) -> torch.Tensor:
        return model_to_uint8(g(seeds_to_z(seeds, g.style_dim, device), truncation_psi=truncation_psi), g.config)

    try:
        return seeded_features(make_images, num, batch, extractor, seed, keep_features, progress)
    finally:
        g.train(was_training)
