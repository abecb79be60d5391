"""How well a field predicts a section it never saw, beside the baselines it must beat (``reconstruct evaluate``).

The benchmark's protocol (BENCHMARKS.md, "Neural transcriptomic field") on a user's own stack: a section is held
out, the field is fitted on the others exactly as ``reconstruct fit`` fits it, and the held-out section's spots are
predicted (``value="measured"``: the expected measured log1p value of a spot) and scored per gene (Pearson r over
spots, RMSE) against their measured log1p(counts per 10k). The baselines — nearest section, linear interpolation
between the neighbouring sections, 3D kNN — are scored on the same spots, each with its ``k`` chosen on inner
*training* sections (never on the held-out one).

This module holds the scoring and the report (its figure: :func:`voxelome.plot.stack_figures.field_holdout`); the
CLI (:mod:`voxelome.cli_field_evaluate`) fits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError, did_you_mean
from voxelome.evaluate.field_baselines import (
    BASELINE_KS,
    baseline_predict,
    choose_k,
    evenly_spread_inner,
    per_gene_scores,
    section_depths,
)

#: plain names of the baselines, for the report and the figure
BASELINE_LABELS = {"nearest_section": "nearest section", "linear_interp": "linear interpolation",
                   "knn_3d": "3D kNN"}


def choose_held_out(depths: dict[str, float], requested: list[str] | None, max_sections: int) -> list[str]:
    """The sections to hold out: ``requested`` (checked), else up to ``max_sections`` inner ones, evenly spread.

    Inner sections (never the first or last in z) test interpolation; a requested outer section tests extrapolation.
    """
    order = list(depths)
    if len(order) < 3:
        raise VoxelomeError(f"evaluating a field needs ≥ 3 sections (one held out, ≥ 2 to fit on); the stack has "
                            f"{len(order)} ({', '.join(order)}).")
    if requested:
        for name in requested:
            if name not in depths:
                raise VoxelomeError(f"--held-out {name!r} is not a section of the stack ({', '.join(order)})."
                                    f"{did_you_mean(name, order)}")
        if len(set(requested)) != len(requested):
            raise VoxelomeError(f"--held-out names a section twice: {requested}.")
        return list(requested)
    if max_sections < 1:
        raise VoxelomeError(f"--max-sections {max_sections} must be ≥ 1 (each held-out section costs one fit).")
    return evenly_spread_inner(order, max_sections)


def baseline_scores(train_xyz, train_section, train_y, test_xyz, test_y) -> dict:
    """Every baseline's scores on the test spots, its ``k`` chosen on inner training sections.

    Validation: up to two inner training sections (evenly spread), each predicted from the other training sections;
    with fewer than three training sections there is none, and each baseline keeps the middle of its grid.

    Returns
    -------
    dict
        ``{baseline: {"r", "rmse", "k", "val_r", "r_per_gene"}}`` (``val_r`` None without validation).
    """
    train_xyz, train_section = np.asarray(train_xyz, float), np.asarray(train_section)
    inner = evenly_spread_inner(list(section_depths(train_xyz, train_section)), 2)
    val_sets = [(train_section == s, train_y[train_section == s]) for s in inner]
    out = {}
    for name, grid in BASELINE_KS.items():
        k, val_r = choose_k(name, train_xyz, train_section, train_y, val_sets) if val_sets else (grid[len(grid) // 2],
                                                                                                 None)
        s = per_gene_scores(baseline_predict(name, train_xyz, train_section, train_y, test_xyz, k), test_y)
        out[name] = {"r": s["mean_r"], "rmse": s["mean_rmse"], "k": int(k), "val_r": val_r,
                     "validation_sections": inner, "r_per_gene": s["r"]}
    return out


def score_section(name: str, depths: dict, genes: list[str], field_pred: np.ndarray, test_y: np.ndarray,
                  baselines: dict) -> dict:
    """One held-out section's row of the report (per-gene arrays kept under ``*_per_gene`` for the gene table)."""
    s = per_gene_scores(field_pred, test_y)
    best = max(baselines, key=lambda b: baselines[b]["r"])
    order = list(depths)
    return {"section": name, "z_um": depths[name], "outer": name in (order[0], order[-1]), "n_spots": len(test_y),
            "n_genes": len(genes), "field": {"r": s["mean_r"], "rmse": s["mean_rmse"]},
            "baselines": {b: {k: v for k, v in d.items() if k != "r_per_gene"} for b, d in baselines.items()},
            "best_baseline": best, "field_minus_best_baseline": s["mean_r"] - baselines[best]["r"],
            "field_r_per_gene": s["r"], "baseline_r_per_gene": {b: d["r_per_gene"] for b, d in baselines.items()},
            "genes": list(genes)}


def summarise(rows: list[dict]) -> dict:
    """Means over the held-out sections and a one-line reading of them."""
    mean_field = float(np.mean([r["field"]["r"] for r in rows]))
    means = {b: float(np.mean([r["baselines"][b]["r"] for r in rows])) for b in BASELINE_KS}
    best = max(means, key=means.get)
    margin = mean_field - means[best]
    ahead = sum(r["field_minus_best_baseline"] > 0 for r in rows)
    verdict = (f"the field predicts the held-out sections {'better' if margin > 0 else 'worse'} than the best "
               f"baseline ({BASELINE_LABELS[best]}) by {margin:+.3f} mean per-gene r, ahead on {ahead} of "
               f"{len(rows)} sections")
    return {"mean_field_r": mean_field, "mean_baseline_r": means, "best_baseline": best,
            "field_minus_best_baseline": margin, "sections_field_ahead": int(ahead), "verdict": verdict}


def write_report(out_dir: Path, rows: list[dict], meta: dict) -> dict:
    """``report.json`` (per section and means), ``per_gene.csv`` and ``evaluate.png`` in ``out_dir``; the report."""
    import pandas as pd

    from voxelome.io.atomic import atomic_path
    from voxelome.plot.stack_figures import field_holdout

    report = {**meta, "sections": [{k: v for k, v in r.items() if not k.endswith("_per_gene") and k != "genes"}
                                   for r in rows], **summarise(rows)}
    with atomic_path(out_dir / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    table = pd.concat([pd.DataFrame({"section": r["section"], "gene": r["genes"], "field_r": r["field_r_per_gene"],
                                     **{f"{b}_r": v for b, v in r["baseline_r_per_gene"].items()}}) for r in rows])
    with atomic_path(out_dir / "per_gene.csv") as tmp:
        table.to_csv(tmp, index=False)
    field_holdout(rows, BASELINE_LABELS, out_dir / "evaluate.png")
    return report
