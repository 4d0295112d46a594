"""Multi-scale sliced Wasserstein distance (SWD) between two image sets (Karras et al. 2018).

The definition follows "Progressive Growing of GANs" (section 5, appendix D):

1. Each image gets a Laplacian pyramid built with the 5-tap binomial filter [1, 4, 6, 4, 1] / 16
   (mirror boundary, as scipy.ndimage's "mirror" and cv2.pyrDown): Gaussian levels are blurred and
   halved down to 16x16; a Laplacian level is a Gaussian level minus the next one upsampled (zeros
   inserted, blurred with 4x the filter); the coarsest level is the 16x16 Gaussian level itself.
   Images of H != W: both axes are halved together while the shorter side stays >= 16 (and both
   sides are even), so the minimum edge applies to the shorter side: 512x384 gives levels
   512x384, 256x192, ..., 32x24; 32x16 gives the one level 32x16. Square images must have a
   power-of-two side, as in the paper.
2. From every level, `patches_per_image` 7x7 neighbourhoods are drawn at uniform random positions
   lying wholly inside the level (rows and columns drawn separately over the level's height and
   width); each is a descriptor of 7 * 7 * 3 = 147 values (channel-major).
3. The descriptors of one set and one level are normalised per colour channel with that set's own
   mean and standard deviation, so SWD ignores a global brightness/contrast difference per channel.
4. Per level, SWD = mean over random unit directions of the 1-D Wasserstein-1 distance between the
   two projected descriptor sets: the mean absolute difference of their sorted projections. The
   reported numbers are that mean x 1e3 (the paper's units), one per level named by its resolution
   (``swd_64``, ``swd_32``, ``swd_16``; ``swd_WxH`` for H != W: ``swd_64x32``), and their average
   ``swd_avg``. Both sets must hold images of one size (H and W each).

Entry points:
    swd_from_images(images_a, images_b, ...): both sets in memory.
    SWDCollector(resolution, ...).add(images) per batch, then swd_from_collectors(a, b, ...): for
    sets too large to hold as images (a generator's output, a dataset read batch by batch).

Memory: a collector keeps levels * patches_per_image * 147 values per image, 2 bytes each in
float16 (the default): 36.75 KiB per level per image at 128 patches, so 184 KiB per 256x256 image
(5 levels) and 1.8 GiB for 10k such images. float16 keeps about 3 significant digits of each
value, an error two orders below the sampling noise of SWD on a few thousand images; pass
dtype=torch.float32 to rule it out at twice the memory. Computing the distances adds two float32
projection buffers of at most `max_buffer_elements` values each (256 MiB each by default).

Time: sorting the projections dominates, levels * 2 * descriptors * directions * repeats values
(for the paper's 16384 images at 1024x1024, 7 levels and 512 directions: 15e9 values, minutes on
a CPU core). On the CPU numpy sorts in place on torch.get_num_threads() threads; device="cuda"
projects and sorts on a GPU instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from stylenat.errors import ConfigError, DataError

__all__ = ["MIN_RESOLUTION", "PATCH_SIZE", "SWDCollector", "laplacian_pyramid", "level_name", "level_resolutions",
           "pyr_down", "pyr_up", "reconstruct_laplacian_pyramid", "sliced_wasserstein", "swd_from_collectors",
           "swd_from_images", "wasserstein1_1d"]

MIN_RESOLUTION = 16  # the coarsest pyramid level (its shorter side, for H != W), as in the paper
PATCH_SIZE = 7
# [1, 4, 6, 4, 1] / 16 is symmetric: weights of the outer pair, the inner pair and the centre.
_BINOMIAL = (1 / 16, 4 / 16, 6 / 16)
# Descriptors fed in small batches are merged into blocks of about this many rows, so the
# projections run as few large matrix products rather than many small ones.
_BLOCK_ROWS = 1 << 16
_DEFAULT_BUFFER_ELEMENTS = 1 << 26  # float32 values per projection buffer: 256 MiB
_STORE_DTYPES = (torch.float16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Laplacian pyramid

def _every_other(x: torch.Tensor, dim: int, start: int, count: int) -> torch.Tensor:
    """`count` entries of x along `dim` (2 or 3), from `start`, with step 2 (a view)."""
    index = [slice(None)] * 4
    index[dim] = slice(start, start + 2 * count - 1, 2)
    return x[tuple(index)]


def _down_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x [B, C, H, W] filtered along `dim` (2: rows, 3: columns) with [1,4,6,4,1]/16, mirror boundary,
    keeping the even positions only (the others are never computed).

    A weighted sum of shifted views rather than a convolution: elementwise arithmetic gives every
    image the same bits whatever batch it comes in, so descriptors do not depend on how a set was
    split into batches.
    """
    half = x.shape[dim] // 2
    padded = F.pad(x, (2, 2, 0, 0) if dim == 3 else (0, 0, 2, 2), mode="reflect")
    s = [_every_other(padded, dim, t, half) for t in range(5)]
    outer, inner, centre = _BINOMIAL
    return outer * (s[0] + s[4]) + inner * (s[1] + s[3]) + centre * s[2]


def _up_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x [B, C, H, W] doubled along `dim`: zeros inserted after each entry, then filtered with
    2 x [1,4,6,4,1]/16 under the mirror boundary of the zero-inserted signal.

    Computed per output phase, without the zeros: an even output 2i is (x[i-1] + 6 x[i] + x[i+1]) / 8,
    an odd one 2i+1 is (x[i] + x[i+1]) / 2. The mirror boundary of the zero-inserted signal makes
    x[-1] = x[1] at the start but x[n] = x[n-1] at the end (its last entry is an inserted zero).
    """
    n = x.shape[dim]
    padded = torch.cat([x.narrow(dim, 1, 1), x, x.narrow(dim, n - 1, 1)], dim)
    prev, here, nxt = (padded.narrow(dim, t, n) for t in range(3))
    even = (prev + nxt) * 0.125 + here * 0.75
    odd = (here + nxt) * 0.5
    return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] float blurred with the binomial filter and halved: [B, C, H/2, W/2].

    Keeps the even rows and columns of the blurred image, as cv2.pyrDown. The filter is
    separable, so each axis is filtered and halved in turn.
    """
    return _down_axis(_down_axis(x, 2), 3)


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] float doubled: zeros inserted after every row and column, then blurred with
    4 x the binomial filter (2 x per axis, restoring the mean), mirror boundary: [B, C, 2H, 2W]."""
    return _up_axis(_up_axis(x, 2), 3)


def laplacian_pyramid(images: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """Laplacian pyramid of a batch, finest level first.

    Args:
        images: [B, C, H, W], pixel values (uint8 is converted to float32; unit kept, e.g. 0..255).
        num_levels: levels wanted; level i is H / 2^i high and W / 2^i wide, so H and W must both
            be divisible by 2^(num_levels - 1). The last level is the Gaussian (blurred) image, the
            others are band-pass differences.
    Returns:
        num_levels float tensors [B, C, H / 2^i, W / 2^i], in the unit of `images`.
    """
    x = images.float() if not images.is_floating_point() else images
    gaussian = [x]
    for _ in range(num_levels - 1):
        gaussian.append(pyr_down(gaussian[-1]))
    return [g - pyr_up(nxt) for g, nxt in itertools.pairwise(gaussian)] + [gaussian[-1]]


def reconstruct_laplacian_pyramid(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """The images a pyramid of laplacian_pyramid came from: upsample and add, coarsest first."""
    x = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        x = pyr_up(x) + level
    return x


def _text(size: int | tuple[int, int]) -> str:
    """A size as WIDTHxHEIGHT."""
    h, w = (size, size) if isinstance(size, int) else size
    return f"{w}x{h}"


def level_name(size: int | tuple[int, int]) -> str:
    """How a level is named in the results: its side for a square (``64``), else ``WxH`` (``64x32``)."""
    return str(size) if isinstance(size, int) else _text(size)


def level_resolutions(resolution: int | tuple[int, int]) -> list[int] | list[tuple[int, int]]:
    """Sizes of the pyramid levels SWD uses for images of size `resolution`, finest first.

    Both axes are halved while the shorter side stays >= 16 and both are even: a square of a power
    of two gives sides resolution .. 16 (as the reference), 48 gives 48, 24; a (height, width) pair
    with H != W gives pairs: (384, 512) -> (384, 512), (192, 256), ..., (24, 32). A square pair is
    its int.
    """
    resolution = _check_resolution(resolution)
    pairs = [(resolution, resolution) if isinstance(resolution, int) else resolution]
    while min(pairs[-1]) // 2 >= MIN_RESOLUTION and not (pairs[-1][0] % 2 or pairs[-1][1] % 2):
        pairs.append((pairs[-1][0] // 2, pairs[-1][1] // 2))
    return [h for h, _ in pairs] if isinstance(resolution, int) else pairs


def _check_resolution(resolution) -> int | tuple[int, int]:
    """`resolution` as SWD holds it (an int for a square, else (height, width)); DataError when SWD
    cannot take it."""
    if isinstance(resolution, (tuple, list)) and len(resolution) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in resolution):
        h, w = int(resolution[0]), int(resolution[1])
        resolution = h if h == w else (h, w)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, tuple)):
        raise DataError(f"SWD image resolution must be an integer number of pixels or a (height, width) pair, got "
                        f"{resolution!r}")
    if min((resolution, resolution) if isinstance(resolution, int) else resolution) < MIN_RESOLUTION:
        raise DataError(f"SWD needs images at least {MIN_RESOLUTION} pixels on the shorter side, got "
                        f"{_text(resolution)}; resize the images")
    return resolution


def _check_images(images: torch.Tensor | np.ndarray, resolution: int | tuple[int, int] | None = None) -> torch.Tensor:
    """images as a uint8 tensor [N, 3, H, W] of a size SWD takes (see level_resolutions), that size
    being `resolution` if given."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise DataError(f"SWD takes images as a uint8 tensor [N, 3, H, W], got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise DataError(f"SWD takes uint8 images (0..255), got {images.dtype}; convert them with "
                        "(x * 255).round().clamp(0, 255).to(torch.uint8) or pass the uint8 originals")
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"SWD takes RGB images [N, 3, H, W], got shape {tuple(images.shape)}; "
                        "convert grey images with x.expand(-1, 3, -1, -1)")
    h, w = images.shape[2:]
    size = _check_resolution((h, w))
    if resolution is not None and size != resolution:
        raise DataError(f"images are {_text(size)} but this SWD collector was made for {_text(resolution)}; "
                        "resize them or make a collector for their size")
    return images


# ---------------------------------------------------------------------------------------------
# Descriptors

def _gather_patches(level: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """7x7 patches of level [B, C, H, W] with top-left corners [B, P, 2] (row, col): [B * P, C * 49].

    A descriptor is laid out channel, row, column (C-major), as the reference implementation.
    """
    b, c = level.shape[:2]
    offsets = torch.arange(PATCH_SIZE, device=level.device)
    rows = (corners[..., 0, None] + offsets)[:, :, :, None]  # [B, P, 7, 1]
    cols = (corners[..., 1, None] + offsets)[:, :, None, :]  # [B, P, 1, 7]
    batch = torch.arange(b, device=level.device)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[batch, rows, cols]  # [B, P, 7, 7, C]
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, c * PATCH_SIZE * PATCH_SIZE)


class SWDCollector:
    """Streaming collector of the Laplacian-pyramid patch descriptors of one image set.

    Feed batches with add(); compare two collectors with swd_from_collectors(). Patch positions
    are drawn from the collector's own generator, one draw per image in feeding order, so the
    descriptors of a set do not depend on how it is split into batches. Two collectors with the
    same seed fed the same images hold identical descriptors (their SWD is exactly 0).

    Args:
        resolution: the images' size: the side of square images (a power of two >= 16), or
            (height, width) for H != W (the shorter side >= 16); see level_resolutions.
        patches_per_image: 7x7 neighbourhoods drawn per image and per level (paper: 128).
        seed: seed of the patch positions.
        dtype: storage type of the descriptors, torch.float16 (2 bytes a value) or torch.float32.
    """

    def __init__(self, resolution: int | tuple[int, int], patches_per_image: int = 128, seed: int = 0,
                 dtype: torch.dtype = torch.float16):
        if not isinstance(patches_per_image, int) or patches_per_image < 1:
            raise ConfigError(f"patches_per_image must be a positive integer, got {patches_per_image!r}")
        if dtype not in _STORE_DTYPES:
            raise ConfigError(f"SWD descriptors are stored as torch.float16 or torch.float32, got {dtype}")
        self.resolution = _check_resolution(resolution)
        self.resolutions = level_resolutions(self.resolution)
        self.patches_per_image = patches_per_image
        self.dtype = dtype
        self.num_images = 0
        self._gen = torch.Generator().manual_seed(seed)
        levels = len(self.resolutions)
        self._blocks: list[list[torch.Tensor]] = [[] for _ in range(levels)]
        self._pending: list[list[torch.Tensor]] = [[] for _ in range(levels)]
        self._pending_rows = 0
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # level -> normalization(level)

    @property
    def descriptor_size(self) -> int:
        """Values per descriptor: 3 * 7 * 7."""
        return 3 * PATCH_SIZE * PATCH_SIZE

    @property
    def num_descriptors(self) -> int:
        """Descriptors held per level: num_images * patches_per_image."""
        return self.num_images * self.patches_per_image

    @staticmethod
    def bytes_per_image(resolution: int | tuple[int, int], patches_per_image: int = 128,
                        dtype: torch.dtype = torch.float16) -> int:
        """Bytes a collector keeps per image of size `resolution` (all levels)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return len(level_resolutions(resolution)) * patches_per_image * 3 * PATCH_SIZE * PATCH_SIZE * itemsize

    @property
    def nbytes(self) -> int:
        """Bytes held by the descriptors now."""
        return self.num_images * self.bytes_per_image(self.resolution, self.patches_per_image, self.dtype)

    def add(self, images: torch.Tensor | np.ndarray) -> None:
        """Draw and keep the descriptors of a batch.

        Args:
            images: uint8 [N, 3, H, W] of the collector's size, pixel values 0..255, on any device
                (the pyramid is built there; descriptors are kept on the CPU).
        """
        images = _check_images(images, self.resolution)
        n = len(images)
        if n == 0:
            return
        levels, p = len(self.resolutions), self.patches_per_image
        # One draw per image keeps the stream, hence the positions, independent of batching.
        uniform = torch.stack([torch.rand((levels, p, 2), generator=self._gen, dtype=torch.float64)
                               for _ in range(n)])
        pyramid = laplacian_pyramid(images, levels)
        for i, level in enumerate(pyramid):
            # Top-left corners that keep the patch inside the level: rows over its height, columns over its width.
            span = torch.tensor(level.shape[2:], dtype=torch.long) - PATCH_SIZE + 1
            corners = torch.minimum((uniform[:, i] * span).long(), span - 1).to(level.device)
            self._pending[i].append(_gather_patches(level, corners).to("cpu", self.dtype))
        self._stats.clear()
        self.num_images += n
        self._pending_rows += n * p
        if self._pending_rows >= _BLOCK_ROWS:
            self._merge_pending()

    def _merge_pending(self) -> None:
        for blocks, pending in zip(self._blocks, self._pending):
            if pending:
                blocks.append(torch.cat(pending))
                pending.clear()
        self._pending_rows = 0

    def _stored(self, level: int) -> Iterator[torch.Tensor]:
        yield from self._blocks[level]
        yield from self._pending[level]

    def descriptors(self, level: int) -> torch.Tensor:
        """All descriptors of level `level` (0 = finest) as stored, unnormalised: [num_descriptors, 147].

        A copy; meant for inspection of small sets.
        """
        stored = list(self._stored(level))
        return torch.cat(stored) if stored else torch.empty(0, self.descriptor_size, dtype=self.dtype)

    def normalization(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [3], std [3]) float64 per colour channel over all stored descriptors of a level.

        std is the population standard deviation, taken in two passes (mean, then squared
        deviations), so a channel with no variation gets exactly 0, which is replaced by 1: the
        descriptors of a set of flat images become 0 instead of NaN.
        """
        if self.num_images == 0:
            raise DataError("this SWD collector holds no images; add() at least one batch first")
        if level not in self._stats:
            count = self.num_descriptors * PATCH_SIZE * PATCH_SIZE
            channels = [block.view(-1, 3, PATCH_SIZE * PATCH_SIZE) for block in self._stored(level)]
            mean = sum(c.double().sum(2).sum(0) for c in channels) / count
            var = sum((c.double() - mean[:, None]).square().sum(2).sum(0) for c in channels) / count
            std = var.sqrt()
            self._stats[level] = mean, torch.where(std > 0, std, torch.ones_like(std))
        return self._stats[level]

    def normalized_blocks(self, level: int, keep: np.ndarray | None = None,
                          device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """Normalised float32 descriptors of a level, block by block: [rows, 147] each.

        Args:
            level: 0 = finest.
            keep: sorted row indices to yield (a subsample), or None for all rows.
            device: where the blocks are yielded (moved there in the storage type, then normalised).
        """
        mean, std = (t.to(device, torch.float32)[:, None] for t in self.normalization(level))
        start = 0
        for block in self._stored(level):
            rows = len(block)
            if keep is not None:
                lo, hi = np.searchsorted(keep, [start, start + rows])
                block = block[torch.from_numpy(keep[lo:hi] - start)]
            start += rows
            x = block.to(device).float().view(-1, 3, PATCH_SIZE * PATCH_SIZE)
            yield ((x - mean) / std).view(-1, self.descriptor_size)


# ---------------------------------------------------------------------------------------------
# Sliced Wasserstein distance

def wasserstein1_1d(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Wasserstein-1 distance between two equal-size 1-D samples: mean |sort(a) - sort(b)|.

    Sorting gives the optimal matching in one dimension for any convex cost.

    Args:
        a, b: samples [n] of one quantity, same unit; the result is in that unit.
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if len(a) != len(b) or len(a) == 0:
        raise DataError(f"wasserstein1_1d takes two non-empty samples of the same size, got {len(a)} and {len(b)}; "
                        "subsample the larger one")
    return float(np.abs(np.sort(a) - np.sort(b)).mean())


# directions [D, k] float32 (on the compute device) -> projections [k, n] float32 (there too)
Projector = Callable[[torch.Tensor], torch.Tensor]


def _project(blocks: Callable[[], Iterator[torch.Tensor]], n: int, device: torch.device | None,
             directions: torch.Tensor) -> torch.Tensor:
    """Projections of n descriptors, row blocks [rows, D] from blocks(), on directions [D, k]: [k, n] float32.

    Direction-major, so each direction's projections are contiguous for the sort. With device None
    the result lives in a numpy array (sorted in place later, without torch.sort's index tensor).
    """
    k = directions.shape[1]
    out = torch.from_numpy(np.empty((k, n), np.float32)) if device is None else \
        torch.empty((k, n), dtype=torch.float32, device=device)
    start = 0
    for block in blocks():
        out[:, start:start + len(block)] = directions.T @ block.T
        start += len(block)
    assert start == n, (start, n)
    return out


def _sort_rows_in_place(x: np.ndarray) -> None:
    """Sort each row of x; rows are split over torch.get_num_threads() threads (numpy's sort
    releases the GIL)."""
    workers = min(torch.get_num_threads(), len(x))
    if workers <= 1:
        x.sort(axis=1)
        return
    bounds = np.linspace(0, len(x), workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda ij: x[ij[0]:ij[1]].sort(axis=1), itertools.pairwise(bounds)))


def _sorted_abs_diff_sum(pa: torch.Tensor, pb: torch.Tensor, in_place: bool) -> float:
    """Sum over rows of sum |sort(pa_row) - sort(pb_row)|, in float64. in_place: numpy-backed CPU
    tensors that may be overwritten."""
    if in_place:
        a, b = pa.numpy(), pb.numpy()
        _sort_rows_in_place(a)
        _sort_rows_in_place(b)
        # |a - b| equals |b - a| bit for bit, which makes the result exactly symmetric.
        np.subtract(a, b, out=a)
        np.abs(a, out=a)
        return float(a.sum(dtype=np.float64))
    return float((pa.sort(dim=1).values - pb.sort(dim=1).values).abs().sum(dtype=torch.float64))


def _mean_sliced_w1(project_a: Projector, project_b: Projector, dim: int, n: int, directions: int,
                    repeats: int, gen: torch.Generator, max_buffer_elements: int,
                    device: torch.device | None) -> float:
    """Mean over repeats * directions random unit directions of W1 between the projected sets.

    The mean over all directions equals the reference's mean over repeats of per-repeat means (the
    repeats are of equal size); pooling them lets one pass over the descriptors serve as many
    directions as the buffer holds.
    """
    # Drawn on the CPU in float64 whatever the device, so a seed means the same directions.
    dirs = torch.cat([torch.randn(dim, directions, generator=gen, dtype=torch.float64) for _ in range(repeats)], 1)
    dirs = (dirs / dirs.norm(dim=0, keepdim=True)).float().to(device or "cpu")
    total_dirs = directions * repeats
    per_chunk = max(1, min(total_dirs, max_buffer_elements // max(n, 1)))
    total = 0.0
    for start in range(0, total_dirs, per_chunk):
        chunk = dirs[:, start:start + per_chunk]
        total += _sorted_abs_diff_sum(project_a(chunk), project_b(chunk), in_place=device is None)
    return total / (n * total_dirs)


def _subsample(n_a: int, n_b: int, rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Sorted rows to keep of the larger set so both have min(n_a, n_b); None keeps all.

    The draw depends on the sizes only, not on which set comes first, so SWD stays symmetric.
    """
    if n_a == n_b:
        return None, None
    keep = np.sort(rng.choice(max(n_a, n_b), size=min(n_a, n_b), replace=False))
    return (keep, None) if n_a > n_b else (None, keep)


def _check_counts(directions: int, repeats: int, max_buffer_elements: int) -> None:
    for name, value in (("directions", directions), ("repeats", repeats), ("max_buffer_elements", max_buffer_elements)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def sliced_wasserstein(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, directions: int = 128,
                       repeats: int = 4, seed: int = 0, max_buffer_elements: int = _DEFAULT_BUFFER_ELEMENTS,
                       device: torch.device | str | None = None) -> float:
    """Sliced Wasserstein-1 distance between two point sets held in memory, as they are (no normalising).

    Mean over repeats * directions random unit directions of wasserstein1_1d of the projections;
    the larger set is first subsampled without replacement to the size of the smaller.

    Args:
        a, b: points [n_a, D] and [n_b, D], same unit; the result is in that unit (not x 1e3).
        directions: directions per repetition. repeats: repetitions, each with fresh directions.
        seed: seed of the directions and of the subsample.
        max_buffer_elements: float32 values per projection buffer (memory bound of a chunk of
            directions).
        device: where to project and sort (e.g. "cuda"); None: the CPU, sorting in place with numpy
            on torch.get_num_threads() threads.
    """
    _check_counts(directions, repeats, max_buffer_elements)
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).detach().cpu().float()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).detach().cpu().float()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) == 0 or len(b) == 0:
        raise DataError(f"sliced_wasserstein takes two non-empty point sets [n, D] of the same D, got "
                        f"{tuple(a.shape)} and {tuple(b.shape)}")
    keep_a, keep_b = _subsample(len(a), len(b), np.random.default_rng([seed, 1]))
    a = a if keep_a is None else a[torch.from_numpy(keep_a)]
    b = b if keep_b is None else b[torch.from_numpy(keep_b)]
    n = len(a)
    gen = torch.Generator().manual_seed(seed)
    device = None if device is None else torch.device(device)
    a, b = a.to(device or "cpu"), b.to(device or "cpu")
    return _mean_sliced_w1(partial(_project, lambda: iter([a]), n, device),
                           partial(_project, lambda: iter([b]), n, device),
                           a.shape[1], n, directions, repeats, gen, max_buffer_elements, device)


def swd_from_collectors(a: SWDCollector, b: SWDCollector, directions: int = 128, repeats: int = 4, seed: int = 0,
                        max_buffer_elements: int = _DEFAULT_BUFFER_ELEMENTS,
                        device: torch.device | str | None = None) -> dict[str, float]:
    """SWD x 1e3 per pyramid level, and their average, between the image sets of two collectors.

    Each set is normalised with its own per-level, per-channel statistics (over all its
    descriptors); when the sets hold different numbers of descriptors the larger is subsampled.

    Args:
        a, b: collectors made for the same size (height and width), each fed at least one image.
        directions: random unit directions per repetition (reference: 128).
        repeats: repetitions with fresh directions (reference: 4); the distance averages all
            repeats * directions of them.
        seed: seed of the directions and of the subsample; the same seed gives the same result.
        max_buffer_elements: float32 values per projection buffer, bounding the memory used beyond
            the descriptors to 2 * 4 * max_buffer_elements bytes (but at least one direction).
        device: where to project and sort (e.g. "cuda", much faster for large sets; the
            descriptors stay on the CPU and travel block by block); None: the CPU, sorting in
            place with numpy on torch.get_num_threads() threads.
    Returns:
        {"swd_<side>": SWD x 1e3 for each level, finest first (``swd_<W>x<H>`` for H != W), ...,
        "swd_avg": their mean}.
    """
    _check_counts(directions, repeats, max_buffer_elements)
    if a.resolution != b.resolution:
        raise DataError(f"SWD compares image sets of one resolution, got {_text(a.resolution)} and "
                        f"{_text(b.resolution)}; resize one set")
    for name, c in (("first", a), ("second", b)):
        if c.num_images == 0:
            raise DataError(f"the {name} SWD collector holds no images; add() at least one batch first")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    device = None if device is None else torch.device(device)
    result: dict[str, float] = {}
    for level, side in enumerate(a.resolutions):
        n_a, n_b = a.num_descriptors, b.num_descriptors
        keep_a, keep_b = _subsample(n_a, n_b, rng)
        n = min(n_a, n_b)
        where = device or "cpu"
        dist = _mean_sliced_w1(partial(_project, partial(a.normalized_blocks, level, keep_a, where), n, device),
                               partial(_project, partial(b.normalized_blocks, level, keep_b, where), n, device),
                               a.descriptor_size, n, directions, repeats, gen, max_buffer_elements, device)
        result[f"swd_{level_name(side)}"] = dist * 1e3
    result["swd_avg"] = float(np.mean(list(result.values())))
    return result


def swd_from_images(images_a: torch.Tensor | np.ndarray, images_b: torch.Tensor | np.ndarray,
                    patches_per_image: int = 128, directions: int = 128, repeats: int = 4, seed: int = 0,
                    batch_size: int = 64, dtype: torch.dtype = torch.float16,
                    device: torch.device | str | None = None) -> dict[str, float]:
    """SWD x 1e3 per pyramid level and their average between two image sets held in memory.

    Both sets draw their patch positions from the same seed, so identical sets give exactly 0 and
    swapping the sets gives the same numbers.

    Args:
        images_a, images_b: uint8 [N, 3, H, W] and [M, 3, H, W] (one size for both sets),
            pixel values 0..255: square with a power-of-two side >= 16, or H != W with the shorter
            side >= 16 (see level_resolutions). The paper used 16384 images a set; a few hundred
            already rank models but read higher.
        patches_per_image: 7x7 neighbourhoods per image and level (reference: 128).
        directions, repeats, seed: as in swd_from_collectors (seed also draws the patches).
        batch_size: images per pyramid computation (memory: about 40 * H * W bytes per image).
        dtype: descriptor storage type, see SWDCollector.
        device: where to project and sort, see swd_from_collectors (the pyramids are built where
            the images are).
    Returns:
        {"swd_<side>": ..., "swd_avg": ...} as swd_from_collectors.
    """
    images_a, images_b = _check_images(images_a), _check_images(images_b)
    if images_a.shape[2:] != images_b.shape[2:]:
        raise DataError(f"SWD compares image sets of one resolution, got {_text(tuple(images_a.shape[2:]))} and "
                        f"{_text(tuple(images_b.shape[2:]))}; resize one set")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    collectors = []
    for images in (images_a, images_b):
        if len(images) == 0:
            raise DataError("SWD needs at least one image in each set, got an empty set")
        collector = SWDCollector(tuple(images.shape[2:]), patches_per_image, seed, dtype)
        for start in range(0, len(images), batch_size):
            collector.add(images[start:start + batch_size])
        collectors.append(collector)
    return swd_from_collectors(collectors[0], collectors[1], directions, repeats, seed, device=device)
