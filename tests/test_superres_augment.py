"""Block-phase augmentation of super-resolution pairs: every phase is a valid re-degradation of the same target."""

from __future__ import annotations

import numpy as np

from voxelome.datasets.superres import SuperResPair, block_mean
from voxelome.datasets.superres_augment import all_phases, shifted_pair


def _pair(f=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    high = rng.random((3, size, size)).astype(np.float32)
    mask = rng.random((size, size)) > 0.2
    high *= mask
    low, cnt = block_mean(high, mask, f)
    return SuperResPair("p", ["a", "b", "c"], f, 200.0, high, mask, low, cnt > 0,
                        rng.normal(size=(2, size, size)).astype(np.float32))


def test_phase_zero_reproduces_the_pair_and_others_regroup_the_same_spots():
    p = _pair()
    same = shifted_pair(p, 0, 0)
    assert np.array_equal(same.low, p.low) and np.array_equal(same.high, p.high)
    s = shifted_pair(p, 1, 1)
    assert s.high.shape == (3, 10, 10) and s.high_mask.sum() == p.high_mask.sum()
    assert np.array_equal(s.high[:, 1:9, 1:9], p.high)
    # low pixel (1, 1) of the shifted pair = mean of measured original pixels [1:3, 1:3]
    blk, m = p.high[:, 1:3, 1:3], p.high_mask[1:3, 1:3]
    if m.any():
        assert np.allclose(s.low[:, 1, 1], blk[:, m].mean(1), atol=1e-6)
    phases = all_phases([p])
    assert len(phases) == 4 and all(q.validate() is q for q in phases)
    assert len({q.low.tobytes() for q in phases}) == 4


def test_weighted_phases_average_cells_not_pixels():
    p = _pair(seed=1)
    w = np.ones(p.high_mask.shape)
    w[0, 0] = 3.0  # three cells in the first pixel
    s = shifted_pair(p, 0, 0, weights=w)
    blk, m, ww = p.high[:, :2, :2], p.high_mask[:2, :2], w[:2, :2]
    if m.any():
        expect = (blk * (ww * m)).sum((1, 2)) / (ww * m).sum()
        assert np.allclose(s.low[:, 0, 0], expect, atol=1e-6)
