"""Named metrics of a generator or an image set against real images, and one function measuring any of them.

A name is a kind with an optional image count, as stylegan2-ada names them: ``fid50k``, ``kid10k``,
``swd2k``, ``pr50k`` (``k`` = thousand; ``fid500`` = 500 images), or the bare kind (``fid``) for its
default count. Kinds:

* ``fid``: Frechet Inception distance (needs the Inception weights file).
* ``kid``: kernel Inception distance, mean and std over subsets (Inception).
* ``pr``: improved precision and recall, k = 3 (Kynkaanniemi et al. 2019; Inception features here).
* ``swd``: multi-scale sliced Wasserstein distance of Laplacian-pyramid patches (Karras et al.
  2018), x1e3 per level and averaged; needs no weights file.

The count is the number of generated images (or of images taken from the first set); the real
set is used whole for the Inception metrics (its statistics are cached) and up to the same count
for SWD.

FID follows the paper's protocol (after pytorch-fid): Inception pool features of uint8 images
resized to 299x299 (bilinear, align_corners=False, no antialias) and scaled to [-1, 1]; 50k
generated images without truncation against the whole dataset; Frechet distance in float64.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from stylenat.errors import ConfigError
from stylenat.metrics.distances import frechet_distance, kernel_inception_distance
from stylenat.metrics.features import Extractor, FeatureStats, dataset_features, extract, generated_images, is_image_set
from stylenat.metrics.inception import load_inception

__all__ = ["KINDS", "METRICS", "MetricSpec", "parse_metric", "calc_metric", "measure", "evaluate", "compare", "needs_inception",
           "load_inception_for"]

# kind -> default number of images
KINDS = {"fid": 50000, "kid": 50000, "pr": 50000, "swd": 10000}
_INCEPTION = ("fid", "kid", "pr")
# The names most used, for help texts; any name of the grammar above is accepted.
METRICS = ("fid50k", "fid10k", "kid50k", "kid10k", "pr50k", "swd10k", "swd2k")


@dataclass(frozen=True)
class MetricSpec:
    """name: as given. kind: fid, kid, pr or swd. num: images (None: the kind's default)."""

    name: str
    kind: str
    num: int | None = None

    @property
    def images(self) -> int:
        return self.num if self.num is not None else KINDS[self.kind]


def parse_metric(name: str) -> MetricSpec:
    """The metric a name stands for; ConfigError for a name outside the grammar."""
    m = re.fullmatch(r"(fid|kid|pr|swd)(?:(\d+)(k?))?", str(name).strip().lower())
    if m is None or (m.group(2) is not None and int(m.group(2)) == 0):
        raise ConfigError(f"unknown metric {name!r}; use fid, kid, pr or swd, optionally with an image count "
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
    result = {"fid": frechet_distance(*fake.mean_cov(), *real.mean_cov())}
    if kid:
        result["kid"], result["kid_std"] = kernel_inception_distance(
            fake.features, real.features, kid_subsets, kid_subset_size)
    return result


def _read_at(batches, resolution: int):
    """uint8 image batches made ``resolution`` x ``resolution`` the way a raw real set is read at it
    (``square_resize``: Lanczos), so that a generator is compared with real images at one size."""
    from PIL import Image

    from stylenat.data.images import pil_to_tensor, square_resize

    for images in batches:
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        yield torch.stack([pil_to_tensor(square_resize(Image.fromarray(a), resolution)) for a in arrays]).to(images.device)


def load_inception_for(names: list[str], path: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu") -> Extractor:
    """The Inception network for metrics ``names``; a missing file's message names those that need it."""
    kinds = dict.fromkeys(parse_metric(n).kind for n in names if parse_metric(n).kind in _INCEPTION)
    return load_inception(path, device=device,
                          needed_by=[{"fid": "FID", "kid": "KID", "pr": "precision/recall (pr)"}[k] for k in kinds])


def _swd_collect(batches, resolution: int, total: int, label: str, progress: bool):
    from stylenat._system import Progress
    from stylenat.metrics.swd import SWDCollector

    collector, tick = SWDCollector(resolution), Progress(label, total, progress)
    for images in batches:
        collector.add(images)
        tick.update(collector.num_images)
    return collector


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

    def batches(self, count: int, resolution: int, batch: int, workers: int):
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


def _compare(specs: list[MetricSpec], fake: _Images, real: _Images, resolution: int, extractor, batch: int,
             workers: int, progress: bool) -> dict[str, float]:
    """Every metric of ``specs`` between two sides (see :func:`measure` for the keys)."""
    from stylenat.metrics.precision_recall import precision_recall
    from stylenat.metrics.swd import swd_from_collectors

    results: dict[str, float] = {}
    inception_specs = [s for s in specs if s.kind in _INCEPTION]
    if inception_specs:
        keep = any(s.kind != "fid" for s in inception_specs)
        real_stats = dataset_features(real.path, extractor, resolution, None, batch, keep, workers=workers,
                                      progress=progress, indices=real.indices)
        fake_stats = {}  # one pass per image count, shared by the metrics asking for it
        for spec in inception_specs:
            if spec.images not in fake_stats:
                batches, count = fake.batches(spec.images, resolution, batch, workers)
                fake_stats[spec.images] = extract(batches, extractor, count, keep, f"features of {fake.label}", progress)
            stats = fake_stats[spec.images]
            if spec.kind == "pr":
                pr = precision_recall(real_stats.features, stats.features, k=3)
                results[f"{spec.name}_precision"], results[f"{spec.name}_recall"] = pr["precision"], pr["recall"]
            else:
                out = compare(stats, real_stats, kid=spec.kind == "kid")
                results[spec.name] = out[spec.kind]
                if spec.kind == "kid":
                    results[f"{spec.name}_std"] = out["kid_std"]
            results[f"num_fake_{spec.name}"], results[f"num_real_{spec.name}"] = stats.num, real_stats.num
    for spec in (s for s in specs if s.kind == "swd"):
        batches, count = real.batches(spec.images, resolution, batch, workers)
        real_swd = _swd_collect(batches, resolution, count, f"SWD patches of {real.label}", progress)
        batches, count = fake.batches(spec.images, resolution, batch, workers)
        fake_swd = _swd_collect(batches, resolution, count, f"SWD patches of {fake.label}", progress)
        swd = swd_from_collectors(fake_swd, real_swd)
        results[spec.name] = swd.pop("swd_avg")  # the headline first, then one value per level
        results.update({f"{spec.name}_{key.removeprefix('swd_')}": value for key, value in swd.items()})
        results[f"num_fake_{spec.name}"], results[f"num_real_{spec.name}"] = fake_swd.num_images, real_swd.num_images
    return results


def measure(first, real: str | os.PathLike, names: list[str], *, num: int | None = None, resolution: int | None = None,
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
        resolution: side both sets are read at; default the generator's (required for two image sets).
            A generator's images at another size are Lanczos-resized to it, as raw real images are.
        extractor: Inception network already loaded; default load_inception(inception) when needed.
        inception: the Inception weights file (see load_inception). batch: images per forward.
        device: where the networks run. workers: image-decoding processes. progress: show ticks.
        per_class: also each metric per class of the labelled real data, between its images of that
            class and the first set's (a conditional generator's images of that class, or a labelled
            image set's images of that class); classes without images on either side are left out.
            ConfigError for an unconditional model, unlabelled data or classes that differ.
    Keys: the name (fid, kid mean, swd average), ``<name>_std`` (kid), ``<name>_<res>`` (swd levels),
    ``<name>_precision`` and ``<name>_recall`` (pr), ``num_real_<name>``/``num_fake_<name>``; per
    class the same keys followed by ``/<class name>``.
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
    resolution = resolution or (None if first_is_images else first.resolution)
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
    if any(s.kind in _INCEPTION for s in specs) and extractor is None:
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


def evaluate(first, real: str | os.PathLike, num: int = 50000, kid: bool = False, resolution: int | None = None,
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
    if parse_metric(name).kind in _INCEPTION and extractor is None:
        extractor = load_inception_for([name], device=next(g.parameters()).device)
    values = measure(g, real, [name], extractor=extractor, batch=batch, device=next(g.parameters()).device,
                     progress=progress)
    return {k: v for k, v in values.items() if not k.startswith("num_")}


def needs_inception(names: list[str]) -> bool:
    """Whether any of the metrics needs the Inception weights."""
    return any(parse_metric(n).kind in _INCEPTION for n in names)

