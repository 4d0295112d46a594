"""Named metrics of a generator or an image set against real images, and one function measuring any of them.

A name is a kind with an optional image count, as stylegan2-ada names them: ``fid50k``, ``kid10k``,
``swd2k``, ``pr50k`` (``k`` = thousand; ``fid500`` = 500 images), or the bare kind (``fid``) for its
default count. Each kind is declared once, in ``KINDS`` (see :class:`MetricKind`): fid, kid, pr
(on Inception features, which need the weights file) and swd (needs no weights file).

The count is the number of generated images (or of images taken from the first set); the real
set is used whole for the Inception metrics (its statistics are cached) and up to the same count
for SWD.

FID follows the paper's protocol (after pytorch-fid): Inception pool features of uint8 images
resized to 299x299 (bilinear, align_corners=False, no antialias) and scaled to [-1, 1]; 50k
generated images without truncation against the whole dataset; Frechet distance in float64.
Images of H != W are resized whole to 299x299 (squashed), as pytorch-fid, clean-fid,
torch-fidelity and StyleGAN2-ADA do; SWD works on them at their own size (see metrics.swd).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stylenat._system import Progress
from stylenat.errors import ConfigError
from stylenat.metrics.distances import frechet_distance, kernel_inception_distance
from stylenat.metrics.features import Extractor, FeatureStats, dataset_features, extract, generated_images, is_image_set
from stylenat.metrics.inception import load_inception
from stylenat.metrics.precision_recall import precision_recall
from stylenat.metrics.swd import SWDCollector, swd_from_collectors
from stylenat.models.config import parse_size

__all__ = ["KINDS", "METRICS", "MetricKind", "MetricSpec", "parse_metric", "calc_metric", "measure", "evaluate", "compare",
           "needs_inception", "load_inception_for"]


@dataclass(frozen=True)
class MetricKind:
    """One kind of metric: everything the rest of this module knows about it.

    name: the prefix of its metric names (``fid`` in ``fid50k``). title: how messages name it.
    description: what it measures, for help texts. images: the count of a name without one.
    compare: (fake, real) -> {key suffix: value}, the metric's key being its name plus the suffix
        ("" for the headline value); fake and real are what the kind gathers from each side.
    keys: the suffixes compare returns (``<res>`` standing for each pyramid level's side).
    collector: None for a kind on Inception features (compare gets FeatureStats), else resolution (an
        int, or (height, width)) -> a fresh collector with ``.add(uint8 images)`` and ``.num_images``
        (compare gets two of them).
    per_image: an Inception kind that needs every image's features, not only their mean and covariance.
    examples: its names most used, for help texts.
    """

    name: str
    title: str
    description: str
    images: int
    compare: Callable[[Any, Any], dict[str, float]]
    keys: tuple[str, ...]
    collector: Callable[[int], Any] | None = None
    per_image: bool = False
    examples: tuple[str, ...] = ()

    @property
    def inception(self) -> bool:
        """Whether it needs the Inception weights."""
        return self.collector is None


def _fid(fake: FeatureStats, real: FeatureStats) -> dict[str, float]:
    return {"": frechet_distance(*fake.mean_cov(), *real.mean_cov())}


def _kid(fake: FeatureStats, real: FeatureStats, subsets: int = 100, subset_size: int = 1000) -> dict[str, float]:
    mean, std = kernel_inception_distance(fake.features, real.features, subsets, subset_size)
    return {"": mean, "_std": std}


def _pr(fake: FeatureStats, real: FeatureStats) -> dict[str, float]:
    pr = precision_recall(real.features, fake.features, k=3)
    return {"_precision": pr["precision"], "_recall": pr["recall"]}


def _swd(fake: SWDCollector, real: SWDCollector) -> dict[str, float]:
    levels = swd_from_collectors(fake, real)
    return {"": levels.pop("swd_avg"), **{f"_{key.removeprefix('swd_')}": value for key, value in levels.items()}}


KINDS = {kind.name: kind for kind in (
    MetricKind("fid", "FID", "Frechet Inception distance", 50000, _fid, ("",), examples=("fid50k", "fid10k")),
    MetricKind("kid", "KID", "kernel Inception distance, mean and std over 100 subsets of 1000", 50000, _kid,
               ("", "_std"), per_image=True, examples=("kid50k", "kid10k")),
    MetricKind("pr", "precision/recall (pr)", "improved precision and recall, k = 3 (Kynkaanniemi et al. 2019), on "
               "Inception features", 50000, _pr, ("_precision", "_recall"), per_image=True, examples=("pr50k",)),
    MetricKind("swd", "SWD", "multi-scale sliced Wasserstein distance of Laplacian-pyramid patches (Karras et al. "
               "2018), x1e3 per level and averaged", 10000, _swd, ("", "_<res>"), collector=SWDCollector,
               examples=("swd10k", "swd2k")),
)}
# The names most used, for help texts; any name of the grammar above is accepted.
METRICS = tuple(name for kind in KINDS.values() for name in kind.examples)
_NAME = re.compile(f"({'|'.join(map(re.escape, KINDS))})(?:(\\d+)(k?))?")


def _either(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


@dataclass(frozen=True)
class MetricSpec:
    """name: as given. kind: a key of KINDS. num: images (None: the kind's default)."""

    name: str
    kind: str
    num: int | None = None

    @property
    def metric_kind(self) -> MetricKind:
        return KINDS[self.kind]

    @property
    def images(self) -> int:
        return self.num if self.num is not None else self.metric_kind.images


def parse_metric(name: str) -> MetricSpec:
    """The metric a name stands for; ConfigError for a name outside the grammar."""
    m = _NAME.fullmatch(str(name).strip().lower())
    if m is None or (m.group(2) is not None and int(m.group(2)) == 0):
        raise ConfigError(f"unknown metric {name!r}; use {_either(list(KINDS))}, optionally with an image count "
                          f"(e.g. {', '.join(METRICS)})")
    num = None if m.group(2) is None else int(m.group(2)) * (1000 if m.group(3) else 1)
    return MetricSpec(str(name).strip().lower(), m.group(1), num)


def compare(fake: FeatureStats, real: FeatureStats, kid: bool = False, kid_subsets: int = 100,
            kid_subset_size: int = 1000) -> dict[str, float]:
    """{"fid"} (and {"kid", "kid_std"} when kid) between two sets of statistics.

    Args:
        fake, real: statistics (with kept features for KID). kid_subsets, kid_subset_size: KID's
            subset draws (see kernel_inception_distance).
    """
    result = {"fid": _fid(fake, real)[""]}
    if kid:
        result.update({f"kid{key}": value for key, value in _kid(fake, real, kid_subsets, kid_subset_size).items()})
    return result


def _read_at(batches, resolution: int | tuple[int, int]):
    """uint8 image batches made of size ``resolution`` (an int square, or (height, width)) the way a
    raw real set is read at it (``resize_image``: the centred crop of that aspect, Lanczos), so that
    a generator is compared with real images at one size."""
    from PIL import Image

    from stylenat.data.images import pil_to_tensor, resize_image

    for images in batches:
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        yield torch.stack([pil_to_tensor(resize_image(Image.fromarray(a), resolution)) for a in arrays]).to(images.device)


def load_inception_for(names: list[str], path: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu") -> Extractor:
    """The Inception network for metrics ``names``; a missing file's message names those that need it."""
    kinds = dict.fromkeys(k for k in (parse_metric(n).metric_kind for n in names) if k.inception)
    return load_inception(path, device=device, needed_by=[k.title for k in kinds])


@dataclass
class _Images:
    """One side of a comparison: a generator (its images' labels drawn from ``label_pool``) or an
    image set (restricted to ``indices``)."""

    g: torch.nn.Module | None = None
    label_pool: torch.Tensor | None = None
    path: str | os.PathLike | None = None
    indices: list[int] | None = None

    @property
    def label(self) -> str:
        return "generated images" if self.g is not None else Path(str(self.path)).name

    def batches(self, count: int, resolution: int | tuple[int, int], batch: int, workers: int):
        """(uint8 image batches, how many images) for up to ``count`` images."""
        from stylenat.data import open_dataset

        if self.g is not None:
            images = generated_images(self.g, count, batch, label_pool=self.label_pool)
            return (images if self.g.resolution == resolution else _read_at(images, resolution)), count
        dataset = open_dataset(self.path, resolution, labels=False)
        chosen = list(range(len(dataset)) if self.indices is None else self.indices)[:count]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, chosen), batch_size=batch,
                                             num_workers=workers, generator=torch.Generator().manual_seed(0))
        return loader, len(chosen)


def _collect(kind: MetricKind, side: _Images, count: int, resolution: int, batch: int, workers: int, progress: bool):
    """The collector of ``kind`` fed up to ``count`` images of ``side``, with a progress tick."""
    batches, total = side.batches(count, resolution, batch, workers)
    collector, tick = kind.collector(resolution), Progress(f"{kind.title} of {side.label}", total, progress)
    for images in batches:
        collector.add(images)
        tick.update(collector.num_images)
    return collector


def _compare(specs: list[MetricSpec], fake: _Images, real: _Images, resolution: int, extractor, batch: int,
             workers: int, progress: bool) -> dict[str, float]:
    """Every metric of ``specs`` between two sides (see :func:`measure` for the keys)."""
    results: dict[str, float] = {}

    def record(spec: MetricSpec, values: dict[str, float], num_fake: int, num_real: int) -> None:
        results.update({f"{spec.name}{suffix}": value for suffix, value in values.items()})
        results[f"num_fake_{spec.name}"], results[f"num_real_{spec.name}"] = num_fake, num_real

    inception_specs = [s for s in specs if s.metric_kind.inception]
    if inception_specs:
        keep = any(s.metric_kind.per_image for s in inception_specs)
        real_stats = dataset_features(real.path, extractor, resolution, None, batch, keep, workers=workers,
                                      progress=progress, indices=real.indices)
        fake_stats = {}  # one pass per image count, shared by the metrics asking for it
        for spec in inception_specs:
            if spec.images not in fake_stats:
                batches, count = fake.batches(spec.images, resolution, batch, workers)
                fake_stats[spec.images] = extract(batches, extractor, count, keep, f"features of {fake.label}", progress)
            stats = fake_stats[spec.images]
            record(spec, spec.metric_kind.compare(stats, real_stats), stats.num, real_stats.num)
    for spec in (s for s in specs if not s.metric_kind.inception):
        real_c, fake_c = (_collect(spec.metric_kind, side, spec.images, resolution, batch, workers, progress)
                          for side in (real, fake))
        record(spec, spec.metric_kind.compare(fake_c, real_c), fake_c.num_images, real_c.num_images)
    return results


def measure(first, real: str | os.PathLike, names: list[str], *, num: int | None = None,
            resolution: int | tuple[int, int] | str | None = None,
            extractor: Extractor | None = None, inception: str | os.PathLike | None = None, batch: int = 32,
            device: str | torch.device = "cpu", workers: int = 0, progress: bool = True,
            per_class: bool = False) -> dict[str, float]:
    """Metrics ``names`` of ``first`` against ``real``: {key: value}.

    Args:
        first: a generator module, an image folder/zip, or a model (its g_ema): a model file, run directory,
            Hub-style folder, registered name or hf:// repository.
            A class-conditional generator draws its images' classes in the real data's proportions.
        real: image folder or zip (raw or prepared), or "demo".
        names: metric names (see the module docstring).
        num: images of ``first`` for every metric, overriding the counts in the names.
        resolution: size both sets are read at: an int for a square, (height, width) or "WxH"
            otherwise; default the generator's (required for two image sets). A generator's images
            at another size are cropped to its aspect and Lanczos-resized to it, as raw real images are.
        extractor: Inception network already loaded; default load_inception(inception) when needed.
        inception: the Inception weights file (see load_inception). batch: images per forward.
        device: where the networks run. workers: image-decoding processes. progress: show ticks.
        per_class: also each metric per class of the labelled real data, between its images of that
            class and the first set's (a conditional generator's images of that class, or a labelled
            image set's images of that class); classes without images on either side are left out.
            ConfigError for an unconditional model, unlabelled data or classes that differ.
    Keys: each metric's name followed by each of its kind's ``keys`` (see KINDS: ``fid``, ``kid`` and
    ``kid_std``, ``pr_precision``, ``swd`` and ``swd_32``, ...), and ``num_real_<name>``/``num_fake_<name>``;
    per class the same keys followed by ``/<class name>``.
    """
    from stylenat.data import open_dataset

    specs = [parse_metric(n) for n in names]
    if num is not None:
        specs = [MetricSpec(s.name, s.kind, num) for s in specs]
    first_is_images = not isinstance(first, torch.nn.Module) and is_image_set(first)
    if not first_is_images and not isinstance(first, torch.nn.Module):
        from stylenat.models.loading import resolve_model

        first = resolve_model(first, device=device)
    if per_class and not first_is_images and not first.config.num_classes:
        raise ConfigError("--per-class: the model is unconditional (it has no classes), so it has no images of a "
                          "class to compare; drop --per-class, or measure a class-conditional model")
    if resolution:
        resolution = parse_size(resolution, "--resolution")
    else:
        resolution = None if first_is_images else first.resolution
    if resolution is None:
        raise ConfigError("comparing two image sets needs a resolution to read both at (--resolution)")
    real_set = open_dataset(real, resolution, labels=False)
    first_set = open_dataset(first, resolution, labels=False) if first_is_images and per_class else None
    if per_class:
        classes = real_set.class_names if real_set.labels is not None else []
        if not classes:
            raise ConfigError(f"--per-class needs labelled real data; {real} has no labels")
        if first_set is not None and first_set.labels is None:
            raise ConfigError(f"--per-class: the first set {first} has no labels; label it like the real data")
        theirs = first_set.class_names if first_set is not None else list(first.config.classes)
        if theirs != classes:
            raise ConfigError(f"--per-class: {'the first set' if first_is_images else 'the model'} has classes "
                              f"{theirs[:5]}{'...' if len(theirs) > 5 else ''}, the real data {classes[:5]}"
                              f"{'...' if len(classes) > 5 else ''}; they must be the same")
    if any(s.metric_kind.inception for s in specs) and extractor is None:
        extractor = load_inception_for(names, inception, device)
    fake = _Images(path=first) if first_is_images else _Images(g=first, label_pool=real_set.labels)
    args = (resolution, extractor, batch, workers, progress)
    results = _compare(specs, fake, _Images(path=real), *args)
    if per_class:
        for k, name in enumerate(classes):
            real_k = (real_set.labels == k).nonzero().flatten().tolist()
            first_k = None if first_set is None else (first_set.labels == k).nonzero().flatten().tolist()
            if not real_k or first_k == []:  # a class index without images (StyleGAN's integer labels)
                continue
            fake_k = (_Images(path=first, indices=first_k) if first_set is not None
                      else _Images(g=first, label_pool=torch.tensor([k])))
            results.update({f"{key}/{name}": v for key, v in _compare(specs, fake_k, _Images(path=real, indices=real_k),
                                                                      *args).items()})
    return results


def evaluate(first, real: str | os.PathLike, num: int = 50000, kid: bool = False,
             resolution: int | tuple[int, int] | str | None = None,
             inception: str | os.PathLike | None = None, batch: int = 32, device: str = "cpu", workers: int = 0,
             progress: bool = True) -> dict[str, float]:
    """FID (and KID) of a generator or an image set against a real image set (``stylenat fid``).

    Arguments as for :func:`measure`. Returns {"fid", "num_fake", "num_real"} plus {"kid", "kid_std"} when kid.
    """
    values = measure(first, real, ["fid"] + (["kid"] if kid else []), num=num, resolution=resolution, inception=inception,
                     batch=batch, device=device, workers=workers, progress=progress)
    out = {"fid": values["fid"], "num_fake": values["num_fake_fid"], "num_real": values["num_real_fid"]}
    if kid:
        out.update(kid=values["kid"], kid_std=values["kid_std"])
    return out


def calc_metric(name: str, g: torch.nn.Module, real: str | os.PathLike, extractor: Extractor | None = None,
                batch: int = 32, progress: bool = False) -> dict[str, float]:
    """{key: value} of one metric of generator ``g`` against ``real`` (for the training loop), without
    the image counts; ``extractor`` is the Inception network loaded once by a caller measuring often."""
    if parse_metric(name).metric_kind.inception and extractor is None:
        extractor = load_inception_for([name], device=next(g.parameters()).device)
    values = measure(g, real, [name], extractor=extractor, batch=batch, device=next(g.parameters()).device,
                     progress=progress)
    return {k: v for k, v in values.items() if not k.startswith("num_")}


def needs_inception(names: list[str]) -> bool:
    """Whether any of the metrics needs the Inception weights."""
    return any(parse_metric(n).metric_kind.inception for n in names)

