"""A field averaged with 3D k-nearest-neighbour regression of the measured points, where that predicted better.

On volumetric cells (3D STARmap, slabs held out) the fitted field and 3D kNN predict held-out cells equally well
with errors that differ, and their plain average is better than either (+0.010 mean r; BENCHMARKS.md, fourteenth
session); on sectioned stacks the field alone is better. ``reconstruct fit`` therefore chooses the weight of kNN
on held-out inner sections (:mod:`voxelome.train.field_knn_blend`) and, when it is above 0, stores what kNN needs
in the run folder:

- ``knn_blend.json``: the weight ``a``, ``k``, how they were chosen (validation sections, scores);
- ``knn_points.npz``: ``xyz_um`` ``(n, 3)`` float32 and ``values`` ``(n, g)`` float32 — the measured points'
  log1p(counts per ``target_sum``) of the modelled genes, the scale every field query returns.

Every query of the run is then ``(1 − a) · field + a · kNN``: inverse-distance weights over the ``k`` nearest measured
points, as the benchmark's 3D kNN baseline, with distances floored at half the points' median nearest-neighbour
distance (``distance_floor_um``) so that a query on a measured point (denoising it) does not return its own noisy
value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.io.atomic import atomic_path, atomic_write_json

BLEND_FILE = "knn_blend.json"
POINTS_FILE = "knn_points.npz"
BLEND_FORMAT = "voxelome.field-knn-blend/1"
#: values (points × genes) kept for kNN at most: above it the blend is not offered (the run would carry the data)
MAX_STORED_VALUES = 50_000_000
#: neighbour values gathered per batch of query points (bounds memory: ≈ 4 bytes each)
_GATHER_BUDGET = 20_000_000


class KnnBlend:
    """3D kNN regression of stored point values, blended into a field's predictions with weight ``weight``."""

    def __init__(self, xyz_um: np.ndarray, values: np.ndarray, k: int, weight: float, distance_floor_um: float):
        from scipy.spatial import cKDTree

        if not 0 < weight <= 1:
            raise VoxelomeError(f"kNN blend weight {weight} must lie in (0, 1].")
        self.values = np.asarray(values, np.float32)
        self.k = int(min(k, len(self.values)))
        self.weight = float(weight)
        self.distance_floor_um = float(distance_floor_um)
        self.tree = cKDTree(np.asarray(xyz_um, np.float64))

    @classmethod
    def load(cls, run_dir) -> "KnnBlend | None":
        """The blend recorded in ``run_dir`` (``None`` when there is none or its weight is 0)."""
        run = Path(run_dir)
        if not (run / BLEND_FILE).is_file():
            return None
        record = json.loads((run / BLEND_FILE).read_text())
        if record.get("format") != BLEND_FORMAT:
            raise VoxelomeError(f"{run / BLEND_FILE} is not a kNN blend record (format {record.get('format')!r}).")
        if not record["weight"]:
            return None
        if not (run / POINTS_FILE).is_file():
            raise VoxelomeError(f"{run / BLEND_FILE} asks for a kNN blend but {run / POINTS_FILE} is missing; refit "
                                f"with `voxelome reconstruct fit ... --out {run}` (finished fits are kept).")
        with np.load(run / POINTS_FILE) as z:
            return cls(z["xyz_um"], z["values"], record["k"], record["weight"], record["distance_floor_um"])

    def predict(self, points_xyz_um, gene_index=None) -> np.ndarray:
        """kNN values ``(..., g)`` at ``points_xyz_um`` ``(..., 3)`` µm (columns ``gene_index``; default all)."""
        pts = np.asarray(points_xyz_um, np.float64)
        shape = pts.shape[:-1]
        pts = pts.reshape(-1, 3)
        cols = np.arange(self.values.shape[1]) if gene_index is None else np.asarray(gene_index)
        out = np.empty((len(pts), len(cols)), np.float32)
        step = max(1, _GATHER_BUDGET // max(1, self.k * len(cols)))
        for start in range(0, len(pts), step):
            d, idx = self.tree.query(pts[start:start + step], k=self.k)
            d, idx = d.reshape(len(idx), self.k), idx.reshape(len(idx), self.k)
            w = 1.0 / np.maximum(d, self.distance_floor_um)
            w /= w.sum(1, keepdims=True)
            out[start:start + step] = np.einsum("mk,mkg->mg", w, self.values[idx][:, :, cols])
        return out.reshape(*shape, len(cols))

    def blend(self, field_values: np.ndarray, points_xyz_um, gene_index=None) -> np.ndarray:
        """``(1 − weight) · field_values + weight · kNN`` (shape of ``field_values``)."""
        knn = self.predict(points_xyz_um, gene_index)
        return ((1 - self.weight) * field_values + self.weight * knn).astype(np.float32)


def blend_weight(run_dir) -> float:
    """The kNN weight a run's queries use (0 without a blend), read from its record alone."""
    path = Path(run_dir) / BLEND_FILE
    return float(json.loads(path.read_text())["weight"]) if path.is_file() else 0.0


def distance_floor_um(xyz_um) -> float:
    """Half the median distance (µm) from a point to its nearest other point: the smallest distance kNN weighs."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.asarray(xyz_um, np.float64)).query(xyz_um, k=2)
    return max(float(np.median(d[:, 1])) / 2, 1e-6)


def write_blend(run_dir, record: dict, xyz_um=None, values=None) -> Path:
    """Record a blend choice (``record``: ``weight``, ``k`` and how they were chosen) and, when its weight is above
    0, the points kNN reads. The points are written before the record, so a record always finds them."""
    run = Path(run_dir)
    if record["weight"]:
        with atomic_path(run / POINTS_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, xyz_um=np.asarray(xyz_um, np.float32), values=np.asarray(values, np.float32))
    else:
        (run / POINTS_FILE).unlink(missing_ok=True)
    return atomic_write_json(run / BLEND_FILE, {"format": BLEND_FORMAT, **record}, indent=1)


def remove_blend(run_dir) -> None:
    """Forget a run's blend (its fields are being refitted: a stale choice must not apply to new ones)."""
    for name in (BLEND_FILE, POINTS_FILE):
        (Path(run_dir) / name).unlink(missing_ok=True)
