"""What should a field fitted on only two sections use? Designed on triplets of A, C, D and breast; tested on E–H.

``reconstruct fit --settings auto`` chooses its settings on held-out inner sections when the stack has ≥ 3; with two
sections there is nothing to hold out and it fits ``ntf`` (NB, jitter = ``suggest_jitter``, section effects). The
held-out her2st patients E–H measure exactly that case (3 sections; the middle one predicted from the other two), but
``ntf`` was never chosen for it. Declared before this run (twelfth session):

1. **Design** on triplets of the registered stacks that are not E–H: every inner section of her2st A, C, D (numeric
   order; B left out, its numbering is flagged by ``register order``) and of the breast layers, predicted from its
   two neighbours alone (14 triplets). Candidates: ``ntf`` and the five ``FIELD_CANDIDATES`` of ``select``, one seed,
   the ``cpu`` preset (400 × 2,048 points), 100 genes; plus the mean of every two candidates' predictions. The
   design choice is the single candidate or pair with the highest mean r over the 14 triplets.
2. **Test** on E–H, 2 seeds (what ``reconstruct fit`` fits): the design choice vs ``ntf`` (``bench_field_budget.py
   --seeds 2 --schedules short``'s fits, reused when ``--budget-out`` points at them). ``auto`` on a two-section
   stack adopts the design choice only if its E–H mean r is ≥ ``ntf``'s + 0.005 and no patient is lower by > 0.01.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/bench_field_pairs.py \\
        --out benchmarks/out/field_pairs --stage design --only her2st_A her2st_C
    ... --stage design --only her2st_D breast_st2016      # (the other core)
    ... --stage test                                      # reads the design results, fits E–H
    ... --stage ceiling   # E–H: every candidate × 2 seeds, the best average of ≤ 5 chosen on the test section
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).parent))
from bench_field import REAL_GENES, log_norm, per_gene_scores, read_real_stack  # noqa: E402
from bench_field_library import HELD_OUT_STACKS, KNN_K  # noqa: E402
from bench_field_select import BUDGET, final_fit  # noqa: E402

from voxelome.train.field_selection import (  # noqa: E402
    FIELD_CANDIDATES,
    PAIR_CANDIDATES,
    candidate_overrides,
    pca_loadings,
)
from voxelome.train.field_trainer import suggest_jitter  # noqa: E402
from voxelome.train.point_data import PointData  # noqa: E402

DESIGN_STACKS = ("her2st_A", "her2st_C", "her2st_D", "breast_st2016")
NTF = "ntf"


def candidates(data: PointData) -> dict:
    """name → (overrides, pca rank): ``ntf`` and select's five candidates, as ``reconstruct fit`` builds them."""
    out = {NTF: ({"likelihood": "nb", "jitter_um": suggest_jitter(data)}, 0)}
    for name, cand in FIELD_CANDIDATES.items():
        out[name] = (candidate_overrides(data, cand), int(cand.get("pca", 0)))
    return out


def fit_predict(data, run: Path, overrides: dict, pca: int, query_xyz, seed: int = 0) -> np.ndarray:
    loadings = pca_loadings(data, pca) if pca else None
    field = final_fit(data, run, {**BUDGET, **overrides, **({"seed": seed} if seed else {})}, loadings)
    return field.predict(query_xyz, value="measured")


def triplet(stack, names, i):
    """Training sections ``names[i−1], names[i+1]``, test ``names[i]``: (data, query xyz, truth, kNN r)."""
    sec = stack.obs["section"].to_numpy()
    tr, te = np.isin(sec, [names[i - 1], names[i + 1]]), sec == names[i]
    y = log_norm(stack.X)
    top = np.argsort(-y[tr].mean(0), kind="stable")[:REAL_GENES]
    data = PointData.from_anndata(stack[tr], genes=list(stack.var_names[top]))
    q = np.asarray(stack.obsm["spatial_3d"][te], np.float64)
    truth = y[te][:, top]
    _, idx = cKDTree(data.xyz_um).query(q, k=min(KNN_K, data.xyz_um.shape[0]))
    return data, q, truth, per_gene_scores(y[tr][:, top][idx].mean(1), truth)["mean_r"]


def design(out: Path, stacks) -> dict:
    rows = []
    for name in stacks:
        stack, names = read_real_stack(name)
        for i in range(1, len(names) - 1):
            data, q, truth, knn = triplet(stack, names, i)
            preds = {c: fit_predict(data, out / "runs" / name / names[i] / f"cand{k}", ov, pca, q)
                     for k, (c, (ov, pca)) in enumerate(candidates(data).items())}
            row = {"stack": name, "held_out": names[i], "knn_3d": knn,
                   **{c: per_gene_scores(p, truth)["mean_r"] for c, p in preds.items()}}
            for a, b in itertools.combinations(preds, 2):
                row[f"{a} + {b}"] = per_gene_scores((preds[a] + preds[b]) / 2, truth)["mean_r"]
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
                              if " + " not in k}), flush=True)
    return {"triplets": rows}


def choice(design_rows) -> tuple[str, dict]:
    keys = [k for k in design_rows[0] if k not in ("stack", "held_out", "knn_3d")]
    means = {k: float(np.mean([r[k] for r in design_rows])) for k in keys}
    return max(means, key=means.get), means


def test(out: Path, budget_out: Path, chosen: str) -> dict:
    rows = []
    for name in HELD_OUT_STACKS:
        stack, names = read_real_stack(name)
        data, q, truth, knn = triplet(stack, names, 1)
        cands = candidates(data)
        row = {"stack": name, "held_out": names[1], "knn_3d": knn}
        for label, members in ((NTF, [NTF]), (chosen, chosen.split(" + "))):
            preds = []
            for k, m in enumerate(members):
                ov, pca = cands[m]
                for seed in (0, 1):
                    if m == NTF:  # the fits of bench_field_budget.py --seeds 2 --schedules short (same settings)
                        run = budget_out / "runs" / name / names[1] / ("ntf-short" + (f"-seed{seed}" if seed else ""))
                    else:
                        run = out / "runs" / name / names[1] / (f"{m.replace(' ', '_').replace(',', '')}-seed{seed}")
                    preds.append(fit_predict(data, run, ov, pca, q, seed))
            row[label] = per_gene_scores(sum(preds) / len(preds), truth)["mean_r"]
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    gain = float(np.mean([r[chosen] - r[NTF] for r in rows])) if chosen != NTF else 0.0
    worst = min(r[chosen] - r[NTF] for r in rows) if chosen != NTF else 0.0
    return {"chosen": chosen, "folds": rows, "mean_gain_vs_ntf": gain, "worst_patient_vs_ntf": worst,
            "adopt": bool(chosen != NTF and gain >= 0.005 and worst >= -0.01)}


def ceiling(out: Path, budget_out: Path, max_members: int = 5) -> dict:
    """``--stage ceiling``: on E–H, every candidate (``ntf`` and select's five) × 2 seeds, and the best average of
    ≤ ``max_members`` of them chosen on the held-out middle section itself (an upper bound for any rule combining
    these fields; ``bench_field_ceiling.py`` does the same on the stacks with inner sections). Reuses the test stage's
    fits and the ``ntf`` fits of ``bench_field_budget.py``."""
    from bench_field_ceiling import best_subset

    rows = []
    for name in HELD_OUT_STACKS:
        stack, names = read_real_stack(name)
        data, q, truth, knn = triplet(stack, names, 1)
        preds = {}
        for m, (ov, pca) in candidates(data).items():
            for seed in (0, 1):
                if m == NTF:
                    run = budget_out / "runs" / name / names[1] / ("ntf-short" + (f"-seed{seed}" if seed else ""))
                else:
                    run = out / "runs" / name / names[1] / (f"{m.replace(' ', '_').replace(',', '')}-seed{seed}")
                preds[f"{m}, seed {seed}"] = fit_predict(data, run, ov, pca, q, seed)
        pair = [p for k, p in preds.items() if k.rsplit(", seed", 1)[0] in PAIR_CANDIDATES]
        row = {"stack": name, "held_out": names[1], "knn_3d": knn,
               "pair_x2": per_gene_scores(sum(pair) / len(pair), truth)["mean_r"],
               **best_subset(preds, truth, max_members)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"folds": rows, **{f"mean_{k}_minus_knn": float(np.mean([r[k] - r["knn_3d"] for r in rows]))
                              for k in ("best_single", "mean_of_all", "pair_x2", "ceiling")}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field_pairs"))
    ap.add_argument("--budget-out", type=Path, default=Path("benchmarks/out/field_budget_seeds"),
                    help="bench_field_budget.py --seeds 2 --schedules short output (its ntf fits are reused)")
    ap.add_argument("--stage", choices=("design", "test", "ceiling"), required=True)
    ap.add_argument("--only", nargs="*", default=list(DESIGN_STACKS), choices=DESIGN_STACKS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.stage == "ceiling":
        res = ceiling(args.out, args.budget_out)
        print(json.dumps({k: v for k, v in res.items() if k != "folds"}), flush=True)
        (args.out / "ceiling_her2st_EFGH.json").write_text(json.dumps(res, indent=1))
        return
    if args.stage == "design":
        res = design(args.out, args.only)
        (args.out / f"design_{'_'.join(args.only)}.json").write_text(json.dumps(res, indent=1))
        return
    rows = [r for f in sorted(args.out.glob("design_*.json")) for r in json.loads(f.read_text())["triplets"]]
    if {r["stack"] for r in rows} != set(DESIGN_STACKS):
        raise SystemExit(f"design results cover {sorted({r['stack'] for r in rows})}; run --stage design on "
                         f"every one of {DESIGN_STACKS} first.")
    chosen, means = choice(rows)
    print(json.dumps({"design_triplets": len(rows), "chosen": chosen,
                      "design_means": dict(sorted(means.items(), key=lambda kv: -kv[1])[:8]),
                      "design_ntf": means[NTF]}), flush=True)
    res = {"design_means": means, **test(args.out, args.budget_out, chosen)}
    print(json.dumps({k: v for k, v in res.items() if k not in ("folds", "design_means")}), flush=True)
    (args.out / "test_her2st_EFGH.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
