"""Does the field's training schedule matter on small real stacks? 400 × 2,048 points vs 1,500 × 4,096.

``bench_field_select.py`` and ``bench_field_library.py`` fit every field with 400 iterations × 2,048 points (the
real-stack benchmark budget, also the schedule ``reconstruct fit --settings select`` compares candidates with).
Until the ninth session the ``cpu`` preset — what ``reconstruct fit --settings ntf|robust`` and ``auto`` on a stack
too small to choose on (fewer than 3 sections: her2st patients E–H leave 2 training sections per fold) fitted
with — was 1,500 × 4,096; this check made it 400 × 2,048. Here both schedules per fold, on the held-out her2st patients
E–H by default (3 sections; the middle one predicted from the other two; 100 genes, spot QC and scores of
``bench_field_library.py``), beside 3D kNN (k = 64). Measured r = mean per-gene Pearson r of the predicted measured
value (``value="measured"``, at the library field's depth) against the held-out spots' log1p counts per 10k.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/bench_field_budget.py \\
        --out benchmarks/out/field_budget

``--seeds N --schedules short`` also scores the mean of N fits with seeds 0 … N−1 (``reconstruct fit --seeds N``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).parent))
from bench_field import REAL_GENES, REAL_STACKS, log_norm, per_gene_scores, read_real_stack  # noqa: E402
from bench_field_library import HELD_OUT_STACKS, KNN_K  # noqa: E402
from bench_field_select import BUDGET, LONG_SCHEDULE, final_fit  # noqa: E402

from voxelome.train.field_selection import FIELD_CANDIDATES, ROBUST_CANDIDATE, candidate_overrides  # noqa: E402
from voxelome.train.field_trainer import suggest_jitter  # noqa: E402
from voxelome.train.point_data import PointData  # noqa: E402

SCHEDULES = {"short": BUDGET, "long": LONG_SCHEDULE}


def settings(data: PointData, which) -> dict:
    """``--settings ntf`` and ``robust`` as ``reconstruct fit`` builds them."""
    every = {"ntf": {"likelihood": "nb", "jitter_um": suggest_jitter(data)},
             "robust": candidate_overrides(data, FIELD_CANDIDATES[ROBUST_CANDIDATE])}
    return {k: every[k] for k in which}


def stack_folds(out: Path, name: str, which, schedules=tuple(SCHEDULES), seeds: int = 1) -> dict:
    stack, names = read_real_stack(name)
    y_all = log_norm(stack.X)
    sec_all = stack.obs["section"].to_numpy()
    res = {"stack": name, "folds": []}
    for h in names[1:-1]:
        tr, te = sec_all != h, sec_all == h
        top = np.argsort(-y_all[tr].mean(0), kind="stable")[:REAL_GENES]
        data = PointData.from_anndata(stack[tr], genes=list(stack.var_names[top]))
        test_xyz = np.asarray(stack.obsm["spatial_3d"][te], np.float64)
        truth = y_all[te][:, top]
        _, i = cKDTree(data.xyz_um).query(test_xyz, k=KNN_K)
        row = {"held_out": h, "knn_3d": per_gene_scores(y_all[tr][:, top][i].mean(1), truth)["mean_r"]}
        for tag, overrides in settings(data, which).items():
            for sched in schedules:
                preds = []
                for seed in range(seeds):  # seed 0: the fit a single-seed `reconstruct fit` makes
                    t0 = time.perf_counter()
                    run = out / "runs" / name / h / (f"{tag}-{sched}" + (f"-seed{seed}" if seed else ""))
                    field = final_fit(data, run, {**SCHEDULES[sched], **overrides, **({"seed": seed} if seed else {})})
                    preds.append(field.predict(test_xyz, value="measured"))
                    if not seed:
                        row[f"{tag}_{sched}"] = per_gene_scores(preds[0], truth)["mean_r"]
                        row[f"{tag}_{sched}_seconds"] = time.perf_counter() - t0
                if seeds > 1:  # `reconstruct fit --seeds N`: the mean of the N fits
                    row[f"{tag}_{sched}_x{seeds}"] = per_gene_scores(sum(preds) / seeds, truth)["mean_r"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        res["folds"].append(row)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field_budget"))
    ap.add_argument("--only", nargs="*", default=list(HELD_OUT_STACKS), choices=(*REAL_STACKS, *HELD_OUT_STACKS))
    ap.add_argument("--settings", nargs="+", default=["ntf"], choices=("ntf", "robust"))
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    ap.add_argument("--seeds", type=int, default=1, help="also fit seeds 1 … N−1 and score the mean of the N fits "
                                                         "(<settings>_<schedule>_xN; reconstruct fit --seeds N)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
               "schedules": SCHEDULES, "knn_k": KNN_K}
    for name in args.only:
        results[name] = stack_folds(args.out, name, args.settings, args.schedules, args.seeds)
        tag = f"_seeds{args.seeds}" if args.seeds > 1 else ""
        (args.out / f"results_{'_'.join(args.only)}{tag}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
