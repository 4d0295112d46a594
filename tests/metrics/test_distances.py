"""Frechet distance and KID against closed forms and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stylenat.metrics.distances import frechet_distance, kernel_inception_distance, mmd2_unbiased


def random_spd(rng, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def sqrtm_denman_beavers(a: np.ndarray, steps: int = 60) -> np.ndarray:
    """Principal square root by the Denman-Beavers iteration (eigenvalues of `a` real positive)."""
    y, z = a.copy(), np.eye(len(a))
    for _ in range(steps):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def test_diagonal_and_commuting_covariances_match_the_closed_form():
    # For commuting covariances with eigenvalues a_i, b_i: d = |mu1 - mu2|^2 + sum (sqrt a_i - sqrt b_i)^2.
    rng = np.random.default_rng(0)
    d = 7
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rotated = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-10)


def test_general_covariances_match_an_iterative_matrix_square_root():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    root = sqrtm_denman_beavers(s1 @ s2)
    np.testing.assert_allclose(root @ root, s1 @ s2, atol=1e-10)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)


def test_a_set_against_itself_is_zero_even_with_singular_covariance():
    # 10 samples in 32 dimensions: a rank-9 covariance, the case that trips sqrtm of the product.
    x = np.random.default_rng(2).standard_normal((10, 32)) * 5
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    assert frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(32, rel=1e-9)


def test_non_covariance_input_is_refused():
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def brute_force_mmd2(x, y) -> float:
    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / len(a) + 1) ** 3

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_unbiased_mmd_matches_a_double_loop():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((5, 4)), rng.standard_normal((6, 4)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(brute_force_mmd2(x.tolist(), y.tolist()), rel=1e-12)


def test_kid_of_whole_sets_is_the_mmd_and_subsets_average_to_it():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.3
    full = brute_force_mmd2(x.tolist(), y.tolist())
    # A subset as large as the sets is a permutation of them: every draw gives the same value.
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=1000)
    assert mean == pytest.approx(full, rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    # The unbiased estimator on random subsets has the whole-set U-statistic as its expectation.
    mean, std = kernel_inception_distance(x, y, subsets=4000, subset_size=3, seed=5)
    assert abs(mean - full) < 5 * std / np.sqrt(4000)
    assert kernel_inception_distance(x, y, subsets=10, subset_size=3, seed=5) == \
        kernel_inception_distance(x, y, subsets=10, subset_size=3, seed=5)
