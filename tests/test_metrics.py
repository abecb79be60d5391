"""voxelome.evaluate.metrics: agreement metrics against scipy, held-out plane masks, baseline features."""

import json
import warnings

import numpy as np
import pytest
from scipy import ndimage, stats

from voxelome.errors import VoxelomeError
from voxelome.evaluate.metrics import (distance_to_plane_mask, kl_divergence_rows, mae_per_channel,
                                       pearson_per_channel, pearson_per_column, ridge_baseline_feature_names,
                                       ridge_baseline_features, rmse_per_channel, summarise)


@pytest.fixture
def rng():
    return np.random.default_rng(42)


def test_pearson_per_channel_matches_scipy_with_mask(rng):
    true = rng.normal(size=(4, 7, 9, 11))
    pred = 0.5 * true + rng.normal(size=true.shape)
    mask = rng.random((7, 9, 11)) > 0.4
    r = pearson_per_channel(pred, true, mask)
    assert r.shape == (4,)
    for c in range(4):
        assert r[c] == pytest.approx(stats.pearsonr(pred[c][mask], true[c][mask])[0], abs=1e-12)
    # no mask = all elements; a (1, y, x) mask broadcasts like a (y, x) one
    full = pearson_per_channel(pred, true)
    for c in range(4):
        assert full[c] == pytest.approx(stats.pearsonr(pred[c].ravel(), true[c].ravel())[0], abs=1e-12)
    np.testing.assert_allclose(pearson_per_channel(pred, true, mask[None]), r)


def test_pearson_ignores_non_finite_and_flags_constant_channels(rng):
    true = rng.random((3, 50))
    pred = true + 0.1 * rng.random((3, 50))
    pred[0, 5] = np.nan
    true[1, 7] = np.inf
    pred[2] = 0.25                                   # constant prediction
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # no RuntimeWarning spam
        r = pearson_per_channel(pred, true)
    keep0 = np.arange(50) != 5
    assert r[0] == pytest.approx(stats.pearsonr(pred[0, keep0], true[0, keep0])[0], abs=1e-12)
    assert np.isfinite(r[1])
    assert np.isnan(r[2])
    # fewer than two valid elements → NaN; float32 constant with an awkward value → NaN, not ±1
    assert np.isnan(pearson_per_channel(rng.random((1, 5)), rng.random((1, 5)), np.eye(1, 5, dtype=bool)[0]))[0]
    const = np.full((1, 1000), 0.1, dtype=np.float32)
    assert np.isnan(pearson_per_channel(const, rng.random((1, 1000)))[0])


def test_pearson_per_column_is_transposed_per_channel(rng):
    a, b = rng.random((80, 5)), rng.random((80, 5))
    np.testing.assert_allclose(pearson_per_column(a, b), pearson_per_channel(a.T, b.T))
    assert pearson_per_column(a, b)[2] == pytest.approx(stats.pearsonr(a[:, 2], b[:, 2])[0], abs=1e-12)


def test_shape_errors_are_actionable(rng):
    with pytest.raises(VoxelomeError, match="same channel-first shape"):
        pearson_per_channel(rng.random((2, 5)), rng.random((2, 6)))
    with pytest.raises(VoxelomeError, match="broadcasts neither"):
        pearson_per_channel(rng.random((2, 4, 5)), rng.random((2, 4, 5)), np.ones((3, 3), bool))
    with pytest.raises(VoxelomeError, match=r"\(n, k\)"):
        pearson_per_column(rng.random(5), rng.random(5))


def test_rmse_mae_and_kl(rng):
    pred, true = rng.random((3, 6, 8)), rng.random((3, 6, 8))
    mask = rng.random((6, 8)) > 0.5
    d = (pred - true)[:, mask]
    np.testing.assert_allclose(rmse_per_channel(pred, true, mask), np.sqrt((d ** 2).mean(1)))
    np.testing.assert_allclose(mae_per_channel(pred, true, mask), np.abs(d).mean(1))
    np.testing.assert_allclose(mae_per_channel(pred, true), np.abs(pred - true).reshape(3, -1).mean(1))
    p = rng.dirichlet(np.ones(4), 20)
    q = rng.dirichlet(np.ones(4), 20)
    kl = kl_divergence_rows(p, q)
    assert kl.shape == (20,)
    np.testing.assert_allclose(kl, stats.entropy(p, q, axis=1), rtol=1e-6)
    np.testing.assert_allclose(kl_divergence_rows(p, p), 0.0, atol=1e-12)
    # zeros are safe; identity vs uniform gives log(k)
    np.testing.assert_allclose(kl_divergence_rows(np.eye(3), np.full((3, 3), 1 / 3)), np.log(3), rtol=1e-6)


def test_summarise_is_json_serialisable_with_nan_as_none():
    s = summarise(np.array([0.2, np.nan, 0.6, 0.8]), ["a", "b", "c", "d"])
    text = json.dumps(s, allow_nan=False)           # strict JSON: no NaN tokens
    assert json.loads(text) == s
    assert s["per_channel"] == {"a": 0.2, "b": None, "c": 0.6, "d": 0.8}
    assert s["mean"] == pytest.approx(np.mean([0.2, 0.6, 0.8]))
    assert s["median"] == pytest.approx(0.6)
    assert s["q1"] == pytest.approx(np.percentile([0.2, 0.6, 0.8], 25))
    assert all(type(s[k]) is float for k in ("mean", "median", "q1"))
    assert summarise({"x": float("nan")})["mean"] is None
    assert summarise({"x": np.float32(0.5), "y": None})["per_channel"] == {"x": 0.5, "y": None}
    with pytest.raises(VoxelomeError, match="names"):
        summarise([0.1, 0.2], ["only_one"])


@pytest.mark.parametrize("shape", [(9, 5, 7), (11, 3, 4)])
def test_distance_mask_axial_plane_gives_exact_slabs(shape):
    spacing = (20.0, 3.0, 1.5)                       # anisotropic (dz, dy, dx)
    origin = (-30.0, 4.0, 2.0)
    z0, dmin = 70.0, 40.0                            # voxel centres z = -30, -10, 10, ...
    m = distance_to_plane_mask(shape, spacing, origin, (123.0, -7.0, z0), (0, 0, -2.5), dmin)
    assert m.shape == shape and m.dtype == bool
    z = origin[0] + np.arange(shape[0]) * spacing[0]
    expected = np.abs(z - z0) >= dmin                 # boundary voxels at exactly 40 µm are in
    np.testing.assert_array_equal(m, np.broadcast_to(expected[:, None, None], shape))
    assert expected.sum() < shape[0] and not expected[np.argmin(np.abs(z - z0))]
    assert np.any(np.isclose(np.abs(z - z0), dmin))  # the test really exercises the boundary


def test_distance_mask_oblique_plane_matches_brute_force(rng):
    shape, spacing, origin = (7, 13, 10), (4.0, 2.5, 3.0), (1.0, -5.0, 2.0)
    point, normal, dmin = np.array([12.0, 8.0, 11.0]), np.array([0.3, -0.5, 0.8]), 6.0
    k, j, i = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    xyz = np.stack([origin[2] + i * spacing[2], origin[1] + j * spacing[1], origin[0] + k * spacing[0]], -1)
    dist = np.abs((xyz - point) @ (normal / np.linalg.norm(normal)))
    m = distance_to_plane_mask(shape, spacing, origin, point, normal, dmin)
    np.testing.assert_array_equal(m, dist >= dmin - 1e-6)
    assert 0 < m.sum() < m.size
    with pytest.raises(VoxelomeError, match="non-zero"):
        distance_to_plane_mask(shape, spacing, origin, point, (0, 0, 0), dmin)


def test_distance_mask_large_grid_is_chunked_consistently():
    shape = (40, 300, 400)                           # > one 32 MB chunk of float64 temporaries
    m = distance_to_plane_mask(shape, 2.0, 0.0, (0, 0, 0), (1, 1, 1), 250.0)
    j, i = np.indices(shape[1:]) * 2.0
    for k in (0, 20, 39):                            # first chunk, second chunk
        np.testing.assert_array_equal(m[k], np.abs(i + j + 2.0 * k) / np.sqrt(3) >= 250.0 - 1e-6)


def test_ridge_baseline_features(rng):
    vol = rng.random((6, 20, 24)).astype(np.float32) * 100 + 1000
    f = ridge_baseline_features(vol, (4.0, 2.0, 2.0), scales_um=(4.0, 8.0))
    assert f.shape == (4, 6, 20, 24) and f.dtype == np.float32
    assert ridge_baseline_feature_names((4.0, 8.0)) == ["mean_4um", "std_4um", "mean_8um", "std_8um"]
    ref = ndimage.gaussian_filter(vol.astype(np.float64), (1.0, 2.0, 2.0))
    np.testing.assert_allclose(f[0], ref, rtol=1e-5)
    ref_sq = ndimage.gaussian_filter((vol.astype(np.float64) - 1000) ** 2, (1.0, 2.0, 2.0))
    np.testing.assert_allclose(f[1], np.sqrt(np.maximum(ref_sq - (ref - 1000) ** 2, 0)), rtol=1e-3, atol=1e-2)
    flat = ridge_baseline_features(np.full((4, 5, 6), 7.0), 1.0, (2.0,))
    np.testing.assert_allclose(flat[0], 7.0, rtol=1e-6)
    np.testing.assert_allclose(flat[1], 0.0, atol=1e-5)
    with pytest.raises(VoxelomeError):
        ridge_baseline_features(vol, 0.0)
