"""How far *any* average of the fields already fitted by ``bench_field_select.py`` gets on each held-out section.

An upper bound, not a method: for every fold, every subset of up to ``--max-members`` of the fold's finished fits
(``select``'s ranked candidates × seeds, ``ntf``, ``robust``, the pair …) is averaged and scored on the held-out
section itself, and the best subset kept — a choice no user could make, since it reads the test section. If even
that ceiling stays under 3D kNN + 0.03, no ensemble of this model family (these settings, this budget) meets the
issue's ≥ 0.03 on that stack, and a different model, not another rule for combining these, would be needed.

Reads the fits and the per-fold baselines of a finished ``bench_field_select.py --seeds N [--pair …]`` run (``--out``
of that run; nothing is fitted here). Fits are looked up in ``<out>/runs/*/<fold>`` (fold names are unique across
stacks), which also finds the folder that run wrote some ``--pair`` fits to before its loop variable was fixed.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_field_ceiling.py \\
        --runs benchmarks/out/field_select_seeds --out benchmarks/out/field_ceiling

``--hybrids`` asks the other question for the default ``pair`` field (its 4 fits, 2 candidates × 2 seeds): does
adding a baseline to it get there? Two hybrids, each scored for every setting of a small grid, the setting with the
best *stack mean on the held-out sections* kept (again an oracle, an upper bound): a blend ``(1 − a)·field + a·baseline``
(each baseline with its fold's k) and regression kriging, ``field + w · (uniform k-NN mean of the field's residuals at
the training spots)`` with z distances scaled by ``s`` (s < 1: neighbours across sections count as nearer)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_field_ceiling.py --hybrids \
        --only breast_st2016 her2st_A her2st_B her2st_C her2st_D phantom --out benchmarks/out/field_hybrids

``--only starmap`` does the same on 3D STARmap's held-out slabs with the members of the ``reconstruct fit`` runs that
``bench_field_cells.py`` left (``--cells-runs``: its ``--out`` folders; every run of a fold, e.g. ``--z-slabs`` 11 and
22, `select` and `pair`, pooled), the baselines from those runs' results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_field import (  # noqa: E402
    REAL_GENES,
    REAL_STACKS,
    STARMAP_FOLDS,
    inner_folds,
    leave_out,
    log_norm,
    per_gene_scores,
    read_real_stack,
    starmap_stack,
)
from bench_field_select import phantom_input  # noqa: E402

from voxelome.evaluate.field_baselines import baseline_predict, knn_3d  # noqa: E402
from voxelome.infer.field_export import FittedField  # noqa: E402

PAIR_MEMBERS = ("pair0", "pair1", "pair0_seed1", "pair1_seed1")  # --settings pair × 2 seeds (the default)
BLEND_A = (0.1, 0.2, 0.3, 0.5)
KRIGING_GRID = [(s, k, w) for s in (1.0, 0.25) for k in (5, 10, 20, 40, 80) for w in (0.25, 0.5, 0.75, 1.0)]


def mean_measured(runs, genes, *point_sets) -> list[np.ndarray]:
    """The mean over fitted fields ``runs`` of their measured-spot predictions ``(n, len(genes))`` at each of
    ``point_sets`` (µm), columns in the order of ``genes``; each field is loaded once."""
    sums = [0.0] * len(point_sets)
    for run in runs:
        field = FittedField.load(run)
        col = {g: k for k, g in enumerate(field.genes)}
        cols = [col[str(g)] for g in genes]
        for i, xyz in enumerate(point_sets):
            sums[i] = sums[i] + field.predict(xyz, value="measured")[:, cols]
    return [total / len(runs) for total in sums]


def measured(run: Path, xyz: np.ndarray, genes) -> np.ndarray:
    """A fitted field's measured-spot prediction ``(n, len(genes))`` at ``xyz`` µm, columns in the order of ``genes``."""
    return mean_measured([run], genes, xyz)[0]


def fold_runs(runs: Path, fold: str) -> dict[str, Path]:
    """Finished fits (a ``checkpoint`` and a ``config.yaml``) of one fold, by folder name; the selection's short fits
    are left out (they were fitted on fewer sections)."""
    found = {}
    for parent in sorted(runs.glob(f"runs/*/{fold}")):
        for run in sorted(parent.iterdir()):
            if run.name != "selection" and run.name not in found and (run / "config.yaml").exists() \
                    and any(run.glob("*.pt")):
                found[run.name] = run
    return found


def baseline_rows(runs: Path, name: str) -> dict:
    """Per-fold rows of the bench_field_select run (baselines with their k chosen as in its table; the ``--pair``
    run's rows when there is one, for ``pair_x2``)."""
    found = []
    for f in sorted(runs.glob("results_*.json")):
        d = json.loads(f.read_text())
        if name in d and "folds" in d[name]:
            found.append({row["held_out"]: row for row in d[name]["folds"]})
    if not found:
        raise SystemExit(f"no bench_field_select results for {name} in {runs}")
    return max(found, key=lambda rows: sum("pair_x2" in r for r in rows.values()))


def best_subset(preds: dict, truth: np.ndarray, max_members: int) -> dict:
    """Scores of the best single field, the mean of all and the best mean of ≤ ``max_members`` fields (on ``truth``).

    Identical predictions (select's choice is often one of the pair) count once: a copy would only weigh a member twice.
    """
    unique = {}
    for k, v in preds.items():
        if not any(np.array_equal(v, u) for u in unique.values()):
            unique[k] = v
    best_sub, best_r = None, -np.inf
    for m in range(1, min(max_members, len(unique)) + 1):
        for sub in itertools.combinations(unique, m):
            r = per_gene_scores(sum(unique[k] for k in sub) / m, truth)["mean_r"]
            if r > best_r:
                best_sub, best_r = sub, r
    return {"fits": len(preds), "distinct_fits": len(unique),
            "best_single": max(per_gene_scores(v, truth)["mean_r"] for v in unique.values()),
            "mean_of_all": per_gene_scores(sum(unique.values()) / len(unique), truth)["mean_r"],
            "ceiling": best_r, "ceiling_members": list(best_sub)}


def summarise(out: dict, extra=("pair_x2", "top2_x2")) -> dict:
    """Stack means and their margins over the best baseline (the one with the highest mean over the folds)."""
    folds = out["folds"]
    best_base = max(folds[0]["baselines"], key=lambda b: np.mean([f["baselines"][b] for f in folds]))
    out["best_baseline"] = best_base
    out["mean_best_baseline"] = float(np.mean([f["baselines"][best_base] for f in folds]))
    for key in ("best_single", "mean_of_all", "ceiling", *extra):
        if all(key in f for f in folds):
            out[f"mean_{key}"] = float(np.mean([f[key] for f in folds]))
            out[f"{key}_minus_best_baseline"] = out[f"mean_{key}"] - out["mean_best_baseline"]
    return out


def starmap_ceiling(cells_runs: list[Path], max_members: int) -> dict:
    stack = starmap_stack()
    out = {"stack": "starmap", "runs": [str(p) for p in cells_runs], "folds": []}
    for held, val in STARMAP_FOLDS.items():
        tr, te, _ = leave_out(stack, held, val)
        te_a = stack[te]
        q, truth = np.asarray(te_a.obsm["spatial_3d"], float), log_norm(te_a.X)
        preds, base, cli = {}, None, {}
        for root in cells_runs:
            for work in sorted(root.glob(f"{held}_slab*")):
                for member in sorted((work / "run" / "members").iterdir()):
                    preds[f"{root.name}/{work.name}/{member.name}"] = measured(member, q, te_a.var_names)
            for res in sorted(root.glob("results_slab*.json")):
                for slab, run in json.loads(res.read_text())["runs"].items():
                    for row in run["folds"]:
                        if row["held_out"] == held:
                            base = {b: v["r"] for b, v in row["baselines"].items()}
                            cli[f"{root.name}/slab{slab}"] = row["field"]["r"]
        row = {"held_out": held, "baselines": base, "cli_runs": cli, **best_subset(preds, truth, max_members)}
        print(json.dumps(row), flush=True)
        out["folds"].append(row)
    return summarise(out, extra=())


def stack_folds(name: str):
    """(stack, held-out section names) as bench_field_select.py folds them."""
    if name == "phantom":
        stack, _, folds, _ = phantom_input()
        return stack, folds
    stack, names = read_real_stack(name, "numeric")
    return stack, list(inner_folds(names))


def ceiling(runs: Path, name: str, max_members: int) -> dict:
    stack, folds = stack_folds(name)
    y_all = log_norm(stack.X)
    rows = baseline_rows(runs, name)
    out = {"stack": name, "folds": []}
    for h in folds:
        sec = stack.obs["section"].to_numpy()
        tr, te = sec != h, sec == h
        top = np.argsort(-y_all[tr].mean(0), kind="stable")[:REAL_GENES]  # bench_field_select's genes
        q, truth = stack.obsm["spatial_3d"][te], y_all[te][:, top]
        preds = {k: measured(p, q, stack.var_names[top]) for k, p in fold_runs(runs, h).items()}
        row = {"held_out": h, "baselines": {b: v["r"] for b, v in rows[h]["baselines"].items()},
               **best_subset(preds, truth, max_members)}
        for tag in ("pair_x2", "top2_x2"):
            if tag in rows[h]:
                row[tag] = rows[h][tag]["r"]
        print(json.dumps(row), flush=True)
        out["folds"].append(row)
    return summarise(out)


def hybrid_row(held: str, train: tuple, xyz_te, truth, at_train, at_test, base: dict) -> dict:
    """One fold's hybrids: ``train`` = (xyz µm, section, values) of the training points; ``at_train``/``at_test`` the
    field's measured-value predictions there; ``base`` the fold's baselines ``{name: {"r", "k"}}``."""
    xyz_tr, sec_tr, y_tr = train
    resid = y_tr - at_train
    row = {"held_out": held, "baselines": {b: v["r"] for b, v in base.items()},
           "pair_x2": per_gene_scores(at_test, truth)["mean_r"], "blend": {}, "kriging": {}}
    for b, v in base.items():
        pred = baseline_predict(b, xyz_tr, sec_tr, y_tr, xyz_te, v["k"])
        for a in BLEND_A:
            row["blend"][f"{b} a={a}"] = per_gene_scores((1 - a) * at_test + a * pred, truth)["mean_r"]
    for s, k, w in KRIGING_GRID:
        scale = np.array([1.0, 1.0, s])
        smooth = knn_3d(xyz_tr * scale, resid, xyz_te * scale, k=k, weights="uniform")
        row["kriging"][f"s={s} k={k} w={w}"] = per_gene_scores(at_test + w * smooth, truth)["mean_r"]
    print(json.dumps({"held_out": held, "pair_x2": row["pair_x2"], "best_baseline": max(row["baselines"].values()),
                      "best_blend": max(row["blend"].values()), "best_kriging": max(row["kriging"].values())}),
          flush=True)
    return row


def summarise_hybrids(out: dict) -> dict:
    summarise(out, extra=("pair_x2",))
    for kind in ("blend", "kriging"):
        means = {key: float(np.mean([f[kind][key] for f in out["folds"]])) for key in out["folds"][0][kind]}
        best = max(means, key=means.get)
        out[f"best_{kind}"] = best
        out[f"{kind}_minus_best_baseline"] = means[best] - out["mean_best_baseline"]
        out[f"{kind}_minus_pair_x2"] = means[best] - out["mean_pair_x2"]
    return out


def hybrids(runs: Path, name: str) -> dict:
    """The pair field alone, blended with each baseline, and with its residuals kriged (oracle grids; see above)."""
    stack, folds = stack_folds(name)
    y_all, xyz = log_norm(stack.X), np.asarray(stack.obsm["spatial_3d"], float)
    sec = stack.obs["section"].to_numpy()
    rows = baseline_rows(runs, name)
    out = {"stack": name, "members": list(PAIR_MEMBERS), "folds": []}
    for h in folds:
        tr, te = sec != h, sec == h
        top = np.argsort(-y_all[tr].mean(0), kind="stable")[:REAL_GENES]
        genes = stack.var_names[top]
        fits = [fold_runs(runs, h)[m] for m in PAIR_MEMBERS]
        at_train, at_test = mean_measured(fits, genes, xyz[tr], xyz[te])
        out["folds"].append(hybrid_row(h, (xyz[tr], sec[tr], y_all[tr][:, top]), xyz[te], y_all[te][:, top],
                                       at_train, at_test, rows[h]["baselines"]))
    return summarise_hybrids(out)


def starmap_hybrids(pair_run: Path) -> dict:
    """The same on 3D STARmap's held-out slabs, with the 4 members of ``bench_field_cells.py``'s ``pair`` run
    (``--settings pair``, ``--z-slabs 22``; its baselines and k)."""
    stack = starmap_stack()
    res = json.loads(next(pair_run.glob("results_slab*.json")).read_text())
    base = {row["held_out"]: row["baselines"] for run in res["runs"].values() for row in run["folds"]}
    out = {"stack": "starmap", "members": str(pair_run), "folds": []}
    for held, val in STARMAP_FOLDS.items():
        tr, te, _ = leave_out(stack, held, val)
        tr_a, te_a = stack[tr], stack[te]
        xyz_tr, xyz_te = np.asarray(tr_a.obsm["spatial_3d"], float), np.asarray(te_a.obsm["spatial_3d"], float)
        members = sorted(next(pair_run.glob(f"{held}_slab*")).joinpath("run", "members").iterdir())
        at_train, at_test = mean_measured(members, te_a.var_names, xyz_tr, xyz_te)
        out["folds"].append(hybrid_row(held, (xyz_tr, tr_a.obs["section"].to_numpy(), log_norm(tr_a.X)), xyz_te,
                                       log_norm(te_a.X), at_train, at_test, base[held]))
    return summarise_hybrids(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("benchmarks/out/field_select_seeds"),
                    help="--out of a finished bench_field_select.py run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field_ceiling"))
    ap.add_argument("--only", nargs="*", default=list(REAL_STACKS), choices=(*REAL_STACKS, "phantom", "starmap"))
    ap.add_argument("--cells-runs", type=Path, nargs="*",
                    default=[Path("benchmarks/out/field_cells_seeds"), Path("benchmarks/out/field_cells_pair")],
                    help="--only starmap: --out folders of bench_field_cells.py runs")
    ap.add_argument("--max-members", type=int, default=5, help="largest subset averaged")
    ap.add_argument("--starmap-pair-run", type=Path, default=Path("benchmarks/out/field_cells_pair"),
                    help="--hybrids --only starmap: the --out of bench_field_cells.py's --settings pair run")
    ap.add_argument("--hybrids", action="store_true",
                    help="the pair field blended with each baseline / with kriged residuals (see above)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        if args.hybrids:
            res = starmap_hybrids(args.starmap_pair_run) if name == "starmap" else hybrids(args.runs, name)
            print(json.dumps({k: v for k, v in res.items() if k != "folds"}), flush=True)
            (args.out / f"hybrids_{name}.json").write_text(json.dumps(res, indent=1))
            continue
        res = (starmap_ceiling(args.cells_runs, args.max_members) if name == "starmap"
               else ceiling(args.runs, name, args.max_members))
        print(json.dumps({k: v for k, v in res.items() if k != "folds"}), flush=True)
        (args.out / f"ceiling_{name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
