"""Benchmark: fitting niche signatures on large sections (Visium HD bins, single cells), subset fit vs full fit.

A synthetic section of N spots on a grid (10 µm pitch) × 3,000 genes, counts Poisson from 3 smooth spatial
programmes (~5 % non-zero, sparse), as `voxelome signatures` meets it. ``fit_signatures`` with the default
configuration fits the archetypes on ``max_fit_spots`` (50,000) seeded spots and projects every spot; ``--full``
fits on all spots (the behaviour before the tenth session). Wall time, peak RSS of the fit (above what the data
took), and the agreement of the projected proportions between the two fits (Hungarian-matched Pearson r) when
both are run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_signatures_scale.py --spots 100000 --full \\
        --out benchmarks/out/signatures_scale
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from voxelome.signatures import fit_signatures


def section(n: int, g: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    xy = np.c_[np.repeat(np.arange(side), side), np.tile(np.arange(side), side)][:n].astype(float) * 10
    prog = np.c_[np.sin(xy[:, 0] / 300), np.cos(xy[:, 1] / 200), np.sin((xy[:, 0] + xy[:, 1]) / 500)] + 1.2
    load = rng.gamma(0.3, 1, (3, g))
    parts = [sp.csr_matrix(rng.poisson(prog[i:i + 20000] @ load * 0.05).astype(np.float32))
             for i in range(0, n, 20000)]
    a = ad.AnnData(X=sp.vstack(parts).tocsr(), obs=pd.DataFrame(index=[f"b{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))
    a.obsm["spatial"] = xy
    return a


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_fit(a, **config) -> tuple[np.ndarray, dict]:
    before, t = rss_mb(), time.perf_counter()
    model = fit_signatures(a, **config)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    props = model.project(a)
    return props, {"fit_s": fit_s, "project_s": time.perf_counter() - t, "peak_rss_mb": rss_mb(),
                   "peak_rss_before_mb": before, "max_fit_spots": model.config.max_fit_spots}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spots", type=int, default=100_000)
    ap.add_argument("--full", action="store_true", help="also fit on every spot (run first: RSS peaks are per process)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/signatures_scale"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    a = section(args.spots)
    res = {"spots": args.spots, "genes": a.n_vars, "nnz": int(a.X.nnz)}
    if args.full:  # first, so that its peak is not hidden by the subset fit's
        full, res["full"] = timed_fit(a, max_fit_spots=args.spots)
        print("full", res["full"], flush=True)
    subset, res["subset"] = timed_fit(a)
    print("subset", res["subset"], flush=True)
    if args.full:
        k = subset.shape[1]
        corr = np.corrcoef(subset.T, full.T)[:k, k:]
        rows, cols = linear_sum_assignment(-corr)
        res["matched_r_subset_vs_full"] = corr[rows, cols].tolist()
        res["fit_time_ratio_full_over_subset"] = res["full"]["fit_s"] / res["subset"]["fit_s"]
    (args.out / f"results_{args.spots}{'_full' if args.full else ''}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("full", "subset")}), flush=True)


if __name__ == "__main__":
    main()
