"""``reconstruct fit --select`` (``voxelome.train.field_selection.select_field``) on the registered real stacks.

What a user of the CLI gets, leave-one-inner-section-out on the breast / her2st A–D ``icp`` stacks (the same
stacks, folds, 100 genes, spot QC and scores as ``bench_field.py --only real_stacks``), three ways in one run:

- **ntf**: ``reconstruct fit --settings ntf`` (NB, jitter = ``suggest_jitter``, section effects; the CLI's default
  until this benchmark's first run, reported as "default" in that run's log);
- **robust**: ``--settings robust``, the CLI default since (the ``ROBUST_CANDIDATE``: Gaussian on log1p, jitter
  1.5× in-plane / 6× across, no section effects), one fit;
- **select**: ``--settings select``: ``select_field`` on the fold's training sections (it holds out up to 2 of their
  inner sections, evenly spread, fits its 5 candidates on the rest and keeps the best mean r), then the final fit;
- the section-interpolation and 3D kNN baselines, their k chosen on the **same** held-out sections.

Every field uses preset ``cpu`` with 400 iterations × 2,048 points (``bench_field.py``'s real-stack budget); the
test section is used only for the scores.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/bench_field_select.py \\
        --out benchmarks/out/field_select
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_field import (  # noqa: E402
    BASELINE_KS,
    REAL_GENES,
    REAL_STACKS,
    baselines,
    inner_folds,
    log_norm,
    per_gene_scores,
    read_real_stack,
)

from voxelome.infer.field_export import FittedField  # noqa: E402
from voxelome.errors import VoxelomeError  # noqa: E402
from voxelome.train.field_selection import (  # noqa: E402
    FIELD_CANDIDATES,
    ROBUST_CANDIDATE,
    candidate_overrides,
    inner_sections,
    pca_loadings,
    select_field,
)
from voxelome.train.field_trainer import fit_field, make_field_config, suggest_jitter  # noqa: E402
from voxelome.train.point_data import PointData  # noqa: E402

BUDGET = {"iterations": 400, "batch_size": 2048}


def final_fit(data, run: Path, overrides: dict, loadings=None) -> FittedField:
    """Fit (or, when a finished fit of the same settings is there, reuse: fits are deterministic)."""
    config = make_field_config("cpu", **overrides)
    try:
        fit_field(data, config, run, resume=True, progress=False, loadings=loadings)
    except VoxelomeError:  # another configuration in that folder
        shutil.rmtree(run, ignore_errors=True)
        fit_field(data, config, run, resume=False, progress=False, loadings=loadings)
    return FittedField.load(run)


def stack_folds(out: Path, name: str, max_folds=None) -> dict:
    t0 = time.perf_counter()
    stack, names = read_real_stack(name)
    y_all = log_norm(stack.X)
    res = {"stack": name, "sections": names, "folds": []}
    for h in list(inner_folds(names))[:max_folds]:
        f0 = time.perf_counter()
        sec_all = stack.obs["section"].to_numpy()
        tr, te = sec_all != h, sec_all == h
        tr_a = stack[tr]
        top = np.argsort(-y_all[tr].mean(0), kind="stable")[:REAL_GENES]
        genes = list(stack.var_names[top])
        data = PointData.from_anndata(tr_a, genes=genes)
        qxyz, truth = stack.obsm["spatial_3d"][te], y_all[te][:, top]
        work = out / "runs" / name / h
        chosen = select_field(data, work / "selection", progress=False, **BUDGET)
        val_names = chosen["validation_sections"]
        tr_sec = tr_a.obs["section"].to_numpy()
        val_sets = [(tr_sec == s, y_all[tr][:, top][tr_sec == s]) for s in val_names]
        base = baselines(tr_a.obsm["spatial_3d"], tr_sec, y_all[tr][:, top], qxyz, {"test": truth}, val_sets)["test"]
        row = {"held_out": h, "validation": val_names, "baselines": base, "selection": chosen}
        fields = {"select": ("select", {**BUDGET, **chosen["overrides"]}),
                  "ntf": ("default", {**BUDGET, "likelihood": "nb", "jitter_um": suggest_jitter(data)}),
                  "robust": ("robust", {**BUDGET, **candidate_overrides(data, FIELD_CANDIDATES[ROBUST_CANDIDATE])})}
        for tag, (folder, overrides) in fields.items():
            loadings = pca_loadings(data, chosen["pca"]) if tag == "select" and chosen["pca"] else None
            pred = final_fit(data, work / folder, overrides, loadings).predict(qxyz, value="measured")
            s = per_gene_scores(pred, truth)
            row[tag] = {"r": s["mean_r"], "rmse": s["mean_rmse"]}
        row["wall_s"] = time.perf_counter() - f0
        assert set(val_names) <= {names[c] for c in range(len(names))} and h not in val_names
        print(json.dumps({"fold": h, "val": val_names, "best": chosen["best"], "select": row["select"]["r"],
                          "ntf": row["ntf"]["r"], "robust": row["robust"]["r"], **{b: (base[b]["r"], base[b]["k"]) for b in BASELINE_KS},
                          "wall_s": round(row["wall_s"], 1)}), flush=True)
        res["folds"].append(row)
    for m in ("select", "ntf", "robust"):
        res[f"mean_r_{m}"] = float(np.mean([f[m]["r"] for f in res["folds"]]))
    for b in BASELINE_KS:
        res[f"mean_r_{b}"] = float(np.mean([f["baselines"][b]["r"] for f in res["folds"]]))
    res["best_baseline"] = max(BASELINE_KS, key=lambda b: res[f"mean_r_{b}"])
    res["select_minus_best_baseline"] = res["mean_r_select"] - res[f"mean_r_{res['best_baseline']}"]
    res["robust_minus_best_baseline"] = res["mean_r_robust"] - res[f"mean_r_{res['best_baseline']}"]
    res["wall_s"] = time.perf_counter() - t0
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field_select"))
    ap.add_argument("--only", nargs="*", default=list(REAL_STACKS), choices=REAL_STACKS)
    ap.add_argument("--max-folds", type=int, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
               "budget": BUDGET, "inner_sections_rule": inner_sections.__doc__.split("\n")[0]}
    for name in args.only:
        results[name] = stack_folds(args.out, name, args.max_folds)
        print(json.dumps({k: v for k, v in results[name].items() if k != "folds"}), flush=True)
        (args.out / f"results_{'_'.join(args.only)}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
