"""Cell-segmented in situ platforms (Xenium, MERSCOPE) read as sections, and stacked from serial cell sections."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from voxelome.constants import PIXEL_SIZE_KEY, SPATIAL_3D_KEY, SPOT_DIAMETER_KEY, UNS_KEY
from voxelome.errors import VoxelomeError
from voxelome.io import read_merscope, read_section, read_xenium, write_h5ad
from tenx import write_10x_h5

GENES = ["EPCAM", "KRT8", "KRT18", "ERBB2", "PTPRC", "CD3E", "CD68", "MS4A1", "COL1A1", "ACTA2", "PECAM1", "VWF"]
#: where each gene is high in the synthetic tissue (fractions of its width and height), the same in every section
_HOTSPOTS = np.random.default_rng(123).uniform(0.1, 0.9, (len(GENES), 2))
XENIUM_CONTROLS = {"NegControlProbe_00042": "Negative Control Probe", "BLANK_0006": "Blank Codeword",
                   "UnassignedCodeword_0001": "Unassigned Codeword"}


def _tissue_cells(seed: int, size_um=(600.0, 400.0), pitch_um=10.0):
    """Cells of one section of a synthetic tissue: centres on a jittered 10 µm grid (µm, tissue frame) and Poisson
    counts whose rates follow smooth, asymmetric patterns of position (so that sections can be aligned on them)."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(5, size_um[0], pitch_um), np.arange(5, size_um[1], pitch_um))
    xy = np.c_[gx.ravel(), gy.ravel()] + rng.uniform(-3, 3, (gx.size, 2))
    uv = xy / np.asarray(size_um)
    rates = 0.3 + 6 * np.exp(-((uv[:, None, :] - _HOTSPOTS[None]) ** 2).sum(-1) / 0.02)
    counts = rng.poisson(rates)
    counts[:, 0] += 1  # every cell has a gene count (the reader drops cells without)
    return xy, counts


def _write_xenium(folder, xy_um, counts, *, table="csv.gz", pixel_size=0.2125):
    """A Xenium output folder: ``cell_feature_matrix.h5`` (genes and control features), the cell table,
    ``experiment.xenium``. The first cell has control counts only."""
    folder.mkdir(parents=True)
    n = len(xy_um)
    ids = np.array([f"cell{i:05d}-1" for i in range(n)])
    counts = counts.copy()
    counts[0] = 0
    controls = np.zeros((n, len(XENIUM_CONTROLS)), int)
    controls[:2, 0] = 1
    full = np.c_[counts, controls]
    write_10x_h5(folder / "cell_feature_matrix.h5", ids, GENES + list(XENIUM_CONTROLS),
                 ["Gene Expression"] * len(GENES) + list(XENIUM_CONTROLS.values()), sp.csc_matrix(full.T))
    area = np.full(n, 78.5)  # a 10 µm disk
    area[::7] = 60.0
    cells = pd.DataFrame({"cell_id": ids, "x_centroid": xy_um[:, 0], "y_centroid": xy_um[:, 1],
                          "transcript_counts": counts.sum(1), "control_probe_counts": controls[:, 0],
                          "cell_area": area, "nucleus_area": area / 3})
    if table == "parquet":
        cells["cell_id"] = [c.encode() for c in ids]  # Xenium's Parquet stores ids as bytes
        cells.sample(frac=1.0, random_state=0).to_parquet(folder / "cells.parquet")  # another row order
    else:
        cells.to_csv(folder / "cells.csv.gz", index=False)
    (folder / "experiment.xenium").write_text(json.dumps({"major_version": 5, "pixel_size": pixel_size}))
    return ids, counts


@pytest.mark.parametrize("table", ["csv.gz", "parquet"])
def test_xenium_folder_reads_cells_in_um(tmp_path, table):
    if table == "parquet":
        pytest.importorskip("pyarrow")
    xy, counts = _tissue_cells(0)
    ids, counts = _write_xenium(tmp_path / "xenium", xy, counts, table=table)
    with pytest.warns(UserWarning, match=r"1 of 2400 cells have no gene counts"):
        a = read_section(tmp_path / "xenium")
    assert list(a.var_names) == GENES  # control probes and codewords are not genes
    assert a.n_obs == len(ids) - 1 and list(a.obs_names) == list(ids[1:])
    np.testing.assert_array_equal(a.X.toarray(), counts[1:])
    meta = a.uns[UNS_KEY]
    assert meta[PIXEL_SIZE_KEY] == 0.2125 and meta["platform"] == "xenium"
    np.testing.assert_allclose(a.obsm["spatial"] * meta[PIXEL_SIZE_KEY], xy[1:])  # morphology-image pixels → µm
    assert meta[SPOT_DIAMETER_KEY] == pytest.approx(2 * np.sqrt(78.5 / np.pi))  # the median cell area as a disk
    assert {"cell_area", "nucleus_area", "transcript_counts"} <= set(a.obs.columns)
    write_h5ad(a, tmp_path / "cells.h5ad")  # the table goes on to scanpy as it is
    b = read_section(tmp_path / "cells.h5ad")
    np.testing.assert_allclose(b.obsm["spatial"], a.obsm["spatial"])


def test_xenium_bad_folders(tmp_path):
    xy, counts = _tissue_cells(1, size_um=(100.0, 100.0))
    _write_xenium(tmp_path / "x", xy, counts)
    cells = pd.read_csv(tmp_path / "x" / "cells.csv.gz")
    cells.iloc[5:].to_csv(tmp_path / "x" / "cells.csv.gz", index=False)
    with pytest.raises(VoxelomeError, match=r"5 cells of the count matrix \(e.g. 'cell00000-1'\) are not in"):
        read_xenium(tmp_path / "x")
    cells.drop(columns=["x_centroid"]).to_csv(tmp_path / "x" / "cells.csv.gz", index=False)
    with pytest.raises(VoxelomeError, match=r"lacks the column\(s\) \['x_centroid'\]"):
        read_xenium(tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VoxelomeError, match="not a Xenium output folder"):
        read_xenium(tmp_path / "empty")


def test_merscope_folder_reads_cells_in_um(tmp_path):
    xy, counts = _tissue_cells(2, size_um=(200.0, 150.0))
    ids = [str(1000 + i) for i in range(len(xy))]
    table = pd.DataFrame(counts, columns=GENES, index=pd.Index(ids, name="cell"))
    table["Blank-0"], table["Blank-1"] = 1, 0
    table.to_csv(tmp_path / "cell_by_gene.csv")
    volume = np.full(len(xy), 4 / 3 * np.pi * 6.0 ** 3)  # 12 µm spheres
    pd.DataFrame({"fov": 0, "volume": volume, "center_x": xy[:, 0], "center_y": xy[:, 1]},
                 index=pd.Index(ids, name="EntityID")).loc[ids[::-1]].to_csv(tmp_path / "cell_metadata.csv")
    (tmp_path / "images").mkdir()
    np.savetxt(tmp_path / "images" / "micron_to_mosaic_pixel_transform.csv",
               [[9.259, 0, 120.5], [0, 9.259, -33.0], [0, 0, 1]], delimiter=" ")
    a = read_section(tmp_path)
    assert list(a.var_names) == GENES and list(a.obs_names) == ids
    np.testing.assert_array_equal(a.X.toarray(), counts)
    np.testing.assert_allclose(a.obsm["spatial"], xy)  # µm
    meta = a.uns[UNS_KEY]
    assert meta[PIXEL_SIZE_KEY] == 1.0 and meta[SPOT_DIAMETER_KEY] == pytest.approx(12.0)
    assert meta["micron_to_mosaic_px"][0] == [9.259, 0, 120.5]
    with pytest.raises(VoxelomeError, match="pixel_size_um=0.5: a MERSCOPE section is read in µm"):
        read_section(tmp_path, pixel_size_um=0.5)
    pd.read_csv(tmp_path / "cell_metadata.csv", index_col=0).iloc[3:].to_csv(tmp_path / "cell_metadata.csv")
    with pytest.raises(VoxelomeError, match="3 cells of cell_by_gene.csv"):
        read_merscope(tmp_path)


def test_serial_xenium_sections_stack_into_3d(tmp_path):
    """Two serial sections of one tissue (other cells, other counts), the second rotated 25° and shifted on its
    slide: stacked from the Xenium folders by ``voxelome register stack`` (cells pooled into ~30 µm bins: one cell's
    dozen counts over 12 genes place it poorly), its cells land within a cell diameter of their true place."""
    import anndata as ad
    from typer.testing import CliRunner

    from voxelome.cli import app

    xy0, c0 = _tissue_cells(3)
    xy1, c1 = _tissue_cells(4)
    a = np.deg2rad(25.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    on_slide = (xy1 - xy1.mean(0)) @ rot.T + xy1.mean(0) + [150.0, -80.0]
    _write_xenium(tmp_path / "s1", xy0, c0)
    _write_xenium(tmp_path / "s2", on_slide, c1)
    with pytest.warns(UserWarning, match="1 of 2400 cells have no gene counts"):  # each folder's first cell
        r = CliRunner().invoke(app, ["register", "stack", str(tmp_path / "s1"), str(tmp_path / "s2"), "--z", "0,10",
                                     "--max-points", "300", "--out", str(tmp_path / "stack.h5ad")])
    assert r.exit_code == 0, r.output
    st = ad.read_h5ad(tmp_path / "stack.h5ad")
    assert st.uns["voxelome"]["stack"]["bin_um"] > 20
    sec = st.obs["section"].astype(str).to_numpy()
    xyz = np.asarray(st.obsm[SPATIAL_3D_KEY])
    np.testing.assert_allclose(np.unique(xyz[:, 2]), [0.0, 10.0])
    # section s1 is the stack's frame, in µm as its centroids were written
    np.testing.assert_allclose(xyz[sec == "s1", :2], xy0[1:], atol=1e-6)
    rms = float(np.sqrt(np.mean(np.sum((xyz[sec == "s2", :2] - xy1[1:]) ** 2, 1))))
    before = float(np.sqrt(np.mean(np.sum((on_slide[1:] - xy1[1:]) ** 2, 1))))
    assert before > 100 and rms < 8.0, (before, rms)
