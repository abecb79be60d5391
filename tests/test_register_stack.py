"""Stacking serial sections into one 3D frame (issue 3, part b): expression-based and image-based."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest

from voxelome.constants import SPATIAL_3D_KEY, SPATIAL_KEY
from voxelome.errors import VoxelomeError
from voxelome.register.stack_expression import (
    adjacent_expression_r,
    align_fgw,
    align_icp,
    apply_stack_transform,
    joint_embedding,
    log_normalise,
    section_xy_um,
    stack_sections,
)
from ngff import assert_ngff_image

BREAST = Path(__file__).resolve().parents[2] / "shared" / "data" / "paste_breast_st2016"


def _moved_copy(adata, angle_deg, shift_um, seed=0, keep=0.9):
    """A copy of ``adata`` with its spots rotated about their centre and shifted, 10 % dropped (partial overlap)."""
    rng = np.random.default_rng(seed)
    b = adata[np.sort(rng.choice(adata.n_obs, int(keep * adata.n_obs), replace=False))].copy()
    px = float(b.uns["voxelome"]["pixel_size_um"])
    xy = np.asarray(b.obsm[SPATIAL_KEY], float) * px
    c = xy.mean(0)
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    b.obsm[SPATIAL_KEY] = ((xy - c) @ r.T + c + np.asarray(shift_um)) / px
    return b


def _recovery_error(st, original, moved_idx_names):
    """RMS µm distance between the moved section's stacked spots and the same spots in section 0."""
    sec = st.obs["section"].to_numpy()
    xy0 = dict(zip([n.split(":", 1)[1] for n in st.obs_names[sec == "fixed"]], st.obsm[SPATIAL_3D_KEY][sec == "fixed", :2]))
    xy1 = st.obsm[SPATIAL_3D_KEY][sec == "moved", :2]
    names1 = [n.split(":", 1)[1] for n in st.obs_names[sec == "moved"]]
    d = np.array([np.linalg.norm(p - xy0[n]) for p, n in zip(xy1, names1)])
    return float(np.sqrt(np.mean(d ** 2)))


@pytest.fixture(scope="module")
def phantom_section(phantom):
    return phantom.cut_section(seed=0)


@pytest.mark.parametrize("method", ["icp", "fgw"])
def test_expression_alignment_recovers_known_motion_phantom(phantom_section, method):
    moved = _moved_copy(phantom_section, 35.0, (300.0, -200.0))
    none = _recovery_error(_identity_stack(phantom_section, moved), phantom_section, None)
    st = stack_sections([phantom_section, moved], [0.0, 10.0], names=["fixed", "moved"], method=method)
    err = _recovery_error(st, phantom_section, None)
    assert err < 0.5 * 100.0 and err < none / 5  # within half a spot pitch (100 µm), far better than no alignment


def _identity_stack(a, b):
    """Unaligned stack (raw coordinates) in the same layout, for the baseline error."""
    import anndata as ad

    blocks = []
    for name, x in (("fixed", a), ("moved", b)):
        y = x.copy()
        y.obs_names = [f"{name}:{i}" for i in x.obs_names]
        y.obs["section"] = name
        y.obsm[SPATIAL_3D_KEY] = np.column_stack([section_xy_um(x), np.zeros(x.n_obs)])
        blocks.append(y)
    return ad.concat(blocks, merge="first")


@pytest.mark.shared_data
@pytest.mark.skipif(not BREAST.exists(), reason="../shared/data/paste_breast_st2016 not present")
def test_expression_alignment_recovers_known_motion_breast_layer():
    from voxelome.register.stack_data import read_st_csv_layer

    layer = read_st_csv_layer(BREAST / "slice1.csv.gz", BREAST / "slice1_coor.csv")
    moved = _moved_copy(layer, -50.0, (900.0, 400.0), seed=1)
    none = _recovery_error(_identity_stack(layer, moved), layer, None)
    for method in ("icp", "fgw"):
        st = stack_sections([layer, moved], [0.0, 15.0], names=["fixed", "moved"], method=method)
        err = _recovery_error(st, layer, None)
        assert err < 60.0 and err < none / 10, (method, err, none)  # 60 µm = 0.3 of the 200 µm ST pitch
    # and the stack's own accuracy metric agrees: aligned neighbours are more alike than unaligned ones
    genes = list(layer.var_names)
    ex0, ex1 = log_normalise(layer[:, genes].X), log_normalise(moved[:, genes].X)
    sec = st.obs["section"].to_numpy()
    r_aligned = adjacent_expression_r(st.obsm[SPATIAL_3D_KEY][sec == "fixed", :2], ex0,
                                      st.obsm[SPATIAL_3D_KEY][sec == "moved", :2], ex1)
    r_none = adjacent_expression_r(section_xy_um(layer), ex0, section_xy_um(moved), ex1)
    assert r_aligned > r_none + 0.05


def test_stack_outputs_and_transform_round_trip(tmp_path, phantom_section):
    import anndata as ad

    moved = _moved_copy(phantom_section, 20.0, (150.0, 80.0))
    third = _moved_copy(phantom_section, -15.0, (-100.0, 60.0), seed=3)
    st = stack_sections([phantom_section, moved, third], [0.0, 12.0, 30.0], names=["a", "b", "c"])
    info = st.uns["voxelome"]["stack"]
    assert info["sections"] == ["a", "b", "c"] and info["z_um"] == [0.0, 12.0, 30.0]
    assert st.obsm[SPATIAL_3D_KEY].shape == (st.n_obs, 3)
    for name, z, m in zip(info["sections"], info["z_um"], info["transforms"]):
        sel = (st.obs["section"] == name).to_numpy()
        np.testing.assert_allclose(apply_stack_transform(m, st.obsm[SPATIAL_KEY][sel]), st.obsm[SPATIAL_3D_KEY][sel, :2],
                                   atol=1e-6)
        assert np.all(st.obsm[SPATIAL_3D_KEY][sel, 2] == z)
    path = tmp_path / "stack.h5ad"
    st.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_allclose(back.obsm[SPATIAL_3D_KEY], st.obsm[SPATIAL_3D_KEY])
    np.testing.assert_allclose(np.asarray(back.uns["voxelome"]["stack"]["transforms"][1]), info["transforms"][1])


def test_stack_bad_inputs(phantom_section):
    other = phantom_section[:, :-30].copy()
    with pytest.raises(VoxelomeError, match="at least 2 sections"):
        stack_sections([phantom_section], [0.0])
    with pytest.raises(VoxelomeError, match="strictly increasing"):
        stack_sections([phantom_section, other], [10.0, 5.0])
    with pytest.raises(VoxelomeError, match="one finite depth"):
        stack_sections([phantom_section, other], [0.0])
    with pytest.raises(VoxelomeError, match="method"):
        stack_sections([phantom_section, other], [0.0, 10.0], method="pasta")
    with pytest.warns(UserWarning, match=f"using the {phantom_section.n_vars - 30} genes"):
        stack_sections([phantom_section, other], [0.0, 10.0])
    renamed = phantom_section.copy()
    renamed.var_names = [f"ENSG{i:08d}" for i in range(renamed.n_vars)]
    with pytest.raises(VoxelomeError, match="share only 0 genes"):
        stack_sections([phantom_section, renamed], [0.0, 10.0])
    # sections that cannot overlap (one is a small corner far from the other's tissue) are flagged
    xy = section_xy_um(phantom_section)
    with pytest.raises(VoxelomeError, match="at least 3"):
        stack_sections([phantom_section, phantom_section[:2].copy()], [0.0, 10.0])
    # a section shifted far away from the other with nothing in common cannot overlap after alignment: warned
    far = phantom_section[xy[:, 0] < np.quantile(xy[:, 0], 0.3)].copy()
    far.obsm[SPATIAL_KEY] = far.obsm[SPATIAL_KEY] * 3.0  # spread 3x: no rigid motion fits it onto the other
    with pytest.warns(UserWarning, match="overlaps the previous one little"):
        stack_sections([phantom_section, far], [0.0, 10.0], min_overlap=0.6)


def test_pairwise_aligners_direct(phantom_section):
    xy = section_xy_um(phantom_section)
    emb = joint_embedding([phantom_section.X, phantom_section.X])[0]
    a = np.deg2rad(70)
    r_true = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    moved = xy @ r_true.T + np.array([500.0, -300.0])
    r, t, _ = align_icp(xy, emb, moved, emb, pitch_um=100.0)
    np.testing.assert_allclose(moved @ r.T + t, xy, atol=1.0)
    r2, t2, pi = align_fgw(xy, emb, moved, emb)
    assert pi.shape == (len(xy), len(xy))
    assert np.sqrt(np.mean(np.sum((moved @ r2.T + t2 - xy) ** 2, 1))) < 20.0


def _rotation_map(shape, angle):
    """Affine (2, 3) that ``ndimage.rotate(..., reshape=False)`` applies to (x, y) pixel positions, measured."""
    from scipy import ndimage

    src = np.array([[60.0, 70.0], [150.0, 80.0], [100.0, 160.0]])
    dst = []
    for x, y in src:
        delta = np.zeros(shape)
        delta[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 1.0
        rot = ndimage.rotate(delta, angle, reshape=False, order=1)
        yy, xx = np.indices(shape)
        dst.append([(rot * xx).sum() / rot.sum(), (rot * yy).sum() / rot.sum()])
    design = np.column_stack([src, np.ones(3)])
    return np.linalg.solve(design, np.array(dst)).T


def test_image_stack_recovers_rotation_and_writes_ome_zarr(tmp_path, phantom):
    import anndata as ad
    import skimage.io
    from scipy import ndimage

    from voxelome.datasets import axial_placement
    from voxelome.datasets.histology import render_he
    from voxelome.io.omezarr import read_ome_zarr
    from voxelome.io.sections import validate_section
    from voxelome.register.stack_image import dice, stack_images, tissue_mask

    rng = np.random.default_rng(0)
    spots = rng.uniform(80, 150, (40, 2))  # (x, y) px of the unrotated images: the same tissue points
    paths, masks_raw, adatas = [], [], []
    for k, (z, angle) in enumerate(((14, 0.0), (16, 25.0), (18, -20.0))):
        img, _ = render_he(phantom, axial_placement(phantom, z, pixel_size_um=10.0), shape=(144, 144), seed=k,
                           crop=False)
        pad = np.pad(img, ((40, 40), (40, 40), (0, 0)), constant_values=245)
        rot = ndimage.rotate(pad, angle, reshape=False, order=1, cval=245).astype(np.uint8)
        p = tmp_path / f"s{k}.png"
        skimage.io.imsave(p, rot, check_contrast=False)
        paths.append(p)
        masks_raw.append(tissue_mask(rot))
        m = _rotation_map(pad.shape[:2], angle)
        a = ad.AnnData(X=rng.poisson(5, (40, 12)).astype(np.float32))
        a.var_names = [f"g{i}" for i in range(12)]
        a.obsm["spatial"] = spots @ m[:, :2].T + m[:, 2]
        adatas.append(validate_section(a, pixel_size_um=10.0, spot_diameter_um=55.0))
    res = stack_images(paths, [0.0, 20.0, 40.0], adatas=adatas, work_um=20.0, zarr_out=tmp_path / "stack.ome.zarr")
    raw = [dice(masks_raw[k - 1][::2, ::2], masks_raw[k][::2, ::2]) for k in (1, 2)]
    assert min(res.metrics["dice_adjacent"]) > 0.9 and min(res.metrics["dice_adjacent"]) > max(raw) + 0.05
    # the same tissue points land on each other in the stack (within one 20 µm working pixel)
    xyz = res.adata.obsm[SPATIAL_3D_KEY]
    sec = res.adata.obs["section"].to_numpy()
    ref = xyz[sec == res.names[0], :2]
    for name in res.names[1:]:
        err = np.sqrt(np.mean(np.sum((xyz[sec == name, :2] - ref) ** 2, 1)))
        assert err < 20.0, (name, err)
    data, spacing, _axes = read_ome_zarr(tmp_path / "stack.ome.zarr")
    assert_ngff_image(tmp_path / "stack.ome.zarr", "czyx")
    assert tuple(data.shape) == res.rgb.shape and data.shape[:2] == (3, 3)
    np.testing.assert_allclose(spacing, (20.0, 20.0, 20.0))


def test_cli_register_stack(tmp_path, phantom_section):
    import anndata as ad
    from typer.testing import CliRunner

    from voxelome.cli import app
    from voxelome.io.sections import write_h5ad

    moved = _moved_copy(phantom_section, 30.0, (200.0, 100.0))
    write_h5ad(phantom_section, tmp_path / "a.h5ad")
    write_h5ad(moved, tmp_path / "b.h5ad")
    out = tmp_path / "stack.h5ad"
    r = CliRunner().invoke(app, ["register", "stack", str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad"),
                                 "--z", "0,10", "--out", str(out), "--figure", str(tmp_path / "stack.png")])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert json.loads(r.stdout.strip().splitlines()[-1])["figure"] == str(tmp_path / "stack.png")
    assert Image.open(tmp_path / "stack.png").size[0] > 300  # one pair: as read (top), stacked (bottom)
    st = ad.read_h5ad(out)
    assert st.obsm[SPATIAL_3D_KEY].shape == (phantom_section.n_obs + moved.n_obs, 3)
    assert st.uns["voxelome"]["stack"]["bin_um"] is None  # a few hundred spots: aligned point by point
    bad = CliRunner().invoke(app, ["register", "stack", str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad"),
                                   "--z", "10,0", "--out", str(out)])
    assert bad.exit_code == 2 and "strictly increasing" in bad.output
    r = CliRunner().invoke(app, ["register", "stack", str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad"),
                                 "--z", "0,10", "--out", str(out), "--max-points", "100"])
    assert r.exit_code == 0, r.output
    assert ad.read_h5ad(out).uns["voxelome"]["stack"]["bin_um"] > 0 and '"bin_um": ' in r.output
    bad = CliRunner().invoke(app, ["register", "stack", str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad"),
                                   "--z", "0,10", "--out", str(out), "--max-points", "3"])
    assert bad.exit_code == 2 and "max_points=3 must be an integer ≥ 10" in bad.output


def test_joint_embedding_matches_dense_pca_and_stack_options(phantom_section):
    """The sparse statistics + Lanczos (eigsh) PCA equal a dense exact PCA; gene matching, n_genes, icp_options."""
    import anndata as ad

    x0 = np.asarray(phantom_section.X)
    half = x0.shape[0] // 2
    counts = [x0[:half], x0[half:]]
    emb = np.vstack(joint_embedding(counts, n_components=10, n_genes=150))
    dense = log_normalise(x0).astype(np.float64)
    top = np.argsort(dense.var(0))[::-1][:150]
    xc = dense[:, top] - dense[:, top].mean(0)
    _, v = np.linalg.eigh(xc.T @ xc)
    ref = xc @ v[:, ::-1][:, :10]
    ref /= ref[:, 0].std()
    for k in range(10):  # same components up to sign (the solver is ARPACK here: 150 genes > 4 × 10 PCs)
        assert abs(np.corrcoef(emb[:, k], ref[:, k])[0, 1]) > 0.999
    np.testing.assert_allclose(np.abs(emb[:, 0]), np.abs(ref[:, 0]), atol=1e-3)

    # genes in another order and some missing: the stack keeps the shared ones, each section's own columns
    moved = _moved_copy(phantom_section, 35.0, (300.0, -200.0))
    rng = np.random.default_rng(1)
    order = rng.permutation(moved.n_vars)[:-12]
    moved_perm = moved[:, order].copy()
    with pytest.warns(UserWarning, match=f"using the {phantom_section.n_vars - 12} genes"):
        st = stack_sections([phantom_section, moved_perm], [0.0, 10.0], names=["fixed", "moved"], n_genes=100,
                            icp_options={"n_angles": 8, "coarse_iter": 3})
    genes = list(st.var_names)
    assert genes == [g for g in phantom_section.var_names if g in set(moved_perm.var_names)]
    sel = (st.obs["section"] == "moved").to_numpy()
    np.testing.assert_array_equal(st.X[sel].toarray(), np.asarray(moved_perm[:, genes].X))
    err = _recovery_error(st, phantom_section, None)
    assert err < 50.0 and err < _recovery_error(_identity_stack(phantom_section, moved), phantom_section, None) / 5

    with pytest.raises(VoxelomeError, match="icp_options key"):
        stack_sections([phantom_section, moved], [0.0, 10.0], icp_options={"n_angle": 8})
    with pytest.raises(VoxelomeError, match="n_genes"):
        stack_sections([phantom_section, moved], [0.0, 10.0], n_genes=0)
    dup = ad.AnnData(X=x0, obs=phantom_section.obs.copy(), uns=phantom_section.uns, obsm=dict(phantom_section.obsm),
                     var=phantom_section.var.copy())
    dup.var_names = [str(phantom_section.var_names[0])] * 2 + [str(g) for g in phantom_section.var_names[2:]]
    with pytest.raises(VoxelomeError, match="repeats gene names"):
        stack_sections([phantom_section, dup], [0.0, 10.0])


def test_stacked_shared_gene_matrix_equals_scipy_selection_and_vstack():
    """The one-pass stacked output equals scipy's per-section column selection + vstack (values and arrays)."""
    import scipy.sparse as sp

    from voxelome.register.stack_expression import _csr, _stack_shared

    rng = np.random.default_rng(3)
    mats = [sp.random(40, 30, density=0.3, format="csr", random_state=1, dtype=np.float32),
            rng.poisson(1.0, size=(25, 28)).astype(np.float32),  # dense input
            sp.random(33, 31, density=0.2, format="csr", random_state=2, dtype=np.float64)]  # another dtype
    dup = sp.csr_matrix((np.ones(4), ([0, 0, 1, 2], [3, 3, 5, 7])), shape=(3, 30))  # duplicate entries are summed
    mats.append(dup)
    cols = [np.arange(20)[::-1] + 5, rng.permutation(28)[:20], np.sort(rng.choice(31, 20, replace=False)), None]
    cols[3] = np.arange(20)  # all sections give 20 shared columns; the last keeps its first 20 in order
    ref = sp.vstack([_csr(m, c) for m, c in zip(mats, cols)], format="csr")
    out = _stack_shared(mats, cols)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    for f in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(out, f), getattr(ref, f))
    same = [sp.random(10, 12, density=0.5, format="csr", random_state=k, dtype=np.float32) for k in range(2)]
    np.testing.assert_array_equal(_stack_shared(same, [None, None]).toarray(), sp.vstack(same).toarray())


def test_icp_final_refinement_options(phantom_section):
    """The optional final refinements (soft-assignment EM-ICP, symmetric ICP) keep the recovered motion; bad values."""
    moved = _moved_copy(phantom_section, 35.0, (300.0, -200.0))
    none = _recovery_error(_identity_stack(phantom_section, moved), phantom_section, None)
    for opts in ({"soft_iter": 5, "soft_scale": 0.5}, {"sym_iter": 5}):
        st = stack_sections([phantom_section, moved], [0.0, 10.0], names=["fixed", "moved"], icp_options=opts)
        err = _recovery_error(st, phantom_section, None)
        assert err < 50.0 and err < none / 5, (opts, err)
    with pytest.raises(VoxelomeError, match=r"icp_options\['soft_scale'\]=0 must be a finite number > 0"):
        stack_sections([phantom_section, moved], [0.0, 10.0], icp_options={"soft_iter": 3, "soft_scale": 0})
    with pytest.raises(VoxelomeError, match=r"icp_options\['sym_iter'\]=-1 must be a finite number ≥ 0"):
        stack_sections([phantom_section, moved], [0.0, 10.0], icp_options={"sym_iter": -1})
    with pytest.raises(VoxelomeError, match="icp_options key"):
        stack_sections([phantom_section, moved], [0.0, 10.0], icp_options={"soft_iters": 3})


def test_large_sections_are_aligned_as_pooled_bins(phantom_section):
    """Sections above ``max_points`` (here ~5,600 single cells each) are pooled on a grid and the bins aligned:
    another draw of cells of the same tissue, rotated and shifted, is put back within a few µm."""
    from voxelome.datasets.cells import cells_from_spots
    from voxelome.register.stack_icp import bin_points, bin_size_um

    per_spot = -(-5600 // phantom_section.n_obs)  # ~5,600 cells: above the default max_points (5,000)
    fixed = cells_from_spots(phantom_section, per_spot, seed=0)
    other = cells_from_spots(phantom_section, per_spot, seed=1)
    truth = section_xy_um(other)
    moved = _moved_copy(other, 35.0, (300.0, -200.0), keep=1.0)
    st = stack_sections([fixed, moved], [0.0, 10.0], names=["fixed", "moved"])
    info = st.uns["voxelome"]["stack"]
    assert info["max_points"] == 5000 and info["bin_um"] > info["pitch_um"]  # pooled, not point by point
    assert info["overlap"][1] > 0.9  # cells within one bin of the other section's cells
    got = st.obsm[SPATIAL_3D_KEY][(st.obs["section"] == "moved").to_numpy(), :2]
    err = float(np.sqrt(((got - truth) ** 2).sum(1).mean()))
    none = float(np.sqrt(((section_xy_um(moved) - truth) ** 2).sum(1).mean()))
    assert err < 20.0 and err < none / 20, (err, none)  # 20 µm ≈ 2 cell pitches; no alignment: ~500 µm
    # the grid leaves at most max_points bins per section; below the cap nothing is pooled
    xys = [section_xy_um(fixed), section_xy_um(moved)]
    size = bin_size_um(xys, info["pitch_um"], 1000)
    cxy, cemb = bin_points(xys[0], np.ones((fixed.n_obs, 2)), size)
    assert len(cxy) <= 1000 and np.allclose(cemb, 1.0)
    assert bin_size_um(xys, info["pitch_um"], fixed.n_obs + moved.n_obs) is None
    # a pooled section that cannot overlap the other (a strip spread 3×) is still flagged
    xy = section_xy_um(fixed)
    far = fixed[xy[:, 0] < np.quantile(xy[:, 0], 0.3)].copy()
    far.obsm[SPATIAL_KEY] = far.obsm[SPATIAL_KEY] * 3.0
    with pytest.warns(UserWarning, match="overlaps the previous one little"):
        stack_sections([fixed, far], [0.0, 10.0], max_points=500, min_overlap=0.6)
    for bad in (5, 2.5, True):
        with pytest.raises(VoxelomeError, match=f"max_points={bad!r} must be an integer ≥ 10"):
            stack_sections([fixed, moved], [0.0, 10.0], max_points=bad)


def test_stack_alignment_figure_refuses_mismatched_tables(tmp_path):
    from voxelome.plot.stack_figures import stack_alignment

    xy = [np.zeros((3, 2)), np.ones((4, 2))]
    with pytest.raises(VoxelomeError, match="≥ 2 sections"):
        stack_alignment(xy, xy, [np.zeros(3)], ["a", "b"], tmp_path / "x.png")
    assert stack_alignment(xy, xy, [np.zeros(3), np.ones(4)], ["a", "b"], tmp_path / "x.png").exists()
