"""The library field (``FieldConfig.model_library``), ablated on the registered real stacks and the phantom.

A count-likelihood field predicts the *measured* value of a spot, ``E[log1p(1e4 · Y / L)]``, which depends on the
spot's library ``L``. Away from the measured spots ``L`` is unknown: without a library field the prediction uses
the training median; with it, the field's own prediction of the local log library. Per fold of
``bench_field_select.py`` (the same stacks, spot QC, 100 genes, held-out inner sections, 400 × 2,048 fits), for the
two NB settings of ``reconstruct fit`` (``select``'s narrow-jitter NB candidate and ``--settings ntf``):

- ``median``: the field fitted without a library field, measured values at the training median library;
- ``field``: the same fit with the library field (the default), measured values at its predicted library;
- ``knn_library``: the ``median`` fit's measured values at the library of a 3D kNN mean of the training spots' log
  libraries (k = 16), a non-parametric stand-in for the library field;
- ``own_library``: the ``median`` fit at each held-out spot's *own* library — an oracle (a real held-out section's
  depths are unknown), shown only as the ceiling of what depth explains;
- a reference: the 3D kNN mean of the training spots' log1p values (k = 64, fixed here; ``bench_field_select.py``
  chooses it on validation sections).

Also the correlation of the predicted with the true log library of the held-out spots. ``--only her2st_E her2st_F
her2st_G her2st_H`` runs the same on the her2st patients never used for the field's design (3 sections each).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/bench_field_library.py \\
        --out benchmarks/out/field_library
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
from bench_field_select import BUDGET, final_fit, phantom_input  # noqa: E402

from voxelome.train.field_selection import FIELD_CANDIDATES, candidate_overrides  # noqa: E402
from voxelome.train.field_trainer import suggest_jitter  # noqa: E402
from voxelome.train.point_data import PointData  # noqa: E402

KNN_K = 64
LIBRARY_K = 16
#: her2st patients E–H (3 sections each: one fold, the middle section held out, predicted from the two others):
#: never used to design or tune the field, so they check the library field out of sample
HELD_OUT_STACKS = ("her2st_E", "her2st_F", "her2st_G", "her2st_H")


def settings(data: PointData) -> dict:
    """The two NB settings a user gets: select's NB candidate, and ``--settings ntf``."""
    return {"nb_narrow": candidate_overrides(data, FIELD_CANDIDATES["nb, jitter ×0.5"]),
            "ntf": {"likelihood": "nb", "jitter_um": suggest_jitter(data)}}


def stack_folds(out: Path, name: str) -> dict:
    t0 = time.perf_counter()
    if name == "phantom":
        stack, _, held_out, _ = phantom_input()
    else:
        stack, names = read_real_stack(name)
        held_out = names[1:-1]  # every inner section (the folds of bench_field_select.py)
    y_all = log_norm(stack.X)
    sec_all = stack.obs["section"].to_numpy()
    res = {"stack": name, "folds": []}
    for h in held_out:
        tr, te = sec_all != h, sec_all == h
        top = np.argsort(-y_all[tr].mean(0), kind="stable")[:REAL_GENES]
        data = PointData.from_anndata(stack[tr], genes=list(stack.var_names[top]))
        test_xyz = np.asarray(stack.obsm["spatial_3d"][te], np.float64)
        test_library = np.asarray(stack.X[te].sum(1), np.float64).ravel()  # over all genes, as PointData's
        truth = y_all[te][:, top]
        row = {"held_out": h}
        _, i = cKDTree(data.xyz_um).query(test_xyz, k=KNN_K)
        row["knn_3d"] = per_gene_scores(y_all[tr][:, top][i].mean(1), truth)["mean_r"]
        _, j = cKDTree(data.xyz_um).query(test_xyz, k=LIBRARY_K)
        knn_library = np.exp(np.log(data.library)[j].mean(1))
        for tag, overrides in settings(data).items():
            runs = out / "runs" / name / h
            with_lib = final_fit(data, runs / f"{tag}-library", {**BUDGET, **overrides, "model_library": True})
            median = final_fit(data, runs / f"{tag}-median", {**BUDGET, **overrides, "model_library": False})
            preds = {"median": median.predict(test_xyz, value="measured"),
                     "field": with_lib.predict(test_xyz, value="measured"),
                     "knn_library": median.predict(test_xyz, value="measured", library=knn_library),
                     "own_library": median.predict(test_xyz, value="measured", library=test_library)}
            row[tag] = {k: per_gene_scores(p, truth)["mean_r"] for k, p in preds.items()}
            row[tag]["library_r"] = float(np.corrcoef(np.log(with_lib.library(test_xyz)), np.log(test_library))[0, 1])
            row[tag]["knn_library_r"] = float(np.corrcoef(np.log(knn_library), np.log(test_library))[0, 1])
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else
                              {a: round(b, 4) for a, b in v.items()} if isinstance(v, dict) else v)
                          for k, v in row.items()}), flush=True)
        res["folds"].append(row)
    for tag in ("nb_narrow", "ntf"):
        res[tag] = {k: float(np.mean([f[tag][k] for f in res["folds"]])) for k in res["folds"][0][tag]}
    res["knn_3d"] = float(np.mean([f["knn_3d"] for f in res["folds"]]))
    res["wall_s"] = time.perf_counter() - t0
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field_library"))
    ap.add_argument("--only", nargs="*", default=[*REAL_STACKS, "phantom"],
                    choices=(*REAL_STACKS, *HELD_OUT_STACKS, "phantom"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
               "budget": BUDGET, "knn_k": KNN_K, "library_k": LIBRARY_K}
    for name in args.only:
        results[name] = stack_folds(args.out, name)
        print(json.dumps({k: v for k, v in results[name].items() if k != "folds"}), flush=True)
        (args.out / f"results_{'_'.join(args.only)}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
