"""Metrics of super-resolved expression maps: masked RMSE, SSIM, Pearson r, interval coverage.

All maps are channel-first ``(G, H, W)`` on the high-res grid of a
:class:`voxelome.datasets.superres.SuperResPair`; ``mask (H, W)`` marks the pixels that have a
measured target (``pair.high_mask``). Only masked pixels are scored.

SSIM (Wang et al. 2004, via :func:`skimage.metrics.structural_similarity`) needs a full image, so
the unmasked area is filled *identically* in prediction and truth (with the gene's masked truth
mean), the local SSIM map is computed with a ``win_size × win_size`` uniform window, and its mean is
taken **over the masked pixels only** (windows straddling the mask edge see the same constant on
both sides, which neither rewards nor penalises a method). ``data_range`` per gene is the range
(max − min) of the truth over the masked pixels, so it depends on the truth alone and is the same
for every method compared.
"""

from __future__ import annotations

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.evaluate.metrics import pearson_per_channel, rmse_per_channel

__all__ = ["interval_coverage", "masked_pearson", "masked_rmse", "masked_ssim", "mean_scores", "superres_scores"]


def _check(pred, truth, mask):
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if pred.ndim != 3 or pred.shape != truth.shape:
        raise VoxelomeError(f"pred and truth must both be (G, H, W) maps; got {pred.shape} and {truth.shape}.")
    mask = np.ones(pred.shape[1:], bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != pred.shape[1:]:
        raise VoxelomeError(f"mask has shape {mask.shape}; it must be the grid (H, W) = {pred.shape[1:]}.")
    if not mask.any():
        raise VoxelomeError("mask selects no pixel; nothing to score.")
    return pred, truth, mask


def masked_rmse(pred, truth, mask=None) -> np.ndarray:
    """Per-gene root-mean-square error ``(G,)`` over the masked pixels (units of the maps)."""
    pred, truth, mask = _check(pred, truth, mask)
    return rmse_per_channel(pred, truth, mask)


def masked_pearson(pred, truth, mask=None) -> np.ndarray:
    """Per-gene Pearson r ``(G,)`` over the masked pixels; NaN where pred or truth is constant there."""
    pred, truth, mask = _check(pred, truth, mask)
    return pearson_per_channel(pred, truth, mask)


def masked_ssim(pred, truth, mask=None, *, win_size: int = 7) -> np.ndarray:
    """Per-gene SSIM ``(G,)``: mean local SSIM over the masked pixels (see the module notes).

    Parameters
    ----------
    pred, truth : array-like, shape (G, H, W)
    mask : array-like of bool, shape (H, W), optional
    win_size : int
        Odd side of the uniform SSIM window (high-res pixels); shrunk to the grid when it is smaller.

    Returns
    -------
    ndarray, shape (G,)
        In ``[-1, 1]``; 1 for ``pred == truth``. NaN for a gene constant over the mask in the truth
        (no data range).
    """
    from skimage.metrics import structural_similarity

    pred, truth, mask = _check(pred, truth, mask)
    w = min(int(win_size), min(pred.shape[1:]))
    w -= 1 - w % 2
    if w < 3:
        raise VoxelomeError(f"the grid {pred.shape[1:]} is too small for SSIM (needs ≥ 3×3 pixels).")
    out = np.full(pred.shape[0], np.nan)
    for g in range(pred.shape[0]):
        t = truth[g][mask]
        rng = float(t.max() - t.min())
        if rng <= 0:
            continue
        fill = float(t.mean())
        a, b = np.where(mask, pred[g], fill), np.where(mask, truth[g], fill)
        _, smap = structural_similarity(a, b, win_size=w, data_range=rng, full=True)
        out[g] = float(smap[mask].mean())
    return out


def interval_coverage(samples, truth, mask=None, *, alpha: float = 0.1) -> dict:
    """Empirical coverage of central ``1 − alpha`` intervals from posterior samples.

    Parameters
    ----------
    samples : array-like, shape (S, G, H, W)
        ``S ≥ 2`` samples of the map.
    truth : array-like, shape (G, H, W)
    mask : array-like of bool, shape (H, W), optional
    alpha : float
        Interval ``[q(alpha/2), q(1 − alpha/2)]`` of the samples at each pixel (``np.quantile``, linear).

    Returns
    -------
    dict
        ``coverage`` (fraction of masked truth values inside their interval, all genes pooled),
        ``coverage_per_gene`` (list, G), ``mean_width`` (mean interval width, map units),
        ``nominal`` (1 − alpha), ``n_samples``.
    """
    s = np.asarray(samples, np.float64)
    if s.ndim != 4 or s.shape[0] < 2:
        raise VoxelomeError(f"samples must be (S, G, H, W) with S ≥ 2; got shape {s.shape}.")
    if not 0 < alpha < 1:
        raise VoxelomeError(f"alpha={alpha!r} must be in (0, 1), e.g. 0.1 for 90 % intervals.")
    _, truth, mask = _check(s[0], truth, mask)
    lo, hi = np.quantile(s[:, :, mask], [alpha / 2, 1 - alpha / 2], axis=0)
    t = truth[:, mask]
    inside = (t >= lo) & (t <= hi)
    return {"coverage": float(inside.mean()), "coverage_per_gene": inside.mean(1).tolist(),
            "mean_width": float((hi - lo).mean()), "nominal": 1.0 - alpha, "n_samples": int(s.shape[0])}


def superres_scores(pred, truth, mask=None, *, samples=None, alpha: float = 0.1, win_size: int = 7) -> dict:
    """Summary of one map: mean over genes of RMSE, SSIM, Pearson r (+ median r), coverage when sampled.

    Returns
    -------
    dict
        ``rmse``, ``ssim``, ``pearson`` (NaN-skipping means over genes), ``pearson_median``,
        ``per_gene`` (``{"rmse": [...], "ssim": [...], "pearson": [...]}``), ``n_pixels``; with ``samples``
        also the keys of :func:`interval_coverage` (``coverage``, ``mean_width``, ...).
    """
    pred, truth, mask = _check(pred, truth, mask)
    r, ss, e = masked_pearson(pred, truth, mask), masked_ssim(pred, truth, mask, win_size=win_size), \
        masked_rmse(pred, truth, mask)

    def m(v, f=np.nanmean):
        return float(f(v)) if np.isfinite(v).any() else float("nan")

    out = {"rmse": m(e), "ssim": m(ss), "pearson": m(r), "pearson_median": m(r, np.nanmedian),
           "n_pixels": int(mask.sum()), "n_genes": int(pred.shape[0]),
           "per_gene": {"rmse": e.tolist(), "ssim": ss.tolist(), "pearson": r.tolist()}}
    if samples is not None:
        out.update(interval_coverage(samples, truth, mask, alpha=alpha))
    return out


def mean_scores(scores: list[dict]) -> dict:
    """Average the scalar entries of several :func:`superres_scores` dicts (e.g. the test slices)."""
    if not scores:
        raise VoxelomeError("no scores to average.")
    keys = [k for k, v in scores[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: float(np.nanmean([s[k] for s in scores])) for k in keys} | {"n_maps": len(scores)}
