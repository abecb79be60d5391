"""voxelome.plot: every figure writes a real PNG; the HTML report is one self-contained, escaped file."""

import re
from dataclasses import dataclass

import matplotlib.image as mpimg
import numpy as np
import pytest

import voxelome
from voxelome.errors import VoxelomeError
from voxelome.plot import (orthogonal_views, scatter_pred_vs_true, section_overlay, training_curves,
                           write_html_report)
from voxelome.plot.report import flatten_dict, format_value


def _is_picture(png) -> bool:
    img = mpimg.imread(png)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and \
        len(np.unique(img.reshape(-1, img.shape[-1])[::7], axis=0)) > 10


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """One figure of each kind on tiny seeded data: list of (caption, png)."""
    out = tmp_path_factory.mktemp("figs")
    rng = np.random.default_rng(3)
    xy = np.stack(np.meshgrid(np.arange(12) * 10.0, np.arange(9) * 10.0), -1).reshape(-1, 2)
    meas = rng.dirichlet(np.ones(3), len(xy))
    pred = 0.8 * meas + 0.2 * rng.dirichlet(np.ones(3), len(xy))
    z, y, x = np.meshgrid(np.arange(9), np.arange(20), np.arange(24), indexing="ij")
    ct = np.exp(-((x - 12) ** 2 + (y - 10) ** 2) / 60.0) + 0.1 * rng.random(x.shape)
    vol = rng.dirichlet(np.ones(3), (5, 10, 12)).transpose(3, 0, 1, 2)
    vol[:, :, :2] = np.nan                           # outside the tissue
    return [
        ("overlay", section_overlay(xy, meas, pred, ["a", "b", "c"], out / "overlay.png",
                                    held_out=xy[:, 0] > 80, pixel_size_um=2.0)),
        ("views", orthogonal_views(ct, vol, ["a", "b", "c"], (25.0, 10.0, 10.0), out / "views.png",
                                   pred_spacing_um_zyx=(50.0, 20.0, 20.0), index_zyx=(4, 9, 11))),
        ("curves", training_curves([{"epoch": i, "train_loss": 1 / (i + 1), "val_loss": 1.3 / (i + 1) + 0.01 * i,
                                     "val_pearson": 0.1 * i, "lr": 1e-3 * 0.9 ** i} for i in range(8)],
                                   out / "curves.png")),
        ("scatter", scatter_pred_vs_true(pred, meas, ["a", "b", "c"], out / "scatter.png")),
        ("hexbin", scatter_pred_vs_true(rng.random((3000, 2)), rng.random((3000, 2)), ["u", "v"],
                                        out / "sub" / "hexbin.png")),
    ]


def test_each_figure_is_a_readable_non_flat_png(figures):
    assert len(figures) == 5
    for caption, png in figures:
        assert png.exists() and png.stat().st_size > 1000, caption
        assert _is_picture(png), caption


def test_figure_inputs_are_validated(tmp_path):
    with pytest.raises(VoxelomeError, match="names"):
        scatter_pred_vs_true(np.ones((5, 2)), np.ones((5, 2)), ["only"], tmp_path / "x.png")
    with pytest.raises(VoxelomeError, match="held_out"):
        section_overlay(np.zeros((4, 2)), np.ones((4, 1)), np.ones((4, 1)), ["a"], tmp_path / "x.png",
                        held_out=[True])
    with pytest.raises(VoxelomeError, match="index_zyx"):
        orthogonal_views(np.zeros((3, 4, 5)), np.zeros((1, 3, 4, 5)), ["a"], 1.0, tmp_path / "x.png",
                         index_zyx=(3, 0, 0))
    with pytest.raises(VoxelomeError, match="empty"):
        training_curves([], tmp_path / "x.png")


@dataclass(frozen=True)
class _Cfg:
    lr: float = 1e-3
    name: str = "run<1>"


def test_report_is_one_self_contained_escaped_file(figures, tmp_path):
    metrics = {"pearson": {"mean": 0.876543, "per_channel": {"a": 0.5, "b": None}}, "n_spots": 190,
               "kl": float("nan")}
    path = write_html_report(
        tmp_path / "run" / "report.html", title="Run <1> & co", summary="First para.\n\nSecond para.",
        metrics=metrics, figures=figures + [("gone", tmp_path / "missing.png")],
        config={"model": {"preset": "xpression", "note": "<script>alert('x')</script>"}, "layers": [1, 2, 3],
                "schedule": [{"epoch": 1, "lr": 0.001}]},
        tables={"per signature": [{"name": "a", "r": 0.123456}, {"name": "<b>", "r": None, "extra": True}]},
        notes=["held-out spots are ≥ 200 µm from the training section", "x < y"])
    assert path == tmp_path / "run" / "report.html"
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]       # no temp file left behind
    html = path.read_text(encoding="utf-8")
    imgs = re.findall(r"<img\b[^>]*>", html)
    assert len(imgs) == len(figures)
    assert all(re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', tag) for tag in imgs)
    assert not re.search(r'(src|href)="(?!data:)', html)                     # no external resources
    assert "<script" not in html.lower()                                      # no JS, config escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "pearson.mean" in html and "0.877" in html and "pearson.per_channel.b" in html
    assert "190" in html and "n/a" in html
    assert "Run &lt;1&gt; &amp; co" in html and "&lt;b&gt;" in html and "0.123" in html
    assert "figure not available" in html and "missing.png" in html
    assert "preset: xpression" in html and "layers: [1, 2, 3]" in html and "- epoch: 1" in html
    assert f"voxelome {voxelome.__version__}" in html
    assert "≥ 200 µm" in html and "x &lt; y" in html
    # a frozen dataclass config is accepted too; rewriting replaces the file atomically
    write_html_report(path, title="t", summary="s", metrics={}, figures=[], config=_Cfg())
    assert "name: run&lt;1&gt;" in path.read_text(encoding="utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_flatten_and_format():
    assert flatten_dict({"a": {"b": {"c": 1}}, "d": 2, "e": {}}) == {"a.b.c": 1, "d": 2, "e": {}}
    assert format_value(0.000123456) == "0.000123"
    assert format_value(np.float32(12345.678)) == "1.23e+04"
    assert format_value(True) == "true" and format_value(None) == "n/a" and format_value(np.int64(7)) == "7"
    assert format_value([0.11111, 2]) == "[0.111, 2]"
