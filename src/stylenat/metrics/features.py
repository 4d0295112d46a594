"""Inception features of an image set or a generator, their statistics and the on-disk stats cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from stylenat._system import Progress, atomic_path, cache_dir
from stylenat.data import open_dataset
from stylenat.errors import DataError
from stylenat.metrics.inception import load_inception
from stylenat.models.config import as_shape, parse_size

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


def dataset_features(path: str | os.PathLike, extractor: Extractor, resolution: int | tuple[int, int],
                     num: int | None = None,
                     batch: int = 64, keep_features: bool = False, cache: bool = True,
                     workers: int = 0, progress: bool = True, indices: Sequence[int] | None = None) -> FeatureStats:
    """Statistics of the first `num` images (all when None) of a dataset, cached on disk.

    Args:
        path: image folder or zip (prepared or raw), or "demo" (see stylenat.data.open_dataset).
        extractor: see Extractor (its `cache_key` names the network, its weights and its
            preprocessing). resolution: size the images are read at, an int for a square, else
            (height, width), as open_dataset takes it (raw sets are cropped and resized to it; the
            Inception input is then 299x299 whatever the size, see inception.preprocess).
            num: images to use. batch: images per forward.
        keep_features: keep features for KID. cache: read/write <cache dir>/stats/<name>-<key>.npz,
            the key hashing the dataset's fingerprint, the resolution (the side for a square, as
            ever; [height, width] for H != W, so 512x384 and 384x512 have caches of their own),
            the image count and the extractor's cache_key.
        workers: DataLoader processes decoding images. progress: show the tick.
        indices: only these items of the dataset (e.g. one class), in this order.
    """
    dataset = open_dataset(path, resolution, labels=False)
    chosen = list(range(len(dataset)) if indices is None else indices)
    count = len(chosen) if num is None else min(num, len(chosen))
    h, w = as_shape(parse_size(resolution, "resolution"))
    key = json.dumps({"dataset": dataset.fingerprint(), "resolution": h if h == w else [h, w], "num": count,
                      "extractor": extractor.cache_key,
                      **({} if indices is None else {"indices": hashlib.sha256(str(chosen).encode()).hexdigest()})},
                     sort_keys=True)
    cached = cache_dir() / "stats" / f"{Path(path).name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    if cache and cached.is_file():
        stats = FeatureStats.load(cached)
        if stats.keep_features or not keep_features:
            return stats
    # Its own generator: a DataLoader otherwise draws its worker seed from the global torch RNG,
    # which would make measuring during training change the run's saved random state.
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, chosen[:count]), batch_size=batch,
                                         num_workers=workers, generator=torch.Generator().manual_seed(0))
    stats = extract(loader, extractor, count, keep_features, f"features of {Path(path).name}", progress)
    if cache:
        stats.save(cached)
    return stats


def _seed_batches(make_images: Callable[[Sequence[int]], torch.Tensor], num: int, batch: int,
                  seed: int = 0) -> Iterator[torch.Tensor]:
    return (make_images(range(start, min(start + batch, seed + num))) for start in range(seed, seed + num, batch))


def seeded_features(make_images: Callable[[Sequence[int]], torch.Tensor], num: int, batch: int,
                    extractor: Extractor, seed: int = 0, keep_features: bool = False,
                    progress: bool = True) -> FeatureStats:
    """Statistics of images made from seeds seed, seed+1, ..., seed+num-1.

    Args:
        make_images: seeds -> uint8 images [len(seeds), 3, H, W]. num: images. batch: seeds per call.
        extractor, keep_features, progress: as in `extract`.
    """
    return extract(_seed_batches(make_images, num, batch, seed), extractor, num, keep_features,
                   "features of generated images", progress)


def generated_images(g: torch.nn.Module, num: int, batch: int = 32, seed: int = 0, truncation_psi: float = 1.0,
                     label_pool: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """uint8 images [<= batch, 3, H, W] of generator ``g`` from seeds seed .. seed+num-1, batch by batch.

    Args:
        g: a stylenat generator; in eval mode while the images are made (train mode would update
            its tracked w_avg), its mode restored afterwards. num: images. batch: images per forward.
        seed: first seed. truncation_psi: 1.0 = none (as FID wants).
        label_pool: for a conditional generator, the class indices the images' labels are drawn from
            (e.g. the real data's labels, so the classes come in the data's proportions; default: every
            class alike); the draw is seeded by ``seed``.
    """
    from stylenat.models import model_to_uint8, seeds_to_z

    device = next(g.parameters()).device
    was_training = g.training
    g.eval()
    labels = None
    if g.config.num_classes:
        pool = torch.arange(g.config.num_classes) if label_pool is None else label_pool.cpu()
        labels = pool[torch.randint(len(pool), (num,), generator=torch.Generator().manual_seed(seed))]

    @torch.no_grad()
    def make_images(seeds: Sequence[int]) -> torch.Tensor:
        c = None if labels is None else labels[seeds[0] - seed: seeds[-1] - seed + 1].to(device)
        return model_to_uint8(g(seeds_to_z(seeds, g.style_dim, device), truncation_psi=truncation_psi, c=c), g.config)

    try:
        yield from _seed_batches(make_images, num, batch, seed)
    finally:
        g.train(was_training)


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
    extractor = extractor or load_inception(device=next(g.parameters()).device)
    return extract(generated_images(g, num, batch, seed, truncation_psi), extractor, num, keep_features,
                   "features of generated images", progress)


def is_image_set(path: str | os.PathLike) -> bool:
    """True for "demo", a .zip file, or a folder that is not a training run (no config.json or
    checkpoints/); anything else is a model file (.pt files are zips too: not by content)."""
    path = Path(path)
    if path.is_dir():
        return not (path / "config.json").exists() and not (path / "checkpoints").is_dir()
    return str(path) == "demo" or path.suffix.lower() == ".zip"
