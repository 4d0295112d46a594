"""Improved precision and recall of a generator's features against real ones (Kynkäänniemi et al. 2019).

Each set's manifold is estimated as the union of balls around its samples, each ball's radius
being the distance from the sample to its k-th nearest neighbour in the same set (itself
excluded). Precision is the fraction of fake samples inside the real manifold (how many generated
images look real); recall is the fraction of real samples inside the fake manifold (how much of the
real variety the generator covers).

The paper embeds images with VGG16's fc2 layer (4096-d). This library feeds the 2048-d pool
features of the FID Inception network (stylenat.metrics.inception), so its values are close in
spirit but not numerically comparable with the paper's tables.

Distances are computed block by block (rows x columns of the distance matrix), so memory stays at
about row_batch * (col_batch + k) values however many samples there are: 50k x 50k works.
"""

from __future__ import annotations

import numpy as np
import torch

from stylenat.errors import ConfigError, DataError

__all__ = ["knn_radii", "precision_recall"]

_CENTRE_ROWS = 4096  # rows shifted at a time in float64


def _as_features(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """x as a floating tensor [N, D] of finite values, on its own device (not copied when it already is one)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.from_numpy(np.asarray(x))
        except (TypeError, ValueError) as e:
            raise DataError(f"{name} features must be a float array [N, D], got {type(x).__name__} ({e})") from None
    x = x.detach()
    if not x.is_floating_point():
        x = x.double()
    if x.ndim != 2 or x.shape[1] == 0:
        raise DataError(f"{name} features must be a 2-D array [N, D], got shape {tuple(x.shape)}; "
                        "flatten each sample's features into one row")
    if not torch.isfinite(x).all():
        raise DataError(f"{name} features contain NaN or infinite values; check the feature extractor's input")
    return x


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_size(x: torch.Tensor, k: int, name: str) -> None:
    if len(x) < k + 1:
        raise DataError(f"k-nearest-neighbour radii with k={k} need at least {k + 1} {name}samples, got {len(x)}; "
                        "use more samples or a smaller k")


class _Prepared:
    """A feature set shifted by a common centre, in the compute type, with its squared norms.

    Distances do not change under the shift, but ||x||^2 + ||y||^2 - 2 x.y loses far less to
    cancellation: after centring the norms are of the order of the distances themselves rather
    than of the features' common offset. The shift is done in float64, a row block at a time.
    """

    def __init__(self, x: torch.Tensor, centre: torch.Tensor, dtype: torch.dtype, device: torch.device):
        self.x = torch.empty(x.shape, dtype=dtype, device=device)
        for start in range(0, len(x), _CENTRE_ROWS):
            rows = x[start:start + _CENTRE_ROWS].to(device, torch.float64)
            self.x[start:start + _CENTRE_ROWS] = rows - centre
        self.sq = self.x.square().sum(1)

    def __len__(self) -> int:
        return len(self.x)


def _sq_dist(a: _Prepared, r0: int, r1: int, b: _Prepared, c0: int, c1: int) -> torch.Tensor:
    """Squared distances between rows r0:r1 of a and rows c0:c1 of b, [r1 - r0, c1 - c0], clamped at
    0 (round-off can make them negative)."""
    gram = a.x[r0:r1] @ b.x[c0:c1].T
    return (a.sq[r0:r1, None] + b.sq[None, c0:c1] - 2 * gram).clamp_(min=0)


def _knn_sq_radii(x: _Prepared, k: int, row_batch: int, col_batch: int) -> torch.Tensor:
    """Squared distance of each row of a set to its k-th nearest other row of the same set: [N]."""
    n = len(x)
    out = torch.empty(n, dtype=x.x.dtype, device=x.x.device)
    for r0 in range(0, n, row_batch):
        r1 = min(r0 + row_batch, n)
        # The k smallest so far, unordered: merged with each column block, so a block of the
        # distance matrix is the only large temporary.
        best = torch.full((r1 - r0, k), float("inf"), dtype=out.dtype, device=out.device)
        for c0 in range(0, n, col_batch):
            c1 = min(c0 + col_batch, n)
            d2 = _sq_dist(x, r0, r1, x, c0, c1)
            lo, hi = max(r0, c0), min(r1, c1)
            if lo < hi:  # a sample is not its own neighbour
                idx = torch.arange(lo, hi, device=out.device)
                d2[idx - r0, idx - c0] = float("inf")
            best = torch.cat([best, d2], 1).topk(k, dim=1, largest=False, sorted=False).values
        out[r0:r1] = best.amax(1)
    return out


def knn_radii(features: torch.Tensor | np.ndarray, k: int = 3, row_batch: int = 1024, col_batch: int = 8192,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Distance from each sample to its k-th nearest neighbour in the same set (itself excluded).

    Args:
        features: [N, D] (numpy or torch), any unit; the radii are in that unit.
        k: neighbour rank (1 = nearest other sample); N must exceed k.
        row_batch, col_batch: rows and columns of the distance-matrix block computed at a time.
        dtype: compute type, torch.float32 (fast) or torch.float64.
        device: where to compute; default the device of a torch input, else the CPU.
    Returns:
        float64 tensor [N] on the CPU.
    """
    for name, value in (("k", k), ("row_batch", row_batch), ("col_batch", col_batch)):
        _check_positive(name, value)
    x = _as_features(features, "the")
    _check_size(x, k, "")
    device = torch.device(device) if device is not None else x.device
    prepared = _Prepared(x, x.mean(0, dtype=torch.float64).to(device), _check_dtype(dtype), device)
    return _knn_sq_radii(prepared, k, row_batch, col_batch).double().sqrt().cpu()


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def precision_recall(real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray, k: int = 3,
                     row_batch: int = 1024, col_batch: int = 8192, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake features against real ones.

    precision = fraction of fakes within distance r_k(x) of at least one real x; recall = fraction
    of reals within distance r_k(y) of at least one fake y; r_k is the distance to the k-th nearest
    neighbour in the sample's own set. A point on a ball's boundary counts as inside.

    The paper used VGG16 fc2 features (4096-d) of 50k images and k = 3; the library passes the
    2048-d Inception pool features of stylenat.metrics.inception instead.

    Args:
        real_features: [N, D] features of real images (numpy or torch), N > k.
        fake_features: [M, D] features of generated images, same D and unit, M > k.
        k: neighbour rank setting the ball radii (paper: 3).
        row_batch, col_batch: rows and columns of the distance-matrix block computed at a time;
            memory is about row_batch * (col_batch + k) values of `dtype`, plus the features.
        dtype: compute type: torch.float32 (default; features are centred first, so rounding only
            moves points within about 1e-6 relative of a ball's boundary) or torch.float64.
        device: where to compute; default the device of a torch real_features, else the CPU.
    Returns:
        {"precision": fraction in [0, 1], "recall": fraction in [0, 1]}.
    """
    for name, value in (("k", k), ("row_batch", row_batch), ("col_batch", col_batch)):
        _check_positive(name, value)
    dtype = _check_dtype(dtype)
    real, fake = _as_features(real_features, "real"), _as_features(fake_features, "fake")
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"real and fake features differ in size ({real.shape[1]} vs {fake.shape[1]}); "
                        "extract both with the same network")
    _check_size(real, k, "real ")
    _check_size(fake, k, "fake ")
    device = torch.device(device) if device is not None else real.device
    centre = real.mean(0, dtype=torch.float64).to(device)
    real, fake = _Prepared(real, centre, dtype, device), _Prepared(fake, centre, dtype, device)
    real_r2 = _knn_sq_radii(real, k, row_batch, col_batch)
    fake_r2 = _knn_sq_radii(fake, k, row_batch, col_batch)
    # One pass over the fake x real distances answers both questions.
    fake_inside = torch.zeros(len(fake), dtype=torch.bool, device=device)
    real_inside = torch.zeros(len(real), dtype=torch.bool, device=device)
    for r0 in range(0, len(fake), row_batch):
        r1 = min(r0 + row_batch, len(fake))
        for c0 in range(0, len(real), col_batch):
            c1 = min(c0 + col_batch, len(real))
            d2 = _sq_dist(fake, r0, r1, real, c0, c1)
            fake_inside[r0:r1] |= (d2 <= real_r2[None, c0:c1]).any(1)
            real_inside[c0:c1] |= (d2 <= fake_r2[r0:r1, None]).any(0)
    return {"precision": fake_inside.double().mean().item(), "recall": real_inside.double().mean().item()}
