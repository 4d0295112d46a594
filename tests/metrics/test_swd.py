"""Sliced Wasserstein distance: the pyramid against a loop convolution, W1 against brute force, and
the properties the metric must have (zero, symmetric, repeatable, ranks datasets)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from stylenat.errors import DataError
from stylenat.metrics.swd import (
    SWDCollector,
    laplacian_pyramid,
    level_resolutions,
    pyr_down,
    pyr_up,
    reconstruct_laplacian_pyramid,
    sliced_wasserstein,
    swd_from_collectors,
    swd_from_images,
    wasserstein1_1d,
)

BINOMIAL_2D = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0


# ---------------------------------------------------------------------------------------------
# Oracles, written independently of the implementation

def mirror_index(i: int, n: int) -> int:
    """scipy.ndimage "mirror" boundary: ... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ..."""
    period = 2 * n - 2
    i = abs(i) % period
    return i if i < n else period - i


def convolve_mirror(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """img [C, H, W] convolved with a symmetric 5x5 kernel, mirror boundary, float64."""
    _, h, w = img.shape
    out = np.zeros(img.shape)
    for dy, dx in itertools.product(range(-2, 3), repeat=2):
        rows = [mirror_index(y + dy, h) for y in range(h)]
        cols = [mirror_index(x + dx, w) for x in range(w)]
        out += kernel[dy + 2, dx + 2] * img[:, rows][:, :, cols]
    return out


def down_oracle(img: np.ndarray) -> np.ndarray:
    return convolve_mirror(img, BINOMIAL_2D)[:, ::2, ::2]


def up_oracle(img: np.ndarray) -> np.ndarray:
    c, h, w = img.shape
    z = np.zeros((c, 2 * h, 2 * w))
    z[:, ::2, ::2] = img
    return convolve_mirror(z, 4 * BINOMIAL_2D)


def laplacian_oracle(img: np.ndarray, levels: int) -> list[np.ndarray]:
    gauss = [img.astype(np.float64)]
    for _ in range(levels - 1):
        gauss.append(down_oracle(gauss[-1]))
    return [g - up_oracle(n) for g, n in itertools.pairwise(gauss)] + [gauss[-1]]


def w1_brute_force(a: list[float], b: list[float]) -> float:
    """Optimal transport between two equal-size uniform samples: the best of all matchings."""
    return min(sum(abs(x - b[j]) for x, j in zip(a, perm)) for perm in itertools.permutations(range(len(b)))) / len(a)


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def wave_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth images: per channel, three plane waves of fixed frequencies, random directions and phases."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.full((n, 3, size, size), 128.0)
    for i, c in itertools.product(range(n), range(3)):
        for freq in (1.5, 2.5, 4):
            angle, phase = rng.uniform(0, 2 * np.pi, 2)
            out[i, c] += 30 * np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    return torch.from_numpy(np.clip(np.round(out), 0, 255).astype(np.uint8))


def block_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Sharp-edged images: overlapping rectangles whose channels are each 0 or 255, on black."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 3, size, size), np.uint8)
    for i in range(n):
        for _ in range(12):
            y0, x0 = rng.integers(-4, size - 2, 2)
            h, w = rng.integers(3, size // 2, 2)
            out[i, :, max(y0, 0):y0 + h, max(x0, 0):x0 + w] = rng.choice([0, 255], (3, 1, 1))
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Laplacian pyramid

def test_pyramid_matches_a_loop_convolution_with_mirror_boundary():
    img = np.random.default_rng(0).uniform(0, 255, (3, 32, 32))
    x = torch.from_numpy(img).float()[None]
    np.testing.assert_allclose(pyr_down(x)[0].numpy(), down_oracle(img), atol=1e-3)
    np.testing.assert_allclose(pyr_up(x)[0].numpy(), up_oracle(img), atol=1e-3)
    for got, want in zip(laplacian_pyramid(x, 2), laplacian_oracle(img, 2), strict=True):
        np.testing.assert_allclose(got[0].numpy(), want, atol=2e-3)


def test_pyramid_reconstructs_the_images():
    images = random_images(2, 64, seed=1)
    pyramid = laplacian_pyramid(images, 3)
    assert [tuple(p.shape) for p in pyramid] == [(2, 3, 64, 64), (2, 3, 32, 32), (2, 3, 16, 16)]
    np.testing.assert_allclose(reconstruct_laplacian_pyramid(pyramid).numpy(), images.float().numpy(), atol=1e-3)


def test_flat_images_have_empty_bands_and_a_flat_coarsest_level():
    # Both filters keep a constant (weights sum to 1, and to 1 per phase when upsampling).
    images = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    band, coarse = laplacian_pyramid(images, 2)
    assert band.abs().max() < 1e-4
    np.testing.assert_allclose(coarse.numpy(), 77.0, atol=1e-4)


def test_level_resolutions():
    assert level_resolutions(16) == [16]
    assert level_resolutions(256) == [256, 128, 64, 32, 16]


# ---------------------------------------------------------------------------------------------
# Wasserstein distances

@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_1d_w1_of_sorted_samples_is_the_optimal_matching(n):
    rng = np.random.default_rng(n)
    for _ in range(3):
        a, b = rng.normal(0, 1, n), rng.normal(0.5, 2, n)
        assert wasserstein1_1d(a, b) == pytest.approx(w1_brute_force(list(a), list(b)), rel=1e-12)


def test_sliced_w1_in_one_dimension_is_the_1d_w1():
    # In 1-D the only unit directions are +1 and -1, and W1 does not see the sign.
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 6), rng.normal(1, 3, 6)
    expected = w1_brute_force(list(a), list(b))
    assert sliced_wasserstein(a[:, None], b[:, None], directions=5, repeats=2) == pytest.approx(expected, rel=1e-6)


def test_sliced_w1_of_a_translated_set_is_the_mean_projected_shift():
    # Shifting by v moves every projection by d.v, so SWD = E|d.v| over unit d in R^D, which is
    # |v| Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2)).
    d = 5
    rng = np.random.default_rng(4)
    a = rng.normal(0, 1, (300, d))
    v = rng.normal(0, 1, d)
    expected = np.linalg.norm(v) * math.gamma(d / 2) / (math.sqrt(math.pi) * math.gamma((d + 1) / 2))
    got = sliced_wasserstein(a, a + v, directions=512, repeats=4, seed=0)
    assert got == pytest.approx(expected, rel=0.03)


def test_sliced_w1_does_not_depend_on_the_projection_chunking():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, (200, 7)), rng.normal(0.3, 1, (150, 7))
    whole = sliced_wasserstein(a, b, directions=64, repeats=2, seed=3)
    chunked = sliced_wasserstein(a, b, directions=64, repeats=2, seed=3, max_buffer_elements=500)
    assert chunked == pytest.approx(whole, rel=1e-6)
    assert sliced_wasserstein(b, a, directions=64, repeats=2, seed=3) == whole
    # The torch path (used for a GPU) sorts with torch.sort instead of numpy's in-place sort.
    assert sliced_wasserstein(a, b, directions=64, repeats=2, seed=3, device="cpu") == pytest.approx(whole, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Descriptors

def test_descriptors_are_7x7_windows_of_the_pyramid_levels():
    images = random_images(2, 32, seed=6)
    collector = SWDCollector(32, patches_per_image=5, seed=0, dtype=torch.float32)
    collector.add(images)
    pyramid = laplacian_pyramid(images, 2)
    for level, band in enumerate(pyramid):
        desc = collector.descriptors(level).view(2, 5, 3, 7, 7)
        side = band.shape[-1]
        for i, p in itertools.product(range(2), range(5)):
            windows = [band[i, :, y:y + 7, x:x + 7] for y in range(side - 6) for x in range(side - 6)]
            assert any(torch.equal(desc[i, p], w) for w in windows), (level, i, p)


def test_normalization_is_the_per_channel_mean_and_std_of_the_stored_descriptors():
    collector = SWDCollector(32, patches_per_image=16, seed=2)
    collector.add(random_images(3, 32, seed=7))
    for level in range(2):
        d = collector.descriptors(level).double().view(-1, 3, 49).numpy()
        mean, std = collector.normalization(level)
        np.testing.assert_allclose(mean.numpy(), d.mean(axis=(0, 2)), rtol=1e-10)
        np.testing.assert_allclose(std.numpy(), d.std(axis=(0, 2)), rtol=1e-8)


def test_descriptors_do_not_depend_on_batching_and_memory_is_as_documented():
    images = random_images(7, 32, seed=8)
    whole, pieces = SWDCollector(32, 8, seed=1), SWDCollector(32, 8, seed=1)
    whole.add(images)
    for start in range(0, 7, 3):
        pieces.add(images[start:start + 3])
    for level in range(2):
        assert torch.equal(whole.descriptors(level), pieces.descriptors(level))
    assert whole.nbytes == sum(whole.descriptors(i).numel() * 2 for i in range(2)) == 7 * 2 * 8 * 147 * 2
    assert SWDCollector.bytes_per_image(256) == 5 * 128 * 147 * 2
    assert SWDCollector.bytes_per_image(64, 128, torch.float32) == 3 * 128 * 147 * 4


# ---------------------------------------------------------------------------------------------
# The metric

FAST = {"patches_per_image": 32, "directions": 64, "repeats": 2}


def test_identical_sets_give_exactly_zero_and_names_follow_the_levels():
    images = random_images(6, 64, seed=9)
    result = swd_from_images(images, images.clone(), seed=4, **FAST)
    assert result == {"swd_64": 0.0, "swd_32": 0.0, "swd_16": 0.0, "swd_avg": 0.0}
    assert list(swd_from_images(images[:, :, :16, :16], images[:, :, :16, :16], **FAST)) == ["swd_16", "swd_avg"]


def test_swd_is_symmetric_and_repeatable():
    a, b = random_images(5, 32, seed=10), wave_images(4, 32, seed=11)
    ab = swd_from_images(a, b, seed=2, **FAST)
    assert swd_from_images(b, a, seed=2, **FAST) == ab  # also with the subsample (5 vs 4 images)
    assert swd_from_images(a, b, seed=2, **FAST) == ab
    other = swd_from_images(a, b, seed=3, **FAST)
    assert other != ab and other["swd_avg"] == pytest.approx(ab["swd_avg"], rel=0.3)
    assert ab["swd_avg"] == pytest.approx(np.mean([ab["swd_32"], ab["swd_16"]]), rel=1e-12)


def test_swd_ignores_a_per_set_contrast_change():
    # Descriptors are normalised per set, so doubling every pixel of a set changes nothing.
    a = random_images(4, 32, seed=12) // 2
    result = swd_from_images(a, a * 2, **FAST)
    assert result["swd_avg"] < 1e-6


def test_flat_images_give_finite_numbers():
    # Their bands have no variation at all; normalising must not divide by zero.
    flat = torch.full((3, 3, 32, 32), 90, dtype=torch.uint8)
    assert swd_from_images(flat, flat, **FAST)["swd_avg"] == 0.0
    assert all(math.isfinite(v) and v > 0 for v in swd_from_images(flat, random_images(3, 32, 0), **FAST).values())


def test_halves_of_one_dataset_are_closer_than_two_datasets():
    # SWD of small sets has a sampling floor (about 1/sqrt(descriptors), x 1e3), hence 32 images a
    # side and margins rather than a near-zero within-set value. The 16x16 level, blurred, tells
    # the sets apart least.
    waves, blocks = wave_images(64, 32, seed=0), block_images(64, 32, seed=100)
    options = {"patches_per_image": 64, "directions": 64, "repeats": 2}
    within_waves = swd_from_images(waves[:32], waves[32:], **options)
    within_blocks = swd_from_images(blocks[:32], blocks[32:], **options)
    between = swd_from_images(waves[:32], blocks[32:], **options)
    for key, margin in (("swd_32", 2.0), ("swd_16", 1.3), ("swd_avg", 1.8)):
        assert between[key] > margin * max(within_waves[key], within_blocks[key]), key


def test_collectors_give_the_same_numbers_as_images_in_memory():
    a, b = random_images(6, 32, seed=15), wave_images(6, 32, seed=16)
    ca, cb = SWDCollector(32, 32, seed=5), SWDCollector(32, 32, seed=5)
    for start in range(0, 6, 4):
        ca.add(a[start:start + 4])
        cb.add(b[start:start + 4])
    got = swd_from_collectors(ca, cb, directions=64, repeats=2, seed=5, max_buffer_elements=1000)
    want = swd_from_images(a, b, seed=5, batch_size=6, **FAST)
    assert got == pytest.approx(want, rel=1e-6)
    on_torch = swd_from_collectors(ca, cb, directions=64, repeats=2, seed=5, device="cpu")
    assert on_torch == pytest.approx(want, rel=1e-6)
    assert swd_from_collectors(cb, ca, directions=64, repeats=2, seed=5, device="cpu") == on_torch
    assert swd_from_collectors(ca, ca, directions=64, repeats=2, seed=5, device="cpu")["swd_avg"] == 0.0


@pytest.mark.parametrize("images, match", [
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "at least 16 pixels on the shorter side, got 8x8"),
    (torch.zeros(2, 3, 12, 12, dtype=torch.uint8), "at least 16 pixels on the shorter side, got 12x12"),
    (torch.zeros(2, 3, 32, 8, dtype=torch.uint8), "at least 16 pixels on the shorter side, got 8x32"),
    (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), r"\[N, 3, H, W\]"),
    (torch.zeros(2, 3, 16, 16), "uint8"),
    (torch.zeros(0, 3, 16, 16, dtype=torch.uint8), "at least one image"),
])
def test_bad_images_are_refused(images, match):
    with pytest.raises(DataError, match=match):
        swd_from_images(images, torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_mismatched_or_empty_collectors_are_refused():
    with pytest.raises(DataError, match="one resolution"):
        swd_from_images(random_images(2, 16, 0), random_images(2, 32, 0))
    c16, c32 = SWDCollector(16), SWDCollector(32)
    with pytest.raises(DataError, match="made for 32x32"):
        c32.add(random_images(1, 16, 0))
    c16.add(random_images(1, 16, 0))
    with pytest.raises(DataError, match="no images"):
        swd_from_collectors(c16, SWDCollector(16))
    with pytest.raises(DataError, match="one resolution"):
        swd_from_collectors(c16, c32)
    with pytest.raises(DataError, match="at least 16 pixels"):
        SWDCollector(10)
    assert SWDCollector(100).resolutions == [100, 50, 25]  # any size: halved while even and >= 16


# ---------------------------------------------------------------------------------------------
# Images of H != W (height and width on their own axes throughout)

def rect_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def swd_oracle(images_a: torch.Tensor, images_b: torch.Tensor, patches: int, directions: int, repeats: int,
               seed: int) -> dict[str, float]:
    """SWD by the definition, in float64 numpy, for two sets of one size and count: pyramid by loop
    convolution, patches cut by slicing, per-set per-channel normalisation, W1 of sorted projections.

    It draws its random numbers from the same torch streams as the implementation (positions: one
    rand((levels, patches, 2)) per image; directions: one randn(147, directions) per repeat and level)
    so the two can be compared number for number; everything else is computed here.
    """
    n, _, h, w = images_a.shape
    sizes = [(h, w)]
    while min(sizes[-1]) // 2 >= 16 and sizes[-1][0] % 2 == 0 and sizes[-1][1] % 2 == 0:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    levels = len(sizes)
    per_set = []
    for images in (images_a, images_b):
        gen = torch.Generator().manual_seed(seed)
        desc = [[] for _ in range(levels)]
        for img in images.numpy():
            u = torch.rand((levels, patches, 2), generator=gen, dtype=torch.float64).numpy()
            for level, band in enumerate(laplacian_oracle(img, levels)):
                lh, lw = band.shape[1:]
                assert (lh, lw) == sizes[level]
                for y0, x0 in zip(np.minimum((u[level, :, 0] * (lh - 6)).astype(int), lh - 7),
                                  np.minimum((u[level, :, 1] * (lw - 6)).astype(int), lw - 7)):
                    desc[level].append(band[:, y0:y0 + 7, x0:x0 + 7].ravel())
        normalised = []
        for d in desc:
            d = np.stack(d).reshape(-1, 3, 49)
            mean, std = d.mean(axis=(0, 2)), d.std(axis=(0, 2))
            normalised.append(((d - mean[:, None]) / np.where(std > 0, std, 1)[:, None]).reshape(-1, 147))
        per_set.append(normalised)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for level, (hl, wl) in enumerate(sizes):
        dirs = torch.cat([torch.randn(147, directions, generator=gen, dtype=torch.float64) for _ in range(repeats)], 1)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True)).numpy()
        pa, pb = per_set[0][level] @ dirs, per_set[1][level] @ dirs
        out[f"swd_{wl}x{hl}"] = float(np.abs(np.sort(pa, axis=0) - np.sort(pb, axis=0)).mean()) * 1e3
    out["swd_avg"] = float(np.mean(list(out.values())))
    return out


def test_rectangular_pyramid_matches_a_loop_convolution():
    img = np.random.default_rng(20).uniform(0, 255, (3, 24, 40))  # 40 wide, 24 high
    x = torch.from_numpy(img).float()[None]
    assert pyr_down(x).shape == (1, 3, 12, 20) and pyr_up(x).shape == (1, 3, 48, 80)
    np.testing.assert_allclose(pyr_down(x)[0].numpy(), down_oracle(img), atol=1e-3)
    np.testing.assert_allclose(pyr_up(x)[0].numpy(), up_oracle(img), atol=1e-3)
    for got, want in zip(laplacian_pyramid(x, 3), laplacian_oracle(img, 3), strict=True):
        np.testing.assert_allclose(got[0].numpy(), want, atol=2e-3)


def test_rectangular_levels_stop_at_the_shorter_side():
    assert level_resolutions((16, 32)) == [(16, 32)]  # 32 wide, 16 high: one level
    assert level_resolutions((384, 512)) == [(384, 512), (192, 256), (96, 128), (48, 64), (24, 32)]
    assert level_resolutions((512, 384)) == [(512, 384), (256, 192), (128, 96), (64, 48), (32, 24)]
    assert level_resolutions((64, 96)) == [(64, 96), (32, 48), (16, 24)]
    assert level_resolutions(48) == [48, 24] and level_resolutions(24) == [24] and level_resolutions(64) == [64, 32, 16]
    assert level_resolutions((34, 64)) == [(34, 64), (17, 32)]  # 17 is odd: no further halving
    assert level_resolutions([32, 32]) == [32, 16]  # a square pair is the square
    with pytest.raises(DataError, match="at least 16 pixels on the shorter side, got 64x8"):
        level_resolutions((8, 64))
    assert SWDCollector.bytes_per_image((64, 96)) == 3 * 128 * 147 * 2


def test_rectangular_swd_matches_the_definition_computed_naively():
    # 48 wide, 32 high: two levels (48x32, 24x16); corners range over 26 rows and 42 columns at the
    # finest level, so drawing columns over the height (or the reverse) would give other numbers.
    a, b = rect_images(3, 32, 48, seed=21), wave_images(3, 48, seed=22)[:, :, :32, :]
    options = {"patches_per_image": 12, "directions": 16, "repeats": 2, "seed": 3}
    got = swd_from_images(a, b, dtype=torch.float32, **options)
    want = swd_oracle(a, b, patches=12, directions=16, repeats=2, seed=3)
    assert list(got) == ["swd_48x32", "swd_24x16", "swd_avg"]
    assert got == pytest.approx(want, rel=1e-4)


def test_rectangular_descriptors_are_windows_anywhere_in_the_level():
    images = rect_images(2, 16, 40, seed=23)
    collector = SWDCollector((16, 40), patches_per_image=24, seed=0, dtype=torch.float32)
    collector.add(images)
    desc = collector.descriptors(0).view(2, 24, 3, 7, 7)
    found = set()
    for i, p in itertools.product(range(2), range(24)):
        hits = [(y, x) for y in range(16 - 6) for x in range(40 - 6)
                if torch.equal(desc[i, p], images[i, :, y:y + 7, x:x + 7].float())]
        assert hits, (i, p)
        found.add(hits[0])
    assert max(x for _, x in found) > 16 and max(y for y, _ in found) <= 9  # columns span the width


def test_rectangular_swd_is_zero_for_one_set_and_grows_with_noise():
    base = wave_images(8, 64, seed=24)[:, :, :32, :]  # 64 wide, 32 high
    assert swd_from_images(base, base.clone(), **FAST) == {"swd_64x32": 0.0, "swd_32x16": 0.0, "swd_avg": 0.0}
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(base.shape, generator=gen)
    values = [swd_from_images(base, (base.float() + sigma * noise).round().clamp(0, 255).to(torch.uint8),
                              **FAST)["swd_avg"] for sigma in (2, 8, 32)]
    assert 0 < values[0] < values[1] < values[2]


def test_rectangular_sets_of_other_sizes_are_refused():
    wide, tall = rect_images(2, 16, 32, 0), rect_images(2, 32, 16, 0)
    message = r"^SWD compares image sets of one resolution, got 32x16 and 16x32; resize one set$"
    with pytest.raises(DataError, match=message):
        swd_from_images(wide, tall)
    collector = SWDCollector((16, 32))
    with pytest.raises(DataError, match=r"images are 16x32 but this SWD collector was made for 32x16"):
        collector.add(tall)
    collector.add(wide)
    other = SWDCollector((32, 16))
    other.add(tall)
    with pytest.raises(DataError, match="one resolution, got 32x16 and 16x32"):
        swd_from_collectors(collector, other)
