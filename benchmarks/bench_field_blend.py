"""The rule of ``reconstruct fit --knn-blend auto``, simulated on the benchmark stacks before it was built.

Rule (declared before this ran, fourteenth session): per fold, the ``pair`` settings' two candidates (seed 0, the
benchmark budget) are fitted on the fold's training sections minus its validation sections (select's, ≤ 2 inner,
held out together; STARmap: the fold's validation slab, through the CLI as a user runs it); their mean predicts the
validation spots; 3D kNN (k = the fold's baseline k, chosen on the same validation sections) predicts them from the
same training points; the weight a ∈ {0, 0.25, 0.5} with the best mean validation r is applied to the test section:
(1 − a)·pair_x2 + a·kNN(all training points, k). Adopted as the default only if every stack's mean r ≥ pair − 0.002
and STARmap gains ≥ +0.005. Reuses the test-fold fits of ``bench_field_select.py --seeds 2 --pair`` (``--runs``) and
of ``bench_field_cells.py``'s pair run (STARmap); fits only the validation pairs (into ``--out``).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_field_blend.py starmap phantom breast_st2016 \
        her2st_A her2st_B her2st_C her2st_D

The product (``voxelome.train.field_knn_blend``) follows the rule but chooses k itself on the same held-out points;
``bench_field_cells.py`` and ``reconstruct evaluate`` measure it through the CLI (BENCHMARKS.md).
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

warnings.simplefilter("ignore")  # the stacks' reader says how many genes the sections share, every fold
sys.path.insert(0, str(Path(__file__).parent))
from bench_field import STARMAP_FOLDS, REAL_GENES, leave_out, log_norm, per_gene_scores, starmap_stack  # noqa: E402
from bench_field_select import BUDGET, final_fit  # noqa: E402
from bench_field_ceiling import stack_folds, baseline_rows, fold_runs, mean_measured, PAIR_MEMBERS  # noqa: E402
from voxelome.evaluate.field_baselines import knn_3d  # noqa: E402
from voxelome.train.field_selection import FIELD_CANDIDATES, PAIR_CANDIDATES, candidate_overrides, pca_loadings  # noqa: E402
from voxelome.train.point_data import PointData  # noqa: E402
torch.set_num_threads(1)

RUNS = Path("benchmarks/out/field_select_seeds")  # bench_field_select.py --seeds 2 --pair
CELLS_PAIR = Path("benchmarks/out/field_cells_pair")  # bench_field_cells.py, --settings pair, --slab-um 22
OUT = Path("benchmarks/out/field_blend")
WEIGHTS = (0.0, 0.25, 0.5)
VOXELOME = str(Path(sys.executable).parent / "voxelome")


def fold_row(held, val_pred, val_knn, val_truth, test_pred, test_knn, test_truth, knn_r) -> dict:
    """The weight chosen on the validation points, and what it gives on the test section."""
    scores = {a: per_gene_scores((1 - a) * val_pred + a * val_knn, val_truth)["mean_r"] for a in WEIGHTS}
    a = max(scores, key=scores.get)
    return {"held_out": held, "a": a, "val": scores, "pair": per_gene_scores(test_pred, test_truth)["mean_r"],
            "blend": per_gene_scores((1 - a) * test_pred + a * test_knn, test_truth)["mean_r"], "knn": knn_r}


def sectioned(name: str) -> list:
    """Breast / her2st A–D / phantom folds: validation pairs fitted here, test fits of bench_field_select.py."""
    stack, folds = stack_folds(name)
    y_all, xyz = log_norm(stack.X), np.asarray(stack.obsm["spatial_3d"], float)
    sec = stack.obs["section"].to_numpy()
    rows, res = baseline_rows(RUNS, name), []
    for h in folds:
        tr, te = sec != h, sec == h
        top = np.argsort(-y_all[tr].mean(0), kind="stable")[:REAL_GENES]
        genes = stack.var_names[top]
        sel = json.loads(next(RUNS.glob(f"runs/*/{h}/selection/selection.json")).read_text())
        val = np.isin(sec, sel["validation_sections"]) & tr
        fit_mask = tr & ~val
        data = PointData.from_anndata(stack[fit_mask], genes=list(genes))
        val_pred = 0
        for k, cname in enumerate(PAIR_CANDIDATES):
            cand = FIELD_CANDIDATES[cname]
            pca = int(cand.get("pca", 0))
            field = final_fit(data, OUT / name / h / f"val_pair{k}", {**BUDGET, **candidate_overrides(data, cand)},
                              pca_loadings(data, pca) if pca else None)
            val_pred = val_pred + field.predict(xyz[val], value="measured") / len(PAIR_CANDIDATES)
        k_knn = rows[h]["baselines"]["knn_3d"]["k"]
        fits = [fold_runs(RUNS, h)[m] for m in PAIR_MEMBERS]
        row = fold_row(h, val_pred, knn_3d(xyz[fit_mask], y_all[fit_mask][:, top], xyz[val], k=k_knn),
                       y_all[val][:, top], mean_measured(fits, genes, xyz[te])[0],
                       knn_3d(xyz[tr], y_all[tr][:, top], xyz[te], k=k_knn), y_all[te][:, top],
                       rows[h]["baselines"]["knn_3d"]["r"])
        print(name, json.dumps(row), flush=True)
        res.append(row)
    return res


def starmap() -> list:
    """3D STARmap folds: the validation pair fitted through the CLI on the training cells minus the validation slab,
    the test members of bench_field_cells.py's pair run."""
    stack = starmap_stack()
    prev = json.loads((CELLS_PAIR / "results_slab22.json").read_text())["runs"]["22"]["folds"]
    prev = {r["held_out"]: r for r in prev}
    res = []
    for held, val in STARMAP_FOLDS.items():
        tr, te, vmask = leave_out(stack, held, val)
        tr_a, te_a = stack[tr], stack[te]
        fit_a, val_a = tr_a[~vmask], tr_a[vmask]
        xyz_fit, xyz_val = (np.asarray(a.obsm["spatial_3d"], float) for a in (fit_a, val_a))
        work = OUT / "starmap" / held
        work.mkdir(parents=True, exist_ok=True)
        cells = ad.AnnData(X=sp.csr_matrix(fit_a.X), obs=pd.DataFrame(index=fit_a.obs_names), var=fit_a.var.copy())
        cells.obsm["spatial_3d"] = xyz_fit
        cells.write_h5ad(work / "cells.h5ad")
        pd.DataFrame(xyz_val, columns=["x", "y", "z"]).to_csv(work / "val.csv", index=False)
        if not (work / "run" / "ensemble.json").exists():
            subprocess.run([VOXELOME, "reconstruct", "fit", str(work / "cells.h5ad"), "--out", str(work / "run"),
                            "--z-slabs", "22", "--settings", "pair", "--seeds", "1", "--knn-blend", "off"],
                           check=True, capture_output=True)
        subprocess.run([VOXELOME, "reconstruct", "predict", str(work / "run"), "--points", str(work / "val.csv"),
                        "--out", str(work / "val_pred.csv"), "--value", "measured"], check=True, capture_output=True)
        val_pred = pd.read_csv(work / "val_pred.csv")[list(map(str, val_a.var_names))].to_numpy()
        k_knn = prev[held]["baselines"]["knn_3d"]["k"]
        members = sorted((CELLS_PAIR / f"{held}_slab22" / "run" / "members").iterdir())
        q = np.asarray(te_a.obsm["spatial_3d"], float)
        row = fold_row(held, val_pred, knn_3d(xyz_fit, log_norm(fit_a.X), xyz_val, k=k_knn), log_norm(val_a.X),
                       mean_measured(members, te_a.var_names, q)[0],
                       knn_3d(np.asarray(tr_a.obsm["spatial_3d"], float), log_norm(tr_a.X), q, k=k_knn),
                       log_norm(te_a.X), prev[held]["baselines"]["knn_3d"]["r"])
        print("starmap", json.dumps(row), flush=True)
        res.append(row)
    return res


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[1:]:
        r = starmap() if name == "starmap" else sectioned(name)
        print(f"== {name}: pair {np.mean([x['pair'] for x in r]):.4f} blend {np.mean([x['blend'] for x in r]):.4f} "
              f"knn {np.mean([x['knn'] for x in r]):.4f} a={[x['a'] for x in r]}", flush=True)
        (OUT / f"result_{name}.json").write_text(json.dumps(r, indent=1))
