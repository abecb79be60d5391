"""voxelome.signatures on seeded synthetic sections with known niche proportions."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.ndimage import gaussian_filter
from scipy.optimize import linear_sum_assignment

from voxelome.constants import SIGNATURE_LOADINGS_KEY, SIGNATURES_KEY
from voxelome.errors import VoxelomeError
from voxelome.signatures import (
    SignatureConfig,
    SignatureModel,
    fit_signatures,
    morans_i,
    normalize_log1p,
    project_signatures,
    spatial_weights,
)
from voxelome.signatures.archetypes import project_simplex, simplex_lstsq

K, SIDE, N_GENES = 5, 45, 400  # 2,025 spots on a grid


# --- synthetic data ---------------------------------------------------------------------
def smooth_proportions(rng, k=K, side=SIDE, sigma=6.0, temperature=2.0):
    """Softmax of k smooth Gaussian random fields, shape (side*side, k)."""
    f = np.stack([gaussian_filter(rng.standard_normal((side, side)), sigma, mode="wrap")
                  for _ in range(k)])
    f = (f - f.mean(axis=(1, 2), keepdims=True)) / f.std(axis=(1, 2), keepdims=True)
    e = np.exp(temperature * f)
    return (e / e.sum(0)).reshape(k, -1).T


def gene_profiles(rng, k=K, g=N_GENES):
    """Per-niche expression profiles (k, g): shared gamma baseline × niche-specific gamma fold."""
    return rng.gamma(2.0, 1.0, g) * rng.gamma(0.7, 1 / 0.7, (k, g))


def simulate(rng, props, profiles, *, side=SIDE, library=1500, dispersion=10.0, sparse=False):
    """Negative-binomial counts of spots mixing the niches in ``props``."""
    mu = props @ (profiles / profiles.sum(1, keepdims=True))
    mu *= (library * rng.lognormal(0.0, 0.3, len(props)))[:, None]
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts) if sparse else counts)
    adata.var_names = [f"g{i}" for i in range(counts.shape[1])]
    adata.obs_names = [f"spot{i}" for i in range(counts.shape[0])]
    yy, xx = np.mgrid[:side, :side]
    adata.obsm["spatial"] = np.column_stack([xx.ravel(), yy.ravel()]) * 100.0
    return adata


def match(est, truth):
    """Hungarian matching of estimated to true signatures on Pearson r → (r per pair, perm)."""
    k = truth.shape[1]
    corr = np.corrcoef(est.T, truth.T)[:k, k:]
    rows, cols = linear_sum_assignment(-corr)
    return corr[rows, cols], cols


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    profiles = gene_profiles(rng)
    p1, p2 = smooth_proportions(rng), smooth_proportions(rng)
    return {"p1": p1, "p2": p2, "a1": simulate(rng, p1, profiles), "a2": simulate(rng, p2, profiles)}


@pytest.fixture(scope="module")
def models(data):
    return {m: fit_signatures(data["a1"], method=m, n_signatures=K) for m in ("archetypes", "nmf")}


# --- recovery ---------------------------------------------------------------------------
@pytest.mark.parametrize("method, threshold", [("archetypes", 0.8), ("nmf", 0.8)])
def test_recovers_true_proportions(data, models, method, threshold):
    est = models[method].project(data["a1"])
    r, _ = match(est, data["p1"])
    baseline, _ = match(np.random.default_rng(1).dirichlet(np.ones(K), len(est)), data["p1"])
    print(f"{method}: mean r = {r.mean():.3f} (per signature {np.round(r, 3)}), "
          f"random baseline {baseline.mean():.3f}")
    assert r.mean() >= threshold
    assert r.mean() > baseline.mean() + 0.5


@pytest.mark.parametrize("method", ["archetypes", "nmf"])
def test_fit_equals_projection_and_rows_on_simplex(data, models, method):
    model = models[method]
    again = fit_signatures(data["a1"], method=method, n_signatures=K)  # deterministic
    np.testing.assert_array_equal(model.loadings, again.loadings)
    p = model.project(data["a1"])
    np.testing.assert_allclose(p, project_signatures(again, data["a1"].copy()).obsm[SIGNATURES_KEY])
    assert p.shape == (data["a1"].n_obs, K)
    assert p.min() >= 0 and np.allclose(p.sum(1), 1.0)
    assert model.names == [f"S{i}" for i in range(K)]
    assert model.loadings.shape == (K, len(model.genes)) and model.loadings.min() >= 0
    # Signatures are named by decreasing abundance on the fitted section.
    assert np.all(np.diff(p.mean(0)) <= 1e-12)


@pytest.mark.parametrize("method", ["archetypes", "nmf"])
def test_projection_onto_second_section(data, models, method):
    _, perm = match(models[method].project(data["a1"]), data["p1"])
    est = models[method].project(data["a2"])
    corr = np.corrcoef(est.T, data["p2"].T)[:K, K:]
    r = corr[np.arange(K), perm]  # the matching from section 1, not re-matched
    print(f"{method} on section 2: mean r = {r.mean():.3f}")
    assert r.mean() >= 0.75


def test_sparse_counts_and_counts_layer_give_same_model(data, models):
    a = data["a1"]
    b = ad.AnnData(np.zeros(a.shape, np.float32), obsm={"spatial": a.obsm["spatial"]})
    b.var_names, b.obs_names = a.var_names, a.obs_names
    b.layers["counts"] = sp.csr_matrix(a.X)  # X holds something else; counts layer wins
    model = fit_signatures(b, method="archetypes", n_signatures=K)
    assert model.genes == models["archetypes"].genes
    np.testing.assert_allclose(model.project(b), models["archetypes"].project(a), atol=1e-8)


def test_loadings_turn_signatures_back_into_expression(data, models):
    model = models["archetypes"]
    x = normalize_log1p(np.asarray(data["a1"].X, float))[:, data["a1"].var_names.get_indexer(model.genes)]
    pred = model.to_genes(model.project(data["a1"]))
    r = [np.corrcoef(pred[:, j], x[:, j])[0, 1] for j in range(50)]  # the 50 top SVGs
    assert np.mean(r) > 0.5


# --- to_genes, save/load ----------------------------------------------------------------
def test_to_genes_volume_matches_per_voxel_product(models):
    model = models["nmf"]
    vol = np.random.default_rng(2).dirichlet(np.ones(K), (3, 4, 5)).transpose(3, 0, 1, 2)
    out = model.to_genes(vol)
    assert out.shape == (len(model.genes), 3, 4, 5)
    np.testing.assert_allclose(out[:, 1, 2, 3], vol[:, 1, 2, 3] @ model.loadings)
    flat = model.to_genes(vol.reshape(K, -1).T)  # (n, k) table form
    np.testing.assert_allclose(out.reshape(len(model.genes), -1), flat.T)
    sub = model.to_genes(vol, genes=model.genes[3:5])
    np.testing.assert_allclose(sub, out[3:5])
    with pytest.raises(VoxelomeError, match="signature axis first"):
        model.to_genes(np.ones((4, 3, K)))
    with pytest.raises(VoxelomeError, match="not signature genes"):
        model.to_genes(vol, genes=["nope"])


@pytest.mark.parametrize("method", ["archetypes", "nmf"])
def test_save_load_round_trip(tmp_path, data, models, method):
    model = models[method]
    path = model.save(tmp_path / f"{method}.npz")
    assert path.exists() and path.name == f"{method}.npz"
    loaded = SignatureModel.load(path)
    assert loaded.config == model.config and loaded.genes == model.genes
    np.testing.assert_array_equal(loaded.project(data["a2"]), model.project(data["a2"]))
    assert SignatureModel.load(model.save(tmp_path)).names == model.names  # folder form


# --- gene selection ---------------------------------------------------------------------
def test_morans_i_ranks_patterned_gene_above_random():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:30, :30]
    coords = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    patterned = gaussian_filter(rng.standard_normal((30, 30)), 4).ravel()
    x = np.column_stack([patterned, rng.standard_normal(900)])
    w = spatial_weights(coords, n_neighbors=6)
    i = morans_i(x, w)
    assert i[0] > 0.8 and abs(i[1]) < 0.1
    # Same as the textbook double sum on a small example (also for sparse input).
    z = x[:60] - x[:60].mean(0)
    w_small = spatial_weights(coords[:60], n_neighbors=4).toarray()
    naive = 60 / w_small.sum() * np.einsum("ig,ij,jg->g", z, w_small, z) / (z**2).sum(0)
    np.testing.assert_allclose(morans_i(sp.csr_matrix(x[:60]), sp.csr_matrix(w_small)), naive)
    np.testing.assert_allclose(spatial_weights(coords, radius=1.01).sum(1), 1.0)


def test_variance_selection_needs_no_coordinates(data):
    a = data["a1"].copy()
    del a.obsm["spatial"]
    with pytest.raises(VoxelomeError, match="gene_selection='variance'"):
        fit_signatures(a, n_signatures=K)
    model = fit_signatures(a, n_signatures=K, gene_selection="variance", method="nmf", n_genes=100)
    assert len(model.genes) == 100
    assert match(model.project(a), data["p1"])[0].mean() >= 0.8


def test_simplex_solvers():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(100, 6))
    p = project_simplex(v)
    assert p.min() >= 0 and np.allclose(p.sum(1), 1)
    np.testing.assert_allclose(project_simplex(p), p, atol=1e-12)  # idempotent
    z = rng.normal(size=(4, 10))
    truth = rng.dirichlet(np.ones(4), 50)
    np.testing.assert_allclose(simplex_lstsq(truth @ z, z), truth, atol=1e-6)


# --- errors -----------------------------------------------------------------------------
def _small(n=60, g=30, seed=5):
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.poisson(5.0, (n, g)).astype(np.float32))
    a.var_names = [f"g{i}" for i in range(g)]
    a.obsm["spatial"] = rng.uniform(0, 100, (n, 2))
    return a


@pytest.mark.parametrize("kwargs, message", [
    ({"n_signatures": 1}, "n_signatures=1 must be ≥ 2"),
    ({"method": "archetype"}, "Did you mean 'archetypes'"),
    ({"gene_selection": "morans"}, "Did you mean 'moran'"),
    ({"n_genes": 3, "n_signatures": 4}, "n_genes=3 is fewer than n_signatures=4"),
    ({"n_pcs": 2, "n_signatures": 5}, "n_pcs ≥ 4"),
    ({"n_signature": 3}, "Did you mean 'n_signatures'"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(VoxelomeError, match=message):
        fit_signatures(_small(), **kwargs)


def test_data_errors():
    a = _small()
    with pytest.raises(VoxelomeError, match=r"60 spots.*n_signatures=7.*lower n_signatures to ≤ 6"):
        fit_signatures(a, n_signatures=7)
    bad = a.copy()
    bad.X[0, 0] = np.nan
    with pytest.raises(VoxelomeError, match="NaN"):
        fit_signatures(bad, n_signatures=2)
    bad.X[0, 0] = -1
    with pytest.raises(VoxelomeError, match="negative"):
        fit_signatures(bad, n_signatures=2)
    sparse_genes = a.copy()
    sparse_genes.X[:, 2:] = 0  # only 2 genes expressed
    with pytest.raises(VoxelomeError, match="only 2 genes"):
        fit_signatures(sparse_genes, n_signatures=3)
    dup = a.copy()
    dup.var_names = ["g0"] * a.n_vars
    with pytest.raises(VoxelomeError, match="var_names_make_unique"):
        fit_signatures(dup, n_signatures=2)
    with pytest.warns(UserWarning, match="non-integer"):
        frac = a.copy()
        frac.X = frac.X + 0.5
        fit_signatures(frac, n_signatures=2)


def test_projection_gene_checks(data, models):
    model = models["archetypes"]
    a = data["a2"]
    keep = [g for g in a.var_names if g not in set(model.genes[: len(model.genes) // 4])]
    with pytest.warns(UserWarning, match=f"{len(model.genes) // 4} of {len(model.genes)} signature genes"):
        p = model.project(a[:, keep].copy())
    assert match(p, data["p2"])[0].mean() > 0.7  # still works with 75 % of the genes
    few = [g for g in a.var_names if g not in set(model.genes[: 3 * len(model.genes) // 4])]
    with pytest.raises(VoxelomeError, match="symbols vs Ensembl"):
        model.project(a[:, few].copy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = project_signatures(model, a.copy(), key="niches")
    assert out.obsm["niches"].shape == (a.n_obs, K)
    assert out.uns["niches"]["names"] == model.names
    assert out.varm[SIGNATURE_LOADINGS_KEY].shape == (a.n_vars, K)


def test_config_is_frozen_and_serialisable():
    cfg = SignatureConfig(method="nmf")
    assert cfg.to_dict()["method"] == "nmf"
    with pytest.raises(Exception):
        cfg.method = "archetypes"


def test_large_sections_fit_on_a_subset_and_project_every_spot(data):
    """Above max_fit_spots the signatures are fitted on a seeded subset (archetypal analysis grows faster than the
    spots); every spot is still projected, and the signatures recover the truth as the full fit does."""
    full = fit_signatures(data["a1"], n_signatures=K)
    sub = fit_signatures(data["a1"], n_signatures=K, max_fit_spots=600)  # 600 of 2,025 spots
    assert sub.config.max_fit_spots == 600
    p_sub, p_full = sub.project(data["a1"]), full.project(data["a1"])
    assert p_sub.shape == (data["a1"].n_obs, K) and np.allclose(p_sub.sum(1), 1.0)
    r_sub, _ = match(p_sub, data["p1"])
    r_full, _ = match(p_full, data["p1"])
    assert r_sub.mean() >= 0.8 and r_sub.mean() > r_full.mean() - 0.05, (r_sub, r_full)
    r_agree, _ = match(p_sub, p_full)
    assert r_agree.mean() > 0.9, r_agree
    again = fit_signatures(data["a1"], n_signatures=K, max_fit_spots=600)  # the subset is seeded
    np.testing.assert_array_equal(again.loadings, sub.loadings)
    with pytest.raises(VoxelomeError, match="max_fit_spots"):
        SignatureConfig(max_fit_spots=0)
