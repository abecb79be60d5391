"""``reconstruct fit --select`` (``voxelome.train.field_selection.select_field``) on the registered real stacks.

What a user of the CLI gets, leave-one-inner-section-out on the breast / her2st A–D ``icp`` stacks (the same
stacks, folds, 100 genes, spot QC and scores as ``bench_field.py --only real_stacks``), three ways in one run:

- **ntf**: ``reconstruct fit --settings ntf`` (NB, jitter = ``suggest_jitter``, section effects; the CLI's default
  until this benchmark's first run, reported as "default" in that run's log);
- **robust**: ``--settings robust``, the CLI default since (the ``ROBUST_CANDIDATE``: Gaussian on log1p, jitter
  1.5× in-plane / 6× across, no section effects), one fit;
- **select**: ``--settings select``: ``select_field`` on the fold's training sections (it holds out up to 2 of their
  inner sections, evenly spread, fits its 5 candidates on the rest and keeps the best mean r), then the final fit;
- **top2**: the mean of the predictions of select's choice and the runner-up (``second``; the top-2 ensemble
  declared before ``bench_field.py``'s fifth-session run), both fitted on the fold's training sections;
- **val_guided**: top2 where the two best averaged beat the best alone on the validation sections themselves
  (``select_field``'s ``top2_mean_r``), else select;
- the section-interpolation and 3D kNN baselines, their k chosen on the **same** held-out sections.

``--only phantom`` runs the same on ``bench_field.py``'s simulated Visium phantom stack (its three held-out
sections; r also against the true expression, the field's denoised value). Every field uses preset ``cpu`` with 400 iterations × 2,048 points (``bench_field.py``'s real-stack budget); the
test section is used only for the scores. ``--final-schedule long`` fits select's choice and its runner-up (so
top2) with 1,500 × 4,096 points instead, the ``cpu`` preset's schedule before the ninth session, which
``reconstruct fit`` used for them until then; with the ``--out`` of an earlier run the selections and the other
fits are reused.

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
    PHANTOM_FOLDS,
    REAL_GENES,
    REAL_STACKS,
    baselines,
    inner_folds,
    log_norm,
    per_gene_scores,
    phantom_stack,
    read_real_stack,
)

from voxelome.infer.field_export import FittedField  # noqa: E402
from voxelome.datasets import make_lung_phantom  # noqa: E402
from voxelome.errors import VoxelomeError  # noqa: E402
from voxelome.train.field_selection import (  # noqa: E402
    FIELD_CANDIDATES,
    PAIR_CANDIDATES,
    ROBUST_CANDIDATE,
    candidate_overrides,
    inner_sections,
    pca_loadings,
    select_field,
)
from voxelome.train.field_trainer import fit_field, make_field_config, suggest_jitter  # noqa: E402
from voxelome.train.point_data import PointData  # noqa: E402

BUDGET = {"iterations": 400, "batch_size": 2048}
#: fit folders of select's candidates by validation rank (rank 0 = select's choice)
RANK_TAGS = ("select", "second", "third", "fourth", "fifth")
#: the ``cpu`` preset's schedule until the ninth session (then 400 × 2,048 too)
LONG_SCHEDULE = {"iterations": 1500, "batch_size": 4096}


def final_fit(data, run: Path, overrides: dict, loadings=None) -> FittedField:
    """Fit (or, when a finished fit of the same settings is there, reuse: fits are deterministic)."""
    config = make_field_config("cpu", **overrides)
    try:
        fit_field(data, config, run, resume=True, progress=False, loadings=loadings)
    except VoxelomeError:  # another configuration in that folder
        shutil.rmtree(run, ignore_errors=True)
        fit_field(data, config, run, resume=False, progress=False, loadings=loadings)
    return FittedField.load(run)


def phantom_input():
    """The simulated Visium phantom stack of ``bench_field.py``'s phantom rows (12 axial sections 40 µm apart, 60
    genes), its three held-out sections and the true log1p expression of every spot."""
    ph = make_lung_phantom("small", seed=0, n_genes=60)
    stack = phantom_stack(ph, list(range(2, 47, 4)))
    stack.obs["section"] = stack.obs["section"].astype(str)
    loadings = np.asarray(stack.varm["signature_loadings_true"]).T
    truth = np.log1p(1e4 * np.asarray(stack.obsm["signatures_true"]) @ loadings)
    return stack, sorted(set(stack.obs["section"])), list(PHANTOM_FOLDS), truth


def stack_folds(out: Path, name: str, max_folds=None, final_schedule: str = "compared", seeds: int = 1,
                skip=(), order: str = "numeric", n_top: int = 2, best_pair_rule: bool = False,
                pair_rule: bool = False) -> dict:
    t0 = time.perf_counter()
    if name == "phantom":
        stack, names, held_out, truth_all = phantom_input()
    else:
        (stack, names), truth_all = read_real_stack(name, order), None
        held_out = list(inner_folds(names))
    y_all = log_norm(stack.X)
    res = {"stack": name, "sections": names, "order": order, "folds": []}
    for h in held_out[:max_folds]:
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
        targets = {"test": truth, **({} if truth_all is None else {"truth": truth_all[te][:, top]})}
        base_all = baselines(tr_a.obsm["spatial_3d"], tr_sec, y_all[tr][:, top], qxyz, targets, val_sets)
        base = base_all["test"]
        row = {"held_out": h, "validation": val_names, "baselines": base, "selection": chosen}
        if truth_all is not None:
            row["baselines_vs_truth"] = base_all["truth"]
        # the final fits of select and its runner-up: with the schedule the candidates were compared at, or longer
        final = BUDGET if final_schedule == "compared" else LONG_SCHEDULE
        suffix = "" if final_schedule == "compared" else "_long"
        fields = {"select": ("select" + suffix, {**final, **chosen["overrides"]}),
                  "ntf": ("default", {**BUDGET, "likelihood": "nb", "jitter_um": suggest_jitter(data)}),
                  "robust": ("robust", {**BUDGET, **candidate_overrides(data, FIELD_CANDIDATES[ROBUST_CANDIDATE])})}
        # select's candidates by rank: 0 and 1 always (top2), 2 with --top 3, the best validation pair's with --best-pair
        best_pair = max(chosen["pair_mean_r"], key=lambda p: p["mean_r"])["members"]
        ranks = {0, 1} | ({2} if n_top >= 3 else set()) | \
            ({chosen["ranking"].index(m) for m in best_pair} if best_pair_rule else set())
        settings_of = {RANK_TAGS[k]: chosen["settings"][chosen["ranking"][k]] for k in sorted(ranks)}
        for tag, cand in settings_of.items():
            if tag != "select":  # select's own fit is the entry above (its overrides are chosen["overrides"])
                fields[tag] = (tag + suffix, {**final, **cand["overrides"]})
        if pair_rule:  # --settings pair's two fixed candidates (the two-section default), whatever select ranked
            for k, cand_name in enumerate(PAIR_CANDIDATES):  # not `name`: that is the stack's, used for `work`
                settings_of[f"pair{k}"] = {"overrides": candidate_overrides(data, FIELD_CANDIDATES[cand_name]),
                                           "pca": int(FIELD_CANDIDATES[cand_name].get("pca", 0))}
                fields[f"pair{k}"] = (f"pair{k}", {**BUDGET, **settings_of[f"pair{k}"]["overrides"]})
        for extra in range(1, seeds):  # the same settings fitted again with other seeds (--seeds)
            for t in settings_of:
                fields[f"{t}_seed{extra}"] = (f"{t}{suffix}_seed{extra}", {**fields[t][1], "seed": extra})
        for tag in skip:
            fields.pop(tag)
        preds = {}
        for tag, (folder, overrides) in fields.items():
            rank_tag = tag.split("_seed")[0]
            pca = settings_of[rank_tag]["pca"] if rank_tag in settings_of else 0
            field = final_fit(data, work / folder, overrides, pca_loadings(data, pca) if pca else None)
            preds[tag] = (field.predict(qxyz, value="measured"), field.predict(qxyz))
        # top2 (declared before bench_field.py's fifth-session run): the mean of the two best validation candidates
        preds["top2"] = tuple((a + b) / 2 for a, b in zip(preds["select"], preds["second"]))
        if seeds > 1:
            # declared in the eleventh session before this run (a pilot on the first folds' validation sections: two
            # seeds of one candidate gained +0.001 to +0.006 r there, four up to +0.010): the top 2 candidates, each fitted with `seeds` seeds, averaged;
            # and select's choice alone with its seeds (what --ensemble 1 would give)
            members = ["select", "second"] + [f"{t}_seed{k}" for k in range(1, seeds) for t in ("select", "second")]
            preds[f"top2_x{seeds}"] = tuple(sum(preds[m][i] for m in members) / len(members) for i in range(2))
            if n_top >= 3:
                # declared in the twelfth session before this run: the top 3 candidates × `seeds` seeds, averaged
                # (`reconstruct fit --ensemble 3`); adopted as the default only at ≥ +0.003 mean r over top2_x{seeds}
                # on the real stacks and not lower by > 0.005 against the phantom's truth
                trio = members + ["third"] + [f"third_seed{k}" for k in range(1, seeds)]
                preds[f"top3_x{seeds}"] = tuple(sum(preds[m][i] for m in trio) / len(trio) for i in range(2))
            if best_pair_rule:
                # declared in the twelfth session before this run: the two candidates whose *averaged* prediction
                # scored best on the validation sections (select_field's pair_mean_r), × `seeds` seeds; adopted as the
                # default only at ≥ +0.003 mean r over top2_x{seeds} on the real stacks and not lower by > 0.005
                # against the phantom's truth
                tags = [RANK_TAGS[chosen["ranking"].index(m)] for m in best_pair]
                duo = tags + [f"{t}_seed{k}" for k in range(1, seeds) for t in tags]
                preds[f"bestpair_x{seeds}"] = tuple(sum(preds[m][i] for m in duo) / len(duo) for i in range(2))
                row["best_pair_ranks"] = sorted(chosen["ranking"].index(m) for m in best_pair)
            if pair_rule:
                # declared in the twelfth session before this run: --settings pair (× `seeds`) on stacks where select
                # can choose; adopted there only at ≥ +0.003 mean r over top2_x{seeds} on the real stacks and not lower
                # by > 0.005 against the phantom's truth (the pair was designed on triplets of A, C, D and breast:
                # this is not an independent test on those stacks)
                duo = ["pair0", "pair1"] + [f"pair{j}_seed{k}" for k in range(1, seeds) for j in (0, 1)]
                preds[f"pair_x{seeds}"] = tuple(sum(preds[m][i] for m in duo) / len(duo) for i in range(2))
            alone = ["select"] + [f"select_seed{k}" for k in range(1, seeds)]
            preds[f"select_x{seeds}"] = tuple(sum(preds[m][i] for m in alone) / len(alone) for i in range(2))
        # val_guided (declared in the seventh session before its scores were seen): top2 where the two best averaged
        # beat the best alone on the validation sections, else the best alone
        val_best = chosen["mean_r"][chosen["best"]]
        preds["val_guided"] = preds["top2"] if chosen["top2_mean_r"] > val_best else preds["select"]
        row["second_best"] = chosen["ranking"][1]
        row["validation_r"] = {"best": val_best, "top2": chosen["top2_mean_r"]}
        for tag, (measured, rate) in preds.items():
            s = per_gene_scores(measured, truth)
            row[tag] = {"r": s["mean_r"], "rmse": s["mean_rmse"]}
            if truth_all is not None:  # the denoised expression against the simulation's truth
                row[tag]["truth_r"] = per_gene_scores(rate, targets["truth"])["mean_r"]
        row["wall_s"] = time.perf_counter() - f0
        assert h not in val_names
        print(json.dumps({"fold": h, "val": val_names, "best": chosen["best"],
                          **{t: row[t]["r"] for t in preds if "_seed" not in t},
                          "val_top2_minus_best": row["validation_r"]["top2"] - row["validation_r"]["best"], **{b: (base[b]["r"], base[b]["k"]) for b in BASELINE_KS},
                          "wall_s": round(row["wall_s"], 1)}), flush=True)
        res["folds"].append(row)
    for m in [t for t in res["folds"][0] if isinstance(res["folds"][0][t], dict) and "r" in res["folds"][0][t]]:
        res[f"mean_r_{m}"] = float(np.mean([f[m]["r"] for f in res["folds"]]))
        if truth_all is not None:
            res[f"mean_truth_r_{m}"] = float(np.mean([f[m]["truth_r"] for f in res["folds"]]))
    if truth_all is not None:
        for b in BASELINE_KS:
            res[f"mean_truth_r_{b}"] = float(np.mean([f["baselines_vs_truth"][b]["r"] for f in res["folds"]]))
    for b in BASELINE_KS:
        res[f"mean_r_{b}"] = float(np.mean([f["baselines"][b]["r"] for f in res["folds"]]))
    res["best_baseline"] = max(BASELINE_KS, key=lambda b: res[f"mean_r_{b}"])
    res["select_minus_best_baseline"] = res["mean_r_select"] - res[f"mean_r_{res['best_baseline']}"]
    for m in ("robust", "top2", f"top2_x{seeds}", f"top3_x{seeds}", f"bestpair_x{seeds}", f"pair_x{seeds}",
              f"select_x{seeds}"):
        if f"mean_r_{m}" in res:
            res[f"{m}_minus_best_baseline"] = res[f"mean_r_{m}"] - res[f"mean_r_{res['best_baseline']}"]
    res["wall_s"] = time.perf_counter() - t0
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field_select"))
    ap.add_argument("--only", nargs="*", default=list(REAL_STACKS), choices=(*REAL_STACKS, "phantom"))
    ap.add_argument("--max-folds", type=int, default=None)
    ap.add_argument("--final-schedule", choices=("compared", "long"), default="compared",
                    help="final fits of select / second (top2): the comparison schedule (400 × 2,048), or 1,500 × "
                         "4,096 (the cpu preset's before the ninth session); results_<stacks>_long.json")
    ap.add_argument("--seeds", type=int, default=1,
                    help="also fit select's choice and its runner-up with seeds 1 … N−1 and score their averages "
                         "(top2_xN: all 2N fields; select_xN: the N of select's choice)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("ntf", "robust"),
                    help="leave out these single-setting fits (fewer fits when only the ensembles are compared)")
    ap.add_argument("--order", choices=("numeric", "suggested"), default="numeric",
                    help="section order of the real stacks: numeric, or the expression-suggested order where "
                         "check_section_order flags the numeric one (her2st B); results_<stacks>_order.json")
    ap.add_argument("--top", type=int, choices=(2, 3), default=2,
                    help="3: also fit select's third candidate (with --seeds) and score top3_xN; results_*_top3.json")
    ap.add_argument("--best-pair", action="store_true",
                    help="also fit the best validation pair's candidates (with --seeds) and score bestpair_xN; "
                         "results_*_bestpair.json")
    ap.add_argument("--pair", action="store_true",
                    help="also fit --settings pair's two candidates (with --seeds) and score pair_xN; results_*_pair.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
               "budget": BUDGET, "final_schedule": args.final_schedule, "inner_sections_rule": inner_sections.__doc__.split("\n")[0]}
    for name in args.only:
        results[name] = stack_folds(args.out, name, args.max_folds, args.final_schedule, args.seeds, args.skip,
                                    args.order, args.top, args.best_pair, args.pair)
        print(json.dumps({k: v for k, v in results[name].items() if k != "folds"}), flush=True)
        tag = ("" if args.final_schedule == "compared" else "_long") + (f"_seeds{args.seeds}" if args.seeds > 1 else "")
        tag += ("_order" if args.order == "suggested" else "") + ("_top3" if args.top == 3 else "")
        tag += ("_bestpair" if args.best_pair else "") + ("_pair" if args.pair else "")
        (args.out / f"results_{'_'.join(args.only)}{tag}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
