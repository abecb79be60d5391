"""Evaluation metrics: per-channel agreement, held-out masks and the trivial baseline's features.

All functions are vectorised NumPy and NaN-safe: a non-finite value in either input drops that
element from the statistic of its channel (it never poisons the whole channel), and a channel
with fewer than two valid elements or with zero variance gives ``NaN`` without a warning.

Channel-first arrays follow the package layout: ``(c, z, y, x)`` volumes, ``(c, y, x)`` maps or
``(c, n)`` spot tables; spot tables in AnnData layout ``(n_spots, k)`` use the ``*_per_column``
variant. Geometry is in micrometres; volumes are ``(z, y, x)``, points ``(x, y, z)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from voxelome.errors import VoxelomeError, check_positive

__all__ = [
    "pearson_per_channel",
    "pearson_per_column",
    "rmse_per_channel",
    "mae_per_channel",
    "kl_divergence_rows",
    "summarise",
    "distance_to_plane_mask",
    "ridge_baseline_features",
    "ridge_baseline_feature_names",
]


# --- helpers ------------------------------------------------------------------------
def _paired(pred, true, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten ``(c, ...)`` pairs to ``(c, N)`` float64 and the ``(c, N)`` validity mask."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim < 1:
        raise VoxelomeError(
            f"pred and true must have the same channel-first shape (c, ...); got pred {pred.shape} "
            f"and true {true.shape}. Transpose (n, k) spot tables with pearson_per_column."
        )
    valid = np.isfinite(pred) & np.isfinite(true)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        try:
            m = np.broadcast_to(m, pred.shape[1:])
        except ValueError:
            try:
                m = np.broadcast_to(m, pred.shape)
            except ValueError:
                raise VoxelomeError(
                    f"mask of shape {m.shape} broadcasts neither to the spatial shape {pred.shape[1:]} "
                    f"nor to the full shape {pred.shape} of pred/true."
                ) from None
        valid &= m
    c = pred.shape[0]
    return pred.reshape(c, -1), true.reshape(c, -1), valid.reshape(c, -1)


def _masked_mean(x: np.ndarray, valid: np.ndarray, n: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, x, 0.0).sum(axis=1) / n


# --- agreement ----------------------------------------------------------------------
def pearson_per_channel(pred, true, mask=None) -> np.ndarray:
    """Pearson correlation of each channel over the (masked) elements.

    Parameters
    ----------
    pred, true : array-like, shape (c, ...)
        Channel-first predictions and targets, e.g. ``(c, z, y, x)`` or ``(c, n_spots)``.
    mask : array-like of bool, optional
        Elements to include; broadcast to the spatial shape ``pred.shape[1:]`` (or to the full
        shape for a per-channel mask). Non-finite elements are always excluded.

    Returns
    -------
    ndarray, shape (c,)
        Pearson r per channel, float64 in ``[-1, 1]``; ``NaN`` where a channel has fewer than two
        valid elements or is constant in ``pred`` or ``true``.
    """
    x, y, valid = _paired(pred, true, mask)
    n = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = np.where(valid, x - _masked_mean(x, valid, n)[:, None], 0.0)
        yc = np.where(valid, y - _masked_mean(y, valid, n)[:, None], 0.0)
        r = (xc * yc).sum(axis=1) / np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    # exact constancy test (centring in floating point can leave tiny non-zero residues)
    const = np.zeros(len(n), dtype=bool)
    if x.shape[1]:
        for arr in (x, y):
            hi = np.max(arr, axis=1, where=valid, initial=-np.inf)
            lo = np.min(arr, axis=1, where=valid, initial=np.inf)
            const |= hi <= lo
    r[(n < 2) | const] = np.nan
    return np.clip(r, -1.0, 1.0)


def pearson_per_column(pred, true) -> np.ndarray:
    """Pearson r of each column of ``(n, k)`` tables (spots × signatures or genes).

    Parameters
    ----------
    pred, true : array-like, shape (n, k)

    Returns
    -------
    ndarray, shape (k,)
        As :func:`pearson_per_channel` over the ``n`` rows; ``NaN`` for constant columns.
    """
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise VoxelomeError(f"pred and true must both be (n, k) tables; got {pred.shape} and {true.shape}.")
    return pearson_per_channel(pred.T, true.T)


def rmse_per_channel(pred, true, mask=None) -> np.ndarray:
    """Root-mean-square error per channel, in the units of the inputs.

    Parameters
    ----------
    pred, true : array-like, shape (c, ...)
    mask : array-like of bool, optional
        As in :func:`pearson_per_channel`.

    Returns
    -------
    ndarray, shape (c,)
        ``NaN`` for a channel without valid elements.
    """
    x, y, valid = _paired(pred, true, mask)
    return np.sqrt(_masked_mean((x - y) ** 2, valid, valid.sum(axis=1)))


def mae_per_channel(pred, true, mask=None) -> np.ndarray:
    """Mean absolute error per channel; shapes and masking as :func:`rmse_per_channel`."""
    x, y, valid = _paired(pred, true, mask)
    return _masked_mean(np.abs(x - y), valid, valid.sum(axis=1))


def kl_divergence_rows(p, q, eps: float = 1e-8) -> np.ndarray:
    """Kullback–Leibler divergence ``KL(p || q)`` of each row (in nats).

    Parameters
    ----------
    p, q : array-like, shape (n, k)
        Rows on the simplex (e.g. niche proportions; ``p`` measured, ``q`` predicted). Both are
        clipped to ``eps`` and renormalised, so zeros and slightly unnormalised rows are safe.
    eps : float
        Floor applied before renormalising.

    Returns
    -------
    ndarray, shape (n,)
        ``≥ 0``; ``NaN`` for rows containing non-finite values.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2:
        raise VoxelomeError(f"p and q must both be (n, k) tables of proportions; got {p.shape} and {q.shape}.")
    check_positive("eps", eps)
    p = np.clip(p, eps, None)
    q = np.clip(q, eps, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / p.sum(axis=1, keepdims=True)
        q = q / q.sum(axis=1, keepdims=True)
        return np.maximum((p * np.log(p / q)).sum(axis=1), 0.0)


def _plain(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def summarise(values: Mapping[str, float] | np.ndarray | Sequence[float],
              names: Sequence[str] | None = None) -> dict:
    """JSON-ready summary of per-channel values (e.g. Pearson r per signature).

    Parameters
    ----------
    values : dict of str → float, or array-like, shape (c,)
        Per-channel values; a dict supplies its own names.
    names : sequence of str, optional
        Channel names for an array (default ``"0"``, ``"1"``, …); ignored for a dict.

    Returns
    -------
    dict
        ``{"mean", "median", "q1", "q3", "n_valid", "per_channel": {name: value}}`` with plain
        Python floats; statistics ignore NaN, and NaN (or an empty set) becomes ``None``.
    """
    if isinstance(values, Mapping):
        names = [str(k) for k in values]
        vals = np.asarray([np.nan if v is None else v for v in values.values()], dtype=np.float64)
    else:
        vals = np.asarray(values, dtype=np.float64).ravel()
        names = [str(i) for i in range(vals.size)] if names is None else [str(n) for n in names]
        if len(names) != vals.size:
            raise VoxelomeError(f"summarise got {vals.size} values but {len(names)} names; pass one name per value.")
    finite = vals[np.isfinite(vals)]
    stats = dict.fromkeys(("mean", "median", "q1", "q3"))
    if finite.size:
        q1, med, q3 = np.percentile(finite, [25, 50, 75])
        stats.update(mean=_plain(finite.mean()), median=_plain(med), q1=_plain(q1), q3=_plain(q3))
    stats["n_valid"] = int(finite.size)
    stats["per_channel"] = {n: _plain(v) for n, v in zip(names, vals)}
    return stats


# --- held-out geometry --------------------------------------------------------------
def distance_to_plane_mask(shape_zyx, spacing_um_zyx, origin_um_zyx, plane_point_xyz, plane_normal_xyz,
                           min_distance_um: float) -> np.ndarray:
    """Voxels whose centre lies at least ``min_distance_um`` from a plane.

    Used for held-out evaluation: X-Pression scored predictions only ≥ 200 µm away from the
    section the network was trained on (Túrós et al., 2025).

    Parameters
    ----------
    shape_zyx : tuple of int
        Grid shape ``(z, y, x)``.
    spacing_um_zyx : float or tuple of float
        Voxel size ``(dz, dy, dx)`` in µm.
    origin_um_zyx : tuple of float
        World position ``(z, y, x)`` µm of the centre of voxel ``(0, 0, 0)``
        (as :class:`voxelome.io.volume.Volume`).
    plane_point_xyz : array-like, shape (3,)
        A point on the plane, µm ``(x, y, z)``.
    plane_normal_xyz : array-like, shape (3,)
        Plane normal ``(x, y, z)``; any non-zero length.
    min_distance_um : float
        Threshold in µm (``≥ 0``); a 1e-6 µm tolerance counts voxels at exactly that distance in.

    Returns
    -------
    ndarray of bool, shape (z, y, x)
        True where ``|n̂ · (p - p0)| ≥ min_distance_um``.
    """
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3 or min(shape) < 0:
        raise VoxelomeError(f"shape_zyx={shape_zyx!r} must be three non-negative ints (z, y, x).")
    spacing = np.broadcast_to(np.asarray(spacing_um_zyx, dtype=np.float64), (3,))
    origin = np.broadcast_to(np.asarray(origin_um_zyx, dtype=np.float64), (3,))
    point = np.asarray(plane_point_xyz, dtype=np.float64)
    normal = np.asarray(plane_normal_xyz, dtype=np.float64)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise VoxelomeError(f"plane_point_xyz={plane_point_xyz!r} must be 3 finite numbers (x, y, z) in µm.")
    norm = np.linalg.norm(normal)
    if normal.shape != (3,) or not np.isfinite(norm) or norm == 0:
        raise VoxelomeError(f"plane_normal_xyz={plane_normal_xyz!r} must be a non-zero 3-vector (x, y, z).")
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)) or not np.all(np.isfinite(origin)):
        raise VoxelomeError(f"spacing_um_zyx={spacing_um_zyx!r} must be positive and origin_um_zyx finite (µm).")
    check_positive("min_distance_um", min_distance_um, allow_zero=True)
    n_zyx = (normal / norm)[::-1]                       # normal reordered to (z, y, x)
    p0_zyx = point[::-1]
    # signed distance is separable: sum over axes of n_a * (origin_a + i_a * spacing_a - p0_a)
    terms = [n_zyx[a] * (origin[a] + np.arange(shape[a]) * spacing[a] - p0_zyx[a]) for a in range(3)]
    out = np.empty(shape, dtype=bool)
    thr = float(min_distance_um) - 1e-6
    step = max(1, (1 << 22) // max(1, shape[1] * shape[2]))   # ≤ ~32 MB float64 temporaries
    yx = terms[1][:, None] + terms[2][None, :]
    for z0 in range(0, shape[0], step):
        d = terms[0][z0:z0 + step, None, None] + yx[None]
        np.greater_equal(np.abs(d), thr, out=out[z0:z0 + step])
    return out


# --- trivial baseline ---------------------------------------------------------------
def ridge_baseline_feature_names(scales_um=(10, 20, 40, 80)) -> list[str]:
    """Names of the :func:`ridge_baseline_features` channels, in order."""
    return [f"{kind}_{s:g}um" for s in scales_um for kind in ("mean", "std")]


def ridge_baseline_features(volume_zyx: np.ndarray, spacing_um, scales_um=(10, 20, 40, 80)) -> np.ndarray:
    """Features of the "smoothed intensity + ridge regression" baseline.

    For each scale σ: the Gaussian-smoothed intensity ``G_σ * I`` and the local standard deviation
    ``sqrt(max(G_σ * I² − (G_σ * I)², 0))``. A ridge regression on these per-voxel features is the
    trivial baseline any image → expression network must beat.

    Parameters
    ----------
    volume_zyx : ndarray, shape (z, y, x)
        Image intensities (also works for a 2D ``(y, x)`` image).
    spacing_um : float or tuple of float
        Voxel size in µm, isotropic or per axis ``(dz, dy, dx)``.
    scales_um : sequence of float
        Gaussian σ values in µm.

    Returns
    -------
    ndarray, float32, shape (2 * len(scales_um), z, y, x)
        Channels ordered ``mean_σ1, std_σ1, mean_σ2, …`` (see :func:`ridge_baseline_feature_names`).
    """
    from scipy import ndimage

    img = np.asarray(volume_zyx, dtype=np.float32)
    spacing = np.broadcast_to(np.asarray(spacing_um, dtype=np.float64), (img.ndim,))
    if np.any(~np.isfinite(spacing)) or np.any(spacing <= 0):
        raise VoxelomeError(f"spacing_um={spacing_um!r} must be positive µm (one number or one per axis).")
    scales = [check_positive("scales_um", s) for s in scales_um]
    if not scales:
        raise VoxelomeError("scales_um is empty; give at least one Gaussian σ in µm, e.g. (10, 20, 40, 80).")
    out = np.empty((2 * len(scales),) + img.shape, dtype=np.float32)
    # centre first: the variance is shift-invariant and float32 E[I²] − E[I]² cancels less
    mu = float(np.mean(img, dtype=np.float64)) if img.size else 0.0
    img = img - np.float32(mu)
    sq = img * img
    tmp = np.empty_like(img)
    for i, s in enumerate(scales):
        sigma = s / spacing
        mean = out[2 * i]
        ndimage.gaussian_filter(img, sigma, output=mean)
        ndimage.gaussian_filter(sq, sigma, output=tmp)
        np.subtract(tmp, mean * mean, out=tmp)
        np.sqrt(np.maximum(tmp, 0, out=tmp), out=out[2 * i + 1])
        mean += np.float32(mu)
    return out
