"""Section readers (Visium, legacy ST, h5ad) and validate_section."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from voxelome.constants import PIXEL_SIZE_KEY, SPOT_DIAMETER_KEY, UNS_KEY
from voxelome.errors import VoxelomeError
from voxelome.io import read_legacy_st, read_section, read_visium, validate_section, write_h5ad
from tenx import write_10x_h5

SHARED = Path(__file__).parents[2] / "shared" / "data"
PX_UM = 0.5  # µm per full-res pixel of the synthetic Visium image
D_FULL = 55.0 / PX_UM  # spot diameter in full-res px (Space Ranger's spot_diameter_fullres)


def _visium_grid(n_rows=6, n_cols=8):
    """Visium hexagonal layout: 100 µm centre-to-centre, odd rows shifted by half a spot."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), 2 * cols.ravel() + rows.ravel() % 2
    px_row = 1000 + rows * (100 * np.sqrt(3) / 2) / PX_UM
    px_col = 2000 + cols * 50 / PX_UM
    return rows, cols, px_row, px_col


@pytest.fixture
def visium_outs(tmp_path):
    """A Space Ranger ≥ 2 ``outs/`` folder: filtered h5 (10x CSC layout), positions with header, scalefactors."""
    rng = np.random.default_rng(0)
    rows, cols, px_row, px_col = _visium_grid()
    n = len(rows)
    barcodes = np.array([f"AAAC{i:06d}-1" for i in range(n)])
    in_tissue = np.ones(n, int)
    in_tissue[:3] = 0  # off tissue: dropped even though in the matrix
    genes = ["GeneA", "GeneB", "GeneC", "GeneD", "CD3"]
    types = ["Gene Expression"] * 4 + ["Antibody Capture"]
    counts = rng.poisson(2.0, size=(n - 1, len(genes))).astype(np.int32)  # last barcode: no counts column
    csc = sp.csc_matrix(counts.T)  # genes × cells, as 10x stores it
    outs = tmp_path / "sample1" / "outs"
    (outs / "spatial").mkdir(parents=True)
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", barcodes[: n - 1], genes, types, csc)
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue, "array_row": rows, "array_col": cols,
                        "pxl_row_in_fullres": px_row.round().astype(int), "pxl_col_in_fullres": px_col.round().astype(int)})
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": D_FULL, "tissue_hires_scalef": 0.1, "fiducial_diameter_fullres": 160.0,
         "tissue_lowres_scalef": 0.03}))
    return outs, counts, pos


def test_visium_h5_outs_roundtrip(visium_outs):
    outs, counts, pos = visium_outs
    a = read_section(outs.parent)  # the sample folder holding outs/
    assert a.n_obs == len(pos) - 3 - 1 and list(a.var_names) == ["GeneA", "GeneB", "GeneC", "GeneD"]
    assert sp.issparse(a.X)
    np.testing.assert_array_equal(a.X.toarray(), counts[3:, :4])
    first = pos.set_index("barcode").loc[a.obs_names[0]]
    np.testing.assert_allclose(a.obsm["spatial"][0], [first.pxl_col_in_fullres, first.pxl_row_in_fullres])
    assert a.uns[UNS_KEY][PIXEL_SIZE_KEY] == pytest.approx(PX_UM)
    assert a.uns[UNS_KEY][SPOT_DIAMETER_KEY] == 55.0
    assert a.uns["spatial"]["sample1"]["scalefactors"]["spot_diameter_fullres"] == D_FULL
    assert set(a.obs.columns) >= {"in_tissue", "array_row", "array_col"}


def test_visium_hd_bin_folder(tmp_path):
    """A Visium HD run: square bins, positions in Parquet, scale from microns_per_pixel / bin_size_um."""
    pytest.importorskip("pyarrow")
    rng = np.random.default_rng(3)
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(10), np.arange(12), indexing="ij"))
    n, genes = len(rows), ["GeneA", "GeneB", "GeneC"]
    barcodes = np.array([f"s_016um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)])
    counts = rng.poisson(3.0, size=(n, 3)).astype(np.int32) + 1
    outs = tmp_path / "run" / "outs"
    bin_dir = outs / "binned_outputs" / "square_016um"
    (bin_dir / "spatial").mkdir(parents=True)
    (outs / "binned_outputs" / "square_008um").mkdir()
    write_10x_h5(bin_dir / "filtered_feature_bc_matrix.h5", barcodes, genes, ["Gene Expression"] * 3,
                  sp.csc_matrix(counts.T))
    um_per_px = 0.2737
    pd.DataFrame({"barcode": barcodes, "in_tissue": np.ones(n, int), "array_row": rows, "array_col": cols,
                  "pxl_row_in_fullres": 500 + rows * 16 / um_per_px, "pxl_col_in_fullres": 800 + cols * 16 / um_per_px}
                 ).to_parquet(bin_dir / "spatial" / "tissue_positions.parquet")
    (bin_dir / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 16 / um_per_px, "bin_size_um": 16.0, "microns_per_pixel": um_per_px,
         "tissue_hires_scalef": 0.05, "tissue_lowres_scalef": 0.01, "fiducial_diameter_fullres": 100.0}))
    a = read_section(bin_dir)
    assert a.n_obs == n and list(a.var_names) == genes
    np.testing.assert_array_equal(a.X.toarray(), counts)
    assert a.uns[UNS_KEY][PIXEL_SIZE_KEY] == pytest.approx(um_per_px)
    assert a.uns[UNS_KEY][SPOT_DIAMETER_KEY] == pytest.approx(2 * 16 / np.sqrt(np.pi))  # the bin's area as a disk
    assert a.uns[UNS_KEY]["bin_size_um"] == 16.0
    xy_um = a.obsm["spatial"] * a.uns[UNS_KEY][PIXEL_SIZE_KEY]
    assert np.median(np.diff(np.sort(np.unique(xy_um[:, 0].round(3))))) == pytest.approx(16.0)
    with pytest.raises(VoxelomeError, match=r"Visium HD run.*square_008um.*bins here: square_008um, square_016um"):
        read_section(outs.parent)


def test_visium_mtx_folder_and_headerless_positions(visium_outs):
    outs, counts, pos = visium_outs
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    mtx = outs / "filtered_feature_bc_matrix"
    mtx.mkdir()
    barcodes = pos["barcode"].to_numpy()[:-1]
    with gzip.open(mtx / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(counts.T))
    pd.Series(barcodes).to_csv(mtx / "barcodes.tsv.gz", index=False, header=False)
    pd.DataFrame({"id": [f"E{i}" for i in range(5)], "name": ["GeneA", "GeneB", "GeneC", "GeneD", "CD3"],
                  "type": ["Gene Expression"] * 4 + ["Antibody Capture"]}).to_csv(
        mtx / "features.tsv.gz", sep="\t", index=False, header=False)
    (outs / "spatial" / "tissue_positions.csv").unlink()
    pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    a = read_visium(outs, pixel_size_um=0.5, library_id="lib")
    np.testing.assert_array_equal(a.X.toarray(), counts[3:, :4])
    assert "lib" in a.uns["spatial"]


def test_h5ad_roundtrip_and_scverse_scale(tmp_path, visium_outs):
    a = read_section(visium_outs[0])
    p = write_h5ad(a, tmp_path / "s.h5ad")
    b = read_section(p)
    assert b.uns[UNS_KEY][PIXEL_SIZE_KEY] == pytest.approx(PX_UM)
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    del a.uns[UNS_KEY]  # a plain scverse file: the scale comes from the scalefactors
    write_h5ad(a, tmp_path / "plain.h5ad")
    c = read_section(tmp_path / "plain.h5ad")
    assert c.uns[UNS_KEY][PIXEL_SIZE_KEY] == pytest.approx(PX_UM)
    with pytest.warns(UserWarning, match="overrides"):
        assert read_section(p, pixel_size_um=0.6).uns[UNS_KEY][PIXEL_SIZE_KEY] == 0.6
    with pytest.raises(VoxelomeError, match=".h5ad"):
        write_h5ad(a, tmp_path / "s.hdf")


def _legacy_files(tmp_path, px_per_step=290.0, n=6):
    xs, ys = np.meshgrid(np.arange(5, 5 + n), np.arange(3, 3 + n), indexing="ij")
    xs, ys = xs.ravel(), ys.ravel()
    spots = pd.DataFrame({"x": xs, "y": ys, "new_x": xs + 0.01, "new_y": ys - 0.02,
                          "pixel_x": 100 + xs * px_per_step, "pixel_y": 50 + ys * px_per_step, "selected": 1})
    spots.loc[0, "selected"] = 0
    spots.to_csv(tmp_path / "S1_selection.tsv", sep="\t", index=False)
    ids = [f"{x}x{y}" for x, y in zip(xs, ys)][1:] + ["99x99"]  # 99x99: counts without a spot
    counts = pd.DataFrame(np.random.default_rng(0).poisson(3, (len(ids), 4)), index=ids, columns=list("ABCD"))
    counts.to_csv(tmp_path / "S1.tsv.gz", sep="\t")
    return tmp_path / "S1.tsv.gz", tmp_path / "S1_selection.tsv", counts


def test_legacy_st_infers_pixel_size(tmp_path):
    counts_tsv, spots_tsv, counts = _legacy_files(tmp_path)
    a = read_legacy_st(counts_tsv, spots_tsv)
    assert a.n_obs == len(counts) - 1 and "99x99" not in a.obs_names
    assert a.uns[UNS_KEY][PIXEL_SIZE_KEY] == pytest.approx(200 / 290.0)
    assert "inferred" in a.uns[UNS_KEY]["pixel_size_source"]
    np.testing.assert_allclose(a.obsm["spatial"][0], [100 + 5 * 290.0, 50 + 4 * 290.0])
    np.testing.assert_array_equal(a.X.toarray(), counts.loc[a.obs_names].to_numpy())
    assert read_legacy_st(counts_tsv, spots_tsv, pixel_size_um=0.7).uns[UNS_KEY][PIXEL_SIZE_KEY] == 0.7
    # dispatch: a pair, a folder, a counts file + spots all read the same
    for src, kw in (((counts_tsv, spots_tsv), {}), (tmp_path, {}), (counts_tsv, {"spots": spots_tsv}),
                    (counts_tsv, {})):
        assert read_section(src, **kw).n_obs == a.n_obs


@pytest.mark.shared_data
def test_real_her2st_c2():
    root = SHARED / "her2st"
    if not (root / "ST-cnts" / "C2.tsv.gz").exists():
        pytest.skip(f"her2st shared data not present under {root}")
    a = read_legacy_st(root / "ST-cnts" / "C2.tsv.gz", root / "ST-spotfiles" / "C2_selection.tsv")
    assert a.shape == (187, 15706)
    assert 0.6 < a.uns[UNS_KEY][PIXEL_SIZE_KEY] < 0.8  # README: ≈ 0.69 µm/px
    assert (a.obsm["spatial"].max(0) < [9274, 9911]).all()  # inside the 9274 × 9911 px image
    assert read_section(root, library_id="C2").n_obs == 187
    assert read_section(root / "ST-cnts" / "C2.tsv.gz").n_obs == 187  # spot file found in ../ST-spotfiles


# --- validate_section ------------------------------------------------------------------
def _section(X, n=16, pitch_px=200.0):
    xy = np.stack(np.meshgrid(np.arange(4), np.arange(n // 4)), -1).reshape(-1, 2) * pitch_px
    a = ad.AnnData(X=X, var=pd.DataFrame(index=[f"g{i}" for i in range(X.shape[1])]))
    a.obsm["spatial"] = xy.astype(float)
    return a


def test_validate_nan_and_negative_counts():
    X = np.ones((16, 3))
    X[5, 2] = np.nan
    with pytest.raises(VoxelomeError, match=r"1 bad entries \(1 NaN/inf, 0 negative\).*spot '5', gene 'g2'"):
        validate_section(_section(X), pixel_size_um=0.5, spot_diameter_um=55)
    Y = sp.csr_matrix(np.ones((16, 3)))
    Y[7, 1], Y[9, 0] = -2.0, -1.0
    with pytest.raises(VoxelomeError, match=r"2 bad entries \(0 NaN/inf, 2 negative\).*spot '7', gene 'g1'"):
        validate_section(_section(Y), pixel_size_um=0.5, spot_diameter_um=55)


def test_validate_units_that_do_not_fit():
    a = _section(np.ones((16, 3)))  # spots 200 px apart: Visium at 0.5 µm/px
    validate_section(a, pixel_size_um=0.5, spot_diameter_um=55)
    with pytest.raises(VoxelomeError, match="units do not fit.*pixel_size_um="):
        validate_section(a, pixel_size_um=0.005, spot_diameter_um=55)  # spot 11000 px across
    with pytest.raises(VoxelomeError, match="units do not fit"):
        validate_section(a, pixel_size_um=50.0, spot_diameter_um=55)  # spot ~1 px across


def test_validate_other_errors_and_fixes():
    with pytest.raises(VoxelomeError, match="no spots"):
        validate_section(ad.AnnData(np.zeros((0, 3))), pixel_size_um=1, spot_diameter_um=55)
    a = _section(np.ones((16, 3)))
    a.obsm["spatial"] = np.zeros((16, 3))
    with pytest.raises(VoxelomeError, match=r"\(n_spots, 2\)"):
        validate_section(a, pixel_size_um=1, spot_diameter_um=55)
    a = _section(np.ones((16, 3)))
    a.obsm["spatial"][3, 0] = np.nan
    with pytest.raises(VoxelomeError, match="non-finite coordinates"):
        validate_section(a, pixel_size_um=0.5, spot_diameter_um=55)
    a = _section(np.ones((16, 3)))
    with pytest.raises(VoxelomeError, match="scale is unknown"):
        validate_section(a)
    a.var_names = ["g", "g", "h"]
    with pytest.warns(UserWarning, match="duplicate gene"):
        validate_section(a, pixel_size_um=0.5, spot_diameter_um=55)
    assert a.var_names.is_unique
    assert validate_section(a).uns[UNS_KEY][PIXEL_SIZE_KEY] == 0.5  # re-validation reads uns


def test_read_section_errors(tmp_path):
    with pytest.raises(VoxelomeError, match="no such"):
        read_section(tmp_path / "nothing")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(VoxelomeError, match="unsupported section input"):
        read_section(tmp_path / "x.csv")
    with pytest.raises(VoxelomeError, match="library_id"):
        read_section(tmp_path)  # a folder without any section


def test_section_image_needs_a_stored_image_and_its_scale(visium_outs):
    from voxelome.io.sections import section_image

    outs, _, _ = visium_outs
    a = read_section(outs)  # the synthetic outs have no tissue images
    with pytest.raises(VoxelomeError, match=r"no 'hires' image.*--image HE.tif --pixel-size-um"):
        section_image(a)
    lib = next(iter(a.uns["spatial"]))
    a.uns["spatial"][lib]["images"]["hires"] = np.zeros((20, 30, 3), np.uint8)
    image, px = section_image(a)
    assert image.shape == (20, 30, 3) and px == pytest.approx(PX_UM / 0.1)  # tissue_hires_scalef 0.1
    del a.uns["spatial"][lib]["scalefactors"]["tissue_hires_scalef"]
    with pytest.raises(VoxelomeError, match="tissue_hires_scalef"):
        section_image(a)
