"""Training datasets: uint8 images [3, S, S] from a prepared dataset, a raw folder/zip, or the demo.

With xflip the dataset has 2n items and item i >= n is the mirror image of item i - n. Flips are
decided by the index alone (not by a random draw inside the dataset), so a training loop that seeds
its own sampler gets exactly the same batches again when it resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch
from PIL import Image

from stylenat.data.demo import DEMO_SIZE, DEMO_VERSION, draw_face
from stylenat.data.images import decode_image, pil_to_tensor, square_resize
from stylenat.data.prepare import DATASET_FORMAT, DATASET_JSON, output_name
from stylenat.data.sources import FileSource
from stylenat.errors import ConfigError, DataError


class ImageDataset(torch.utils.data.Dataset):
    """Base class: `num_images` images of side `resolution`, doubled by mirrored copies if `xflip`.

    Subclasses implement `_load(i)` (image i < num_images as uint8 [3, S, S]) and `_content_key()`
    (a JSON-able value that changes whenever the images could).
    """

    def __init__(self, num_images: int, resolution: int, xflip: bool):
        self.num_images = num_images
        self.resolution = resolution
        self.xflip = xflip

    def __len__(self) -> int:
        return self.num_images * (2 if self.xflip else 1)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        image = self._load(index % self.num_images)
        return image.flip(-1) if index >= self.num_images else image

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

    source: the dataset's files; meta: its parsed dataset.json; resolution: required image side
    (ValueError when it differs from the prepared size); xflip: add mirrored copies.
    """

    def __init__(self, source: FileSource, meta: dict, resolution: int, xflip: bool = False):
        if meta["size"] != resolution:
            raise DataError(f"{source.path} holds {meta['size']}x{meta['size']} images but resolution "
                             f"{resolution} was asked for; prepare it again with --size {resolution}")
        super().__init__(meta["count"], resolution, xflip)
        self.source, self.meta = source, meta

    def _load(self, i: int) -> torch.Tensor:
        return pil_to_tensor(decode_image(self.source.read(output_name(i))))

    def _content_key(self):
        return [self.meta["content_sha1"], self.meta["count"]]


def _image_extensions() -> set[str]:
    Image.init()  # registers every format plugin, so the extension table is complete
    return set(Image.registered_extensions())


class RawDataset(ImageDataset):
    """Image files of a plain folder or zip, centre-cropped and Lanczos-resized as they are read.

    source: the files (those without an image extension are ignored, with one warning listing
    them); resolution: output side; xflip: add mirrored copies. A file that fails to decode is
    warned about once and replaced by the next good image, so an epoch never stops half-way.
    """

    def __init__(self, source: FileSource, resolution: int, xflip: bool = False):
        exts = _image_extensions()
        is_image = {n: os.path.splitext(n)[1].lower() in exts for n in source.names}
        self.files = [n for n in source.names if is_image[n]]
        ignored = [n for n in source.names if not is_image[n]]
        if not self.files:
            raise DataError(f"no images found in {source.path}")
        if ignored:
            shown = ", ".join(ignored[:10]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 10 else "")
            warnings.warn(f"{source.path}: ignoring files that are not images: {shown}", stacklevel=3)
        super().__init__(len(self.files), resolution, xflip)
        self.source = source
        self._bad: set[int] = set()  # per process: files known not to decode

    def _load(self, i: int) -> torch.Tensor:
        for j in ((i + k) % self.num_images for k in range(self.num_images)):
            if j in self._bad:
                continue
            try:
                return pil_to_tensor(square_resize(decode_image(self.source.read(self.files[j])), self.resolution))
            except Exception as exc:  # any undecodable file is skipped, not fatal mid-epoch
                self._bad.add(j)
                warnings.warn(f"{self.source.path}: skipping unreadable image {self.files[j]} ({exc})", stacklevel=2)
        raise DataError(f"none of the {self.num_images} images in {self.source.path} can be decoded")

    def _content_key(self):
        return [[n, self.source.sizes[n]] for n in self.files]


class DemoDataset(ImageDataset):
    """The built-in demo: procedurally drawn cartoon faces, drawn on demand (under 1 ms each).

    resolution: image side; xflip: add mirrored copies; seed: which family of faces;
    count: number of distinct faces.
    """

    def __init__(self, resolution: int, xflip: bool = False, seed: int = 0, count: int = DEMO_SIZE):
        super().__init__(count, resolution, xflip)
        self.seed = seed

    def _load(self, i: int) -> torch.Tensor:
        return pil_to_tensor(draw_face(i, self.seed, self.resolution))

    def _content_key(self):
        return [DEMO_VERSION, self.seed, self.num_images]


def open_dataset(path_or_demo: str | os.PathLike, resolution: int, *, xflip: bool = False) -> ImageDataset:
    """Open training images as a torch Dataset of uint8 tensors [3, resolution, resolution].

    path_or_demo: "demo" for the built-in faces (write "./demo" for a folder of that name), a
    folder or zip made by `stylenat prepare`, or any folder/zip of images (cropped and resized on
    the fly); resolution: image side in pixels; xflip: append mirrored copies (len doubles).
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"resolution must be a positive integer, got {resolution!r}")
    if str(path_or_demo) == "demo":
        return DemoDataset(resolution, xflip)
    source = FileSource(path_or_demo)
    if DATASET_JSON in source.names:
        meta = json.loads(source.read(DATASET_JSON))
        if isinstance(meta, dict) and meta.get("format") == DATASET_FORMAT:
            return PreparedDataset(source, meta, resolution, xflip)
    return RawDataset(source, resolution, xflip)

