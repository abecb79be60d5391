"""More training pairs from the same sections: the degradation at every block phase.

A pair whose low-res map is the block mean of its high-res map (the real-data pairs: spots → 2×2 pseudo-spots)
can be degraded again with the block grid shifted by ``(dy, dx)`` high-res pixels, ``0 ≤ dy, dx < factor``: the
same measured spots grouped differently. The ``factor²`` phases give ``factor²`` different low-res inputs for
one target — the cheapest defence against over-fitting when only a few hundred spots are measured.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from voxelome.datasets.superres import SuperResPair, block_mean


def shifted_pair(pair: SuperResPair, dy: int, dx: int, min_pixels: int = 1, weights=None) -> SuperResPair:
    """``pair`` re-degraded with its block grid shifted by ``(dy, dx)`` high-res pixels.

    The high-res maps are padded by ``dy`` rows on top and ``dx`` columns on the left (and at the bottom/right
    up to a multiple of the factor) with unmeasured pixels; ``low`` is the mean over each block's measured pixels
    (weighted by ``weights`` (H, W), e.g. cells per pixel, when given), observed where ≥ ``min_pixels`` are.
    """
    f = int(pair.factor)
    H, W = pair.high_mask.shape
    ph, pw = (-(H + dy)) % f, (-(W + dx)) % f
    pad = ((dy, ph), (dx, pw))

    def grow(a):
        return None if a is None else np.pad(a, ((0, 0), *pad)) if a.ndim == 3 else np.pad(a, pad)

    high, mask = grow(pair.high), grow(pair.high_mask)
    low, cnt = block_mean(high, mask, f)
    if weights is not None:  # weighted block mean Σ w·v / Σ w (e.g. the mean over cells, not pixels)
        w = np.pad(np.asarray(weights, np.float64), pad) * mask
        g, hh, ww = high.shape
        s = (high * w).reshape(g, hh // f, f, ww // f, f).sum((2, 4))
        tot = w.reshape(hh // f, f, ww // f, f).sum((1, 3))
        low = np.divide(s, tot, out=np.zeros_like(s), where=tot > 0).astype(np.float32)
    low_mask = cnt >= int(min_pixels)
    # features of padded positions: edge values (never scored; only context)
    image = None if pair.image is None else np.pad(pair.image, ((0, 0), *pad), mode="edge")
    return dataclasses.replace(pair, name=f"{pair.name}_phase{dy}{dx}", high=high.astype(np.float32), high_mask=mask,
                               low=(low * low_mask).astype(np.float32), low_mask=low_mask, image=image,
                               truth=grow(pair.truth), extra={})


def all_phases(pairs, min_pixels: int = 1, weights_key: str | None = None) -> list[SuperResPair]:
    """Every pair at each of its ``factor²`` block phases (phase (0, 0) re-derived the same way)."""
    out = []
    for p in pairs:
        w = p.extra.get(weights_key) if weights_key else None
        for dy in range(int(p.factor)):
            for dx in range(int(p.factor)):
                out.append(shifted_pair(p, dy, dx, min_pixels, w).validate())
    return out
