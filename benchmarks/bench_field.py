"""Neural transcriptomic field vs section baselines: leave-one-section-out, sparse input, denoising, real stacks.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 15 python benchmarks/bench_field.py --out benchmarks/out/field \
        --only phantom sparse starmap real_stacks

Every baseline runs in the same process on the same split. The section baselines (nearest section,
linear interpolation between neighbouring sections) read each section with an in-plane k-nearest
mean and 3D kNN uses inverse-distance weights; their k is chosen on an inner validation section
(a training section of the fold), never on the held-out section. The field's settings were chosen on
inner validation sections too (``PHANTOM_GRID``, ``STARMAP_GRID``; per fold among ``REAL_CANDIDATES`` for
the real stacks). Scores: per-gene Pearson r and RMSE on log1p(counts per 10k), averaged over genes.
``--only real_stacks`` (or stack names: breast_st2016, her2st_A … her2st_D) runs the registration issue's
expression stacks (``voxelome.register.stack_sections``, method ``icp``); ``--selection one|all`` picks the
validation sections of each fold (one section, as in the third pass, or every inner training section in turn). ``--only scale`` runs
``bench_field_scale.py`` at 1M cells × 500 genes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from voxelome.datasets import axial_placement, make_lung_phantom
from voxelome.evaluate.field_baselines import (  # noqa: F401  (BASELINE_KS, K_*: imported by the other benchmarks)
    BASELINE_KS,
    K_3D,
    K_SECTION,
    baseline_predict,
    choose_k,
    knn_3d,
    linear_between_sections,
    nearest_section,
    per_gene_scores,
)
from voxelome.infer.field_export import FittedField
from voxelome.train.field_trainer import fit_field, make_field_config, suggest_jitter
from voxelome.train.point_data import PointData

STARMAP = Path(__file__).resolve().parents[2] / "shared" / "data" / "starmap3d_mini_giotto"


def log_norm(X, lib=None):
    X = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    lib = X.sum(1) if lib is None else lib
    return np.log1p(X / lib[:, None] * 1e4)


def baselines(train_xyz, train_sec, train_y, query_xyz, targets: dict, val_sets) -> dict:
    """Every baseline with its k chosen on ``val_sets`` (inner split), scored on each test target.

    Returns ``{target_name: {baseline: {r, rmse, k, val_r}}}``.
    """
    out = {t: {} for t in targets}
    xyz, sec = np.asarray(train_xyz, float), np.asarray(train_sec)
    for name in BASELINE_KS:
        k, val_r = choose_k(name, xyz, sec, train_y, val_sets)
        pred = baseline_predict(name, xyz, sec, train_y, query_xyz, k)
        for t, truth in targets.items():
            s = per_gene_scores(pred, truth)
            out[t][name] = {"r": s["mean_r"], "rmse": s["mean_rmse"], "k": k, "val_r": val_r}
    return out


class Ensemble:
    """Fields fitted with different seeds; predictions are their mean (an ensemble over seeds)."""

    def __init__(self, fields):
        self.fields = fields

    def predict(self, xyz, **kw):
        return np.mean([f.predict(xyz, **kw) for f in self.fields], axis=0)

    def denoise(self, adata):
        return np.mean([f.denoise(adata.copy(), key=None) for f in self.fields], axis=0)


def fit(data: PointData, run: Path, *, seeds=(0,), loadings=None, jitter_scale=(1.0, 1.0), **overrides):
    """Fit one field per seed (preset ``cpu`` + overrides; jitter = suggest_jitter × jitter_scale (xy, z))."""
    j = suggest_jitter(data)
    jit = (j[0] * jitter_scale[0], j[1] * jitter_scale[0], j[2] * jitter_scale[1])
    fields, secs = [], 0.0
    for seed in seeds:
        cfg = make_field_config("cpu", jitter_um=jit, seed=seed, **overrides)
        t0 = time.perf_counter()
        fit_field(data, cfg, run / f"seed{seed}", loadings=loadings, resume=False, progress=False)
        secs += time.perf_counter() - t0
        fields.append(FittedField.load(run / f"seed{seed}"))
    return Ensemble(fields), {"fit_s": secs, "train_points_per_s": len(seeds) * cfg.iterations * cfg.batch_size / secs,
                              "seeds": list(seeds), "iterations": cfg.iterations, "batch_size": cfg.batch_size,
                              "jitter_um": list(cfg.jitter_um), "likelihood": cfg.likelihood,
                              "box_shape": cfg.box_shape, "section_dim": cfg.section_dim}


def nmf_loadings(X, k, seed=0):
    """Rate profiles ``(k, g)`` (rows sum to 1) from an NMF of the training spots' count fractions."""
    from sklearn.decomposition import NMF

    X = X.toarray() if sp.issparse(X) else np.asarray(X, np.float64)
    H = NMF(k, init="nndsvda", max_iter=400, random_state=seed).fit(X / X.sum(1, keepdims=True)).components_
    return H / H.sum(1, keepdims=True)


def pca_loadings(y, k):
    """Signed gene axes ``(k, g)``: the top principal axes of the training values (for ``low_rank='linear'``)."""
    _, _, vt = np.linalg.svd(y - y.mean(0), full_matrices=False)
    return vt[:k]


def field_scores(field, query_xyz, targets: dict, value="rate") -> dict:
    """``{target: {r, rmse}}`` of the field's ``value`` at the query points (plus query speed)."""
    t0 = time.perf_counter()
    pred = field.predict(query_xyz, value=value)
    q = len(query_xyz) * len(field.fields) / (time.perf_counter() - t0)
    out = {}
    for t, truth in targets.items():
        s = per_gene_scores(pred, truth)
        out[t] = {"r": s["mean_r"], "rmse": s["mean_rmse"], "query_points_per_s": q}
    return out


def leave_out(stack, held, val):
    """Masks (train, test) for a held-out section, and the inner validation mask among the training rows."""
    sec = stack.obs["section"].to_numpy()
    te = sec == held
    return ~te, te, sec[~te] == val


# --- phantom ---------------------------------------------------------------------------
def phantom_stack(ph, z_indices, seed0=0):
    secs = []
    for k, z in enumerate(z_indices):
        a = ph.cut_section(axial_placement(ph, z), seed=seed0 + k)
        a.obs["section"] = f"s{k:02d}"
        secs.append(a)
    return ad.concat(secs, index_unique="-", merge="same")


#: held-out section → inner validation section (among the training sections; never a test section),
#: where the baselines' k was chosen in-run and the field's settings were tuned (see BENCHMARKS.md).
PHANTOM_FOLDS = {"s03": "s09", "s06": "s10", "s08": "s01"}
#: field settings for the phantom (NB counts), chosen on the inner validation section of fold s03
#: (``--only tune_phantom``); the low-rank field uses NMF-8 loadings of the training spots.
PHANTOM_FIELD = {"iterations": 800, "batch_size": 2048, "jitter_scale": (0.5, 1.0)}
#: candidates tried on the inner validation split (fold s03, validation s09); nmf = NMF loadings' rank (0: full).
PHANTOM_GRID = {
    "full, box=points, jitter ×1": {"nmf": 0, "box_shape": "points", "jitter_scale": (1, 1)},
    "NMF 8, box=points, jitter ×1": {"nmf": 8, "box_shape": "points", "jitter_scale": (1, 1)},
    "full, Gaussian on log1p, box=points": {"nmf": 0, "box_shape": "points", "jitter_scale": (1, 1),
                                            "likelihood": "gaussian"},
    "full, box=points, jitter xy ×1.5": {"nmf": 0, "box_shape": "points", "jitter_scale": (1.5, 1)},
    "full, cube box, jitter ×1": {"nmf": 0, "jitter_scale": (1, 1)},
    "NMF 8, cube, jitter ×1": {"nmf": 8, "jitter_scale": (1, 1)},
    "NMF 8, cube, jitter xy ×0.75": {"nmf": 8, "jitter_scale": (0.75, 1)},
    "NMF 12, cube, jitter ×1": {"nmf": 12, "jitter_scale": (1, 1)},
    "NMF 8, cube, jitter xy ×0.5": {"nmf": 8, "jitter_scale": (0.5, 1)},
    "full, cube, jitter xy ×0.75": {"nmf": 0, "jitter_scale": (0.75, 1)},
    "NMF 8, cube, jitter xy ×0.25": {"nmf": 8, "jitter_scale": (0.25, 1)},
    "full, cube, jitter xy ×0.5": {"nmf": 0},
}


def phantom_loso(out: Path, folds=PHANTOM_FOLDS, seeds=(0, 1, 2), iterations=800):
    ph = make_lung_phantom("small", seed=0, n_genes=60)
    stack = phantom_stack(ph, list(range(2, 47, 4)))  # 12 axial sections 40 µm apart
    loadings = np.asarray(stack.varm["signature_loadings_true"]).T
    rows = []
    for h, v in folds.items():
        tr, te, val = leave_out(stack, h, v)
        tr_a, te_a = stack[tr], stack[te]
        data = PointData.from_anndata(tr_a)
        y_tr = log_norm(tr_a.X)
        targets = {"measured": log_norm(te_a.X),
                   "truth": np.log1p(1e4 * np.asarray(te_a.obsm["signatures_true"]) @ loadings)}
        sec = pd.Categorical(tr_a.obs["section"]).codes
        res = {"held_out": h, "validation": v, "n_train": int(tr.sum()), "n_test": int(te.sum()),
               **baselines(tr_a.obsm["spatial_3d"], sec, y_tr, te_a.obsm["spatial_3d"], targets,
                           [(val, y_tr[val])])}
        cfg = {**PHANTOM_FIELD, "iterations": iterations}
        f_full, info_full = fit(data, out / f"phantom_{h}_full", seeds=seeds[:1], **cfg)
        f_low, info_low = fit(data, out / f"phantom_{h}_nmf8", seeds=seeds, loadings=nmf_loadings(tr_a.X, 8), **cfg)
        q = te_a.obsm["spatial_3d"]
        for name, f in (("field_full", f_full), ("field_nmf8", f_low)):
            for value in ("rate", "measured"):
                for t, sc in field_scores(f, q, targets, value).items():
                    res[t][f"{name}_{value}"] = sc
        res["fit_full"], res["fit_nmf8"] = info_full, info_low
        if h == next(iter(folds)):  # denoising on the training spots, against the known truth
            truth_tr = np.log1p(1e4 * np.asarray(tr_a.obsm["signatures_true"]) @ loadings)
            res["denoise"] = {"raw": per_gene_scores(y_tr, truth_tr)["mean_r"],
                              "field_full": per_gene_scores(f_full.denoise(tr_a), truth_tr)["mean_r"],
                              "field_nmf8": per_gene_scores(f_low.denoise(tr_a), truth_tr)["mean_r"],
                              "knn_smooth_oracle_k": knn_smooth_oracle(tr_a.obsm["spatial_3d"], y_tr, truth_tr)}
            t0 = time.perf_counter()
            knn_3d(tr_a.obsm["spatial_3d"], y_tr, te_a.obsm["spatial_3d"], k=16)
            res["knn_query_points_per_s"] = te_a.n_obs / (time.perf_counter() - t0)
        rows.append(res)
        print(json.dumps(res)[:600], flush=True)
    return rows


def tune_phantom(out: Path, fold="s03"):
    """Score every PHANTOM_GRID candidate on the inner validation section of ``fold`` (measured spots)."""
    ph = make_lung_phantom("small", seed=0, n_genes=60)
    stack = phantom_stack(ph, list(range(2, 47, 4)))
    tr, _, val = leave_out(stack, fold, PHANTOM_FOLDS[fold])
    inner = stack[tr]
    tr_a, va_a = inner[~val], inner[val]
    data, measured, y = PointData.from_anndata(tr_a), log_norm(va_a.X), log_norm(tr_a.X)
    res = {"fold": fold, "validation": PHANTOM_FOLDS[fold],
           "knn_3d": {k: per_gene_scores(knn_3d(tr_a.obsm["spatial_3d"], y, va_a.obsm["spatial_3d"], k=k),
                                         measured)["mean_r"] for k in K_3D}}
    for name, settings in PHANTOM_GRID.items():
        settings = {**PHANTOM_FIELD, **settings}
        k = settings.pop("nmf")
        f, _ = fit(data, out / "tune_phantom" / name.replace(" ", "_").replace(",", ""),
                   loadings=nmf_loadings(tr_a.X, k) if k else None, **settings)
        res[name] = per_gene_scores(f.predict(va_a.obsm["spatial_3d"]), measured)["mean_r"]
        print(name, res[name], flush=True)
    return res


def knn_smooth_oracle(xyz, y, truth):
    """kNN smoothing (uniform weights) of the training spots with the k best **against the truth** (favours kNN)."""
    scores = {k: per_gene_scores(knn_3d(xyz, y, xyz, k=k, weights="uniform"), truth) for k in K_3D}
    k = max(scores, key=lambda k: scores[k]["mean_r"])
    return {"r": scores[k]["mean_r"], "rmse": scores[k]["mean_rmse"], "k": k}


def knn_denoise(held="s03"):
    """kNN smoothing (uniform weights) of the training spots of the first LOSO split, vs the truth (no fit)."""
    ph = make_lung_phantom("small", seed=0, n_genes=60)
    stack = phantom_stack(ph, list(range(2, 47, 4)))
    loadings = np.asarray(stack.varm["signature_loadings_true"]).T
    tr_a = stack[(stack.obs["section"] != held).to_numpy()]
    y_tr = log_norm(tr_a.X)
    truth_tr = np.log1p(1e4 * np.asarray(tr_a.obsm["signatures_true"]) @ loadings)
    res = {"raw": per_gene_scores(y_tr, truth_tr)["mean_r"],
           "knn_smooth_oracle_k": knn_smooth_oracle(tr_a.obsm["spatial_3d"], y_tr, truth_tr)}
    print(json.dumps(res), flush=True)
    return res


def phantom_sparse(out: Path, iterations=800, n_eval=20000):
    """40 axial sections of the small phantom (every 1.2 slices), keep every 10th (4); r vs the volume truth.

    The baselines' k is chosen by holding out each of the two inner kept sections in turn (measured spots).
    """
    ph = make_lung_phantom("small", seed=1, n_genes=60)
    z_all = np.linspace(3, 44, 40)
    kept = z_all[::10]  # 10 %
    stack = phantom_stack(ph, kept, seed0=100)
    data = PointData.from_anndata(stack)
    field, info = fit(data, out / "phantom_sparse", **{**PHANTOM_FIELD, "iterations": iterations})
    vol = ph.volume
    rng = np.random.default_rng(0)
    zlo, zhi = int(np.ceil(kept.min())), int(np.floor(kept.max()))
    cand = np.argwhere(ph.tissue[zlo:zhi + 1]) + [zlo, 0, 0]
    pick = cand[rng.choice(len(cand), min(n_eval, len(cand)), replace=False)]
    xyz = vol.index_to_xyz(pick.astype(float))
    props = ph.truth[:, pick[:, 0], pick[:, 1], pick[:, 2]].T
    truth = np.log1p(1e4 * (props / np.maximum(props.sum(1, keepdims=True), 1e-9)) @ ph.loadings)
    y = log_norm(stack.X)
    names = stack.obs["section"].to_numpy()
    sec = pd.Categorical(names).codes
    val_sets = [(names == s, y[names == s]) for s in ("s01", "s02")]
    base = baselines(stack.obsm["spatial_3d"], sec, y, xyz, {"truth": truth}, val_sets)["truth"]
    res = {"sections_cut": 40, "sections_kept": len(kept), "kept_z_um": (kept * vol.spacing_um[0]).tolist(),
           "n_eval_voxels": len(xyz), **base, "field_full": field_scores(field, xyz, {"truth": truth})["truth"],
           "fit": info}
    print(json.dumps(res), flush=True)
    return res


# --- STARmap ---------------------------------------------------------------------------
def starmap_stack():
    loc = np.loadtxt(STARMAP / "starmap_cell_loc.txt")
    expr = pd.read_csv(STARMAP / "starmap_expr.txt.gz", sep=" ", index_col=0)
    X = expr.to_numpy().T.astype(np.float32)
    z = loc[:, 2]
    edges = np.linspace(z.min(), z.max() + 1e-6, 9)  # 8 z-slabs of ~11 units
    slab = np.digitize(z, edges[1:-1])
    a = ad.AnnData(X=X, obs=pd.DataFrame({"section": [f"slab{s}" for s in slab]}, index=list(expr.columns)),
                   var=pd.DataFrame(index=list(expr.index)))
    a.obsm["spatial_3d"] = loc
    return a[X.sum(1) > 0].copy()  # 85 of the 4,000 cells have no signal at all


#: held-out slab → inner validation slab (a training slab that is never a test slab).
STARMAP_FOLDS = {"slab2": "slab6", "slab4": "slab1", "slab5": "slab1"}
#: field settings for STARmap, chosen on the inner validation slab of fold slab2 (``--only tune_starmap``).
STARMAP_FIELD = {"likelihood": "gaussian", "iterations": 400, "batch_size": 2048, "jitter_scale": (1.5, 6.0),
                 "box_shape": "cube", "section_dim": 0}
_X = {"box_shape": "cube", "section_dim": 8}  # the grid's common base: cube box, with section effects
#: candidates tried on the inner validation split (fold slab2, validation slab6), in the order they were run.
STARMAP_GRID = {
    "preset: box=points, jitter ×1, 800 it": {**_X, "box_shape": "points", "iterations": 800, "jitter_scale": (1, 1)},
    "cube box": {**_X, "iterations": 800, "jitter_scale": (1, 1)},
    "jitter xy ×2": {**_X, "iterations": 800, "jitter_scale": (2, 1)},
    "jitter xy ×2, 400 it": {**_X, "jitter_scale": (2, 1)},
    "jitter xy ×2 z ×2": {**_X, "jitter_scale": (2, 2)},
    "jitter xy ×2 z ×4": {**_X, "jitter_scale": (2, 4)},
    "jitter xy ×3 z ×4": {**_X, "jitter_scale": (3, 4)},
    "jitter xy ×2 z ×4, low rank (PCA 8)": {**_X, "jitter_scale": (2, 4), "pca": 8},
    "jitter xy ×2 z ×4, no section effects": {"jitter_scale": (2, 4)},
    "… no section effects, 8 levels": {"jitter_scale": (2, 4), "n_levels": 8},
    "… no section effects, lr 3e-3": {"jitter_scale": (2, 4), "lr": 3e-3},
    "jitter xy ×2 z ×6, no section effects": {"jitter_scale": (2, 6)},
    "jitter xy ×2 z ×8, no section effects": {"jitter_scale": (2, 8)},
    "jitter xy ×1 z ×6, no section effects": {"jitter_scale": (1, 6)},
    "jitter xy ×1.25 z ×6, no section effects": {"jitter_scale": (1.25, 6)},
    "jitter xy ×1.5 z ×6, no section effects": {"jitter_scale": (1.5, 6)},
    "jitter xy ×1.5 z ×8, no section effects": {"jitter_scale": (1.5, 8)},
    "jitter xy ×1.5 z ×6, with section effects": {**_X, "jitter_scale": (1.5, 6)},
    "jitter xy ×1.5 z ×6, no section effects, hidden 128": {"jitter_scale": (1.5, 6), "hidden": 128},
    # third pass (NB on the raw integer values; scored with value="measured")
    "NB, jitter xy ×1.5 z ×6, no section effects": {"likelihood": "nb"},
    "NB, jitter xy ×1.5 z ×6, section effects": {"likelihood": "nb", "section_dim": 8},
    "NB, jitter xy ×0.5 z ×1, section effects": {"likelihood": "nb", "section_dim": 8, "jitter_scale": (0.5, 1)},
    "NB, jitter xy ×1.5 z ×6, low rank (NMF 8 of counts)": {"likelihood": "nb", "nmf": 8},
}


def starmap_fit(tr_a, run: Path, seeds, **settings):
    settings = {**STARMAP_FIELD, **settings}
    k, n_nmf = settings.pop("pca", 0), settings.pop("nmf", 0)
    loadings = nmf_loadings(tr_a.X, n_nmf) if n_nmf else None
    if k:
        loadings, settings["low_rank"] = pca_loadings(log_norm(tr_a.X), k), "linear"
    return fit(PointData.from_anndata(tr_a), run, seeds=seeds, loadings=loadings, **settings)


def starmap_loso(out: Path, folds=STARMAP_FOLDS, seeds=(0, 1, 2)):
    if not STARMAP.exists():
        return {"skipped": f"{STARMAP} not found"}
    stack = starmap_stack()
    rows = []
    for h, v in folds.items():
        tr, te, val = leave_out(stack, h, v)
        tr_a, te_a = stack[tr], stack[te]
        y_tr, truth = log_norm(tr_a.X), log_norm(te_a.X)
        sec = pd.Categorical(tr_a.obs["section"]).codes
        res = {"held_out": h, "validation": v, "n_train": int(tr.sum()), "n_test": int(te.sum()),
               **baselines(tr_a.obsm["spatial_3d"], sec, y_tr, te_a.obsm["spatial_3d"], {"measured": truth},
                           [(val, y_tr[val])])["measured"]}
        f, info = starmap_fit(tr_a, out / f"starmap_{h}", seeds)
        res["field_ensemble"] = field_scores(f, te_a.obsm["spatial_3d"], {"m": truth})["m"]
        res["field_seeds"] = [per_gene_scores(m.predict(te_a.obsm["spatial_3d"]), truth)["mean_r"] for m in f.fields]
        res["fit"] = info
        rows.append(res)
        print(json.dumps(res), flush=True)
    return rows


def tune_starmap(out: Path, fold="slab2"):
    """Score every STARMAP_GRID candidate on the inner validation slab of ``fold`` (the test slab is left out)."""
    stack = starmap_stack()
    val_label = STARMAP_FOLDS[fold]
    tr, _, val = leave_out(stack, fold, val_label)
    inner = stack[tr]
    tr_a, va_a = inner[~val], inner[val]
    truth = log_norm(va_a.X)
    y = log_norm(tr_a.X)
    res = {"fold": fold, "validation": val_label,
           "knn_3d": {k: per_gene_scores(knn_3d(tr_a.obsm["spatial_3d"], y, va_a.obsm["spatial_3d"], k=k),
                                         truth)["mean_r"] for k in K_3D}}
    for name, settings in STARMAP_GRID.items():
        f, _ = starmap_fit(tr_a, out / "tune" / name.replace(" ", "_").replace(",", ""), (0,), **settings)
        res[name] = per_gene_scores(f.predict(va_a.obsm["spatial_3d"], value="measured"), truth)["mean_r"]
        print(name, res[name], flush=True)
    return res


# --- real stacks of the registration issue ------------------------------------------------
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_STACKS = ("breast_st2016", "her2st_A", "her2st_B", "her2st_C", "her2st_D")
#: section spacing (µm) of the real stacks: an assumption (her2st: 16 µm as in the registration benchmark's
#: image stack; the breast layers are given the same). her2st sections sit at 16 µm × (number − 1), so the
#: missing B4 leaves a double gap; the numeric order is assumed to be the cutting order.
REAL_GAP_UM = 16.0
REAL_GENES = 100  # genes scored: the highest mean log1p(counts per 10k) over the fold's training sections
REAL_MIN_COUNTS = 100  # QC: spots with fewer counts (over the stack's shared genes) are dropped
#: field candidates, selected per fold on its inner validation section (never on the test section).
_R = {"iterations": 400, "batch_size": 2048, "box_shape": "cube"}
REAL_CANDIDATES = {
    "gaussian, jitter xy ×0.5, section effects": {**_R, "likelihood": "gaussian", "jitter_scale": (0.5, 1.0)},
    "gaussian, STARmap settings": {**_R, **STARMAP_FIELD},
    "gaussian, jitter xy ×2.5 z ×6, no section effects": {**_R, **STARMAP_FIELD, "jitter_scale": (2.5, 6.0)},
    "gaussian, STARmap settings, low rank (PCA 8)": {**_R, **STARMAP_FIELD, "pca": 8},
    "nb counts, phantom jitter, section effects": {**_R, "likelihood": "nb", "jitter_scale": (0.5, 1.0)},
}


def read_real_stack(name: str, order: str = "numeric"):
    """A registered real stack (``stack_sections(method="icp")``), spots with ≥ REAL_MIN_COUNTS counts.

    ``order="suggested"``: where :func:`~voxelome.register.section_order.check_section_order` flags the numeric
    order (her2st B), the sections are stacked in the order their expression suggests, REAL_GAP_UM apart (the
    real gaps are then unknown); elsewhere the numeric order is kept.
    """
    from voxelome.io.legacy_st import read_legacy_st
    from voxelome.register.section_order import check_section_order
    from voxelome.register.stack_data import read_st_csv_layer
    from voxelome.register.stack_expression import stack_sections

    if name == "breast_st2016":
        d = DATA / "paste_breast_st2016"
        names = [f"slice{k}" for k in range(1, 5)]
        ads = [read_st_csv_layer(d / f"{s}.csv.gz", d / f"{s}_coor.csv") for s in names]
        z = np.arange(len(names)) * REAL_GAP_UM
    else:
        d = DATA / "her2st"
        names = sorted(p.name.split(".")[0] for p in (d / "ST-cnts").glob(f"{name[-1]}*.tsv.gz"))
        ads = [read_legacy_st(d / "ST-cnts" / f"{s}.tsv.gz", d / "ST-spotfiles" / f"{s}_selection.tsv", library_id=s)
               for s in names]
        z = (np.array([int(s[1:]) for s in names]) - 1) * REAL_GAP_UM
    if order == "suggested":
        check = check_section_order(ads, names, warn=False)
        if not check.consistent:
            ads = [ads[names.index(s)] for s in check.suggested]
            names, z = list(check.suggested), np.arange(len(ads)) * REAL_GAP_UM
    st = stack_sections(ads, z, names=names, method="icp")
    st.obs["section"] = st.obs["section"].astype(str)
    return st[np.asarray(st.X.sum(1)).ravel() >= REAL_MIN_COUNTS].copy(), names


def inner_folds(names) -> dict:
    """Inner sections held out in turn; each one's validation section is the inner training section farthest
    from it (ties: the earlier one), so that predicting it is also an interpolation across one gap."""
    inner = list(range(1, len(names) - 1))
    folds = {}
    for t in inner:
        cand = [i for i in inner if i != t]
        folds[names[t]] = names[max(cand, key=lambda i: (abs(i - t), -i))]
    return folds


#: how a fold's validation sections are chosen (``--selection``). ``one``: the single inner training section
#: farthest from the test one (``inner_folds``; the third pass). ``all``: every inner training section, held out
#: in turn (inner leave-one-section-out within the fold's training sections); a candidate's (and a baseline k's)
#: score is its mean r over them. The stack's end sections are never validation sections: test sections are always
#: inner (predicted from neighbours on both sides), and an end section would be an extrapolation, another task.
SELECTIONS = ("one", "all")


def validation_sections(names, held: str, selection: str) -> list:
    """The fold's validation sections under rule ``selection`` (see ``SELECTIONS``)."""
    if selection == "one":
        return [inner_folds(names)[held]]
    return [s for s in names[1:-1] if s != held]


def real_fit(tr_a, genes, run: Path, settings: dict):
    settings = dict(settings)
    k, loadings = settings.pop("pca", 0), None
    if k:
        loadings, settings["low_rank"] = pca_loadings(log_norm(tr_a.X)[:, tr_a.var_names.get_indexer(genes)], k), "linear"
    return fit(PointData.from_anndata(tr_a, genes=genes), run, loadings=loadings, **settings)


def _slug(cname: str) -> str:
    return cname.replace(" ", "_").replace(",", "")


def _score(pred, truth, **extra) -> dict:
    s = per_gene_scores(pred, truth)
    return {"r": s["mean_r"], "rmse": s["mean_rmse"], **extra}


def _rank(scores: dict) -> list:
    """Keys by decreasing mean score (ties: the first listed)."""
    return sorted(scores, key=lambda c: -np.mean(scores[c]))


def real_stack_loso(out: Path, name: str, candidates=REAL_CANDIDATES, selection="all", max_folds=None,
                    partial: Path | None = None, test_every_candidate=False) -> dict:
    """Leave-one-inner-section-out on one real stack: baselines (k) and the field (candidate) chosen on the fold's
    validation sections (rule ``selection``), r and RMSE on the held-out section's spots.

    With ``selection="all"`` the same run also gives, from the same fits, the choices of rule ``one`` (its section
    is one of the ``all`` sections; the fits are deterministic) and their test scores (``*_one``), and the mean of
    the top-2 candidates' predictions (``field_top2``; a variant stated before the run, not the headline).
    ``test_every_candidate``: a diagnostic — every candidate is also fitted on the fold's training sections and
    scored on the test section (``field_test_r_every_candidate``); never used for any choice.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    stack, names = read_real_stack(name)
    xyz = stack.obsm["spatial_3d"]
    pitch = float(np.median(cKDTree(xyz[:, :2]).query(xyz[:, :2], k=2)[0][:, 1]))
    res = {"stack": name, "selection": selection, "sections": names, "n_spots": stack.n_obs,
           "n_shared_genes": stack.n_vars, "z_um": sorted(set(xyz[:, 2].tolist())), "in_plane_nn_um": pitch,
           "stack_s": time.perf_counter() - t0, "folds": []}
    y_all = log_norm(stack.X)
    for h in list(inner_folds(names))[:max_folds]:
        f0, fc0, n_fits = time.perf_counter(), time.process_time(), 0
        vals, v_one = validation_sections(names, h, selection), inner_folds(names)[h]
        tr, te = stack.obs["section"].to_numpy() != h, stack.obs["section"].to_numpy() == h
        tr_a, te_a = stack[tr], stack[te]
        tr_sec = tr_a.obs["section"].to_numpy()
        top = np.argsort(-y_all[tr].mean(0), kind="stable")[:REAL_GENES]
        genes = list(stack.var_names[top])
        y_tr, truth = y_all[tr][:, top], y_all[te][:, top]
        sec = pd.Categorical(tr_a.obs["section"]).codes
        txyz, qxyz = np.asarray(tr_a.obsm["spatial_3d"], float), te_a.obsm["spatial_3d"]
        row = {"held_out": h, "validation": vals, "validation_one": v_one, "n_train": int(tr.sum()),
               "n_test": int(te.sum()), "baseline_validation_r": {}}
        # baselines: r of every k on every validation section; k by the mean over the rule's sections
        for b, ks in BASELINE_KS.items():
            per = {s: {k: per_gene_scores(baseline_predict(b, txyz[tr_sec != s], sec[tr_sec != s], y_tr[tr_sec != s],
                                                           txyz[tr_sec == s], k), y_tr[tr_sec == s])["mean_r"]
                       for k in ks} for s in vals}
            row["baseline_validation_r"][b] = {s: {str(k): r for k, r in d.items()} for s, d in per.items()}
            for tag, use in (("", vals), ("_one", [v_one])):
                k = _rank({k: [per[s][k] for s in use] for k in ks})[0]
                s = per_gene_scores(baseline_predict(b, txyz, sec, y_tr, qxyz, k), truth)
                row[b + tag] = {"r": s["mean_r"], "rmse": s["mean_rmse"], "k": k,
                                "val_r": float(np.mean([per[v][k] for v in use]))}
        # field: every candidate fitted without each validation section in turn, scored on it
        row["field_validation_r"] = {}
        for s in vals:
            inner, va = tr_a[tr_sec != s], tr_sec == s
            row["field_validation_r"][s] = {}
            for cname, settings in candidates.items():
                f, _ = real_fit(inner, genes, out / "real" / name / h / "val" / s / _slug(cname), settings)
                n_fits += 1
                pred = f.predict(tr_a.obsm["spatial_3d"][va], value="measured")
                row["field_validation_r"][s][cname] = per_gene_scores(pred, y_tr[va])["mean_r"]
        fv = row["field_validation_r"]
        mean_val = {c: [fv[s][c] for s in vals] for c in candidates}
        row["field_validation_mean_r"] = {c: float(np.mean(v)) for c, v in mean_val.items()}
        ranked = _rank(mean_val)
        chosen_one = _rank({c: [fv[v_one][c]] for c in candidates})[0]
        preds, infos = {}, {}
        tested = [ranked[0], *([ranked[1]] if selection == "all" else []), chosen_one]
        for cname in dict.fromkeys([*tested, *(candidates if test_every_candidate else [])]):
            f, infos[cname] = real_fit(tr_a, genes, out / "real" / name / h / "test" / _slug(cname), candidates[cname])
            n_fits += 1
            preds[cname] = f.predict(qxyz, value="measured")
        row["field"] = _score(preds[ranked[0]], truth, chosen=ranked[0])
        row["field_one"] = _score(preds[chosen_one], truth, chosen=chosen_one)
        if selection == "all":
            row["field_top2"] = _score((preds[ranked[0]] + preds[ranked[1]]) / 2, truth, chosen=ranked[:2])
        if test_every_candidate:
            row["field_test_r_every_candidate"] = {c: _score(p, truth)["r"] for c, p in preds.items()}
        row["fit"] = infos[ranked[0]]
        row["best_baseline_on_test"] = max(BASELINE_KS, key=lambda b: row[b]["r"])
        row["baseline_best_on_validation"] = max(BASELINE_KS, key=lambda b: row[b]["val_r"])
        row.update(n_fits=n_fits, wall_s=time.perf_counter() - f0, cpu_s=time.process_time() - fc0)
        res["folds"].append(row)
        print(json.dumps({k: row[k] for k in ("held_out", "validation", "field", "field_one", "field_validation_mean_r",
                                              "n_fits", "wall_s", "cpu_s")}),
              {b: (round(row[b]["r"], 4), row[b]["k"]) for b in BASELINE_KS}, flush=True)
        if partial is not None:
            partial.write_text(json.dumps(res, indent=1))
    variants = (*BASELINE_KS, "field", *(b + "_one" for b in BASELINE_KS), "field_one")
    for m in (*variants, *(["field_top2"] if selection == "all" else [])):
        res[f"mean_r_{m}"] = float(np.mean([f[m]["r"] for f in res["folds"]]))
        res[f"mean_rmse_{m}"] = float(np.mean([f[m]["rmse"] for f in res["folds"]]))
    for tag in ("", "_one"):
        best = max(BASELINE_KS, key=lambda b: res[f"mean_r_{b}{tag}"])
        res[f"best_baseline{tag}"] = best
        res[f"field_minus_best_baseline_r{tag}"] = res[f"mean_r_field{tag}"] - res[f"mean_r_{best}{tag}"]
    res.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
               n_fits=sum(f["n_fits"] for f in res["folds"]))
    print(json.dumps({k: v for k, v in res.items() if k != "folds"}), flush=True)
    return res


# --- scale -----------------------------------------------------------------------------
def scale(out: Path, n=1_000_000):
    """Throughput, time to convergence and peak RSS at ``n`` cells × 500 genes (see bench_field_scale.py)."""
    from bench_field_scale import scale as run_scale

    return run_scale(out / "scale", n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field"))
    ap.add_argument("--only", nargs="*", default=["phantom", "sparse", "starmap", "scale"])
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--seeds", type=int, default=3, help="fields per ensemble (seeds 0 … n-1)")
    ap.add_argument("--selection", choices=SELECTIONS, default="one",
                    help="real stacks: validation sections per fold; 'one' = the inner training section farthest "
                         "from the test one (third pass), 'all' = every inner training section in turn (mean r)")
    ap.add_argument("--max-folds", type=int, default=None, help="real stacks: run only the first N folds")
    ap.add_argument("--test-every-candidate", action="store_true",
                    help="real stacks, diagnostic: also score every field candidate on the test section (no choice "
                         "uses it)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} thread(s), no GPU"}
    if "phantom" in args.only:
        results["phantom_loso"] = phantom_loso(args.out, seeds=tuple(range(args.seeds)), iterations=args.iterations)
    if "knn_denoise" in args.only:
        results["knn_denoise"] = knn_denoise()
    if "sparse" in args.only:
        results["phantom_sparse"] = phantom_sparse(args.out, iterations=args.iterations)
    if "starmap" in args.only:
        results["starmap_loso"] = starmap_loso(args.out, seeds=tuple(range(args.seeds)))
    if "tune_phantom" in args.only:
        results["tune_phantom"] = tune_phantom(args.out)
    if "tune_starmap" in args.only:
        results["tune_starmap"] = tune_starmap(args.out)
    real = [n for n in args.only if n in REAL_STACKS] or (list(REAL_STACKS) if "real_stacks" in args.only else [])
    name = "results_" + "_".join(args.only) + (f"_selection-{args.selection}" if real else "") + ".json"
    for stack in real:  # in the order given; the results file is rewritten after each stack
        results["real_selection"] = args.selection
        results[f"real_{stack}"] = real_stack_loso(args.out, stack, selection=args.selection,
                                                   max_folds=args.max_folds,
                                                   partial=args.out / f"partial_{stack}_{args.selection}.json",
                                                   test_every_candidate=args.test_every_candidate)
        (args.out / name).write_text(json.dumps(results, indent=1))
    if "scale" in args.only:
        results["scale_1M_x_500"] = scale(args.out)
    (args.out / name).write_text(json.dumps(results, indent=1))
    print("wrote", args.out / name)


if __name__ == "__main__":
    main()
