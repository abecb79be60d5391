"""``reconstruct fit --z-slabs`` on volumetric cells without sections: STARmap 3D through the CLI.

3D STARmap (``../shared/data/starmap3d_mini_giotto``: 3,906 cells with signal × 28 genes, x, y, z in the source's
unstated units, used as µm) has no physical sections. A user writes the cells to an ``.h5ad`` (``obsm['spatial_3d']``,
no section column) and runs the README's commands:

    voxelome reconstruct fit cells.h5ad --out RUN --z-slabs T      # slabs of T µm stand for sections; --settings auto
    voxelome reconstruct predict RUN --points test.csv --out pred.csv --value measured

This benchmark does exactly that on ``bench_field.py``'s STARmap folds (8 equal z-slabs of ~11 units; test slabs 2, 4,
5, each held out whole: its cells are never written to the training file) and scores the predicted log1p
(intensity per 10k) of the held-out cells (mean per-gene Pearson r), beside the baselines of ``bench_field.py`` in the
same run (nearest slab, linear interpolation between slabs, 3D kNN; their k chosen on the fold's inner validation slab,
as in BENCHMARKS.md's STARmap table). The CLI's slabs (edges at multiples of T) are its own; the selection inside
``fit`` holds out its own inner slabs of the training cells.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/bench_field_cells.py \\
        --out benchmarks/out/field_cells --slab-um 11 22
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from bench_field import STARMAP_FOLDS, baselines, leave_out, log_norm, per_gene_scores, starmap_stack  # noqa: E402
from bench_superres_patients import voxelome  # noqa: E402  (the CLI as a user runs it)


def run_fold(stack, held: str, val: str, slab_um: float, out: Path) -> dict:
    tr, te, val_mask = leave_out(stack, held, val)
    tr_a, te_a = stack[tr], stack[te]
    work = out / f"{held}_slab{slab_um:g}"
    work.mkdir(parents=True, exist_ok=True)
    cells = ad.AnnData(X=sp.csr_matrix(tr_a.X), obs=pd.DataFrame(index=tr_a.obs_names), var=tr_a.var.copy())
    cells.obsm["spatial_3d"] = np.asarray(tr_a.obsm["spatial_3d"], float)  # no section column: the user's cells
    cells.write_h5ad(work / "cells.h5ad")
    xyz = np.asarray(te_a.obsm["spatial_3d"], float)
    pd.DataFrame(xyz, columns=["x", "y", "z"]).to_csv(work / "test.csv", index=False)
    t0 = time.perf_counter()
    log = voxelome("reconstruct", "fit", work / "cells.h5ad", "--out", work / "run", "--z-slabs", slab_um)
    fit_s = time.perf_counter() - t0
    voxelome("reconstruct", "predict", work / "run", "--points", work / "test.csv", "--out", work / "pred.csv",
             "--value", "measured")
    pred = pd.read_csv(work / "pred.csv")[list(map(str, te_a.var_names))].to_numpy()
    truth = log_norm(te_a.X)
    y_tr = log_norm(tr_a.X)
    codes = pd.Categorical(tr_a.obs["section"]).codes
    base = baselines(tr_a.obsm["spatial_3d"], codes, y_tr, xyz, {"test": truth}, [(val_mask, y_tr[val_mask])])["test"]
    s = per_gene_scores(pred, truth)
    # the fields the run averages (ensemble.json), and the selection's held-out slabs when `select` chose them
    record = json.loads((work / "run" / "ensemble.json").read_text())
    sel_file = work / "run" / "selection" / "selection.json"
    sel = json.loads(sel_file.read_text()) if sel_file.exists() else {}
    row = {"held_out": held, "slab_um": slab_um, "n_train": int(tr.sum()), "n_test": int(te.sum()),
           "field": {"r": s["mean_r"], "rmse": s["mean_rmse"]}, "baselines": base, "fit_wall_s": fit_s,
           "chosen": sorted({n.rsplit(", seed", 1)[0] for n in record["names"]}),
           "validation_slabs": sel.get("validation_sections"),
           "cli_log": [ln for ln in log.splitlines() if ln.strip()][:4]}
    print(json.dumps({"fold": held, "slab_um": slab_um, "field": round(s["mean_r"], 4),
                      **{b: (round(v["r"], 4), v["k"]) for b, v in base.items()}, "chosen": row["chosen"],
                      "fit_s": round(fit_s, 1)}), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field_cells"))
    ap.add_argument("--slab-um", type=float, nargs="+", default=[11.0, 22.0], help="--z-slabs thicknesses to run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stack = starmap_stack()
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "runs": {}}
    for t in args.slab_um:
        rows = [run_fold(stack, h, v, t, args.out) for h, v in STARMAP_FOLDS.items()]
        summary = {"mean_r_field": float(np.mean([r["field"]["r"] for r in rows])),
                   **{f"mean_r_{b}": float(np.mean([r["baselines"][b]["r"] for r in rows])) for b in rows[0]["baselines"]},
                   "fit_wall_s": [round(r["fit_wall_s"], 1) for r in rows]}
        summary["field_minus_knn_3d"] = summary["mean_r_field"] - summary["mean_r_knn_3d"]
        print(json.dumps({"slab_um": t, **summary}), flush=True)
        res["runs"][f"{t:g}"] = {"folds": rows, **summary}
        tag = "_".join(f"{x:g}" for x in args.slab_um)
        (args.out / f"results_slab{tag}.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
