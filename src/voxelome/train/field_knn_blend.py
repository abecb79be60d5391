"""Choose how much 3D kNN of the measured points to average into a fitted ensemble, on held-out inner sections.

The rule (declared before it was run on the benchmark stacks; BENCHMARKS.md, fourteenth session): up to two inner
sections (evenly spread; never the first or last) are held out **together**; every configuration of the ensemble
is fitted once (its first seed) on the other sections; the mean of their predictions of the held-out points'
measured values is averaged with 3D kNN of the other sections' points (inverse-distance weights, ``k`` chosen among
:data:`~voxelome.evaluate.field_baselines.K_3D` on the same held-out points) with a weight ``a`` in
:data:`BLEND_WEIGHTS`, and the ``a`` with the best mean per-gene r is kept (ties: the smaller). On the benchmark
stacks it kept 0 on breast, her2st A, C, D and the phantom, where the field is clearly ahead of kNN, and 0.5 on
every 3D STARmap fold, where the two tie.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.evaluate.field_baselines import K_3D, knn_3d, per_gene_scores
from voxelome.infer.field_knn import MAX_STORED_VALUES, distance_floor_um, remove_blend, write_blend
from voxelome.train.field_selection import held_out_truth, inner_sections, pca_loadings, split_sections

#: kNN weights compared (0 = the fields alone)
BLEND_WEIGHTS = (0.0, 0.25, 0.5)


def choose_knn_blend(data, specs, run_dir, *, max_validation_sections: int = 2, resume: bool = True,
                     log: Callable[[str], None] = print) -> dict:
    """Choose the kNN weight of an ensemble run on held-out inner sections and record it in ``run_dir``.

    Parameters
    ----------
    data : PointData
        The whole stack, in memory (≥ 3 sections).
    specs : list of MemberSpec
        The ensemble's configurations (:mod:`voxelome.train.field_members`); each is fitted once, without the
        held-out sections, into ``run_dir/knn_blend/<folder>`` (kept until the choice is recorded, so an
        interrupted choice resumes).
    run_dir : path
        The ensemble's run folder: ``knn_blend.json`` (always) and ``knn_points.npz`` (weight > 0) go there.
    max_validation_sections : int
        Inner sections held out (together).
    resume : bool
        Continue the validation fits from their ``last.pt``.
    log : callable
        Where the progress lines go.

    Returns
    -------
    dict
        What ``knn_blend.json`` records: ``weight``, ``k``, ``validation_sections``, ``mean_r`` (weight → mean
        r on the held-out points), ``mean_r_knn`` (kNN alone), ``reason`` when no blend was considered.
    """
    from voxelome.infer.field_export import FittedField
    from voxelome.train.field_trainer import fit_field

    run = Path(run_dir)
    remove_blend(run)
    if len(data) * data.n_genes > MAX_STORED_VALUES:
        record = {"weight": 0.0, "k": None, "reason": f"{len(data)} points × {data.n_genes} genes is more than "
                  f"{MAX_STORED_VALUES:,} values: kNN would carry the data in the run"}
        write_blend(run, record)
        return record
    held = inner_sections(data, max_validation_sections)
    names = [data.section_names[c] for c in held]
    train, test = split_sections(data, held)
    target_sum = specs[0].config.target_sum
    truth = held_out_truth(test, target_sum)
    work = run / "knn_blend"
    pred = np.zeros(truth.shape)
    for spec in specs:
        loadings = None if spec.loadings is None else pca_loadings(train, int(np.shape(spec.loadings)[0]))
        log(f"kNN blend: {spec.name} without {', '.join(names)} → {work / spec.folder}")
        try:
            fit_field(train, spec.config, work / spec.folder, loadings=loadings, resume=resume, progress=True)
        except VoxelomeError:  # an interrupted choice for other settings left its fit there
            shutil.rmtree(work / spec.folder, ignore_errors=True)
            fit_field(train, spec.config, work / spec.folder, loadings=loadings, resume=False, progress=True)
        pred += FittedField.load(work / spec.folder).predict(test.xyz_um, value="measured") / len(specs)
    values = held_out_truth(train, target_sum)
    knn_by_k = {k: knn_3d(train.xyz_um, values, test.xyz_um, k=k) for k in K_3D}
    knn_r = {k: per_gene_scores(p, truth)["mean_r"] for k, p in knn_by_k.items()}
    k = max(knn_r, key=knn_r.get)
    knn = knn_by_k[k]
    mean_r = {a: per_gene_scores((1 - a) * pred + a * knn, truth)["mean_r"] for a in BLEND_WEIGHTS}
    weight = max(BLEND_WEIGHTS, key=lambda a: (mean_r[a], -a))
    record = {"weight": weight, "k": int(k), "validation_sections": names,
              "mean_r": {str(a): r for a, r in mean_r.items()}, "mean_r_knn": knn_r[k],
              "rule": "kNN weight with the best mean r on held-out inner sections (fields fitted without them)"}
    if weight:
        record["distance_floor_um"] = distance_floor_um(data.xyz_um)
        write_blend(run, record, data.xyz_um, held_out_truth(data, target_sum))
    else:
        write_blend(run, record)
    shutil.rmtree(work, ignore_errors=True)
    return record


def blend_summary(record: dict) -> str:
    """One line on the choice, for the fit's log."""
    if "reason" in record:
        return f"kNN blend: not considered ({record['reason']})"
    r = record["mean_r"]
    return (f"kNN blend chosen on held-out {', '.join(record['validation_sections'])}: weight {record['weight']:g} "
            f"(mean r fields {r['0.0']:.3f}, 3D kNN k={record['k']} {record['mean_r_knn']:.3f}, "
            + ", ".join(f"{float(a):g}: {v:.3f}" for a, v in r.items() if float(a)) + ")"
            + (" — every query averages them" if record["weight"] else " — the fields alone"))

