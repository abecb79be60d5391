"""Super-resolution data, metrics and baselines: phantom pairs, real-data pairs, SSIM/r/coverage, upsampling."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from voxelome.datasets.superres import (
    block_mean,
    phantom_pairs,
    starmap_pairs,
)
from voxelome.errors import VoxelomeError
from voxelome.evaluate.superres_baselines import (
    bicubic_upsample,
    fill_unobserved,
    nearest_upsample,
)
from voxelome.evaluate.superres_metrics import (
    interval_coverage,
    masked_pearson,
    masked_rmse,
    masked_ssim,
    mean_scores,
    superres_scores,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
KW = dict(n_genes=12, z_step=3, gap_um=20.0)


@pytest.fixture(scope="module")
def pairs(phantom):
    return phantom_pairs(phantom=phantom, **KW)


@pytest.fixture(scope="module")
def clean(phantom):
    return phantom_pairs(phantom=phantom, noise=False, he=False, **KW)


def test_phantom_pairs_shapes_and_split(pairs, phantom):
    split_z = {s: [p.extra["z_index"] for p in v] for s, v in pairs.items()}
    assert all(split_z.values())
    # held out by z, in order, more than gap_um = 2 slices apart
    assert max(split_z["train"]) + 2 < min(split_z["val"]) and max(split_z["val"]) + 2 < min(split_z["test"])
    for p in itertools.chain(*pairs.values()):
        p.validate()
        G, H, W = p.high.shape
        assert (G, p.factor, p.pixel_size_um) == (12, 5, 20.0)
        assert H % 5 == 0 and W % 5 == 0 and p.low.shape == (G, H // 5, W // 5)
        assert p.image.shape[1:] == (H, W) and p.image.dtype == np.float32
        assert p.extra["he_rgb"].shape == (H * 4, W * 4, 3)
        np.testing.assert_array_equal(p.truth, p.high)
        # the mask is the tissue (≥ 50 % of the pixel's voxels) and the target is positive there
        tis = phantom.tissue[p.extra["z_index"], :2 * H, :2 * W].reshape(H, 2, W, 2).mean((1, 3)) >= 0.5
        np.testing.assert_array_equal(p.high_mask, tis)
        assert (p.high[:, p.high_mask] > 0).all() and 0.2 < p.high_mask.mean() < 1
        # a spot is observed only where its block is mostly tissue
        assert p.low_mask.sum() <= block_mean(p.high[:1], p.high_mask, 5)[1].astype(bool).sum()
    # image features: standardised on the training slices, and they carry the tissue structure
    tr = np.concatenate([p.image[:, p.high_mask] for p in pairs["train"]], axis=1)
    np.testing.assert_allclose(tr.mean(1), 0, atol=1e-3)
    np.testing.assert_allclose(tr.std(1), 1, atol=1e-2)


def test_phantom_noiseless_low_is_block_mean_and_noise_is_unbiased_enough(pairs, clean):
    for p in clean["test"] + clean["train"]:
        mean, _ = block_mean(p.high, p.high_mask, p.factor)
        np.testing.assert_allclose(p.low[:, p.low_mask], mean[:, p.low_mask], rtol=1e-6)
        assert (p.low[:, ~p.low_mask] == 0).all() and p.image is None
    # the noisy spots scatter around the noiseless ones (Poisson noise ≪ the spread of expression)
    noisy, ref = pairs["train"][0], clean["train"][0]
    both = noisy.low_mask & ref.low_mask
    d = noisy.low[:, both] - ref.low[:, both]
    assert abs(d.mean()) < 0.1 and d.std() < 0.6 * ref.high[:, ref.high_mask].std()
    assert np.corrcoef(noisy.low[:, both].ravel(), ref.low[:, both].ravel())[0, 1] > 0.9


def test_phantom_pairs_are_seeded_and_cached(phantom, tmp_path):
    a = phantom_pairs(phantom=phantom, he=False, cache_dir=tmp_path, **KW)
    assert len(list(tmp_path.glob("phantom_pairs_*.npz"))) == 1
    b = phantom_pairs(phantom=phantom, he=False, cache_dir=tmp_path, **KW)  # from the cache
    c = phantom_pairs(phantom=phantom, he=False, **KW)  # rebuilt
    for x, y in ((a, b), (a, c)):
        for px, py in zip(itertools.chain(*x.values()), itertools.chain(*y.values()), strict=True):
            for f in ("high", "high_mask", "low", "low_mask", "truth"):
                np.testing.assert_array_equal(getattr(px, f), getattr(py, f))
                assert getattr(px, f).dtype == getattr(py, f).dtype
            assert (px.name, px.genes, px.factor, px.image, px.extra) == (py.name, py.genes, py.factor, None, py.extra)


def test_validate_names_the_problem(clean):
    p = clean["test"][0]
    with pytest.raises(VoxelomeError, match="low.shape"):
        dataclasses.replace(p, low=p.low[:, :-1]).validate()
    with pytest.raises(VoxelomeError, match="high.dtype"):
        dataclasses.replace(p, high=p.high.astype(np.float64)).validate()
    bad = p.high.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(VoxelomeError, match="NaN"):
        dataclasses.replace(p, high=bad).validate()
    with pytest.raises(VoxelomeError, match="len\\(genes\\)"):
        dataclasses.replace(p, genes=p.genes[:-1]).validate()
    with pytest.raises(VoxelomeError, match="image"):
        dataclasses.replace(p, image=np.zeros((3, 4, 4), np.float32)).validate()
    with pytest.raises(VoxelomeError, match="outside their masks"):
        dataclasses.replace(p, high=p.high + 1).validate()
    c = p.crop(5, 10, 20, 30)
    assert c.high.shape[1:] == (20, 30) and c.low.shape[1:] == (4, 6)
    np.testing.assert_array_equal(c.low, p.low[:, 1:5, 2:8])
    with pytest.raises(VoxelomeError, match="multiples of factor"):
        p.crop(1, 0, 10, 10)


def test_metrics_perfect_and_known_values():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48] / 10.0
    truth = np.stack([np.sin(yy) + np.cos(xx), yy * xx, rng.random((40, 48))]).astype(np.float32)
    mask = (yy - 2) ** 2 + (xx - 2.4) ** 2 < 3.5
    np.testing.assert_allclose(masked_ssim(truth, truth, mask), 1.0)
    np.testing.assert_allclose(masked_pearson(truth, truth, mask), 1.0)
    np.testing.assert_allclose(masked_rmse(truth, truth, mask), 0.0)
    # RMSE of a constant offset; r unchanged by an affine map; values outside the mask are ignored
    off = truth + 0.3
    off[:, ~mask] = 99.0
    np.testing.assert_allclose(masked_rmse(off, truth, mask), 0.3, rtol=1e-5)
    np.testing.assert_allclose(masked_pearson(2 * truth - 1, truth, mask), 1.0)
    # SSIM drops with noise and is blind to what happens outside the mask
    noisy = truth + rng.normal(0, 0.5, truth.shape).astype(np.float32)
    s = masked_ssim(noisy, truth, mask)
    assert (s < 0.9).all()
    noisy2 = noisy.copy()
    noisy2[:, ~mask] = -50
    np.testing.assert_allclose(masked_ssim(noisy2, truth, mask), s)
    summ = superres_scores(noisy, truth, mask)
    assert summ["n_pixels"] == int(mask.sum()) and len(summ["per_gene"]["ssim"]) == 3
    assert mean_scores([summ, summ])["ssim"] == pytest.approx(summ["ssim"])
    with pytest.raises(VoxelomeError, match="mask"):
        masked_rmse(truth, truth, mask[:-1])


def test_coverage_known_answer():
    rng = np.random.default_rng(1)
    G, H, W, S = 3, 30, 30, 64
    mu = rng.normal(0, 1, (G, H, W))
    sd = rng.uniform(0.2, 1.0, (G, H, W))
    truth = mu + sd * rng.standard_normal((G, H, W))  # truth drawn from the same Gaussian as the samples
    samples = mu + sd * rng.standard_normal((S, G, H, W))
    mask = np.ones((H, W), bool)
    mask[:5] = False
    cov = interval_coverage(samples, truth, mask, alpha=0.1)
    # empirical quantiles of 64 samples cover slightly less than 90 % on average (~0.88)
    assert 0.85 <= cov["coverage"] <= 0.92 and cov["nominal"] == pytest.approx(0.9)
    narrow = mu + 0.2 * sd * rng.standard_normal((S, G, H, W))  # over-confident: 5× too narrow
    assert interval_coverage(narrow, truth, mask)["coverage"] < 0.4
    wide = mu + 3 * sd * rng.standard_normal((S, G, H, W))
    assert interval_coverage(wide, truth, mask)["coverage"] > 0.99
    # 8 samples (the minimum): 90 % intervals from the 5 % / 95 % empirical quantiles cover ~ 0.7–0.8
    few = interval_coverage(samples[:8], truth, mask)["coverage"]
    assert 0.6 < few < cov["coverage"]
    with pytest.raises(VoxelomeError, match="S ≥ 2"):
        interval_coverage(samples[:1], truth, mask)


def test_bicubic_recovers_a_ramp_and_fills_unobserved():
    f = 5
    yy, xx = np.mgrid[0:60, 0:70]
    high = np.stack([0.05 * yy + 0.02 * xx + 1, 0.03 * xx]).astype(np.float32)
    mask = np.ones((60, 70), bool)
    low, _ = block_mean(high, mask, f)
    up = bicubic_upsample(low, np.ones(low.shape[1:], bool), f)
    np.testing.assert_allclose(up, high, atol=1e-3)  # up to the border (odd-reflection padding)
    assert np.abs(nearest_upsample(low, np.ones(low.shape[1:], bool), f) - high).mean() > 0.05
    # an unobserved spot takes its nearest observed neighbour's value before interpolation
    lm = np.ones(low.shape[1:], bool)
    lm[4, 6] = False
    filled = fill_unobserved(np.where(lm, low, 0), lm)
    assert filled[0, 4, 6] in {low[0, 3, 6], low[0, 5, 6], low[0, 4, 5], low[0, 4, 7]}
    assert bicubic_upsample(np.where(lm, low, 0), lm, f).shape == high.shape


def test_real_data_builders_need_their_folder(tmp_path):
    with pytest.raises(VoxelomeError, match="data_dir=None"):
        starmap_pairs()
    with pytest.raises(VoxelomeError, match="is not a folder"):
        starmap_pairs(data_dir=tmp_path / "missing")


@pytest.mark.skipif(not (SHARED / "starmap3d_mini_giotto").is_dir(), reason="shared/data/starmap3d_mini_giotto absent")
def test_starmap_pairs():
    p = starmap_pairs(data_dir=SHARED / "starmap3d_mini_giotto")
    assert [len(p[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    n = 0
    for q in itertools.chain(*p.values()):
        q.validate()
        assert q.image is None and len(q.genes) == 28 and q.factor == 5
        np.testing.assert_array_equal(q.high_mask, q.extra["n_cells"] > 0)
        n += q.extra["n_cells"].sum()
        # pseudo-spot = mean over the block's cells = cell-count-weighted mean of the pixels
        w = q.extra["n_cells"].astype(float)
        num, _ = block_mean(q.high * w, np.ones_like(q.high_mask), 5)
        den, _ = block_mean(w[None], np.ones_like(q.high_mask), 5)
        np.testing.assert_allclose(q.low[:, q.low_mask], (num / np.maximum(den, 1e-12))[:, q.low_mask], rtol=1e-5)
    assert 3000 < n <= 3915  # cells in the three strips (gaps hold the rest)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VOXELOME_RUN_SLOW"), reason="slow (~45 s: reads 5 count tables); "
                    "set VOXELOME_RUN_SLOW=1")
@pytest.mark.skipif(not (SHARED / "her2st").is_dir(), reason="shared/data/her2st absent")
def test_her2st_pairs(tmp_path):
    from voxelome.datasets.superres import her2st_pairs

    p = her2st_pairs("C2", cache_dir=tmp_path, data_dir=SHARED / "her2st")
    assert [q.name for q in p["test"]] == ["her2st_C2"] and len(p["train"]) == 4
    q = p["test"][0].validate()
    assert q.factor == 2 and q.pixel_size_um == 200.0 and q.image.shape[0] == 8 and len(q.genes) == 50
    assert q.high_mask.sum() == 187  # every measured spot of C2 on the grid
    mean, cnt = block_mean(q.high, q.high_mask, 2)
    np.testing.assert_allclose(q.low[:, q.low_mask], mean[:, q.low_mask], rtol=1e-6)
    assert (cnt[q.low_mask] >= 1).all()
