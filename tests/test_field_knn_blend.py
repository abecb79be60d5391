"""A field ensemble averaged with 3D kNN of the measured points: the weight chosen on held-out inner sections, every
query blended, stale choices forgotten, the CLI option."""

import json

import numpy as np
import pytest
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from voxelome.cli import app

from voxelome.infer.field_export import FittedField
from voxelome.infer.field_knn import BLEND_FILE, POINTS_FILE, KnnBlend
from voxelome.train.field_knn_blend import BLEND_WEIGHTS, choose_knn_blend
from voxelome.train.field_members import MemberSpec, fit_members
from voxelome.train.field_selection import held_out_truth
from voxelome.train.field_trainer import make_field_config
from voxelome.train.point_data import PointData
from test_field_fit import synthetic_stack

#: a few iterations: the fields stay rough, so kNN of the measured spots predicts held-out sections better
ROUGH = dict(iterations=8, batch_size=128, n_levels=3, log2_table_size=8)


@pytest.fixture(scope="module")
def stack():
    return synthetic_stack(seed=3, z_planes=np.arange(0, 201, 50.0), pitch=80.0)


@pytest.fixture(scope="module")
def data(stack):
    return PointData.from_anndata(stack, genes=[f"g{i}" for i in range(6)])


def _specs():
    return [MemberSpec("nb", "nb", make_field_config("cpu", likelihood="nb", **ROUGH)),
            MemberSpec("gaussian", "gaussian", make_field_config("cpu", likelihood="gaussian", **ROUGH))]


def test_knn_blend_query_formula_and_records(data, tmp_path):
    specs = _specs()
    members = fit_members(data, tmp_path, specs, seeds=1, rule="test", log=lambda s: None)
    record = choose_knn_blend(data, specs, tmp_path, log=lambda s: None)
    # inner sections only (never the first or last), held out together; every weight scored
    assert record["validation_sections"] == ["z050", "z150"]
    assert set(record["mean_r"]) == {str(a) for a in BLEND_WEIGHTS}
    assert record["weight"] == 0.5 and record["mean_r"]["0.5"] > record["mean_r"]["0.0"]  # rough fields: kNN helps
    assert not (tmp_path / "knn_blend").exists()  # the validation fits are removed once the choice is recorded
    ens = FittedField.load(tmp_path)
    assert isinstance(ens.knn, KnnBlend) and ens.knn.weight == 0.5
    # anywhere, and on measured spots (denoising them): inverse-distance weights, distances floored at half the
    # spots' nearest-neighbour distance (80 µm grid, 50 µm apart in z → 25 µm) so a spot is not its own prediction
    assert record["distance_floor_um"] == pytest.approx(25.0)
    pts = np.vstack([np.column_stack([np.linspace(30, 950, 40), np.linspace(900, 40, 40), np.linspace(10, 190, 40)]),
                     data.xyz_um[::97]])
    measured = held_out_truth(data)  # log1p counts per 10k of the measured spots
    d, idx = cKDTree(data.xyz_um).query(pts, k=record["k"])
    w = 1 / np.maximum(d, 25.0)
    knn = np.einsum("mk,mkg->mg", w / w.sum(1, keepdims=True), measured[idx])
    assert (w[-len(data.xyz_um[::97]):, 0] / w[-len(data.xyz_um[::97]):].sum(1)).max() < 0.2
    parts = [FittedField.load(tmp_path / m) for m in members]
    for kwargs in ({}, {"value": "measured"}):
        fields = np.mean([p.predict(pts, **kwargs) for p in parts], axis=0)
        np.testing.assert_allclose(ens.predict(pts, **kwargs), 0.5 * fields + 0.5 * knn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ens.predict(pts, ["g4", "g1"]), ens.predict(pts)[:, [4, 1]], rtol=1e-6)
    # a volume goes through the same predict (and its resume markers see the blend in the fingerprint)
    ens.write_volume(tmp_path / "v.ome.zarr", 100.0, chunks=(2, 4, 4), progress=False)
    import zarr

    vol = np.asarray(zarr.open_group(str(tmp_path / "v.ome.zarr"), mode="r")["0"])
    shape, spacing, origin = ens.volume_geometry(100.0)
    z, y, x = (o + s * np.arange(n) for o, s, n in zip(origin, spacing, shape))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    np.testing.assert_allclose(vol, np.moveaxis(ens.predict(np.stack([xx, yy, zz], -1)), -1, 0), rtol=1e-5, atol=1e-5)
    (tmp_path / BLEND_FILE).rename(tmp_path / "kept.json")
    assert FittedField.load(tmp_path).fingerprint != ens.fingerprint
    (tmp_path / "kept.json").rename(tmp_path / BLEND_FILE)
    # refitting the members forgets the blend chosen for the old ones
    fit_members(data, tmp_path, specs, seeds=1, rule="test", log=lambda s: None)
    assert not (tmp_path / BLEND_FILE).exists() and not (tmp_path / POINTS_FILE).exists()
    assert FittedField.load(tmp_path).knn is None


def test_cli_knn_blend_option(stack, tmp_path):
    path = tmp_path / "stack.h5ad"
    stack.write_h5ad(path)
    quick = ["--n-genes", "4", *(f"--set={k}={v}" for k, v in ROUGH.items()), "--seeds", "1"]
    runner = CliRunner()
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "on"), *quick])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "on" / BLEND_FILE).read_text())
    assert "kNN blend chosen on held-out z050, z150: weight" in res.output
    assert ("then with 3D kNN" in res.output) == (record["weight"] > 0)
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "off"), *quick,
                              "--knn-blend", "off"])
    assert res.exit_code == 0 and not (tmp_path / "off" / BLEND_FILE).exists(), res.output
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "x"), "--knn-blend", "of"])
    assert res.exit_code == 2 and "--knn-blend 'of' is not one of auto, off" in res.output
    two = tmp_path / "two.h5ad"
    stack[stack.obs["section"].isin(["z000", "z050"])].copy().write_h5ad(two)
    res = runner.invoke(app, ["reconstruct", "fit", str(two), "--out", str(tmp_path / "two"), *quick])
    assert res.exit_code == 0 and "kNN blend: not considered" in res.output, res.output
    assert not (tmp_path / "two" / BLEND_FILE).exists()


def test_knn_blend_not_offered_above_the_stored_values_cap(data, tmp_path, monkeypatch):
    import voxelome.train.field_knn_blend as blend

    monkeypatch.setattr(blend, "MAX_STORED_VALUES", len(data) * data.n_genes - 1)
    record = choose_knn_blend(data, _specs(), tmp_path, log=lambda s: None)
    assert record["weight"] == 0 and "kNN would carry the data" in record["reason"]
    assert not (tmp_path / "knn_blend").exists() and not (tmp_path / POINTS_FILE).exists()  # nothing fitted or kept
    assert json.loads((tmp_path / BLEND_FILE).read_text())["weight"] == 0 and KnnBlend.load(tmp_path) is None
