"""Fit the members of a field ensemble: each configuration with several seeds, averaged when queried.

``reconstruct fit`` fits a selection's best candidates (``--ensemble``) or one fixed configuration, each with
``--seeds`` seeds, into ``RUN/members/`` and records them in ``RUN/ensemble.json``
(:mod:`voxelome.infer.field_ensemble`), so every query of the run averages them. On the registered real stacks two
seeds averaged beat one fit on 16 of 17 held-out sections (BENCHMARKS.md, eleventh session).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from voxelome.errors import VoxelomeError
from voxelome.infer.field_ensemble import ENSEMBLE_FILE, write_ensemble
from voxelome.infer.field_knn import remove_blend
from voxelome.train.field_trainer import FieldConfig, fit_field


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One configuration of an ensemble.

    Attributes
    ----------
    name : str
        What it is, for ``ensemble.json`` (e.g. the candidate's name).
    folder : str
        Folder stem under ``RUN/members/``: its first seed is fitted into ``members/<folder>``, seed ``s`` after the
        first into ``members/<folder>-seed-<s>`` (stable names: an interrupted ensemble resumes).
    config : FieldConfig
        Its configuration; its ``seed`` is the first of the seeds.
    loadings : array (k, g), optional
        Fixed gene loadings of a low-rank field.
    """

    name: str
    folder: str
    config: FieldConfig
    loadings: object = None


def fit_members(data, run_dir, specs: list[MemberSpec], *, seeds: int = 2, rule: str, resume: bool = True,
                log: Callable[[str], None] = print) -> list[str]:
    """Fit every spec with ``seeds`` seeds (``config.seed`` … ``config.seed + seeds − 1``) and record the ensemble.

    Parameters
    ----------
    data : PointData
        The stack every member is fitted to.
    run_dir : path
        The run folder; members go to ``run_dir/members/``, the record to ``run_dir/ensemble.json`` (written once
        every member has finished; a stale record is removed first).
    specs : list of MemberSpec
        The configurations.
    seeds : int
        Fits per configuration (≥ 1); at least two members in all.
    rule : str
        How the members were chosen, for the record.
    resume : bool
        Continue each member from its ``last.pt``.
    log : callable
        Where the progress lines go.

    Returns
    -------
    list of str
        The member folders, relative to ``run_dir``.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise VoxelomeError(f"seeds={seeds!r} must be a positive integer (fits per configuration, averaged).")
    total = len(specs) * seeds
    if total < 2:
        raise VoxelomeError(f"an ensemble needs ≥ 2 members; {len(specs)} configuration(s) × {seeds} seed(s) give "
                            f"{total}. Fit a single field instead.")
    run = Path(run_dir)
    (run / ENSEMBLE_FILE).unlink(missing_ok=True)
    remove_blend(run)  # a blend was chosen for the fields being refitted
    members, names = [], []
    for spec in specs:
        for k in range(seeds):
            seed = spec.config.seed + k
            member = f"members/{spec.folder}" + (f"-seed-{seed}" if k else "")
            name = spec.name if seeds == 1 else f"{spec.name}, seed {seed}"
            log(f"member {len(members) + 1}/{total}: {name} → {run / member}")
            fit_field(data, dataclasses.replace(spec.config, seed=seed), run / member, loadings=spec.loadings,
                      resume=resume, progress=True)
            members.append(member)
            names.append(name)
    write_ensemble(run, members, names, rule=rule + (f", each fitted with {seeds} seeds" if seeds > 1 else ""))
    return members
