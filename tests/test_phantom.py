"""Tests of voxelome.datasets: the synthetic lung phantom and its simulated Visium sections."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import ndimage

from voxelome import constants as C
from voxelome.datasets import (
    SIGNATURE_NAMES,
    TRUE_SIGNATURES_KEY,
    PhantomConfig,
    axial_placement,
    hex_grid,
    make_lung_phantom,
    oblique_placement,
)
from voxelome.errors import VoxelomeError

TINY = dict(shape=(24, 96, 96))


@pytest.fixture(scope="module")
def small():
    return make_lung_phantom("small", seed=0)


@pytest.fixture(scope="module")
def default_section():
    """The demo setting: default phantom, middle axial section (one ~5–10 s generation)."""
    ph = make_lung_phantom()
    return ph, ph.cut_section(axial_placement(ph), seed=0)


# --- configuration ----------------------------------------------------------------------
@pytest.mark.parametrize("kw, name", [
    (dict(spacing_um=0.0), "spacing_um"), (dict(spacing_um=-5.0), "spacing_um"),
    (dict(shape=(8, 64, 64)), "shape"), (dict(shape=(32, 64)), "shape"),
    (dict(n_signatures=4), "n_signatures"), (dict(n_signatures=7), "n_signatures"),
    (dict(focus_radius_um=(300.0, 100.0)), "focus_radius_um"), (dict(seed=-1), "seed"),
    (dict(noise_sd=float("nan")), "noise_sd"),
])
def test_bad_config_names_parameter(kw, name):
    with pytest.raises(VoxelomeError, match=name) as err:
        PhantomConfig(**kw)
    assert "E.g." in str(err.value) or "Use" in str(err.value)  # a fix is offered


def test_bad_override_and_preset():
    with pytest.raises(VoxelomeError, match="Did you mean 'seed'"):
        make_lung_phantom(sead=1)
    with pytest.raises(VoxelomeError, match="Did you mean 'small'"):
        make_lung_phantom("smal")
    with pytest.raises(VoxelomeError, match="spacing_um"):
        make_lung_phantom(spacing_um=0)


# --- volume and truth -------------------------------------------------------------------
def test_deterministic_by_seed():
    a, b, c = make_lung_phantom(**TINY, seed=3), make_lung_phantom(**TINY, seed=3), make_lung_phantom(**TINY, seed=4)
    va, vb = np.asarray(a.volume.data), np.asarray(b.volume.data)
    assert np.array_equal(va, vb) and np.array_equal(a.truth, b.truth) and np.array_equal(a.loadings, b.loadings)
    assert not np.array_equal(va, np.asarray(c.volume.data))


def test_image_independent_of_signature_count():
    six, five = make_lung_phantom(**TINY, seed=1), make_lung_phantom(**TINY, seed=1, n_signatures=5)
    assert np.array_equal(np.asarray(six.volume.data), np.asarray(five.volume.data))
    assert five.truth.shape[0] == 5 and five.signature_names == list(SIGNATURE_NAMES[:5])
    assert np.allclose(five.truth.sum(0)[five.tissue], 1, atol=1e-5)


def test_volume_and_truth_layout(small):
    vol = small.volume
    assert vol.shape == tuple(small.config.shape) and vol.spacing_um == (10.0, 10.0, 10.0)
    img = np.asarray(vol.data)
    assert img.dtype == np.float32 and np.isfinite(img).all()
    assert -0.5 < np.percentile(img, 1) and np.percentile(img, 99) < 1.3  # roughly [0, 1]
    assert img[small.tissue].mean() > img[~small.tissue].mean() + 0.05  # lung denser than outside air
    t = small.truth
    assert t.shape == (6,) + vol.shape and t.dtype == np.float32
    assert t.min() >= 0
    assert np.allclose(t.sum(0)[small.tissue], 1.0, atol=1e-5)
    assert np.all(t[:, ~small.tissue] == 0)
    assert 0.5 < small.tissue.mean() < 0.95
    tv = small.truth_volume("airway")
    assert tv.shape == vol.shape and np.array_equal(np.asarray(tv.data), t[1])
    with pytest.raises(VoxelomeError, match="Did you mean"):
        small.truth_volume("airways")


def test_every_signature_dominant_and_mixed(small):
    t = small.truth[:, small.tissue]
    dom = t.argmax(0)
    frac = np.bincount(dom, minlength=len(t)) / dom.size
    assert np.all(frac > 0.02), dict(zip(small.signature_names, frac.round(3)))
    assert 0.4 < t.max(0).mean() < 0.9  # mixed but distinct


def test_loadings(small):
    L = small.loadings
    assert L.shape == (6, 240) and np.all(L > 0) and np.allclose(L.sum(1), 1)
    assert len(small.gene_names) == 240 == len(set(small.gene_names))
    assert np.corrcoef(np.log(L)).min() < 0.95  # profiles are distinct


def test_trivial_baseline_is_clearly_beaten(small):
    """Smoothed intensity (σ = 1, 2, 4 voxels) + ridge must not explain the truth: the CNN's bar."""
    from sklearn.linear_model import Ridge

    img = np.asarray(small.volume.data)
    feats = np.stack([ndimage.gaussian_filter(img, s) for s in (1, 2, 4)], -1).reshape(-1, 3)
    y = small.truth.reshape(len(small.truth), -1).T
    left = np.zeros(img.shape, bool)
    left[..., : img.shape[2] // 2] = True
    rng = np.random.default_rng(0)
    train = rng.choice(np.flatnonzero(small.tissue & left), 100_000, replace=False)
    test = rng.choice(np.flatnonzero(small.tissue & ~left), 100_000, replace=False)
    pred = Ridge(alpha=1.0).fit(feats[train], y[train]).predict(feats[test])
    r = np.nanmean([np.corrcoef(pred[:, k], y[test, k])[0, 1] for k in range(y.shape[1])])
    print(f"trivial baseline mean Pearson r = {r:.3f}")
    assert r < 0.6


# --- sections -----------------------------------------------------------------------------
def test_hex_grid_geometry():
    xy, row, col = hex_grid((0, 1000), (0, 1000), 100.0)
    d, _ = __import__("scipy.spatial", fromlist=["cKDTree"]).cKDTree(xy).query(xy, k=2)
    assert np.allclose(d[:, 1], 100.0)
    assert np.all((col - row) % 2 == 0)  # Visium: even columns on even rows, odd on odd rows
    assert np.allclose(np.diff(np.unique(xy[:, 1])), 100 * np.sqrt(3) / 2)


def test_default_axial_section_contract(default_section):
    ph, a = default_section
    assert a.n_obs >= 1000 and a.n_vars >= 200
    assert list(a.var_names) == ph.gene_names and a.obs_names.is_unique
    X = a.X
    assert np.issubdtype(X.dtype, np.integer) and X.min() >= 0 and X.sum(1).min() > 0
    assert {"array_row", "array_col"} <= set(a.obs.columns)
    assert a.obsm[C.SPATIAL_KEY].shape == (a.n_obs, 2) and a.obsm[C.SPATIAL_3D_KEY].shape == (a.n_obs, 3)
    sig = a.obsm[TRUE_SIGNATURES_KEY]
    assert sig.shape == (a.n_obs, 6) and np.all(np.isfinite(sig)) and np.allclose(sig.sum(1), 1)
    meta = a.uns[C.UNS_KEY]
    assert meta[C.SPOT_DIAMETER_KEY] == 55.0 and meta["spot_pitch_um"] == 100.0 and meta["thickness_um"] == 10.0
    assert meta[C.PIXEL_SIZE_KEY] == 1.0 and meta["signature_names"] == ph.signature_names
    assert meta["source"] == "lung phantom seed 0"
    # spots lie on the plane and obsm['spatial'] maps onto obsm['spatial_3d']
    from voxelome.register.placement import SectionPlacement

    pl = SectionPlacement.from_dict(meta[C.PLANE_KEY])
    assert np.allclose(pl.map(a.obsm[C.SPATIAL_KEY]), a.obsm[C.SPATIAL_3D_KEY])
    assert np.allclose(a.obsm[C.SPATIAL_3D_KEY][:, 2], (ph.volume.shape[0] // 2) * 10.0)
    # every niche dominates ≥ 3 % of spots on the default section
    frac = np.bincount(sig.argmax(1), minlength=6) / a.n_obs
    print("dominance fractions", dict(zip(ph.signature_names, frac.round(3))))
    assert np.all(frac >= 0.03)
    # counts follow the signatures: spot-level correlation of marker sums with the truth
    n_mark = int(0.3 * a.n_vars) // 6
    for k in range(6):
        marker = np.asarray(X[:, k * n_mark:(k + 1) * n_mark]).sum(1) / np.asarray(X).sum(1)
        assert np.corrcoef(marker, sig[:, k])[0, 1] > 0.5


def test_signatures_true_matches_direct_sampling(default_section):
    """Independent check: mean of truth over voxel centres within the spot radius on the slice."""
    ph, a = default_section
    z = ph.volume.shape[0] // 2
    xyz = a.obsm[C.SPATIAL_3D_KEY]
    r = 27.5
    g = np.arange(-3, 4)
    dy, dx = np.meshgrid(g, g, indexing="ij")
    keep = (dx * 10.0) ** 2 + (dy * 10.0) ** 2 <= r**2 + 1e-6
    direct = []
    for x, y, _ in xyz:
        jy, jx = int(round(y / 10)), int(round(x / 10))
        yy, xx = jy + dy[keep], jx + dx[keep]
        w = ph.tissue[z, yy, xx]
        direct.append(ph.truth[:, z, yy, xx][:, w].mean(1))
    direct = np.asarray(direct)
    diff = np.abs(direct - a.obsm[TRUE_SIGNATURES_KEY])
    print(f"|signatures_true - direct| mean {diff.mean():.4f}, p99 {np.percentile(diff, 99):.4f}")
    assert diff.mean() < 0.01 and np.percentile(diff, 99) < 0.06


def test_oblique_section(small):
    pl = oblique_placement(small, tilt_deg=12.0, seed=2)
    a = small.cut_section(pl, seed=1)
    xyz = a.obsm[C.SPATIAL_3D_KEY]
    assert a.n_obs > 100 and xyz[:, 2].std() > 50.0  # the plane is really tilted
    u, v, n = pl.frame
    centre = small.volume.index_to_xyz((np.asarray(small.volume.shape) - 1) / 2)
    assert np.allclose((xyz - centre) @ n, 0, atol=1e-6)  # through the volume centre
    assert np.degrees(np.arccos(abs(n[2]))) == pytest.approx(12.0)
    assert a.obsm[C.SPATIAL_KEY].min() >= 0  # pixel coordinates are non-negative
    assert np.all(small.volume.contains(xyz))
    sig = a.obsm[TRUE_SIGNATURES_KEY]
    assert np.allclose(sig.sum(1), 1) and np.all(sig >= 0)


def test_section_counts_seeded_and_h5ad_roundtrip(small, tmp_path):
    a1 = small.cut_section(seed=5, mean_library_size=2000, dispersion=3.0)
    a2 = small.cut_section(seed=5, mean_library_size=2000, dispersion=3.0)
    a3 = small.cut_section(seed=6, mean_library_size=2000, dispersion=3.0)
    assert np.array_equal(a1.X, a2.X) and not np.array_equal(a1.X, a3.X)
    lib = np.asarray(a1.X).sum(1)
    assert 1000 < np.median(lib) < 3000
    # negative binomial: over-dispersed relative to Poisson
    mu = a1.obs["library_size"].to_numpy()[:, None] * (a1.obsm[TRUE_SIGNATURES_KEY] @ small.loadings)
    resid = (np.asarray(a1.X) - mu) ** 2 / mu
    assert resid.mean() > 2.0
    path = tmp_path / "section.h5ad"
    a1.write_h5ad(path)
    b = ad.read_h5ad(path)
    assert np.array_equal(np.asarray(b.X), np.asarray(a1.X))
    assert np.allclose(b.uns[C.UNS_KEY][C.PLANE_KEY]["matrix"], a1.uns[C.UNS_KEY][C.PLANE_KEY]["matrix"])


def test_section_bad_inputs(small):
    with pytest.raises(VoxelomeError, match="spot_diameter_um"):
        small.cut_section(spot_diameter_um=0)
    with pytest.raises(VoxelomeError, match="placement"):
        small.cut_section("middle")
    with pytest.raises(VoxelomeError, match="tilt_deg"):
        oblique_placement(small, tilt_deg=95)
    from voxelome.register.placement import SectionPlacement

    outside = SectionPlacement.from_origin_normal([1e5, 1e5, 1e5], [0, 0, 1], 1.0)
    with pytest.raises(VoxelomeError, match="no spot"):
        small.cut_section(outside)
