"""Score predicted volumes against the phantom's ground truth (held-out voxels only)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from voxelome.evaluate.metrics import distance_to_plane_mask, pearson_per_channel, summarise


def block_mean(array: np.ndarray, step) -> np.ndarray:
    """Mean over cells of ``step`` (z, y, x) voxels of a ``(c, z, y, x)`` array, edge-padded.

    Output shape ``(c, ceil(z/sz), ceil(y/sy), ceil(x/sx))`` — the grid of the predictions.
    """
    step = [int(s) for s in np.broadcast_to(step, (3,))]
    c, *shape = array.shape
    out = [-(-s // f) for s, f in zip(shape, step)]
    pad = [(0, 0)] + [(0, o * f - s) for o, f, s in zip(out, step, shape)]
    a = np.pad(np.asarray(array, dtype=np.float32), pad, mode="edge")
    a = a.reshape(c, out[0], step[0], out[1], step[1], out[2], step[2])
    return a.mean((2, 4, 6))


def match_signatures(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Order of predicted channels that best matches truth channels (Hungarian on Pearson r).

    Needed when signatures were *learned* from the section (archetypes are unordered).
    """
    k = truth.shape[0]
    r = np.zeros((pred.shape[0], k))
    for i in range(pred.shape[0]):
        r[i] = pearson_per_channel(np.repeat(pred[i:i + 1], k, 0), truth, mask)
    rows, cols = linear_sum_assignment(-np.nan_to_num(r, nan=-1.0))
    order = np.empty(k, int)
    order[cols] = rows
    return order


def score_volume(pred: np.ndarray, truth_grid: np.ndarray, tissue_grid: np.ndarray, *, spacing_um_zyx,
                 origin_um_zyx, plane_point_xyz, plane_normal_xyz, names, min_distance_um: float = 200.0,
                 match: bool = False) -> dict:
    """Voxel-wise Pearson r per signature on tissue ≥ ``min_distance_um`` from the training plane.

    Parameters
    ----------
    pred, truth_grid : ndarray, shape (k, z, y, x)
        Prediction and ground truth on the same output grid.
    tissue_grid : ndarray of bool, shape (z, y, x)
        Voxels inside the organ.
    match : bool
        Reorder predicted channels to the truth first (learned signatures).
    """
    held = distance_to_plane_mask(pred.shape[1:], spacing_um_zyx, origin_um_zyx, plane_point_xyz,
                                  plane_normal_xyz, min_distance_um) & tissue_grid
    order = match_signatures(pred, truth_grid, held) if match else np.arange(pred.shape[0])
    r = pearson_per_channel(pred[order], truth_grid, held)
    out = summarise(dict(zip(names, r.tolist())), names)
    out["n_voxels"] = int(held.sum())
    out["min_distance_um"] = float(min_distance_um)
    if match:
        out["matched_order"] = order.tolist()
    return out
