"""Improved precision and recall against a brute-force transcription of the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stylenat.errors import ConfigError, DataError
from stylenat.metrics.precision_recall import knn_radii, precision_recall


def brute_radii(points: list[list[float]], k: int) -> list[float]:
    """Distance of each point to its k-th nearest other point, by Python loops."""
    return [sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    real_l, fake_l = real.tolist(), fake.tolist()
    real_r, fake_r = brute_radii(real_l, k), brute_radii(fake_l, k)
    precision = sum(any(math.dist(f, r) <= rr for r, rr in zip(real_l, real_r)) for f in fake_l) / len(fake_l)
    recall = sum(any(math.dist(r, f) <= fr for f, fr in zip(fake_l, fake_r)) for r in real_l) / len(real_l)
    return precision, recall


def feature_sets(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """40 reals and 35 fakes in 5-D whose manifolds overlap only in part."""
    rng = np.random.default_rng(seed)
    real = rng.normal(0, 1, (40, 5))
    fake = rng.normal(0, 1, (35, 5)) * np.array([0.5, 2, 1, 1, 1]) + np.array([0.8, 0, 0, 0, 0])
    return real, fake


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_brute_force_definition(k, dtype):
    for seed in range(3):
        real, fake = feature_sets(seed)
        expected = brute_precision_recall(real, fake, k)
        assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the case is not trivial
        got = precision_recall(real, fake, k=k, dtype=dtype)
        assert (got["precision"], got["recall"]) == pytest.approx(expected, abs=1e-12)


def test_radii_match_the_brute_force_definition():
    real, _ = feature_sets(7)
    for k in (1, 3, 6):
        np.testing.assert_allclose(knn_radii(real, k, dtype=torch.float64).numpy(), brute_radii(real.tolist(), k),
                                   rtol=1e-10)
        np.testing.assert_allclose(knn_radii(real, k, row_batch=7, col_batch=5).numpy(), brute_radii(real.tolist(), k),
                                   rtol=1e-5)


@pytest.mark.parametrize("row_batch, col_batch", [(1, 1), (3, 7), (7, 3), (16, 64), (1000, 1000)])
def test_block_sizes_do_not_change_the_answer(row_batch, col_batch):
    real, fake = feature_sets(11)
    expected = precision_recall(real, fake, k=3)
    assert precision_recall(real, fake, k=3, row_batch=row_batch, col_batch=col_batch) == expected


def test_inputs_may_be_torch_or_numpy_of_any_float_type():
    real, fake = feature_sets(12)
    expected = precision_recall(real, fake)
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake).float()) == expected
    assert precision_recall(real.astype(np.float32), list(fake)) == expected


def test_identical_sets_are_fully_precise_and_fully_covering():
    real, _ = feature_sets(13)
    assert precision_recall(real, real.copy()) == {"precision": 1.0, "recall": 1.0}


def test_far_apart_clusters_give_zero():
    real, fake = feature_sets(14)
    assert precision_recall(real, fake + 1000.0) == {"precision": 0.0, "recall": 0.0}


def test_a_fake_set_covering_half_the_reals():
    # Reals: two far clusters of 20. Fakes: copies of the first cluster. Every fake sits on a real
    # (precision 1); the second cluster is out of every fake ball (recall 1/2).
    rng = np.random.default_rng(15)
    first, second = rng.normal(0, 1, (20, 4)), rng.normal(50, 1, (20, 4))
    result = precision_recall(np.concatenate([first, second]), first.copy())
    assert result == {"precision": 1.0, "recall": 0.5}


def test_a_sample_is_not_its_own_neighbour():
    # With k=1, real radii are the gaps to the nearest other real: 1, 1, 1, 1, 7. Fake 4.5 is 5.5
    # from real 10 (inside its ball of 7); 20 and -1.5 are outside every ball. Fake radii are
    # 6, 15.5, 6, and every real lies within 6 of -1.5 or 4.5.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[4.5], [20.0], [-1.5]])
    np.testing.assert_allclose(knn_radii(real, k=1).numpy(), [1, 1, 1, 1, 7], rtol=1e-6)
    result = precision_recall(real, fake, k=1)
    assert result["precision"] == pytest.approx(1 / 3) and result["recall"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_point_on_a_ball_boundary_counts_as_inside(dtype):
    # Small integers keep every squared distance exact in both types: fake 8 is exactly 2 from
    # real 6, whose k=1 radius is 2; fake 30 is outside every ball.
    real, fake = np.array([[0.0], [2.0], [4.0], [6.0]]), np.array([[8.0], [30.0]])
    assert precision_recall(real, fake, k=1, dtype=dtype) == {"precision": 0.5, "recall": 1.0}


@pytest.mark.parametrize("real, fake, k, error, match", [
    (np.zeros(10), np.zeros((10, 2)), 3, DataError, "2-D"),
    (np.zeros((10, 3)), np.zeros((10, 2)), 3, DataError, "differ in size"),
    (np.zeros((3, 2)), np.zeros((10, 2)), 3, DataError, "at least 4 real samples"),
    (np.zeros((10, 2)), np.zeros((2, 2)), 3, DataError, "at least 4 fake samples"),
    (np.full((10, 2), np.nan), np.zeros((10, 2)), 3, DataError, "NaN"),
    (np.zeros((10, 2)), np.zeros((10, 2)), 0, ConfigError, "k must be a positive integer"),
])
def test_bad_input_is_refused(real, fake, k, error, match):
    with pytest.raises(error, match=match):
        precision_recall(real, fake, k=k)
