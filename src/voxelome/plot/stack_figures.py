"""Quality-control figures of serial-section stacks and of the fields fitted to them, one PNG each.

Drawn like :mod:`voxelome.plot.figures` (a private Agg :class:`~matplotlib.figure.Figure`, never pyplot's state):

- :func:`stack_alignment`: every pair of adjacent sections before and after ``register stack``'s alignment, spots
  coloured by the first principal component of their joint expression embedding — aligned sections show the
  same pattern on top of each other;
- :func:`field_holdout`: ``reconstruct evaluate``'s scores, per held-out section and per gene.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from voxelome.errors import VoxelomeError
from voxelome.plot.figures import _RC, _limits, _save


def stack_alignment(raw_xy, aligned_xy, colour, names, path, *, max_pairs: int = 8) -> Path:
    """Adjacent sections as read (top row) and as stacked (bottom row).

    Parameters
    ----------
    raw_xy, aligned_xy : list of arrays, each shape (n_i, 2)
        Spot centres (µm) of each section before alignment (its own frame) and in the stack's frame.
    colour : list of arrays, each shape (n_i,)
        A value per spot in one scale for all sections (e.g. PC1 of the joint expression embedding).
    names : list of str
        Section names, in stack order.
    path : path-like
        PNG to write.
    max_pairs : int
        At most this many adjacent pairs are drawn (evenly spread), so a long stack stays legible.

    Returns
    -------
    Path
    """
    n = len(names)
    if not (len(raw_xy) == len(aligned_xy) == len(colour) == n) or n < 2:
        raise VoxelomeError(f"stack_alignment needs ≥ 2 sections with positions and colours for each; got {n} names, "
                            f"{len(raw_xy)} / {len(aligned_xy)} / {len(colour)} tables.")
    pairs = np.unique(np.linspace(1, n - 1, min(max_pairs, n - 1)).round().astype(int))
    lo, hi = _limits(*colour)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(2.4 * len(pairs) + 1.0, 5.0), layout="constrained")
        axes = np.atleast_2d(fig.subplots(2, len(pairs), squeeze=False))
        for col, k in enumerate(pairs):
            for row, (xys, label) in enumerate(((raw_xy, "as read"), (aligned_xy, "stacked"))):
                ax = axes[row, col]
                prev, cur = np.asarray(xys[k - 1], float), np.asarray(xys[k], float)
                ax.scatter(prev[:, 0], prev[:, 1], s=30, facecolors="none", linewidths=0.8,
                           edgecolors=matplotlib.colormaps["viridis"]((np.asarray(colour[k - 1]) - lo) / (hi - lo)))
                sc = ax.scatter(cur[:, 0], cur[:, 1], s=6, c=colour[k], vmin=lo, vmax=hi, cmap="viridis")
                ax.set_aspect("equal")
                ax.invert_yaxis()  # image convention: y grows downwards
                ax.set_title(f"{names[k - 1]} (rings), {names[k]} (dots)\n{label}")
                ax.tick_params(labelsize=6)
        fig.colorbar(sc, ax=axes, shrink=0.7, label="expression PC1 (joint embedding)")
        return _save(fig, path)


def field_holdout(rows: list[dict], labels: dict, path) -> Path:
    """Per held-out section, mean r of the field and of each baseline (bars); per gene, the field's r against the
    best baseline's (one point per gene and section; above the diagonal: the field is better for that gene).

    Parameters
    ----------
    rows : list of dict
        :func:`voxelome.evaluate.field_holdout.score_section` rows.
    labels : dict
        Baseline key → plain name.
    path : path-like
        PNG to write.
    """
    names = [r["section"] for r in rows]
    series = {"field": [r["field"]["r"] for r in rows],
              **{labels[b]: [r["baselines"][b]["r"] for r in rows] for b in labels}}
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(10, 4.0), layout="constrained")
        ax, bx = fig.subplots(1, 2)
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            ax.bar(np.arange(len(names)) + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_ylabel("mean per-gene r (held-out spots)")
        ax.set_title("held-out sections")
        ax.legend(ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
        for r in rows:
            best = r["best_baseline"]
            bx.scatter(r["baseline_r_per_gene"][best], r["field_r_per_gene"], s=8, alpha=0.6,
                       label=f"{r['section']} (vs {labels[best]})")
        values = np.concatenate([np.r_[r["baseline_r_per_gene"][r["best_baseline"]], r["field_r_per_gene"]]
                                 for r in rows])
        values = values[np.isfinite(values)]
        lim = [float(values.min()) - 0.05, float(values.max()) + 0.05] if len(values) else [0.0, 1.0]
        bx.plot(lim, lim, color="0.5", lw=1)
        bx.set_xlim(lim)
        bx.set_ylim(lim)
        bx.set_xlabel("best baseline r, per gene")
        bx.set_ylabel("field r, per gene")
        bx.set_title("genes above the line: the field is better")
        bx.legend()
        return _save(fig, path)
