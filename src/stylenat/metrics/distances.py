"""Distances between two sets of Inception features: Frechet distance (FID) and KID, in float64."""

from __future__ import annotations

import numpy as np

from stylenat.errors import DataError

# Relative size of a negative eigenvalue that is still round-off, not a broken covariance.
_NEG_EIG_TOL = 1e-6


def _psd_eigh(m: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix, eigenvalues at round-off level set to 0.

    Zeroing them (numpy.linalg.matrix_rank's threshold) matters for singular covariances: the
    square root of a 1e-14 round-off eigenvalue would add a spurious 1e-7 to tr sqrt per null
    direction.
    """
    w, v = np.linalg.eigh((m + m.T) / 2)
    scale = max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    if w.min(initial=0.0) < -_NEG_EIG_TOL * scale:
        raise ValueError(f"{what} is not positive semi-definite (eigenvalue {w.min():.3g}); "
                         "pass covariance matrices of real features")
    return np.where(w > len(w) * np.finfo(np.float64).eps * scale, w, 0.0), v


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2).

    Args:
        mu1, mu2: means [D]. sigma1, sigma2: covariances [D, D] (symmetric PSD).
    The trace of sqrt(sigma1 sigma2) is taken as sum sqrt(eig(A sigma2 A)) with A = sqrt(sigma1):
    A sigma2 A is similar to sigma1 sigma2 but symmetric PSD, so its eigenvalues are real and
    non-negative even when the product is singular (fewer samples than dimensions). This replaces
    the usual scipy.linalg.sqrtm of the non-symmetric product, its eps*I retry and its dropping of
    small imaginary parts; round-off negatives are set to 0 and larger ones raise.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    w1, v1 = _psd_eigh(sigma1, "sigma1")
    root1 = (v1 * np.sqrt(w1)) @ v1.T
    w12, _ = _psd_eigh(root1 @ sigma2 @ root1, "sqrt(sigma1) sigma2 sqrt(sigma1)")
    _psd_eigh(sigma2, "sigma2")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(w12).sum())


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for all pairs: x [n, d], y [m, d] -> [n, m]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel: x [n, d], y [m, d] (n, m >= 2).

    mean of k(x_i, x_j) over i != j + mean of k(y_i, y_j) over i != j - 2 mean of k(x_i, y_j).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, m = len(x), len(y)
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * polynomial_kernel(x, y).mean())


def kernel_inception_distance(feats1, feats2, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std of unbiased MMD^2 over random subsets.

    Args:
        feats1, feats2: features [n1, D], [n2, D].
        subsets: number of subset pairs drawn. subset_size: images per subset, lowered to the
            smaller set's size when a set is smaller (as stylegan2-ada does).
        seed: seed of the subset draws, so a result can be repeated.
    """
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    size = min(subset_size, len(feats1), len(feats2))
    if size < 2:
        raise DataError("KID needs at least 2 images on each side")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(feats1[rng.choice(len(feats1), size, replace=False)],
                            feats2[rng.choice(len(feats2), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))
