"""Volumetric cells without sections: z-slabs stand for sections (``z_slab_um`` / ``reconstruct fit --z-slabs``)."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.errors import VoxelomeError
from voxelome.infer.field_export import FittedField
from voxelome.train.point_data import PointData, z_slabs
from voxelome.train.point_store import open_point_store

FAST = ["--set", "iterations=150", "--set", "batch_size=512", "--set", "log2_table_size=12"]


def _cells(n=1500, seed=0):
    """Cells scattered through a 400 × 400 × 120 µm block; two genes follow z, one x (no sections)."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform((0, 0, 3), (400, 400, 123), (n, 3))
    rate = np.c_[np.exp(2.5 * np.sin(xyz[:, 2] / 20)), np.exp(2 * np.cos(xyz[:, 2] / 30)), np.exp(xyz[:, 0] / 150),
                 np.full(n, 3.0)]
    counts = rng.poisson(rate) + (np.arange(4)[None] == 3)  # the last gene is never 0: no empty cells
    a = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(index=["Zsin", "Zcos", "Xexp", "Flat"]))
    a.obsm["spatial_3d"] = xyz
    return a, np.log1p(1e4 * rate / rate.sum(1, keepdims=True))


def test_z_slabs_are_stable_named_and_checked():
    codes, names = z_slabs([3.0, 12.5, 9.99, 41.0, 10.0], 10)
    assert names == ["z0-10um", "z10-20um", "z40-50um"]  # edges at multiples of the thickness; 20–40 empty: skipped
    assert codes.tolist() == [0, 1, 0, 2, 1] and codes.dtype == np.int64
    sub_codes, sub_names = z_slabs([12.5, 41.0], 10)  # a subset of the points gets the same slab names
    assert [sub_names[c] for c in sub_codes] == ["z10-20um", "z40-50um"]
    assert z_slabs([-4.0, 1.0], 2.5)[1] == ["z-5--2.5um", "z0-2.5um"]
    for bad in (0, -1.0):
        with pytest.raises(VoxelomeError, match="z_slab_um"):
            z_slabs([1.0, 2.0], bad)
    with pytest.raises(VoxelomeError, match="finite"):
        z_slabs([1.0, np.nan], 1)
    with pytest.raises(VoxelomeError, match="thicker slabs"):
        z_slabs(np.arange(20_000.0), 1)


def test_points_without_sections_need_slabs_and_get_them():
    a, _ = _cells(200)
    with pytest.raises(VoxelomeError, match=r"obs\['section'\] is missing.*--z-slabs"):
        PointData.from_anndata(a)
    data = PointData.from_anndata(a, z_slab_um=30)
    assert data.section_names == ["z0-30um", "z30-60um", "z60-90um", "z90-120um", "z120-150um"]
    assert data.z_slab_um == 30.0
    np.testing.assert_array_equal(data.section, np.floor(a.obsm["spatial_3d"][:, 2] / 30).astype(int))
    with pytest.raises(VoxelomeError, match="1 z-slab.*thinner slabs"):
        PointData.from_anndata(a, z_slab_um=500)
    a.obs["section"] = "one"  # an existing section column is not read when slabs are asked for
    assert len(PointData.from_anndata(a, z_slab_um=30).section_names) == 5


def test_cli_fit_on_slabs_has_no_section_effects_and_predicts_held_out_cells(tmp_path):
    a, true = _cells()
    test = np.arange(len(a)) % 5 == 0  # held-out cells, everywhere in the block
    a[~test].copy().write_h5ad(tmp_path / "cells.h5ad")
    run = CliRunner().invoke(app, ["reconstruct", "fit", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "run"),
                                   "--z-slabs", "20", "--settings", "ntf", "--seeds", "1", *FAST])
    assert run.exit_code == 0, run.output
    assert "7 z-slabs of 20 µm stand for sections" in run.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["config"]["section_dim"] == 0
    pred = FittedField.load(tmp_path / "run").predict(a.obsm["spatial_3d"][test])
    r = [np.corrcoef(pred[:, g], true[test, g])[0, 1] for g in range(3)]
    # the z structure inside and across slabs is kept: 0.86 here; per-slab effects (section_dim=8) absorb part of it
    # (min r 0.78 with the same fit)
    assert min(r) > 0.82, r
    bad = CliRunner().invoke(app, ["reconstruct", "fit", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "r2"),
                                   "--z-slabs", "20", "--set", "section_dim=4"])
    assert bad.exit_code == 2 and "z-slabs of one volume" in bad.output
    missing = CliRunner().invoke(app, ["reconstruct", "fit", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "r3")])
    assert missing.exit_code == 2 and "--z-slabs" in missing.output


def test_cli_store_records_slabs_and_fit_honours_them(tmp_path):
    a, _ = _cells(400)
    a.write_h5ad(tmp_path / "cells.h5ad")
    r = CliRunner().invoke(app, ["reconstruct", "store", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "st"),
                                 "--z-slabs", "40"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "st" / "points.json").read_text())["z_slab_um"] == 40.0
    store = open_point_store(tmp_path / "st")
    assert store.z_slab_um == 40.0 and store.section_names == ["z0-40um", "z40-80um", "z80-120um", "z120-160um"]
    r = CliRunner().invoke(app, ["reconstruct", "fit", str(tmp_path / "st"), "--out", str(tmp_path / "run"), *FAST])
    assert r.exit_code == 0, r.output
    assert "4 z-slabs of 40 µm" in r.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["config"]["section_dim"] == 0
    r = CliRunner().invoke(app, ["reconstruct", "fit", str(tmp_path / "st"), "--out", str(tmp_path / "r2"),
                                 "--z-slabs", "10"])
    assert r.exit_code == 2 and "point store" in r.output


def test_cells_without_counts_are_refused_or_dropped(tmp_path):
    a, _ = _cells(400)
    X = a.X.toarray()
    X[[5, 17, 230]] = 0  # imaging panels leave some cells without any count
    a.X = sp.csr_matrix(X)
    a.write_h5ad(tmp_path / "cells.h5ad")
    args = ["reconstruct", "fit", str(tmp_path / "cells.h5ad"), "--z-slabs", "40", "--settings", "ntf", *FAST]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r1")])
    assert r.exit_code == 2 and "3 points have no counts" in r.output and "--drop-empty" in r.output
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r2"), "--drop-empty"])
    assert r.exit_code == 0, r.output
    assert "3 of 400 points have no counts and are left out" in r.output and "on 397 points" in r.output
    r = CliRunner().invoke(app, ["reconstruct", "store", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "st"),
                                 "--z-slabs", "40", "--drop-empty", "--chunk", "150"])
    assert r.exit_code == 0, r.output
    store = open_point_store(tmp_path / "st")
    assert len(store) == 397 and "3 points without counts left out" in r.output
    keep = X.sum(1) > 0
    np.testing.assert_array_equal(store.xyz_um, a.obsm["spatial_3d"][keep].astype(np.float32))
    np.testing.assert_array_equal(store.rows(np.arange(397)), X[keep].astype(np.float32))
