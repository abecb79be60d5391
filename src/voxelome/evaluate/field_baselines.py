"""Baselines a 3D expression field must beat, and the per-gene scores to compare them.

All baselines take training points ``(n, 3)`` µm with their section codes and values ``(n, g)``
(e.g. log1p-normalised expression) and predict values at query points:

- :func:`nearest_section`: copy from the training section whose mean z is nearest (in-plane
  average of the ``k`` nearest spots in x, y).
- :func:`linear_between_sections`: linear interpolation along z between the nearest training
  sections below and above the query (each read by an in-plane ``k``-nearest average); the
  nearest section when the query is outside the stack.
- :func:`knn_3d`: ``k``-nearest-neighbour regression in 3D (inverse-distance weights).

The section baselines assume an axial stack (sections ~ planes of constant z), as serial
sectioning gives; they are what a field replaces. :func:`choose_k` picks each baseline's ``k`` on
validation sections among the training ones (never on the section being scored); :func:`section_depths` and
:func:`evenly_spread_inner` give the sections in depth order and the inner ones to hold out.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def _in_plane(tree_xy: cKDTree, vals: np.ndarray, q_xy: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(vals))
    _, idx = tree_xy.query(q_xy, k=k)
    idx = idx.reshape(len(q_xy), k)
    return vals[idx].mean(axis=1)


class _Sections:
    def __init__(self, xyz, section, values):
        self.codes = np.unique(section)
        self.z = np.array([np.mean(xyz[section == c, 2]) for c in self.codes])
        order = np.argsort(self.z)
        self.codes, self.z = self.codes[order], self.z[order]
        self.trees = [cKDTree(xyz[section == c, :2]) for c in self.codes]
        self.vals = [np.asarray(values[section == c], dtype=np.float64) for c in self.codes]

    def read(self, i, q_xy, k):
        return _in_plane(self.trees[i], self.vals[i], q_xy, k)


def section_depths(xyz_um: np.ndarray, section: np.ndarray) -> dict:
    """Median z (µm) of every section (keyed by its name or code, as a Python scalar), in increasing z."""
    section = np.asarray(section)
    depth = {n.item() if isinstance(n, np.generic) else n: float(np.median(xyz_um[section == n, 2]))
             for n in np.unique(section)}
    return dict(sorted(depth.items(), key=lambda kv: kv[1]))


def evenly_spread_inner(order: list, max_sections: int) -> list:
    """Up to ``max_sections`` of the inner items of ``order`` (never the first or last), evenly spread."""
    inner = list(order)[1:-1]
    if len(inner) <= max_sections:
        return inner
    return [inner[i] for i in np.unique(np.linspace(0, len(inner) - 1, max_sections).round().astype(int))]


def nearest_section(xyz, section, values, query_xyz, *, k: int = 1) -> np.ndarray:
    """Values ``(m, g)`` at ``query_xyz`` copied from the nearest training section (in-plane k-NN mean)."""
    s = _Sections(np.asarray(xyz, float), np.asarray(section), values)
    q = np.asarray(query_xyz, float)
    near = np.abs(q[:, 2, None] - s.z[None]).argmin(1)
    out = np.empty((len(q), s.vals[0].shape[1]))
    for i in np.unique(near):
        m = near == i
        out[m] = s.read(i, q[m, :2], k)
    return out


def linear_between_sections(xyz, section, values, query_xyz, *, k: int = 1) -> np.ndarray:
    """Values ``(m, g)`` linearly interpolated in z between the neighbouring training sections."""
    s = _Sections(np.asarray(xyz, float), np.asarray(section), values)
    q = np.asarray(query_xyz, float)
    hi = np.searchsorted(s.z, q[:, 2]).clip(1, len(s.z) - 1)
    lo = hi - 1
    w = ((q[:, 2] - s.z[lo]) / np.maximum(s.z[hi] - s.z[lo], 1e-12)).clip(0, 1)
    out = np.zeros((len(q), s.vals[0].shape[1]))
    for i in range(len(s.z)):
        for sel, weight in ((lo == i, 1 - w), (hi == i, w)):
            if sel.any():
                out[sel] += weight[sel, None] * s.read(i, q[sel, :2], k)
    return out


def knn_3d(xyz, values, query_xyz, *, k: int = 10, weights: str = "distance") -> np.ndarray:
    """Values ``(m, g)``: mean of the ``k`` nearest training points in 3D.

    ``weights="distance"`` (inverse-distance weights, for new points) or ``"uniform"`` (plain mean;
    use it to smooth the training points themselves, where a point's own distance is 0).
    """
    tree = cKDTree(np.asarray(xyz, float))
    k = min(k, len(xyz))
    d, idx = tree.query(np.asarray(query_xyz, float), k=k)
    d, idx = d.reshape(len(idx), k), idx.reshape(len(idx), k)
    w = 1.0 / np.maximum(d, 1e-6) if weights == "distance" else np.ones_like(d)
    w /= w.sum(1, keepdims=True)
    return np.einsum("mk,mkg->mg", w, np.asarray(values, np.float64)[idx])


def per_gene_scores(pred, true) -> dict:
    """Per-gene Pearson r and RMSE of ``pred`` vs ``true`` ``(n, g)``; genes constant in either give NaN r.

    Returns
    -------
    dict
        ``r`` and ``rmse`` (arrays of g), ``mean_r`` (NaN-mean), ``mean_rmse``.
    """
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    pc, tc = p - p.mean(0), t - t.mean(0)
    den = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (pc * tc).sum(0) / den, np.nan)
    rmse = np.sqrt(((p - t) ** 2).mean(0))
    return {"r": r, "rmse": rmse, "mean_r": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
            "mean_rmse": float(rmse.mean())}


#: the neighbourhood sizes each baseline's k is chosen from (in-plane spots per section; 3D points)
K_SECTION = (1, 2, 4, 8, 16, 32)
K_3D = (4, 8, 16, 32, 64, 128)
BASELINE_KS = {"nearest_section": K_SECTION, "linear_interp": K_SECTION, "knn_3d": K_3D}


def baseline_predict(name: str, xyz, section, values, query_xyz, k: int, weights: str = "distance") -> np.ndarray:
    """Baseline ``name`` (a key of :data:`BASELINE_KS`) fitted on ``xyz`` µm / ``section`` / ``values`` ``(n, g)``,
    evaluated at ``query_xyz`` ``(m, 3)`` µm → ``(m, g)``."""
    if name == "nearest_section":
        return nearest_section(xyz, section, values, query_xyz, k=k)
    if name == "linear_interp":
        return linear_between_sections(xyz, section, values, query_xyz, k=k)
    if name == "knn_3d":
        return knn_3d(xyz, values, query_xyz, k=k, weights=weights)
    raise ValueError(f"unknown baseline {name!r}; one of {sorted(BASELINE_KS)}")


def choose_k(name: str, xyz, section, values, val_sets) -> tuple[int, float]:
    """The ``k`` of baseline ``name`` with the best mean r over validation sets, and that mean r.

    ``val_sets``: list of ``(mask, targets)``: a boolean mask of the validation rows among the training rows
    (predicted from the other rows) and their target values ``(m, g)``.
    """
    xyz, section, values = np.asarray(xyz, float), np.asarray(section), np.asarray(values)
    scores = {}
    for k in BASELINE_KS[name]:
        rs = [per_gene_scores(baseline_predict(name, xyz[~m], section[~m], values[~m], xyz[m], k), t)["mean_r"]
              for m, t in val_sets]
        scores[k] = float(np.mean(rs))
    k = max(scores, key=scores.get)
    return k, scores[k]
