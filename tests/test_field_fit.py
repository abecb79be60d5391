"""Field fitting on a small seeded synthetic stack: quality vs baselines, exact resume, save/load,
resumable chunk-invariant OME-Zarr export, virtual sections, denoising, CLI."""

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.evaluate.field_baselines import knn_3d, linear_between_sections, nearest_section, per_gene_scores
from voxelome.infer.blocks import DONE_DIR
from voxelome.infer.field_export import FIELD_DENOISED_KEY, FittedField
from voxelome.io.omezarr import read_ome_zarr
from voxelome.register.placement import SectionPlacement
from voxelome.train.field_trainer import fit_field, make_field_config, suggest_jitter
from voxelome.train.point_data import PointData
from ngff import assert_ngff_image

GENES = [f"g{i}" for i in range(12)]
HELD_OUT = "z200"


def synthetic_stack(seed=0, n_genes=12, z_planes=np.arange(0, 401, 50.0), pitch=40.0, library=150.0, depth=None):
    """Serial axial sections (a 40 µm spot grid every 50 µm in z) of a smooth 3D field of 12 genes.

    Log-rates are sums of 6 random 3D Gaussian blobs; counts are negative binomial (θ = 5) around
    ``library · rate``; a 13th column ``other`` holds the rest of the library. ``obsm['truth']``
    is the noise-free ``log1p(1e4 · rate)`` of the 12 genes. ``depth``: optional function of the
    points ``(n, 3)`` µm multiplying each spot's expected library (spatially varying sequencing depth).
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform([100, 100, -50], [900, 900, 450], (6, 3))
    radii = rng.uniform(120, 250, 6)
    weights = rng.gamma(1.0, 1.0, (6, n_genes)) * (rng.random((6, n_genes)) < 0.5)
    base = rng.normal(0, 0.3, n_genes)

    def rate(xyz):
        d2 = ((xyz[:, None, :] - centres[None]) ** 2).sum(-1) / radii[None] ** 2
        r = np.exp(base + np.exp(-d2) @ weights * 1.5)
        return r / r.sum(1, keepdims=True) * 0.5

    g = np.arange(0, 1000.1, pitch)
    xx, yy = np.meshgrid(g, g)
    sections = []
    for z in z_planes:
        xyz = np.column_stack([xx.ravel(), yy.ravel(), np.full(xx.size, z)])
        lib = library * np.exp(rng.normal(0, 0.2, len(xyz))) * (1.0 if depth is None else depth(xyz))
        counts = rng.poisson(rng.gamma(5.0, lib[:, None] * rate(xyz) / 5.0))
        X = np.column_stack([counts, rng.poisson(lib * 0.5)]).astype(np.float32)
        name = f"z{int(z):03d}"
        a = ad.AnnData(X=X, obs=pd.DataFrame({"section": name}, index=[f"{name}_{i}" for i in range(len(xyz))]),
                       var=pd.DataFrame(index=GENES + ["other"]))
        a.obsm["spatial_3d"] = xyz
        a.obsm["truth"] = np.log1p(1e4 * rate(xyz))
        sections.append(a)
    return ad.concat(sections, index_unique=None)


def log_norm(adata):
    X = np.asarray(adata.X, dtype=np.float64)
    return np.log1p(X[:, :12] / X.sum(1, keepdims=True) * 1e4)


@pytest.fixture(scope="module")
def stack():
    return synthetic_stack()


@pytest.fixture(scope="module")
def split(stack):
    held = (stack.obs["section"] == HELD_OUT).to_numpy()
    return stack[~held].copy(), stack[held].copy()


@pytest.fixture(scope="module")
def fitted(split, tmp_path_factory):
    train, _ = split
    data = PointData.from_anndata(train, genes=GENES)
    config = make_field_config("cpu", iterations=600, batch_size=1024, n_levels=8, log2_table_size=14,
                               jitter_um=suggest_jitter(data), seed=0, num_threads=2)
    run = tmp_path_factory.mktemp("field") / "run"
    fit_field(data, config, run, progress=False)
    return run


def test_field_beats_section_baselines_on_held_out_section(fitted, split):
    train, test = split
    truth = test.obsm["truth"]
    field = FittedField.load(fitted)
    r_field = per_gene_scores(field.predict(test.obsm["spatial_3d"]), truth)["mean_r"]
    xyz, y, sec = train.obsm["spatial_3d"], log_norm(train), pd.Categorical(train.obs["section"]).codes
    # the baselines get their best in-plane neighbourhood on the held-out section itself (favours them)
    r_linear = max(per_gene_scores(linear_between_sections(xyz, sec, y, test.obsm["spatial_3d"], k=k), truth)["mean_r"]
                   for k in (1, 4, 9, 16))
    r_nearest = max(per_gene_scores(nearest_section(xyz, sec, y, test.obsm["spatial_3d"], k=k), truth)["mean_r"]
                    for k in (1, 4, 9, 16))
    r_knn = per_gene_scores(knn_3d(xyz, y, test.obsm["spatial_3d"], k=10), truth)["mean_r"]
    assert r_field > r_linear + 0.01, (r_field, r_linear)
    assert r_field > max(r_nearest, r_knn), (r_field, r_nearest, r_knn)


def test_denoised_spots_beat_raw_counts(fitted, split):
    train, _ = split
    field = FittedField.load(fitted)
    den = field.denoise(train)
    assert den.shape == (train.n_obs, 12) and train.obsm[FIELD_DENOISED_KEY] is den
    truth = train.obsm["truth"]
    assert per_gene_scores(den, truth)["mean_r"] > per_gene_scores(log_norm(train), truth)["mean_r"] + 0.1


def test_expected_measured_value_predicts_noisy_spots_better(fitted, split):
    """value='measured' (E[log1p(1e4·Y/L)] under the NB) beats log1p(1e4·rate) in RMSE vs held-out measured spots."""
    _, test = split
    field = FittedField.load(fitted)
    xyz, measured = test.obsm["spatial_3d"], log_norm(test)
    rate, expected = field.predict(xyz), field.predict(xyz, value="measured")
    assert (expected <= rate + 1e-5).all()  # Jensen
    rmse_rate, rmse_exp = (per_gene_scores(p, measured)["mean_rmse"] for p in (rate, expected))
    assert rmse_exp < rmse_rate - 0.02, (rmse_exp, rmse_rate)
    own = field.predict(xyz, value="measured", library=np.asarray(test.X).sum(1))  # each spot's own library
    assert own.shape == expected.shape and not np.allclose(own, expected)
    with pytest.raises(Exception, match="'rate'"):
        field.predict(xyz, value="mean")


def test_save_load_round_trip(fitted, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(fitted, copy)
    a, b = FittedField.load(fitted), FittedField.load(copy)
    pts = np.random.default_rng(0).uniform(0, 1000, (50, 3))
    np.testing.assert_array_equal(a.predict(pts), b.predict(pts))
    assert b.genes == GENES and (copy / "config.yaml").exists() and (copy / "history.json").exists()
    assert b.config.iterations == 600
    with pytest.raises(Exception, match="Did you mean 'g1'"):
        a.predict(pts, genes=["g1x"])
    with pytest.raises(Exception, match="NaN"):
        a.predict(np.array([[0.0, np.nan, 1.0]]))


def test_resume_is_exact(split, tmp_path):
    train, _ = split
    data = PointData.from_anndata(train, genes=GENES[:4])
    cfg = dict(batch_size=128, n_levels=4, log2_table_size=10, lr_schedule="constant", checkpoint_every=5,
               jitter_um=(20.0, 20.0, 20.0), likelihood="zinb")
    fit_field(data, make_field_config("cpu", iterations=12, **cfg), tmp_path / "a", progress=False)
    fit_field(data, make_field_config("cpu", iterations=7, **cfg), tmp_path / "b", progress=False)
    fit_field(data, make_field_config("cpu", iterations=12, **cfg), tmp_path / "b", progress=False)  # resumes at 7
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model_state"]
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model_state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    with pytest.raises(Exception, match="different config"):
        fit_field(data, make_field_config("cpu", iterations=12, **{**cfg, "lr": 0.5}), tmp_path / "b", progress=False)
    # a low-rank run is not resumed with other loadings (the checkpoint's buffer would silently win)
    low = make_field_config("cpu", iterations=12, **{**cfg, "likelihood": "gaussian", "low_rank": "linear"})
    w = np.eye(2, 4)
    fit_field(data, low, tmp_path / "c", loadings=w, progress=False)
    fit_field(data, low, tmp_path / "c", loadings=w, progress=False)  # same loadings: resumes (nothing left to do)
    for other in (w[::-1], None):
        with pytest.raises(Exception, match="other gene loadings"):
            fit_field(data, low, tmp_path / "c", loadings=other, progress=False)


def test_held_out_loss_is_recorded_and_leaves_training_unchanged(split, tmp_path):
    train, test = split
    data = PointData.from_anndata(train, genes=GENES[:4])
    held = PointData.from_anndata(test, genes=GENES[:4], min_sections=1)
    cfg = make_field_config("cpu", iterations=60, batch_size=256, n_levels=4, log2_table_size=10, log_every=20,
                            jitter_um=(20.0, 20.0, 20.0))
    fit_field(data, cfg, tmp_path / "plain", progress=False)
    fit_field(data, cfg, tmp_path / "val", progress=False, validation=held, validation_points=100)
    hist = json.loads((tmp_path / "val" / "history.json").read_text())
    assert [h["iteration"] for h in hist] == [0, 20, 40, 60] and hist[0]["loss"] is None
    assert all(np.isfinite(h["val_loss"]) for h in hist) and hist[-1]["val_loss"] < hist[0]["val_loss"]
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "val" / "checkpoint.pt", weights_only=True)["model_state"]
    for k in a:  # evaluating the held-out loss draws no training randomness and takes no step
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(Exception, match="same genes"):
        fit_field(data, cfg, tmp_path / "bad", progress=False,
                  validation=PointData.from_anndata(test, genes=GENES[1:5], min_sections=1))


def test_volume_export_matches_points_is_chunk_invariant_and_resumable(fitted, tmp_path):
    field = FittedField.load(fitted)
    box = ((100.0, 200.0, 90.0), (400.0, 420.0, 290.0))
    kw = dict(bbox_um=box, genes=["g0", "g5", "g7"], progress=False, pyramid=False)
    s1 = field.write_volume(tmp_path / "a.ome.zarr", (25.0, 20.0, 30.0), chunks=(3, 4, 5), **kw)
    s2 = field.write_volume(tmp_path / "b.ome.zarr", (25.0, 20.0, 30.0), chunks=(8, 7, 3), **kw)
    a, spacing, names = read_ome_zarr(tmp_path / "a.ome.zarr")
    assert_ngff_image(tmp_path / "a.ome.zarr", "czyx")
    b = np.asarray(read_ome_zarr(tmp_path / "b.ome.zarr")[0])
    a = np.asarray(a)
    assert names == ["g0", "g5", "g7"] and a.shape == tuple(s1["shape_czyx"]) == (3, 9, 12, 11)
    assert spacing == (25.0, 20.0, 30.0) and s2["blocks"] != s1["blocks"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # chunk-invariant
    z, y, x = (np.asarray(s1["origin_um_zyx"])[i] + np.asarray(s1["spacing_um_zyx"])[i] * np.arange(n)
               for i, n in enumerate(a.shape[1:]))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    direct = np.moveaxis(field.predict(np.stack([xx, yy, zz], -1), ["g0", "g5", "g7"]), -1, 0)
    np.testing.assert_allclose(a, direct, rtol=0, atol=1e-6)
    # an interrupted export: some chunks never finished (no marker, garbage data) → only they are redone
    import zarr

    store = tmp_path / "a.ome.zarr"
    arr = zarr.open_array(str(store / "0"), mode="r+")
    markers = sorted((store / DONE_DIR).glob("[0-9]*"))
    for m in markers[:5]:
        idx = [int(v) for v in m.name.split("_")]
        arr[(slice(None), *[slice(i * c, (i + 1) * c) for i, c in zip(idx, (3, 4, 5))])] = -7.0
        m.unlink()
    again = field.write_volume(store, (25.0, 20.0, 30.0), chunks=(3, 4, 5), **kw)
    assert again["computed"] == 5 and again["skipped"] == s1["blocks"] - 5
    np.testing.assert_array_equal(np.asarray(read_ome_zarr(store)[0]), a)
    with pytest.raises(Exception, match="another model or volume"):
        field.write_volume(store, (10.0, 20.0, 30.0), chunks=(3, 4, 5), **kw)


def test_default_volume_box_is_the_training_points_box(fitted, split):
    """Not the field's padded cube: for a 1 mm × 1 mm × 0.4 mm stack that cube is ~1.2 mm deep, mostly empty."""
    field = FittedField.load(fitted)
    xyz = split[0].obsm["spatial_3d"]
    shape, spacing, origin = field.volume_geometry(50.0)
    np.testing.assert_allclose(origin, xyz.min(0)[::-1])
    top = np.asarray(origin) + (np.asarray(shape) - 1) * 50.0
    assert (top <= xyz.max(0)[::-1] + 1e-6).all() and (top > xyz.max(0)[::-1] - 50.0).all()
    lo, hi = field.box_um
    assert (hi - lo)[2] > 1.5 * np.ptp(xyz[:, 2])  # the field's own box (a cube) reaches far beyond the sections


def test_oblique_virtual_section_equals_point_queries(fitted):
    field = FittedField.load(fitted)
    placement = SectionPlacement.from_origin_normal((300.0, 250.0, 150.0), (0.3, -0.2, 1.0), 15.0)
    img = field.virtual_section(placement, (6, 9), genes=["g2", "g3"])
    assert img.shape == (2, 6, 9)
    rows, cols = np.meshgrid(np.arange(6), np.arange(9), indexing="ij")
    pts = placement.map(np.column_stack([cols.ravel(), rows.ravel()]))
    np.testing.assert_allclose(img.reshape(2, -1).T, field.predict(pts, ["g2", "g3"]), atol=1e-5)


def test_cli_fit_volume_predict(split, tmp_path):
    train, _ = split
    stack = tmp_path / "stack.h5ad"
    train.write_h5ad(stack)
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["reconstruct", "fit", str(stack), "--out", str(run), "--genes", "g0,g1,g2",
                              "--set", "iterations=10", "--set", "batch_size=64", "--set", "n_levels=3",
                              "--set", "log2_table_size=8"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["reconstruct", "volume", str(run), "--out", str(tmp_path / "v.ome.zarr"),
                              "--spacing-um", "200", "--genes", "g1"])  # --spacing-um: as the other verbs spell it
    assert res.exit_code == 0, res.output
    assert np.asarray(read_ome_zarr(tmp_path / "v.ome.zarr")[0]).shape[0] == 1
    assert_ngff_image(tmp_path / "v.ome.zarr", "czyx")
    pd.DataFrame({"x": [10.0, 500.0], "y": [20.0, 600.0], "z": [0.0, 222.0]}).to_csv(tmp_path / "p.csv", index=False)
    res = runner.invoke(app, ["reconstruct", "predict", str(run), "--points", str(tmp_path / "p.csv"),
                              "--out", str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(tmp_path / "o.csv").columns) == ["x", "y", "z", "g0", "g1", "g2"]
    # a virtual oblique section in the three formats: the same values as the API, µm pixels and gene names kept
    import tifffile

    from voxelome.infer.field_export import FittedField
    from voxelome.register.placement import SectionPlacement

    plane = ["--origin", "0,0,100", "--normal", "0.2,0,1", "--pixel-size", "40", "--shape", "6,9", "--genes", "g2,g0"]
    expected = FittedField.load(run).virtual_section(
        SectionPlacement.from_origin_normal((0, 0, 100), (0.2, 0, 1), 40.0), (6, 9), ["g2", "g0"])
    for name in ("s.ome.zarr", "s.tif", "s.npz"):
        if name == "s.npz":  # the µm-suffixed spelling of the other verbs works too
            plane[plane.index("--pixel-size")] = "--pixel-size-um"
        res = runner.invoke(app, ["reconstruct", "section", str(run), "--out", str(tmp_path / name), *plane])
        assert res.exit_code == 0, res.output
    from voxelome.infer.slide import read_slide_map

    data, spacing, names = read_slide_map(tmp_path / "s.ome.zarr")  # the 2D (c, y, x) reader
    assert_ngff_image(tmp_path / "s.ome.zarr", "cyx")
    np.testing.assert_allclose(np.asarray(data), expected, rtol=1e-6)
    assert names == ["g2", "g0"] and tuple(spacing) == (40.0, 40.0)
    with tifffile.TiffFile(tmp_path / "s.tif") as tf:
        np.testing.assert_allclose(tf.asarray(), expected, rtol=1e-6)
        assert tf.imagej_metadata["Labels"] == ["g2", "g0"] and tf.imagej_metadata["unit"] == "um"
    np.testing.assert_allclose(np.load(tmp_path / "s.npz")["values"], expected)
    res = runner.invoke(app, ["reconstruct", "section", str(run), "--out", str(tmp_path / "s.png"), *plane])
    assert res.exit_code == 2 and ".ome.zarr (napari), .tif (Fiji) or .npz" in res.output
    res = runner.invoke(app, ["reconstruct", "fit", str(stack), "--out", str(tmp_path / "r2"), "--genes", "g1,gg2"])
    assert res.exit_code == 2 and "Did you mean" in res.output
    res = runner.invoke(app, ["reconstruct", "fit", str(stack), "--out", str(tmp_path / "r3"), "--likelihood", "poison"])
    assert res.exit_code == 2 and "Did you mean 'poisson'" in res.output
