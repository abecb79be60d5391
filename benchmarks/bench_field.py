"""Neural transcriptomic field vs section baselines: leave-one-section-out, sparse input, denoising, speed.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 15 python benchmarks/bench_field.py --out benchmarks/out/field

Every baseline runs in the same process on the same split. The section baselines (nearest section,
linear interpolation between neighbouring sections) read each section with an in-plane k-nearest
mean and 3D kNN uses inverse-distance weights; all of them get the k that is best **on the held-out
data itself** (an oracle choice that favours the baselines). The field's settings are fixed in
advance (the ``cpu`` preset; jitter from :func:`suggest_jitter`), not tuned on held-out data.
Scores: per-gene Pearson r and RMSE on log1p(counts per 10k), averaged over genes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from voxelome.datasets import axial_placement, make_lung_phantom
from voxelome.evaluate.field_baselines import knn_3d, linear_between_sections, nearest_section, per_gene_scores
from voxelome.infer.field_export import FittedField
from voxelome.train.field_trainer import fit_field, make_field_config, suggest_jitter
from voxelome.train.point_data import PointData

K_SECTION = (1, 2, 4, 8, 16, 32)
K_3D = (4, 8, 16, 32, 64, 128)
STARMAP = Path(__file__).resolve().parents[2] / "shared" / "data" / "starmap3d_mini_giotto"


def log_norm(X, lib=None):
    X = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    lib = X.sum(1) if lib is None else lib
    return np.log1p(X / lib[:, None] * 1e4)


def best(fn, ks, truth):
    scores = [(per_gene_scores(fn(k), truth), k) for k in ks]
    s, k = max(scores, key=lambda t: t[0]["mean_r"])
    return {"r": s["mean_r"], "rmse": s["mean_rmse"], "k": k}


def baselines(train_xyz, train_sec, train_y, query_xyz, truth) -> dict:
    return {
        "nearest_section": best(lambda k: nearest_section(train_xyz, train_sec, train_y, query_xyz, k=k), K_SECTION, truth),
        "linear_interp": best(lambda k: linear_between_sections(train_xyz, train_sec, train_y, query_xyz, k=k),
                              K_SECTION, truth),
        "knn_3d": best(lambda k: knn_3d(train_xyz, train_y, query_xyz, k=k), K_3D, truth),
    }


def fit(data: PointData, run: Path, loadings=None, **overrides):
    cfg = make_field_config("cpu", jitter_um=suggest_jitter(data), **overrides)
    t0 = time.perf_counter()
    fit_field(data, cfg, run, loadings=loadings, resume=False, progress=False)
    secs = time.perf_counter() - t0
    return FittedField.load(run), {"fit_s": secs, "train_points_per_s": cfg.iterations * cfg.batch_size / secs,
                                   "iterations": cfg.iterations, "batch_size": cfg.batch_size,
                                   "jitter_um": list(cfg.jitter_um), "likelihood": cfg.likelihood}


def nmf_loadings(X, k, seed=0):
    """Rate profiles ``(k, g)`` (rows sum to 1) from an NMF of the training spots' count fractions."""
    from sklearn.decomposition import NMF

    X = X.toarray() if sp.issparse(X) else np.asarray(X, np.float64)
    H = NMF(k, init="nndsvda", max_iter=400, random_state=seed).fit(X / X.sum(1, keepdims=True)).components_
    return H / H.sum(1, keepdims=True)


def field_scores(field, query_xyz, truth):
    t0 = time.perf_counter()
    pred = field.predict(query_xyz)
    q = len(query_xyz) / (time.perf_counter() - t0)
    s = per_gene_scores(pred, truth)
    return {"r": s["mean_r"], "rmse": s["mean_rmse"], "query_points_per_s": q}


# --- phantom ---------------------------------------------------------------------------
def phantom_stack(ph, z_indices, seed0=0):
    secs = []
    for k, z in enumerate(z_indices):
        a = ph.cut_section(axial_placement(ph, z), seed=seed0 + k)
        a.obs["section"] = f"s{k:02d}"
        secs.append(a)
    return ad.concat(secs, index_unique="-", merge="same")


def phantom_loso(out: Path, held=("s03", "s06", "s08"), iterations=800):
    ph = make_lung_phantom("small", seed=0, n_genes=60)
    stack = phantom_stack(ph, list(range(2, 47, 4)))  # 12 axial sections 40 µm apart
    loadings = np.asarray(stack.varm["signature_loadings_true"]).T
    rows = []
    for h in held:
        te = (stack.obs["section"] == h).to_numpy()
        tr_a, te_a = stack[~te], stack[te]
        data = PointData.from_anndata(tr_a)
        y_tr = log_norm(tr_a.X)
        measured = log_norm(te_a.X)
        truth = np.log1p(1e4 * np.asarray(te_a.obsm["signatures_true"]) @ loadings)
        sec = pd.Categorical(tr_a.obs["section"]).codes
        res = {"held_out": h, "n_train": int((~te).sum()), "n_test": int(te.sum())}
        for target, t in (("measured", measured), ("truth", truth)):
            res[target] = baselines(tr_a.obsm["spatial_3d"], sec, y_tr, te_a.obsm["spatial_3d"], t)
        f_full, info_full = fit(data, out / f"phantom_{h}_full", iterations=iterations, batch_size=2048)
        f_low, info_low = fit(data, out / f"phantom_{h}_nmf8", loadings=nmf_loadings(tr_a.X, 8),
                              iterations=iterations, batch_size=2048)
        for target, t in (("measured", measured), ("truth", truth)):
            res[target]["field_full"] = field_scores(f_full, te_a.obsm["spatial_3d"], t)
            res[target]["field_nmf8"] = field_scores(f_low, te_a.obsm["spatial_3d"], t)
        res["fit_full"], res["fit_nmf8"] = info_full, info_low
        if h == held[0]:  # denoising on the training spots, against the known truth
            truth_tr = np.log1p(1e4 * np.asarray(tr_a.obsm["signatures_true"]) @ loadings)
            den = f_full.denoise(tr_a.copy(), key=None)
            res["denoise"] = {"raw": per_gene_scores(y_tr, truth_tr)["mean_r"],
                              "field_full": per_gene_scores(den, truth_tr)["mean_r"],
                              "field_nmf8": per_gene_scores(f_low.denoise(tr_a.copy(), key=None), truth_tr)["mean_r"],
                              "knn_smooth": best(lambda k: knn_3d(tr_a.obsm["spatial_3d"], y_tr, tr_a.obsm["spatial_3d"], k=k,
                                                                  weights="uniform"), K_3D, truth_tr)}
            t0 = time.perf_counter()
            knn_3d(tr_a.obsm["spatial_3d"], y_tr, te_a.obsm["spatial_3d"], k=16)
            res["knn_query_points_per_s"] = te_a.n_obs / (time.perf_counter() - t0)
        rows.append(res)
        print(json.dumps(res)[:600], flush=True)
    return rows


def knn_denoise(held="s03"):
    """kNN smoothing (uniform weights) of the training spots of the first LOSO split, vs the truth (no fit)."""
    ph = make_lung_phantom("small", seed=0, n_genes=60)
    stack = phantom_stack(ph, list(range(2, 47, 4)))
    loadings = np.asarray(stack.varm["signature_loadings_true"]).T
    tr_a = stack[(stack.obs["section"] != held).to_numpy()]
    y_tr = log_norm(tr_a.X)
    truth_tr = np.log1p(1e4 * np.asarray(tr_a.obsm["signatures_true"]) @ loadings)
    res = {"raw": per_gene_scores(y_tr, truth_tr)["mean_r"],
           "knn_smooth_uniform": best(lambda k: knn_3d(tr_a.obsm["spatial_3d"], y_tr, tr_a.obsm["spatial_3d"], k=k,
                                                       weights="uniform"), K_3D, truth_tr)}
    print(json.dumps(res), flush=True)
    return res


def phantom_sparse(out: Path, iterations=800, n_eval=20000):
    """40 axial sections of the small phantom (every 1.2 slices), keep every 10th (4); r vs the volume truth."""
    ph = make_lung_phantom("small", seed=1, n_genes=60)
    z_all = np.linspace(3, 44, 40)
    kept = z_all[::10]  # 10 %
    stack = phantom_stack(ph, kept, seed0=100)
    data = PointData.from_anndata(stack)
    field, info = fit(data, out / "phantom_sparse", iterations=iterations, batch_size=2048)
    vol = ph.volume
    rng = np.random.default_rng(0)
    zlo, zhi = int(np.ceil(kept.min())), int(np.floor(kept.max()))
    cand = np.argwhere(ph.tissue[zlo:zhi + 1]) + [zlo, 0, 0]
    pick = cand[rng.choice(len(cand), min(n_eval, len(cand)), replace=False)]
    xyz = vol.index_to_xyz(pick.astype(float))
    props = ph.truth[:, pick[:, 0], pick[:, 1], pick[:, 2]].T
    truth = np.log1p(1e4 * (props / np.maximum(props.sum(1, keepdims=True), 1e-9)) @ ph.loadings)
    y = log_norm(stack.X)
    sec = pd.Categorical(stack.obs["section"]).codes
    base = baselines(stack.obsm["spatial_3d"], sec, y, xyz, truth)
    res = {"sections_cut": 40, "sections_kept": len(kept), "kept_z_um": (kept * vol.spacing_um[0]).tolist(),
           "n_eval_voxels": len(xyz), **base, "field_full": field_scores(field, xyz, truth), "fit": info}
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


def starmap_loso(out: Path, held=("slab2", "slab4", "slab5"), iterations=800):
    if not STARMAP.exists():
        return {"skipped": f"{STARMAP} not found"}
    stack = starmap_stack()
    rows = []
    for h in held:
        te = (stack.obs["section"] == h).to_numpy()
        tr_a, te_a = stack[~te], stack[te]
        data = PointData.from_anndata(tr_a)
        y_tr, truth = log_norm(tr_a.X), log_norm(te_a.X)
        sec = pd.Categorical(tr_a.obs["section"]).codes
        res = {"held_out": h, "n_train": int((~te).sum()), "n_test": int(te.sum()),
               **baselines(tr_a.obsm["spatial_3d"], sec, y_tr, te_a.obsm["spatial_3d"], truth)}
        f, info = fit(data, out / f"starmap_{h}", likelihood="gaussian", iterations=iterations, batch_size=2048)
        res["field_gaussian"] = field_scores(f, te_a.obsm["spatial_3d"], truth)
        res["fit"] = info
        rows.append(res)
        print(json.dumps(res), flush=True)
    return rows


# --- scale -----------------------------------------------------------------------------
def scale(out: Path, n=1_000_000, g=500, iterations=150, batch=8192):
    """Throughput and peak RSS of a fit on a synthetic sparse stack of n cells × g genes (~10 nnz per cell)."""
    rng = np.random.default_rng(0)
    nnz_per = 10
    indptr = np.arange(0, n * nnz_per + 1, nnz_per)
    m = sp.csr_matrix((rng.integers(1, 6, n * nnz_per).astype(np.float32),
                       rng.integers(0, g, n * nnz_per).astype(np.int32), indptr), shape=(n, g))
    m.sum_duplicates()
    xyz = rng.uniform(0, 5000, (n, 3))
    xyz[:, 2] = np.round(xyz[:, 2] / 100) * 100  # 51 sections 100 µm apart
    a = ad.AnnData(X=m, obs=pd.DataFrame({"section": (xyz[:, 2] // 100).astype(int).astype(str)},
                                         index=np.arange(n).astype(str)),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    a.obsm["spatial_3d"] = xyz
    t0 = time.perf_counter()
    data = PointData.from_anndata(a)
    prep = time.perf_counter() - t0
    cfg = make_field_config("cpu", iterations=iterations, batch_size=batch, jitter_um=(50.0, 50.0, 75.0))
    t0 = time.perf_counter()
    fit_field(data, cfg, out / "scale", resume=False, progress=False)
    secs = time.perf_counter() - t0
    res = {"n_cells": n, "n_genes": g, "nnz": int(m.nnz), "prepare_s": prep, "iterations": iterations,
           "batch_size": batch, "fit_s": secs, "train_points_per_s": iterations * batch / secs,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field"))
    ap.add_argument("--only", nargs="*", default=["phantom", "sparse", "starmap", "scale"])
    ap.add_argument("--iterations", type=int, default=800)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} thread(s), no GPU"}
    if "phantom" in args.only:
        results["phantom_loso"] = phantom_loso(args.out, iterations=args.iterations)
    if "knn_denoise" in args.only:
        results["knn_denoise"] = knn_denoise()
    if "sparse" in args.only:
        results["phantom_sparse"] = phantom_sparse(args.out, iterations=args.iterations)
    if "starmap" in args.only:
        results["starmap_loso"] = starmap_loso(args.out, iterations=args.iterations)
    if "scale" in args.only:
        results["scale_1M_x_500"] = scale(args.out)
    name = "results_" + "_".join(args.only) + ".json"
    (args.out / name).write_text(json.dumps(results, indent=1))
    print("wrote", args.out / name)


if __name__ == "__main__":
    main()
