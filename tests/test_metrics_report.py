"""Metrics against scipy, held-out plane masks, figures and the single-file report."""

import json
import re

import matplotlib.image as mpimg
import numpy as np
import pytest
from scipy import stats

from voxelome.evaluate.metrics import (distance_to_plane_mask, pearson_per_channel, pearson_per_column,
                                       ridge_baseline_features, summarise)
from voxelome.evaluate.phantom import block_mean
from voxelome.plot.figures import orthogonal_views, section_overlay, training_curves
from voxelome.plot.report import write_html_report


def test_pearson_matches_scipy_with_mask():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 5, 6, 7)), rng.random((3, 5, 6, 7))
    mask = rng.random((5, 6, 7)) > 0.3
    r = pearson_per_channel(a, b, mask)
    for c in range(3):
        assert r[c] == pytest.approx(stats.pearsonr(a[c][mask], b[c][mask])[0], abs=1e-10)
    assert np.isnan(pearson_per_channel(np.ones((1, 10)), rng.random((1, 10)))[0])
    np.testing.assert_allclose(pearson_per_column(a.reshape(3, -1).T, b.reshape(3, -1).T),
                               pearson_per_channel(a, b), atol=1e-12)


def test_summarise_is_json_ready():
    s = summarise({"a": 0.5, "b": float("nan"), "c": 0.7})
    json.dumps(s)
    assert s["per_channel"]["b"] is None and s["mean"] == pytest.approx(0.6)


def test_distance_mask_axial_slabs_anisotropic():
    m = distance_to_plane_mask((9, 4, 5), (20.0, 1.0, 1.0), (0, 0, 0), (0, 0, 80.0), (0, 0, 1), 40.0)
    expected = np.abs(np.arange(9) * 20.0 - 80.0) >= 40.0
    np.testing.assert_array_equal(m[:, 0, 0], expected)
    assert m.all(axis=(1, 2)).tolist() == expected.tolist()


def test_block_mean_shapes_and_values():
    a = np.arange(2 * 5 * 4 * 3, dtype=np.float32).reshape(2, 5, 4, 3)
    b = block_mean(a, 2)
    assert b.shape == (2, 3, 2, 2)
    assert b[0, 0, 0, 0] == pytest.approx(a[0, :2, :2, :2].mean())


def test_baseline_features_shape():
    f = ridge_baseline_features(np.random.default_rng(0).random((6, 8, 9)).astype(np.float32), 10.0, (10, 20))
    assert f.shape == (4, 6, 8, 9) and f.dtype == np.float32


def test_figures_and_report_are_self_contained(tmp_path):
    rng = np.random.default_rng(1)
    xy = rng.random((60, 2)) * 1000
    meas = rng.dirichlet(np.ones(3), 60)
    figs = [
        ("overlay", section_overlay(xy, meas, meas * 0.9 + 0.033, ["a", "b", "c"], tmp_path / "o.png",
                                    held_out=rng.random(60) > 0.7)),
        ("views", orthogonal_views(rng.random((8, 20, 24)), rng.dirichlet(np.ones(3), (4, 10, 12)).transpose(3, 0, 1, 2),
                                   ["a", "b", "c"], (10.0, 10.0, 10.0), tmp_path / "v.png",
                                   pred_spacing_um_zyx=(20.0, 20.0, 20.0))),
        ("curves", training_curves([{"epoch": i, "train_loss": 1 / (i + 1), "val_loss": 1.2 / (i + 1)}
                                    for i in range(5)], tmp_path / "c.png")),
    ]
    for _, png in figs:
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.std() > 0.01  # a real picture, not a flat colour
    report = write_html_report(tmp_path / "report.html", title="t", summary="s", metrics={"r": {"mean": 0.8767}},
                               figures=figs, config={"note": "<script>alert(1)</script>"})
    html = report.read_text()
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "0.877" in html and "<script>alert" not in html
