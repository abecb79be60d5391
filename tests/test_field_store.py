"""Disk-backed points (point store): same fit as in RAM, chunked writing from a backed .h5ad, clear errors."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.errors import VoxelomeError
from voxelome.train.field_trainer import fit_field, make_field_config
from voxelome.train.point_data import PointData, TensorRows
from voxelome.train.point_store import (
    DiskCSR,
    PointStoreWriter,
    open_point_store,
    write_point_store,
)


def _stack(n=600, g=12, sections=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(0.8, (n, g)).astype(np.float32)
    X[np.arange(n), rng.integers(0, g, n)] += 1  # no empty cells
    X[7] = 0
    X[7, 3] = 5  # a row with a single value; some rows are sparse
    obs = pd.DataFrame({"section": [f"s{i % sections}" for i in range(n)]}, index=[f"c{i}" for i in range(n)])
    a = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))
    # float32-exact coordinates: the store keeps float32 µm, the in-RAM path float64
    xyz = np.c_[rng.uniform(0, 200, (n, 2)), (np.arange(n) % sections) * 30.0 + rng.normal(0, 1, n)]
    a.obsm["spatial_3d"] = xyz.astype(np.float32).astype(np.float64)
    return a


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("store")
    a = _stack()
    a.write_h5ad(d / "stack.h5ad")
    write_point_store(d / "stack.h5ad", d / "all", chunk=170)  # backed .h5ad, 4 chunks
    write_point_store(a, d / "sub", genes=["G5", "G2", "G9"], chunk=250)
    return a, d


def test_store_matches_the_in_ram_points(stores):
    a, d = stores
    disk, ram = open_point_store(d / "all"), PointData.from_anndata(a)
    assert isinstance(disk.values, DiskCSR) and isinstance(disk.xyz_um, np.memmap)
    assert disk.genes == ram.genes and disk.section_names == ram.section_names and disk.is_counts
    np.testing.assert_array_equal(disk.xyz_um, ram.xyz_um)
    np.testing.assert_array_equal(disk.section, ram.section)
    np.testing.assert_array_equal(disk.library, ram.library)
    idx = np.random.default_rng(1).integers(0, len(a), 300)
    np.testing.assert_array_equal(disk.rows(idx), ram.rows(idx))
    rows = TensorRows.from_values(disk.values, "cpu")  # tensors over the memmaps, not copies
    assert rows.data.data_ptr() == disk.values.data.ctypes.data
    np.testing.assert_array_equal(rows(torch.from_numpy(idx)).numpy(), ram.rows(idx))
    # a gene subset keeps the library over all genes, as from_anndata does
    sub, ram_sub = open_point_store(d / "sub"), PointData.from_anndata(a, genes=["G5", "G2", "G9"])
    assert sub.genes == ["G5", "G2", "G9"]
    np.testing.assert_array_equal(sub.library, ram_sub.library)
    np.testing.assert_array_equal(sub.rows(idx), ram_sub.rows(idx))
    assert np.load(d / "all" / "indices.npy", mmap_mode="r").dtype == np.int32  # plain .npy files


def test_fit_from_store_is_identical_to_the_in_ram_fit(stores, tmp_path):
    a, d = stores
    cfg = make_field_config("cpu", iterations=25, batch_size=256, jitter_um=(5.0, 5.0, 10.0), log2_table_size=12,
                            log_every=5)
    held = PointData.from_anndata(a[a.obs["section"] == "s1"].copy(), min_sections=1)
    fit_field(open_point_store(d / "all"), cfg, tmp_path / "disk", progress=False, validation=held)
    fit_field(PointData.from_anndata(a), cfg, tmp_path / "ram", progress=False, validation=held)
    s1 = torch.load(tmp_path / "disk" / "checkpoint.pt", weights_only=True)["model_state"]
    s2 = torch.load(tmp_path / "ram" / "checkpoint.pt", weights_only=True)["model_state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    h1, h2 = (json.loads((tmp_path / r / "history.json").read_text()) for r in ("disk", "ram"))
    assert [(h["loss"], h["val_loss"]) for h in h1] == [(h["loss"], h["val_loss"]) for h in h2]
    assert h1[-1]["val_loss"] < h1[0]["val_loss"]  # it trained: below the untrained field (per-gene means)


def test_cli_store_then_fit(stores, tmp_path):
    _, d = stores
    r = CliRunner().invoke(app, ["reconstruct", "store", str(d / "stack.h5ad"), "--out", str(tmp_path / "st"),
                                 "--genes", "G1,G4", "--chunk", "200"])
    assert r.exit_code == 0, r.output
    assert open_point_store(tmp_path / "st").genes == ["G1", "G4"]
    r = CliRunner().invoke(app, ["reconstruct", "fit", str(tmp_path / "st"), "--out", str(tmp_path / "run"),
                                 "--set", "iterations=3", "--set", "batch_size=64", "--set", "log2_table_size=10"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    r = CliRunner().invoke(app, ["reconstruct", "fit", str(tmp_path / "st"), "--out", str(tmp_path / "r2"),
                                 "--genes", "G1"])
    assert r.exit_code == 2 and "point store" in r.output


def _write(path, a, **kw):
    return write_point_store(a, path, **kw)


def test_bad_stores_are_refused_with_clear_errors(stores, tmp_path):
    a, d = stores
    with pytest.raises(VoxelomeError, match="does not exist"):
        open_point_store(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VoxelomeError, match="no points.json"):
        open_point_store(tmp_path / "empty")
    with pytest.raises(VoxelomeError, match="already holds a point store"):
        _write(d / "all", a)
    with pytest.raises(VoxelomeError, match="does not exist"):
        write_point_store(tmp_path / "missing.h5ad", tmp_path / "x")
    with pytest.raises(VoxelomeError, match="not in the stack's var_names.*G10"):
        _write(tmp_path / "x", a, genes=["G1", "Gx10"])

    def broken(name, change):
        p = tmp_path / name
        _write(p, a)
        change(p)
        return p

    def save(p, key, arr):
        np.save(p / f"{key}.npy", arr)

    p = broken("int64", lambda p: save(p, "indices", np.load(p / "indices.npy").astype(np.int64)))
    with pytest.raises(VoxelomeError, match="indices.npy is int64.*needs int32"):
        open_point_store(p)
    p = broken("lacks", lambda p: (p / "data.npy").unlink())
    with pytest.raises(VoxelomeError, match="lacks data.npy"):
        open_point_store(p)
    p = broken("cols", lambda p: save(p, "indices", np.load(p / "indices.npy") + 5))
    with pytest.raises(VoxelomeError, match="column indices outside"):
        open_point_store(p)
    p = broken("ptr", lambda p: save(p, "indptr", np.load(p / "indptr.npy")[::-1].copy()))
    with pytest.raises(VoxelomeError, match="indptr.npy must start at 0"):
        open_point_store(p)

    def nan(p):
        x = np.load(p / "xyz_um.npy")
        x[3, 1] = np.nan
        save(p, "xyz_um", x)

    with pytest.raises(VoxelomeError, match="NaN"):
        open_point_store(broken("nan", nan))
    p = broken("fmt", lambda p: (p / "points.json").write_text(json.dumps({"format": "other/9"})))
    with pytest.raises(VoxelomeError, match="format 'other/9'"):
        open_point_store(p)
    one = a[a.obs["section"] == "s0"].copy()
    with pytest.raises(VoxelomeError, match="1 section"):
        open_point_store(_write(tmp_path / "one", one))
    # a write that fails midway leaves no manifest: the store is refused as incomplete
    with pytest.raises(RuntimeError), PointStoreWriter(tmp_path / "half", ["G0"], ["s0", "s1"]) as w:
        w.append(sp.csr_matrix(np.ones((3, 1))), np.zeros((3, 3)), np.array([0, 1, 1]))
        raise RuntimeError("killed")
    with pytest.raises(VoxelomeError, match="did not finish"):
        open_point_store(tmp_path / "half")
    with PointStoreWriter(tmp_path / "w", ["G0"], ["s0", "s1"]) as w:
        with pytest.raises(VoxelomeError, match="NaN"):
            w.append(sp.csr_matrix(np.ones((2, 1))), np.full((2, 3), np.nan), np.array([0, 1]))
        with pytest.raises(VoxelomeError, match="section codes"):
            w.append(sp.csr_matrix(np.ones((2, 1))), np.zeros((2, 3)), np.array([0, 2]))
        w.append(sp.csr_matrix(np.ones((2, 1))), np.zeros((2, 3)), np.array([0, 1]))
    assert len(open_point_store(tmp_path / "w")) == 2
    # a counts row without counts is refused when the writer closes: the store never gets a manifest
    with pytest.raises(VoxelomeError, match=r"no counts at all \(first: row 3\)"), \
            PointStoreWriter(tmp_path / "e", ["G0"], ["s0", "s1"]) as w:
        w.append(sp.csr_matrix(np.ones((2, 1))), np.zeros((2, 3)), np.array([0, 1]))
        w.append(sp.csr_matrix(np.array([[2.0], [0.0]])), np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(VoxelomeError, match="did not finish"):
        open_point_store(tmp_path / "e")
    with pytest.raises(VoxelomeError, match="no points were written"), \
            PointStoreWriter(tmp_path / "z", ["G0"], ["s0", "s1"]):
        pass


def test_unit_coordinates_do_not_depend_on_the_chunking(stores):
    from voxelome.train.field_trainer import _unit_coords

    _, d = stores
    xyz = open_point_store(d / "all").xyz_um
    lo, extent = np.array([-10.0, -5.0, -20.0]), np.array([230.0, 230.0, 230.0])
    whole = ((np.asarray(xyz, np.float64) - lo) / extent).astype(np.float32)
    np.testing.assert_array_equal(_unit_coords(xyz, lo, extent, chunk=97), whole)
