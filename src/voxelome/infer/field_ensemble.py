"""Several fitted fields of one stack queried as one: the mean of their predictions.

``reconstruct fit --settings select --ensemble 2`` fits the two candidates that predicted the held-out inner
sections best and averages them: on the five registered real stacks the mean of the top two was better than the
best alone on 15 of 17 held-out sections (10 of 17 once count fields had a library field), and tied with it on the
simulated phantom (BENCHMARKS.md, fifth, seventh and eighth sessions). Every member predicts on one scale (``log1p``
counts per ``target_sum``, or the modelled value), whatever its likelihood, so their mean is well defined.

A run folder holds the members in ``members/candidate-K/`` (ordinary field runs; K = the candidate's index in
:data:`~voxelome.train.field_selection.FIELD_CANDIDATES`; ``candidate-K-seed-S/`` for its other seeds, and
``members/field[-seed-S]/`` for the seeds of one fixed configuration, ``reconstruct fit --seeds``;
:mod:`voxelome.train.field_members` fits them) and ``ensemble.json`` naming them;
:meth:`voxelome.infer.field_export.FittedField.load` returns a :class:`FieldEnsemble` for such a folder, so every
query (points, denoised spots, virtual sections, volumes, the Dask export) works unchanged. When ``reconstruct fit``
chose to average the members with 3D kNN of the measured points (``knn_blend.json``, :mod:`voxelome.infer.field_knn`),
every query includes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.infer.field_export import FittedField
from voxelome.infer.field_knn import BLEND_FILE, KnnBlend
from voxelome.io.atomic import atomic_write_json

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "voxelome.field-ensemble/1"


def is_ensemble_run(run_dir) -> bool:
    """Whether ``run_dir`` is a folder written by :func:`write_ensemble`."""
    return (Path(run_dir) / ENSEMBLE_FILE).is_file()


def write_ensemble(run_dir, members: list[str], names: list[str], rule: str) -> Path:
    """Record the members of an ensemble run (atomically, after every member has finished fitting).

    Parameters
    ----------
    run_dir : path
        The run folder; ``members`` are paths relative to it, each a finished field run.
    members : list of str
        Member run folders, relative to ``run_dir``.
    names : list of str
        What each member is (e.g. the candidate settings' names), for the record.
    rule : str
        How the members were chosen, for the record.
    """
    run = Path(run_dir)
    if len(members) < 2 or len(members) != len(names):
        raise VoxelomeError(f"an ensemble needs ≥ 2 members with one name each; got {len(members)} members and "
                            f"{len(names)} names.")
    FieldEnsemble.from_members([run / m for m in members])  # refuse members that cannot be averaged
    return atomic_write_json(run / ENSEMBLE_FILE, {"format": ENSEMBLE_FORMAT, "members": list(members),
                                                   "names": list(names), "rule": rule}, indent=1)


class FieldEnsemble(FittedField):
    """The mean of several fields fitted to the same stack (same genes, same sections).

    Geometry, genes, sections and library sizes (``config``, ``meta``) are the first member's; :meth:`predict`
    averages every member's prediction, so every other query of :class:`FittedField` is the ensemble's.
    """

    members: list = None
    #: the 3D kNN share of every query (``knn_blend.json``), ``None`` for the members' mean alone
    knn: KnnBlend | None = None

    @classmethod
    def from_members(cls, run_dirs, device: str | None = None) -> "FieldEnsemble":
        """Load member runs and check that they model the same genes of the same sections."""
        fields = [FittedField.load(d, device) for d in run_dirs]
        first = fields[0]
        for d, f in zip(run_dirs, fields):
            for key in ("genes", "section_names"):
                if list(f.meta.get(key, [])) != list(first.meta.get(key, [])):
                    raise VoxelomeError(f"ensemble member {d} has other {key} than {run_dirs[0]}; members must be "
                                        "fitted to the same stack and genes.")
        fingerprint = hashlib.sha256("".join(f.fingerprint for f in fields).encode()).hexdigest()[:16]
        ens = cls(first.config, first.meta, first.model, first.device, fingerprint)
        ens.members, ens.member_names = fields, []
        return ens

    @classmethod
    def load(cls, run_dir, device: str | None = None) -> "FieldEnsemble":
        """Load the ensemble recorded in ``run_dir/ensemble.json``."""
        run = Path(run_dir)
        record = json.loads((run / ENSEMBLE_FILE).read_text())
        if record.get("format") != ENSEMBLE_FORMAT:
            raise VoxelomeError(f"{run / ENSEMBLE_FILE} is not a field ensemble record (format "
                                f"{record.get('format')!r}, expected {ENSEMBLE_FORMAT!r}).")
        missing = [m for m in record["members"] if not (run / m).exists()]
        if missing:
            raise VoxelomeError(f"ensemble members {missing} of {run} are missing; refit with `voxelome reconstruct "
                                f"fit ... --out {run}` (finished members are kept).")
        ens = cls.from_members([run / m for m in record["members"]], device)
        ens.member_names = list(record.get("names", []))
        ens.knn = KnnBlend.load(run)
        if ens.knn is not None:  # other blends are other predictions (a volume's resume markers check this)
            mixed = ens.fingerprint + (run / BLEND_FILE).read_text()
            ens.fingerprint = hashlib.sha256(mixed.encode()).hexdigest()[:16]
        return ens

    def predict(self, points_xyz_um, genes=None, **kwargs) -> np.ndarray:
        """The members' mean of :meth:`FittedField.predict` (same arguments, same shape ``(..., g)``), averaged
        with 3D kNN of the measured points when the run chose so (:attr:`knn`; it ignores ``section``/``library``)."""
        total = None
        for field in self.members:
            y = field.predict(points_xyz_um, genes, **kwargs)
            total = y if total is None else total + y
        mean = total / np.float32(len(self.members))
        return mean if self.knn is None else self.knn.blend(mean, points_xyz_um, self.gene_index(genes))

    def library(self, points_xyz_um, **kwargs) -> np.ndarray:
        """Geometric mean of the members' :meth:`FittedField.library` (members without a library field, e.g.
        Gaussian ones, are left out)."""
        with_field = [f for f in self.members if f.model.library_head]
        if not with_field:
            raise VoxelomeError("no member of this ensemble has a library field (all are Gaussian or were fitted "
                                "without model_library); refit a count likelihood to predict depth.")
        return np.exp(np.mean([np.log(f.library(points_xyz_um, **kwargs)) for f in with_field], axis=0))
