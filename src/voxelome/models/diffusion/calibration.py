"""Predictive intervals from samples, and their calibration on held-out data (split conformal).

A diffusion model's sample spread is a *shape* of uncertainty, not a calibrated one: with 8 samples the
central 90 % sample interval is about the sample range, which covers a 9th exchangeable draw only ~7/9 of the
time, and a model trained on little data is usually over- or under-dispersed (on real spots ours is far too
narrow, and exactly zero where the low-res input pins a pixel). We therefore report the spread as a per-pixel
standard deviation and turn it into intervals by split conformal prediction (Romano et al. 2019, Angelopoulos &
Bates 2021) on a calibration set: :func:`fit_intervals` gives ``mean ± q_g · √(std² + τ_g²)``, where ``τ_g`` (the
median absolute error of gene ``g`` on one half of the calibration pixels) is the error the samples do not
show, and ``q_g`` the conformal quantile of the normalised errors on the other half. Where the spread is
informative the intervals follow it; where it is not they fall back to a per-gene width. On data exchangeable
with the calibration set the coverage is ≥ ``level``. :func:`conformal_multipliers` is the plain
``mean ± q_g · std`` variant.
"""

from __future__ import annotations

import numpy as np

from voxelome.errors import VoxelomeError


def _check_level(level: float) -> float:
    if not 0 < float(level) < 1:
        raise VoxelomeError(f"level={level!r} must lie in (0, 1); e.g. 0.9 for 90 % intervals.")
    return float(level)


def sample_interval(samples: np.ndarray, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` interval of the samples: the ``(1 ± level)/2`` quantiles over axis 0."""
    level = _check_level(level)
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo.astype(np.float32), hi.astype(np.float32)


def conformal_multipliers(means, stds, truths, masks, level: float = 0.9, floor: float = 1e-6) -> np.ndarray:
    """Per-gene multipliers ``q_g`` so that ``mean ± q_g · std`` covers ``level`` of calibration truths.

    Parameters
    ----------
    means, stds, truths : list of array, shape (G, H, W)
        Predictive mean, standard deviation and truth of each calibration map.
    masks : list of bool array, shape (H, W)
        Where the truth is measured.
    level : float
        Target coverage.
    floor : float
        Lower bound on ``std`` (pixels where all samples agree).

    Returns
    -------
    array, shape (G,)
        The finite-sample conformal quantile ``⌈(n + 1) · level⌉ / n`` of the scores, per gene.
    """
    level = _check_level(level)
    scores = np.concatenate([np.abs(t - m)[:, k] / np.maximum(s[:, k], floor)
                             for m, s, t, k in zip(means, stds, truths, masks)], axis=1)
    n = scores.shape[1]
    if n < 10:
        raise VoxelomeError(f"calibration needs ≥ 10 measured pixels, got {n}; pass more calibration data.")
    q = min(1.0, np.ceil((n + 1) * level) / n)
    return np.quantile(scores, q, axis=1, method="higher").astype(np.float32)


def fit_intervals(means, stds, truths, masks, level: float = 0.9, seed: int = 0) -> dict:
    """Per-gene ``τ_g`` and ``q_g`` for intervals ``mean ± q_g · √(std² + τ_g²)`` (split conformal).

    Parameters
    ----------
    means, stds, truths : list of array, shape (G, H, W)
        Predictive mean, sample standard deviation and truth of each calibration map.
    masks : list of bool array, shape (H, W)
        Where the truth is measured.
    level : float
        Target coverage.
    seed : int
        Seed of the random halving of the calibration pixels (τ on one half, q on the other).

    Returns
    -------
    dict
        ``tau`` (G,) and ``multipliers`` (G,), float32 lists' arrays.
    """
    level = _check_level(level)
    err = np.concatenate([np.abs(t - m)[:, k] for m, t, k in zip(means, truths, masks)], axis=1)
    sd = np.concatenate([s[:, k] for s, k in zip(stds, masks)], axis=1)
    n = err.shape[1]
    if n < 20:
        raise VoxelomeError(f"calibration needs ≥ 20 measured pixels, got {n}; pass more calibration data.")
    half = np.random.default_rng(seed).permutation(n) < n // 2
    tau = np.maximum(np.median(err[:, half], axis=1), 1e-6)
    scores = err[:, ~half] / np.sqrt(sd[:, ~half] ** 2 + tau[:, None] ** 2)
    m = scores.shape[1]
    q = np.quantile(scores, min(1.0, np.ceil((m + 1) * level) / m), axis=1, method="higher")
    return {"tau": tau.astype(np.float32), "multipliers": q.astype(np.float32)}


def predictive_interval(mean: np.ndarray, std: np.ndarray, tau, multipliers) -> tuple[np.ndarray, np.ndarray]:
    """``mean ∓ q_g · √(std² + τ_g²)`` for ``(G, ...)`` maps (see :func:`fit_intervals`)."""
    shape = (-1,) + (1,) * (mean.ndim - 1)
    half = np.asarray(multipliers, np.float32).reshape(shape) * np.sqrt(
        std ** 2 + np.asarray(tau, np.float32).reshape(shape) ** 2)
    return (mean - half).astype(np.float32), (mean + half).astype(np.float32)


def gaussian_interval(mean: np.ndarray, std: np.ndarray, multipliers) -> tuple[np.ndarray, np.ndarray]:
    """``mean ∓ q_g · std`` for ``(G, ...)`` maps and per-gene multipliers ``q`` (G,) or a scalar."""
    q = np.asarray(multipliers, np.float32)
    q = q.reshape((-1,) + (1,) * (mean.ndim - 1)) if q.ndim else q
    return (mean - q * std).astype(np.float32), (mean + q * std).astype(np.float32)


def coverage(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of measured truth values inside ``[lower, upper]``; maps ``(G, H, W)``, mask ``(H, W)``."""
    inside = (truth >= lower) & (truth <= upper)
    return float(inside[:, mask].mean())


def sample_crps(samples: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean continuous ranked probability score of ``(S, G, H, W)`` samples at the measured pixels.

    ``CRPS = E|X − y| − ½ E|X − X'|`` (Gneiting & Raftery 2007), estimated from the samples: a proper score,
    lowest for the true predictive distribution, so unlike the RMSE of the sample mean it rewards a spread
    of the right size. For one sample it is the mean absolute error.
    """
    x = samples[:, :, mask].astype(np.float64)  # (S, G, n)
    y = truth[:, mask].astype(np.float64)
    term1 = np.abs(x - y[None]).mean(0)
    s = len(x)
    term2 = np.zeros_like(term1)
    for i in range(s):  # pairwise |X - X'| without an (S, S, G, n) array
        term2 += np.abs(x[i][None] - x).sum(0)
    return float((term1 - 0.5 * term2 / (s * s)).mean())
