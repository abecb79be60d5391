"""Choose a field's settings on held-out sections of the stack itself.

The coordinate jitter (the field's smoothing) and the likelihood that predict a stack best depend on the
data: on the registered breast/her2st stacks the best of the same candidates differed from stack to stack
(BENCHMARKS.md, "Neural transcriptomic field on the real stacks"). :func:`select_field` therefore holds out
inner sections of the user's own stack one at a time, fits every candidate on the other sections (short fits,
:data:`SELECT_BUDGET`), scores its prediction of the held-out section's spots (mean per-gene Pearson r of log1p
counts per 10k, the benchmark's score; the prediction is the expected measured value of a spot there, as where the
field is used) and keeps the candidate with the best mean over the held-out sections. End sections are never held out:
predicting them is extrapolation, another task. Scores are written to ``selection.json`` as each fit finishes, so
an interrupted selection resumes without refitting.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from voxelome.errors import VoxelomeError
from voxelome.evaluate.field_baselines import evenly_spread_inner, per_gene_scores, section_depths
from voxelome.io.atomic import atomic_path, atomic_write_json
from voxelome.train.field_trainer import fit_field, make_field_config, suggest_jitter
from voxelome.train.point_data import PointData

SELECTION_FILE = "selection.json"
SELECTION_FORMAT = "voxelome.field-selection/1"

#: Candidate settings: :class:`FieldConfig` overrides, with ``jitter_scale`` = multiples (in-plane, across
#: sections) of :func:`suggest_jitter` and ``pca`` = a low-rank output through the top ``pca`` principal axes
#: of the training values (:func:`pca_loadings`). The five real-stack candidates of ``benchmarks/bench_field.py``;
#: each was the best on at least one real stack there.
FIELD_CANDIDATES = {
    "nb, jitter ×0.5": {"likelihood": "nb", "jitter_scale": (0.5, 1.0)},
    "gaussian, jitter ×0.5": {"likelihood": "gaussian", "jitter_scale": (0.5, 1.0)},
    "gaussian, jitter ×1.5 in-plane ×6 across, no section effects": {
        "likelihood": "gaussian", "jitter_scale": (1.5, 6.0), "section_dim": 0},
    "gaussian, jitter ×2.5 in-plane ×6 across, no section effects": {
        "likelihood": "gaussian", "jitter_scale": (2.5, 6.0), "section_dim": 0},
    "gaussian, jitter ×1.5 in-plane ×6 across, no section effects, low rank (8 principal axes)": {
        "likelihood": "gaussian", "jitter_scale": (1.5, 6.0), "section_dim": 0, "pca": 8, "low_rank": "linear"},
}


def pca_loadings(data: PointData, k: int) -> np.ndarray:
    """The top ``k`` principal axes ``(k, g)`` of the points' log1p(counts per 10k) (or values): signed gene
    loadings for a ``low_rank='linear'`` field. From the ``g × g`` covariance of the sparse values, so the
    points are never densified."""
    x = data.values if sp.issparse(data.values) else sp.csr_matrix(np.asarray(data.values, np.float64))
    x = sp.csr_matrix(x, dtype=np.float64)
    if data.is_counts:
        x.data *= np.repeat(1e4 / data.library, np.diff(x.indptr))
        np.log1p(x.data, out=x.data)
    n = x.shape[0]
    mean = np.asarray(x.mean(axis=0)).ravel()
    cov = (x.T @ x).toarray() / n - np.outer(mean, mean)
    vals, vecs = np.linalg.eigh(cov)
    return np.ascontiguousarray(vecs[:, ::-1][:, :min(k, cov.shape[0])].T)


#: The candidate of ``reconstruct fit --settings robust``: on the five real stacks of BENCHMARKS.md (16 µm serial
#: sections, near-replicates) never more than 0.017 r below 3D kNN, where NB fits scored at the training median
#: library collapsed on her2st B (held-out r 0.04–0.16 against 0.2–0.3; the library field, ``model_library``, fixed
#: most of that); but its smoothing across sections loses to kNN on the phantom.
ROBUST_CANDIDATE = "gaussian, jitter ×1.5 in-plane ×6 across, no section effects"
#: ``reconstruct fit --settings pair`` (what ``auto`` fits on counts held in memory): the mean of these two
#: candidates. The best single candidate or pair on 14 triplets of her2st A, C, D and the breast layers (a section
#: predicted from its two neighbours alone); then better than ``ntf`` on all four held-out her2st patients E–H
#: (+0.009 mean r; ``benchmarks/bench_field_pairs.py``) and than ``select``'s top two on the five real stacks
#: (+0.006; ``bench_field_select.py --pair``) and the phantom's truth (+0.003) (BENCHMARKS.md).
PAIR_CANDIDATES = ("nb, jitter ×0.5",
                   "gaussian, jitter ×1.5 in-plane ×6 across, no section effects, low rank (8 principal axes)")


def candidate_overrides(data: PointData, candidate: dict) -> dict:
    """A candidate's :class:`FieldConfig` overrides for this stack: ``jitter_scale`` turned into ``jitter_um``
    (µm, from :func:`suggest_jitter`); ``pca`` dropped (pass ``loadings=pca_loadings(data, k)`` to the fit)."""
    cand = dict(candidate)
    cand.pop("pca", None)
    sx, sz = cand.pop("jitter_scale", (1.0, 1.0))
    jx, jy, jz = suggest_jitter(data)
    return {**cand, "jitter_um": (jx * sx, jy * sx, jz * sz)}


def candidate_config(data: PointData, candidate: dict, preset: str = "cpu", **overrides):
    """The :class:`FieldConfig` of one candidate: ``preset`` + ``overrides`` + the candidate's settings."""
    return make_field_config(preset, **{**overrides, **candidate_overrides(data, candidate)})


def split_section(data: PointData, code: int) -> tuple[PointData, PointData]:
    """``(the stack without section code, that section alone)``; both keep every section name and code."""
    return split_sections(data, [code])


def split_sections(data: PointData, codes) -> tuple[PointData, PointData]:
    """``(the stack without the sections codes, those sections)``; both keep every section name and code."""
    if not isinstance(data.values, (np.ndarray, sp.spmatrix, sp.sparray)):
        raise VoxelomeError("choosing settings on held-out sections needs the stack in memory (an .h5ad), not a "
                            "point store; choose them on a subsample written to .h5ad, then fit the store.")
    held = np.isin(data.section, list(codes))
    return tuple(PointData(data.xyz_um[keep], data.section[keep], list(data.section_names), list(data.genes),
                           data.values[keep], data.library[keep], data.is_counts, data.z_slab_um)
                 for keep in (~held, held))


def held_out_truth(part: PointData, target_sum: float = 1e4) -> np.ndarray:
    """What a prediction of ``part`` is scored against: log1p(counts per ``target_sum``) (counts) or the values,
    ``(n, g)``."""
    y = part.rows(np.arange(len(part))).astype(np.float64)
    return np.log1p(y / part.library[:, None] * target_sum) if part.is_counts else y


def inner_sections(data: PointData, max_sections: int) -> list[int]:
    """Codes of up to ``max_sections`` inner sections (never the first or last by median z), evenly spread."""
    order = list(section_depths(data.xyz_um, data.section))
    if len(order) < 3:
        raise VoxelomeError(f"choosing settings needs ≥ 3 sections (a held-out inner section between two others); "
                            f"the stack has {len(order)}. Fit with fixed settings (no select) instead.")
    return [int(c) for c in evenly_spread_inner(order, max_sections)]


#: iterations × batch size of the comparison fits at most (the real-stack benchmark's budget, now also the ``cpu``
#: preset's): complete schedules rank the candidates, and the chosen ones are fitted with the same schedule
#: (:func:`with_budget`), the one that was validated, whatever longer one the preset or ``--set`` asks for
SELECT_BUDGET = (400, 2048)


def with_budget(config, budget):
    """``config`` with its iterations and batch size capped at ``budget = (iterations, batch_size)`` (None: as is)."""
    if budget is None:
        return config
    return dataclasses.replace(config, iterations=min(config.iterations, int(budget[0])),
                               batch_size=min(config.batch_size, int(budget[1])))


def select_field(data: PointData, work_dir, *, candidates: dict | None = None, preset: str = "cpu",
                 max_validation_sections: int = 2, budget: tuple[int, int] | None = SELECT_BUDGET,
                 progress: bool = True, **overrides) -> dict:
    """Fit every candidate with each held-out inner section left out; keep the best mean r.

    Parameters
    ----------
    data : PointData
        The whole stack (≥ 3 sections, in memory).
    work_dir : path
        Folder for ``selection.json`` (every score; re-read to resume) and the temporary fits.
    candidates : dict, optional
        Name → overrides (see :data:`FIELD_CANDIDATES`, the default). Likelihoods for counts are skipped
        when the values are not counts.
    preset, **overrides
        The rest of the configuration, shared by every candidate (e.g. ``iterations=400``).
    max_validation_sections : int
        Inner sections held out in turn (evenly spread); each costs one fit per candidate.
    budget : (int, int) or None
        Caps on the comparison fits' iterations and batch size (``None``: the configuration's own).
    progress : bool
        A progress bar over the fits.

    Returns
    -------
    dict
        ``best`` (name), ``overrides`` (its FieldConfig overrides, jitter in µm), ``pca`` (the low-rank
        output's principal axes, 0 = none: fit with ``loadings=pca_loadings(data, pca)``), ``ranking`` (every
        candidate, best mean r first), ``settings`` (name → {``overrides``, ``pca``} for each), ``scores``
        (name → {section: mean r}), ``mean_r`` (name → mean over the held-out sections), ``pair_mean_r``
        (every two candidates' averaged prediction: ``{"members": [a, b], "mean_r": …}``), ``top2_mean_r``
        (that of the two best), ``validation_sections`` (names), ``budget`` (the comparison fits' caps: fit the
        chosen candidates with :func:`with_budget` to fit what was validated).
    """
    cands = dict(FIELD_CANDIDATES if candidates is None else candidates)
    if not data.is_counts:
        cands = {k: v for k, v in cands.items() if v.get("likelihood", "nb") == "gaussian"}
    if not cands:
        raise VoxelomeError("no candidate settings to compare (count likelihoods need raw counts); pass candidates "
                            "with likelihood='gaussian'.")
    if not isinstance(max_validation_sections, int) or max_validation_sections < 1:
        raise VoxelomeError(f"max_validation_sections={max_validation_sections!r} must be a positive integer.")
    held = inner_sections(data, max_validation_sections)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    record = {"format": SELECTION_FORMAT, "preset": preset, "overrides": _jsonable(overrides),
              "budget": None if budget is None else [int(b) for b in budget],
              "candidates": _jsonable(cands), "validation_sections": [data.section_names[c] for c in held],
              "scores": {}}
    path = work / SELECTION_FILE
    if path.exists():  # resume: keep the scores of the same comparison
        old = json.loads(path.read_text())
        if all(old.get(k) == record[k] for k in ("format", "preset", "overrides", "budget", "candidates",
                                                 "validation_sections")):
            record["scores"] = old.get("scores", {})
            if "pair_mean_r" in old:
                record["pair_mean_r"] = old["pair_mean_r"]
    preds_dir = work / "predictions"  # held-out predictions, kept until the pairs are scored

    def pred_path(name, code):
        return preds_dir / f"{list(cands).index(name)}-{code}.npy"

    pairs_done = "pair_mean_r" in record
    todo = [(n, c) for n in cands for c in held if data.section_names[c] not in record["scores"].get(n, {})
            or not (pairs_done or pred_path(n, c).exists())]
    from voxelome.infer.field_export import FittedField

    bar = tqdm(total=len(cands) * len(held), initial=len(cands) * len(held) - len(todo), desc="choose field settings",
               disable=not progress)
    for name, code in todo:
        train, test = split_section(data, code)
        run = work / "fits" / "current"
        shutil.rmtree(run, ignore_errors=True)
        k = cands[name].get("pca", 0)
        config = candidate_config(train, cands[name], preset, **overrides)
        fit_field(train, with_budget(config, budget), run, resume=False, progress=False,
                  loadings=pca_loadings(train, k) if k else None)
        # the expected measured value of a spot there (count fields: at the library their library field predicts,
        # else the training median): the held-out spots' own depths are not known where the field is used
        pred = FittedField.load(run).predict(test.xyz_um, value="measured")
        r = per_gene_scores(pred, held_out_truth(test))["mean_r"]
        with atomic_path(pred_path(name, code)) as tmp, open(tmp, "wb") as fh:  # a killed run leaves no torn file
            np.save(fh, pred)
        record["scores"].setdefault(name, {})[data.section_names[code]] = float(r)
        atomic_write_json(path, record, indent=1)
        bar.update()
    bar.close()
    shutil.rmtree(work / "fits", ignore_errors=True)
    if not pairs_done:  # the mean of every two candidates, scored on the same held-out spots
        names, pair_r = list(cands), []
        truths = {c: held_out_truth(split_section(data, c)[1]) for c in held}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                r = [per_gene_scores((np.load(pred_path(a, c)) + np.load(pred_path(b, c))) / 2, truths[c])["mean_r"]
                     for c in held]
                pair_r.append({"members": [a, b], "mean_r": float(np.nanmean(r))})
        record["pair_mean_r"] = pair_r
        atomic_write_json(path, record, indent=1)
    shutil.rmtree(preds_dir, ignore_errors=True)
    mean = {n: float(np.nanmean([record["scores"][n][data.section_names[c]] for c in held])) for n in cands}
    # best mean r first; NaN (a candidate that failed on every section) last; ties keep the candidates' order
    ranking = sorted(cands, key=lambda n: (-np.nan_to_num(mean[n], nan=-np.inf), list(cands).index(n)))
    best = ranking[0]
    chosen = candidate_config(data, cands[best], preset, **overrides)
    record.update(mean_r=mean, best=best, ranking=ranking,
                  chosen_config={k: getattr(chosen, k) for k in ("likelihood", "jitter_um", "section_dim")})
    atomic_write_json(path, _jsonable(record), indent=1)
    settings = {n: {"overrides": candidate_overrides(data, cands[n]), "pca": int(cands[n].get("pca", 0))}
                for n in ranking}
    top_pair = next(p["mean_r"] for p in record["pair_mean_r"] if set(p["members"]) == set(ranking[:2])) \
        if len(ranking) > 1 else float("nan")
    return {"best": best, **settings[best], "ranking": ranking, "settings": settings, "scores": record["scores"],
            "mean_r": mean, "top2_mean_r": top_pair, "pair_mean_r": record["pair_mean_r"],
            "validation_sections": record["validation_sections"], "budget": record["budget"]}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else list(o)))
