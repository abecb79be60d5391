"""From expression pairs to the network's tensors and back: upsampling, per-gene scaling, residuals.

The diffusion runs on the *normalised residual* ``r = (high − up(low)) / σ_g``: what the low-res map does
not already say, per gene in units of its training spread. ``up`` is the bicubic baseline (unobserved
low-res pixels filled with their nearest observed neighbour first, so borders do not drag the interpolation
towards zero), so the model learns exactly what bicubic upsampling misses. The low-res condition itself is
standardised per gene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voxelome.errors import check_choice

BASES = ("bicubic", "nearest")


def upsample_low(low: np.ndarray, low_mask: np.ndarray, factor: int, method: str = "bicubic") -> np.ndarray:
    """The condition's base, ``(G, h·f, w·f)``: one of the upsampling baselines itself
    (:mod:`voxelome.evaluate.superres_baselines`; unobserved low-res pixels filled by their nearest observed one).
    ``nearest`` (block replication) keeps every block's mean exactly, so the residual is within-block detail."""
    from voxelome.evaluate.superres_baselines import bicubic_upsample, nearest_upsample

    check_choice("base", method, BASES)
    return (bicubic_upsample if method == "bicubic" else nearest_upsample)(low, low_mask, factor)


@dataclass(frozen=True)
class ExpressionScaling:
    """Per-gene statistics fitted on the training pairs (all arrays shape (G,))."""

    low_mean: np.ndarray  #: mean of the observed low-res values
    low_std: np.ndarray  #: their standard deviation
    residual_std: np.ndarray  #: spread of ``high − up(low)`` over measured high-res pixels
    base: str = "bicubic"  #: the upsampling ``up`` (see :func:`upsample_low`)

    @classmethod
    def fit(cls, pairs, base: str = "bicubic") -> ExpressionScaling:
        lows = np.concatenate([p.low[:, p.low_mask] for p in pairs], axis=1)
        res = np.concatenate([(p.high - upsample_low(p.low, p.low_mask, p.factor, base))[:, p.high_mask]
                              for p in pairs], axis=1)
        floor = 1e-3
        return cls(lows.mean(1).astype(np.float32), np.maximum(lows.std(1), floor).astype(np.float32),
                   np.maximum(res.std(1), floor).astype(np.float32), base)

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k).tolist() for k in ("low_mean", "low_std", "residual_std")}, "base": self.base}

    @classmethod
    def from_dict(cls, d: dict) -> ExpressionScaling:
        return cls(*(np.asarray(d[k], np.float32) for k in ("low_mean", "low_std", "residual_std")),
                   d.get("base", "bicubic"))


def pair_tensors(pair, scaling: ExpressionScaling) -> dict[str, np.ndarray]:
    """The arrays the network sees for one pair (all float32, full high-res grid).

    Returns
    -------
    dict
        ``low_up`` (G, H, W) standardised upsampled condition; ``low_mask`` (1, H, W) observed low-res
        pixels at high resolution; ``image`` (F, H, W) or absent; ``x0`` (G, H, W) normalised residual target
        (0 outside the mask); ``mask`` (1, H, W) measured high-res pixels; ``base`` (G, H, W) the raw
        upsampled low-res map that samples are added to.
    """
    f = int(pair.factor)
    base = upsample_low(pair.low, pair.low_mask, f, scaling.base)
    g = (slice(None), None, None)
    out = {
        "low_up": ((base - scaling.low_mean[g]) / scaling.low_std[g]).astype(np.float32),
        "low_mask": np.kron(pair.low_mask.astype(np.float32), np.ones((f, f), np.float32))[None],
        "x0": np.where(pair.high_mask[None], (pair.high - base) / scaling.residual_std[g], 0.0).astype(np.float32),
        "mask": pair.high_mask.astype(np.float32)[None],
        "base": base.astype(np.float32),
    }
    if pair.image is not None:
        out["image"] = np.asarray(pair.image, np.float32)
    return out


def to_expression(residual: np.ndarray, base: np.ndarray, scaling: ExpressionScaling) -> np.ndarray:
    """Normalised residual samples ``(..., G, H, W)`` → expression on the targets' scale."""
    return residual * scaling.residual_std[:, None, None] + base


def block_consistency(samples: np.ndarray, low: np.ndarray, low_mask: np.ndarray, high_mask: np.ndarray,
                      factor: int) -> np.ndarray:
    """Shift each sample so its mean over every low-res block's measured pixels equals the observed value.

    Parameters
    ----------
    samples : array, shape (S, G, H, W)
    low : array, shape (G, h, w); low_mask : (h, w) bool; high_mask : (H, W) bool
    factor : int

    Returns
    -------
    array, shape (S, G, H, W)
        Samples whose block means reproduce ``low`` exactly where both the block and some of its pixels are
        observed (other blocks are left as they are).
    """
    s, g, hh, ww = samples.shape
    f = int(factor)
    h, w = hh // f, ww // f
    m = high_mask[: h * f, : w * f].reshape(h, f, w, f).astype(np.float32)
    n = m.sum((1, 3))
    x = samples[..., : h * f, : w * f].reshape(s, g, h, f, w, f)
    means = (x * m).sum((3, 5)) / np.maximum(n, 1)
    shift = np.where((n > 0) & low_mask, low[None] - means, 0.0)
    out = samples.copy()
    out[..., : h * f, : w * f] = (x + shift[:, :, :, None, :, None]).reshape(s, g, h * f, w * f)
    return out
