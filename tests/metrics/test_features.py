"""Feature statistics of image sets and seeded generators, and the dataset-stats cache."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from stylenat.metrics.features import FeatureStats, dataset_features, seeded_features
from stylenat.metrics.registry import compare
from stylenat.models import seeds_to_z


def test_running_stats_equal_numpy_mean_and_cov():
    x = np.random.default_rng(0).standard_normal((11, 5)) * 3 + 2
    stats = FeatureStats(keep_features=True)
    for chunk in (x[:4], x[4:5], x[5:]):
        stats.append(chunk)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.features, x, rtol=1e-6)


def test_folder_stats_are_cached_and_reused(tmp_path, image_writer, extractor, extractor_oracle, isolated_cache):
    arrays = image_writer(tmp_path / "real", 5)
    first = dataset_features(tmp_path / "real", extractor, 8, batch=2, progress=False)
    assert (extractor.calls, extractor.images) == (3, 5)
    feats = extractor_oracle(arrays)
    np.testing.assert_allclose(first.mean_cov()[0], feats.mean(0), rtol=1e-10)
    np.testing.assert_allclose(first.mean_cov()[1], np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-12)
    assert len(list((isolated_cache / "stats").glob("*.npz"))) == 1

    second = dataset_features(tmp_path / "real", extractor, 8, batch=2, progress=False)
    assert extractor.calls == 3  # read from the cache: the extractor did not run again
    np.testing.assert_array_equal(second.mean_cov()[1], first.mean_cov()[1])

    dataset_features(tmp_path / "real", extractor, 8, batch=2, keep_features=True, progress=False)
    assert extractor.calls == 6  # the cached file had no features for KID: computed once more ...
    kept = dataset_features(tmp_path / "real", extractor, 8, batch=2, keep_features=False, progress=False)
    assert extractor.calls == 6 and kept.keep_features  # ... and that richer file serves both
    np.testing.assert_allclose(kept.features, feats, rtol=1e-6)


def test_cache_key_follows_count_extractor_and_files(tmp_path, image_writer, extractor):
    image_writer(tmp_path / "real", 4)
    run = lambda **kw: dataset_features(tmp_path / "real", extractor, 8, progress=False, **kw)  # noqa: E731
    run()
    run(num=3)
    assert extractor.calls == 2  # another image count is another key
    extractor.cache_key = "other-weights"
    run()
    assert extractor.calls == 3  # another network is another key
    image_writer(tmp_path / "real", 4, seed=9, size=9)  # same names, other content and size
    run()
    assert extractor.calls == 4  # files changed: the cache missed


def test_zip_equals_folder(tmp_path, image_writer, extractor):
    image_writer(tmp_path / "real", 3)
    with zipfile.ZipFile(tmp_path / "real.zip", "w") as zf:
        for path in sorted((tmp_path / "real").iterdir()):
            zf.write(path, f"sub/{path.name}")
    a = dataset_features(tmp_path / "real", extractor, 8, progress=False).mean_cov()
    b = dataset_features(tmp_path / "real.zip", extractor, 8, progress=False).mean_cov()
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_empty_or_missing_sets_are_clear_errors(tmp_path, extractor):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        dataset_features(tmp_path / "empty", extractor, 8, progress=False)
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*absent"):
        dataset_features(tmp_path / "absent", extractor, 8, progress=False)
    assert extractor.calls == 0


def test_seeded_images_do_not_depend_on_batching(extractor):
    def make_images(seeds):
        z = seeds_to_z(seeds, 3 * 4 * 4)
        return (z.view(-1, 3, 4, 4) * 40 + 128).clamp(0, 255).to(torch.uint8)

    a = seeded_features(make_images, 7, 3, extractor, seed=10, keep_features=True, progress=False)
    b = seeded_features(make_images, 7, 7, extractor, seed=10, keep_features=True, progress=False)
    assert a.num == 7 and extractor.calls == 3 + 1
    np.testing.assert_array_equal(a.features, b.features)
    single = torch.randn(48, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(seeds_to_z([12], 48)[0], single)


def test_fid_of_a_set_against_itself_is_zero(tmp_path, image_writer, extractor):
    image_writer(tmp_path / "real", 9)
    stats = dataset_features(tmp_path / "real", extractor, 8, progress=False)
    assert abs(compare(stats, stats)["fid"]) < 1e-10


def test_rectangular_stats_are_cached_under_their_own_size(tmp_path, extractor, extractor_oracle, isolated_cache,
                                                          image_writer):
    import hashlib
    import json

    from stylenat.data import open_dataset

    arrays = image_writer(tmp_path / "real", 5, (16, 32))  # 32 wide, 16 high
    wide = dataset_features(tmp_path / "real", extractor, (16, 32), batch=2, progress=False)
    assert extractor.images == 5
    np.testing.assert_allclose(wide.mean_cov()[0], extractor_oracle(arrays).mean(0), rtol=1e-10)
    dataset_features(tmp_path / "real", extractor, [16, 32], batch=2, progress=False)
    assert extractor.images == 5  # the same size as a list: read from the cache
    dataset_features(tmp_path / "real", extractor, (32, 16), batch=2, progress=False)
    dataset_features(tmp_path / "real", extractor, 16, batch=2, progress=False)
    assert extractor.images == 15  # 16x32 (transposed) and 16x16 are other keys
    names = sorted(p.name for p in (isolated_cache / "stats").glob("*.npz"))
    assert len(names) == 3

    def key_name(resolution):
        fingerprint = open_dataset(tmp_path / "real", resolution, labels=False).fingerprint()
        key = json.dumps({"dataset": fingerprint, "resolution": resolution, "num": 5,
                          "extractor": extractor.cache_key}, sort_keys=True)
        return f"real-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"

    # A square keeps the key it always had (the side), so existing caches stay valid; a rectangle's
    # key holds [height, width].
    assert {key_name(16), key_name([16, 32]), key_name([32, 16])} == set(names)
