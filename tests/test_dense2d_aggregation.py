"""Spot aggregation of dense maps (PixNet): exact disk sums at any radius / sub-pixel centre, label masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxelome.errors import VoxelomeError
from voxelome.models.spot_aggregation import (aggregate_disks, aggregate_labels, disk_area_weights,
                                              disk_weight_matrix, image_px_to_map_xy)


@pytest.mark.parametrize("radius", [0.4, 1.0, 2.5, 3.125, 6.9, 12.5])
@pytest.mark.parametrize("centre", [(30.0, 30.0), (30.5, 29.5), (31.37, 28.81), (29.999, 30.001)])
def test_constant_map_sums_to_constant_times_disk_area(radius, centre):
    c = 2.75
    dense = np.full((3, 64, 64), c)
    got = aggregate_disks(dense, [centre], radius)
    np.testing.assert_allclose(got, c * np.pi * radius ** 2, rtol=1e-12, atol=1e-12)
    # the mean over the disk of a constant map is the constant
    np.testing.assert_allclose(aggregate_disks(dense, [centre], radius, reduce="mean"), c, rtol=1e-12)


def test_pixel_weights_match_monte_carlo_and_are_area_fractions():
    centre, r = (10.3, 10.7), 3.2
    y0, x0, w = disk_area_weights(centre, r)
    assert w.min() >= 0 and w.max() <= 1
    rng = np.random.default_rng(0)
    n = 400_000
    pts = rng.random((n, 2)) * [w.shape[1], w.shape[0]] + [x0, y0]
    inside = ((pts - centre) ** 2).sum(1) <= r * r
    hist, _, _ = np.histogram2d(pts[inside, 1], pts[inside, 0],
                                bins=[np.arange(y0, y0 + w.shape[0] + 1), np.arange(x0, x0 + w.shape[1] + 1)])
    mc = hist / (n / w.size)
    assert np.abs(mc - w).max() < 0.03  # 8,000 samples per pixel: σ ≈ 0.006


def test_radius_changes_values_as_it_should():
    rng = np.random.default_rng(1)
    dense = rng.random((2, 80, 80)) + 0.5
    radii = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    sums = np.stack([aggregate_disks(dense, [(40.2, 39.6)], r)[0] for r in radii])
    assert (np.diff(sums, axis=0) > 0).all()  # a positive map: a larger disk holds more
    # and nearly as much as the area ratio says (the map is noisy around its mean 1.0)
    ratio = sums[-1] / sums[-2]
    assert np.all(np.abs(ratio - 4.0) < 0.3)
    # continuity in the radius (no jumps at pixel boundaries)
    a, b = aggregate_disks(dense, [(40.2, 39.6)], 5.0)[0], aggregate_disks(dense, [(40.2, 39.6)], 5.0 + 1e-6)[0]
    assert np.abs(a - b).max() < 1e-3


def test_disk_across_the_edge_sums_the_inside_and_outside_centres_are_refused():
    dense = np.ones((1, 20, 20))
    half = aggregate_disks(dense, [(0.0, 10.0)], 4.0)[0, 0]
    np.testing.assert_allclose(half, np.pi * 16 / 2, rtol=1e-12)
    with pytest.raises(VoxelomeError, match="outside the map"):
        aggregate_disks(dense, [(25.0, 10.0)], 2.0)
    with pytest.raises(VoxelomeError, match="radius"):
        aggregate_disks(dense, [(5.0, 5.0)], 0.0)


def test_torch_aggregation_matches_numpy_and_has_the_weights_as_gradient():
    rng = np.random.default_rng(2)
    dense = rng.random((4, 30, 30))
    centres, r = [(10.3, 11.8), (20.5, 19.5)], [3.1, 4.4]
    t = torch.tensor(dense, requires_grad=True)
    got = aggregate_disks(t, centres, r)
    np.testing.assert_allclose(got.detach().numpy(), aggregate_disks(dense, centres, r), rtol=1e-12)
    got[0, 1].backward()
    w = disk_weight_matrix((30, 30), centres, r).toarray()[0].reshape(30, 30)
    np.testing.assert_allclose(t.grad[1].numpy(), w, rtol=1e-12)
    assert t.grad[[0, 2, 3]].abs().sum() == 0


def test_label_masks_sum_exactly_at_map_and_finer_resolution():
    rng = np.random.default_rng(3)
    dense = rng.random((2, 12, 10))
    labels = rng.integers(0, 5, (12, 10))
    got = aggregate_labels(dense, labels)
    want = np.stack([dense[:, labels == k].sum(1) for k in range(1, 5)])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # a segmentation 3× finer than the map: each fine pixel holds 1/9 of its map pixel
    fine = np.kron(labels, np.ones((3, 3), int))
    fine[0, 0] = 4  # one fine pixel moved to region 4: 1/9 of map pixel (0, 0) moves with it
    moved = want.copy()
    if labels[0, 0] > 0:
        moved[labels[0, 0] - 1] -= dense[:, 0, 0] / 9
    moved[3] += dense[:, 0, 0] / 9
    np.testing.assert_allclose(aggregate_labels(dense, fine), moved, rtol=1e-12)
    np.testing.assert_allclose(aggregate_labels(dense, np.kron(labels, np.ones((3, 3), int))), want, rtol=1e-12)
    np.testing.assert_allclose(aggregate_labels(np.ones((1, 12, 10)), labels, reduce="mean"), 1.0)
    with pytest.raises(VoxelomeError, match="integer multiple"):
        aggregate_labels(dense, labels[:-1])
    with pytest.raises(VoxelomeError, match="integer label"):
        aggregate_labels(dense, labels.astype(float))


def test_reader_pixels_to_map_coordinates():
    # pixel 0 of a 0.5 µm image is centred at 0.25 µm; on a 2 µm map that is x = 0.125
    np.testing.assert_allclose(image_px_to_map_xy([[0, 0], [3, 7]], 0.5, 2.0), [[0.125, 0.125], [0.875, 1.875]])
