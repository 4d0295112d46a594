"""Training datasets: uint8 images [3, H, W] from a prepared dataset, a raw folder/zip, or the demo.

A resolution is an int for a square, else (height, width) (see stylenat._size).

With xflip the dataset has 2n items and item i >= n is the mirror image of item i - n. Flips are
decided by the index alone (not by a random draw inside the dataset), so a training loop that seeds
its own sampler gets exactly the same batches again when it resumes.

A labelled dataset (a prepared one with labels, or a raw one with StyleGAN's dataset.json; see
stylenat.data.labels) yields (image, class index) pairs, unless opened with ``labels=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings

import torch
from PIL import Image

from stylenat.data.demo import DEMO_SIZE, DEMO_VERSION, draw_face
from stylenat.data.images import decode_image, is_image_name, pil_to_tensor, resize_image
from stylenat.data.labels import STYLEGAN_JSON, listed, read_labels
from stylenat.data.prepare import meta_size, output_name, prepared_meta
from stylenat._size import as_shape, is_model_size, parse_size, size_flag, size_text
from stylenat.data.sources import UNSAFE_REASON, FileSource
from stylenat.errors import DataError


class ImageDataset(torch.utils.data.Dataset):
    """Base class: `num_images` images of size `resolution` (an int for a square, else (height,
    width)), doubled by mirrored copies if `xflip`.

    Subclasses implement `_load(i)` (image i < num_images as uint8 [3, H, W]) and `_content_key()`
    (a JSON-able value that changes whenever the images could). ``labels`` (class index per image)
    and ``class_names`` make a labelled dataset; items are then (image, label) pairs unless
    ``with_labels`` is set to False.
    """

    def __init__(self, num_images: int, resolution: int | tuple[int, int], xflip: bool, labels: list[int] | None = None,
                 class_names: list[str] | None = None):
        self.num_images = num_images
        self.resolution = parse_size(resolution, "resolution")
        self.xflip = xflip
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.long)
        self.class_names = list(class_names or [])
        self.with_labels = labels is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return as_shape(self.resolution)

    @property
    def num_classes(self) -> int:
        """Classes of a labelled dataset; 0 when it has no labels."""
        return len(self.class_names) if self.labels is not None else 0

    def __len__(self) -> int:
        return self.num_images * (2 if self.xflip else 1)

    def label(self, index: int) -> int:
        """The class index of item ``index`` (a mirrored copy has its original's)."""
        return int(self.labels[index % self.num_images])

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        image = self._load(index % self.num_images)
        image = image.flip(-1) if index >= self.num_images else image
        return (image, self.label(index)) if self.with_labels else image

    def fingerprint(self) -> str:
        """A short hex string that is equal for datasets yielding the same images (for cache keys)."""
        key = json.dumps([type(self).__name__, self._content_key(), self.resolution, self.xflip])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def _load(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def _content_key(self):
        raise NotImplementedError


class PreparedDataset(ImageDataset):
    """A dataset written by `prepare_dataset` (folder or zip); images are used as stored.

    source: the dataset's files; meta: its parsed dataset.json; resolution: required image size
    (DataError when it differs from the prepared size); xflip: add mirrored copies.
    """

    def __init__(self, source: FileSource, meta: dict, resolution, xflip: bool = False):
        have, want = meta_size(source, meta), parse_size(resolution, "resolution")
        if have != want:
            raise DataError(f"{source.path} holds {size_text(have)} images but {size_text(want)} was asked for; "
                            f"prepare it again at that size: stylenat prepare SRC DST --size {size_flag(want)}")
        super().__init__(meta["count"], resolution, xflip, meta.get("labels"), meta.get("classes"))
        self.source, self.meta = source, meta

    def _load(self, i: int) -> torch.Tensor:
        return pil_to_tensor(decode_image(self.source.read(output_name(i))))

    def _content_key(self):
        return [self.meta["content_sha1"], self.meta["count"]]


class RawDataset(ImageDataset):
    """Image files of a plain folder or zip, centre-cropped and Lanczos-resized as they are read.

    source: the files (those without an image extension, and zip entries whose names point outside
    the archive, are ignored with a warning listing them; StyleGAN's dataset.json in the root
    labels them); resolution: output size (each image's largest centred region of that aspect is
    resized to it); xflip: add mirrored copies. A file that fails to decode
    is warned about once and replaced by the next good image (of the same class), so an epoch
    never stops half-way.
    """

    def __init__(self, source: FileSource, resolution: int, xflip: bool = False):
        self.files = [n for n in source.names if is_image_name(n)]
        ignored = [n for n in source.names if not is_image_name(n) and n != STYLEGAN_JSON]
        if source.unsafe:
            warnings.warn(f"{source.path}: ignoring {listed(source.unsafe, f'entries with an {UNSAFE_REASON}')}",
                          stacklevel=3)
        if not self.files:
            raise DataError(f"no images found in {source.path}")
        if ignored:
            shown = ", ".join(ignored[:10]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 10 else "")
            warnings.warn(f"{source.path}: ignoring files that are not images: {shown}", stacklevel=3)
        found = read_labels(source, self.files)
        super().__init__(len(self.files), resolution, xflip, found and found.labels, found and found.classes)
        self.source = source
        self._bad: set[int] = set()  # per process: files known not to decode

    def _load(self, i: int) -> torch.Tensor:
        for j in ((i + k) % self.num_images for k in range(self.num_images)):
            if j in self._bad or (self.labels is not None and self.labels[j] != self.labels[i]):
                continue
            try:
                return pil_to_tensor(resize_image(decode_image(self.source.read(self.files[j])), self.resolution))
            except Exception as exc:  # any undecodable file is skipped, not fatal mid-epoch
                self._bad.add(j)
                warnings.warn(f"{self.source.path}: skipping unreadable image {self.files[j]} ({exc})", stacklevel=2)
        raise DataError(f"none of the {self.num_images} images in {self.source.path} can be decoded"
                        + (f" (of class {self.class_names[self.labels[i]]})" if self.labels is not None else ""))

    def _content_key(self):
        return [[n, self.source.sizes[n]] for n in self.files]


class DemoDataset(ImageDataset):
    """The built-in demo: procedurally drawn cartoon faces, drawn on demand (under 1 ms each).

    resolution: image size (a rectangle has the face centred on a wider or taller canvas);
    xflip: add mirrored copies; seed: which family of faces;
    count: number of distinct faces.
    """

    def __init__(self, resolution, xflip: bool = False, seed: int = 0, count: int = DEMO_SIZE):
        super().__init__(count, resolution, xflip)
        self.seed = seed

    def _load(self, i: int) -> torch.Tensor:
        return pil_to_tensor(draw_face(i, self.seed, self.resolution))

    def _content_key(self):
        return [DEMO_VERSION, self.seed, self.num_images]


def open_dataset(path_or_demo: str | os.PathLike, resolution: int | tuple[int, int], *, xflip: bool = False,
                 labels: bool = True) -> ImageDataset:
    """Open training images as a torch Dataset of uint8 tensors [3, H, W].

    path_or_demo: "demo" for the built-in faces (write "./demo" for a folder of that name), a
    folder or zip made by `stylenat prepare` (it must hold images of this size: DataError
    otherwise), or any folder/zip of images (each centre-cropped to the aspect and resized on the
    fly); resolution: an int for a square, else (height, width) (or "WIDTHxHEIGHT"); xflip: append
    mirrored copies (len doubles); labels: yield (image, class index) pairs when the data is
    labelled (False: images only).
    """
    resolution = parse_size(resolution, "resolution")
    if str(path_or_demo) == "demo":
        dataset = DemoDataset(resolution, xflip)
    else:
        source = FileSource(path_or_demo)
        meta = prepared_meta(source)
        if meta is not None:
            dataset = PreparedDataset(source, meta, resolution, xflip)
        else:
            dataset = RawDataset(source, resolution, xflip)
    dataset.with_labels = labels and dataset.labels is not None
    return dataset


def native_resolution(path_or_demo: str | os.PathLike, sample: int = 64) -> tuple[int | None, bool]:
    """The size of the images a dataset holds, and whether that size is binding.

    Sizes are an int for a square, else (height, width). Returns (size, binding): a prepared
    dataset gives (its size, True); raw images all of one size (judged on up to ``sample`` files
    spread over the set, from their headers) give (that size, True when a model can have it: a
    square of a power of two, or bw * 2^s wide and bh * 2^s high with max(bw, bh) in 4..7, see
    stylenat._size.is_model_size); the demo and raw images of mixed sizes give (None, False):
    they are cropped and resized to whatever the model needs.
    """
    if str(path_or_demo) == "demo":
        return None, False
    source = FileSource(path_or_demo)
    meta = prepared_meta(source)
    if meta is not None:
        return meta_size(source, meta), True
    files = [n for n in source.names if is_image_name(n)]
    sizes = set()
    for name in files[:: max(1, len(files) // sample)][:sample]:
        try:
            with Image.open(io.BytesIO(source.read(name))) as img:
                sizes.add(img.size)
        except Exception:  # an unreadable file says nothing about the others' size
            continue
    if len(sizes) != 1:
        return None, False
    (w, h), = sizes
    size = parse_size((h, w), "image size")
    power_of_two_square = w == h and w & (w - 1) == 0
    return size, power_of_two_square or is_model_size(size)


def dataset_classes(path_or_demo: str | os.PathLike) -> list[str]:
    """The class names of a labelled dataset (prepared with labels, or raw with StyleGAN's
    dataset.json); empty for unlabelled data and the demo."""
    if str(path_or_demo) == "demo":
        return []
    source = FileSource(path_or_demo)
    meta = prepared_meta(source)
    if meta is not None:
        return list(meta.get("classes") or []) if meta.get("labels") is not None else []
    found = read_labels(source, [n for n in source.names if is_image_name(n)])
    return found.classes if found is not None else []
