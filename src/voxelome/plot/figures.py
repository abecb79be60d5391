"""Standard figures of a voxelome run, each saved as one PNG.

Every function draws on a private :class:`matplotlib.figure.Figure` rendered by the Agg canvas,
so it never touches pyplot's global state or the user's interactive backend, is safe in worker
threads and leaks no figures. Each saves a PNG (110 dpi) at ``path`` and returns it as a
:class:`~pathlib.Path`. Geometry is in micrometres; volumes are ``(z, y, x)``, multichannel
volumes ``(c, z, y, x)``, spot coordinates ``(x, y)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import LinearSegmentedColormap, ListedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from voxelome.errors import VoxelomeError
from voxelome.evaluate.metrics import pearson_per_column

__all__ = ["section_overlay", "orthogonal_views", "training_curves", "scatter_pred_vs_true", "section_order"]

DPI = 110
_RC = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7}


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _table(name: str, arr, n: int | None = None) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or (n is not None and arr.shape[0] != n):
        raise VoxelomeError(f"{name} must be an (n_spots, k) table{'' if n is None else f' with n={n}'}; got {arr.shape}.")
    return arr


def _names(names, k: int) -> list[str]:
    names = [f"sig{i}" for i in range(k)] if names is None else [str(s) for s in names]
    if len(names) != k:
        raise VoxelomeError(f"names has {len(names)} entries but the data has {k} channels; pass one name per channel.")
    return names


def _limits(*arrays, q=(1.0, 99.0)) -> tuple[float, float]:
    vals = np.concatenate([np.ravel(a) for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, q))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5) if lo == 0 else (lo - abs(lo) * 0.05, lo + abs(lo) * 0.05)


def _colours(k: int) -> list:
    base = matplotlib.colormaps["tab10" if k <= 10 else "tab20"].colors
    return [base[i % len(base)] for i in range(k)]


def _fmt_r(r: float) -> str:
    return "r = n/a" if not np.isfinite(r) else f"r = {r:.2f}"


# --- section overlay ------------------------------------------------------------------
def section_overlay(spatial_px, measured, predicted, names, path, *, spot_size: float | None = None,
                    held_out=None, pixel_size_um: float | None = None, max_columns: int = 8,
                    cmap: str = "viridis") -> Path:
    """Measured (row 1) vs predicted (row 2) signatures on the section, one column per signature.

    Parameters
    ----------
    spatial_px : array-like, shape (n, 2)
        Spot centres ``(x, y)`` in section pixels (``obsm['spatial']``); y grows downwards.
    measured, predicted : array-like, shape (n, k)
        Per-spot values (e.g. niche proportions); each column shares one colour scale.
    names : sequence of str, length k
    path : str or Path
        PNG to write.
    spot_size : float, optional
        Marker area in points²; default scales with the number of spots.
    held_out : array-like of bool, shape (n,), optional
        Held-out spots, drawn outlined; the Pearson r in the titles is computed on them.
    pixel_size_um : float, optional
        µm per pixel; when given the axes are in µm, otherwise in pixels.
    max_columns : int
        At most this many signatures are drawn (the first ones).
    """
    xy = _table("spatial_px", spatial_px)
    if xy.shape[1] != 2:
        raise VoxelomeError(f"spatial_px must be (n, 2) (x, y) pixel coordinates; got {xy.shape}.")
    n = len(xy)
    meas, pred = _table("measured", measured, n), _table("predicted", predicted, n)
    if meas.shape != pred.shape:
        raise VoxelomeError(f"measured {meas.shape} and predicted {pred.shape} must have the same shape.")
    names = _names(names, meas.shape[1])
    ho = None if held_out is None else np.asarray(held_out, dtype=bool).reshape(-1)
    if ho is not None and ho.size != n:
        raise VoxelomeError(f"held_out has {ho.size} entries; expected one per spot ({n}).")
    unit = "px"
    if pixel_size_um is not None:
        xy, unit = xy * float(pixel_size_um), "µm"
    on_held = ho is not None and ho.sum() >= 2
    use = ho if on_held else np.ones(n, dtype=bool)
    r = pearson_per_column(pred[use], meas[use])
    k = min(meas.shape[1], max_columns)
    s = spot_size if spot_size is not None else float(np.clip(0.8 * (2.3 * 72) ** 2 / max(n, 1), 0.5, 150))
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(2.5 * k + 0.8, 5.9), layout="constrained")
        axes = fig.subplots(2, k, squeeze=False, sharex=True, sharey=True)
        for j in range(k):
            vmin, vmax = _limits(meas[:, j], pred[:, j])
            for row, data in enumerate((meas, pred)):
                ax = axes[row, j]
                sc = ax.scatter(xy[:, 0], xy[:, 1], c=data[:, j], s=s, cmap=cmap, vmin=vmin, vmax=vmax,
                                linewidths=0, rasterized=True)
                if ho is not None and ho.any():
                    ax.scatter(xy[ho, 0], xy[ho, 1], c=data[ho, j], s=s, cmap=cmap, vmin=vmin, vmax=vmax,
                               edgecolors="black", linewidths=0.4, rasterized=True)
                ax.set_aspect("equal")
                if row == 0:
                    ax.set_title(f"{names[j]}\nmeasured")
                else:
                    where = "held-out" if on_held else "all spots"
                    ax.set_title(f"{names[j]}\npredicted, {_fmt_r(r[j])} ({where})")
                    ax.set_xlabel(f"x ({unit})")
                if j == 0:
                    ax.set_ylabel(f"y ({unit})")
            fig.colorbar(sc, ax=axes[:, j].tolist(), location="bottom", shrink=0.85, aspect=25, pad=0.01)
        axes[0, 0].invert_yaxis()                       # image convention, shared by all panels
        extra = f" (first {k} of {meas.shape[1]})" if k < meas.shape[1] else ""
        outline = "; outlined: held-out spots" if ho is not None and ho.any() else ""
        fig.suptitle(f"Measured vs predicted signatures{extra}{outline}")
        return _save(fig, path)


# --- orthogonal views -------------------------------------------------------------------
def _triplet(name, v) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(v, dtype=np.float64), (3,))
    if not np.all(np.isfinite(arr)):
        raise VoxelomeError(f"{name}={v!r} must be finite (z, y, x) µm values.")
    return arr


def _extent(shape, spacing, origin, rows: int, cols: int) -> tuple[float, float, float, float]:
    lo = origin - spacing / 2
    hi = origin + (np.asarray(shape) - 0.5) * spacing
    return (lo[cols], hi[cols], hi[rows], lo[rows])  # imshow origin="upper": rows grow downwards


_VIEWS = (("axial", 0, 1, 2), ("coronal", 1, 0, 2), ("sagittal", 2, 0, 1))  # name, fixed axis, row, col axis


def orthogonal_views(ct_zyx, pred_czyx, names, spacing_um_zyx, path, *, pred_spacing_um_zyx=None,
                     index_zyx=None, origin_um_zyx=(0.0, 0.0, 0.0), pred_origin_um_zyx=None,
                     max_signatures: int = 6, title: str | None = None) -> Path:
    """Axial, coronal and sagittal slices of the CT with predicted signatures blended on top.

    Row 1 shows the dominant signature (argmax, categorical colours, legend); each further row one
    signature's proportion as a transparent-to-opaque overlay on the grey CT. Axes are in µm with
    equal aspect, so anisotropic voxels look right; a coarser prediction grid is aligned by its
    ``extent`` only (slices are read, never whole arrays, so dask/zarr inputs stay lazy).

    Parameters
    ----------
    ct_zyx : array-like, shape (z, y, x)
        Image volume (NumPy, dask or zarr).
    pred_czyx : array-like, shape (c, z', y', x')
        Predicted signatures; NaN is drawn transparent.
    names : sequence of str, length c
    spacing_um_zyx : float or tuple of float
        CT voxel size ``(dz, dy, dx)`` µm.
    path : str or Path
    pred_spacing_um_zyx : float or tuple of float, optional
        Prediction voxel size in µm; default the CT spacing.
    index_zyx : tuple of int, optional
        CT voxel through which the three planes pass; default the centre.
    origin_um_zyx, pred_origin_um_zyx : tuple of float
        World position (µm) of the centre of voxel ``(0, 0, 0)`` of each grid; the prediction's
        defaults to the CT's (so a ``[::f]``-strided grid lines up).
    max_signatures : int
        Overlay rows drawn (the first channels); the dominant row uses all channels.
    """
    shape = np.asarray(ct_zyx.shape)
    if len(shape) != 3 or len(pred_czyx.shape) != 4:
        raise VoxelomeError(f"ct_zyx must be (z, y, x) and pred_czyx (c, z, y, x); got {tuple(shape)} and "
                            f"{tuple(pred_czyx.shape)}.")
    c, pshape = int(pred_czyx.shape[0]), np.asarray(pred_czyx.shape[1:])
    names = _names(names, c)
    sp, org = _triplet("spacing_um_zyx", spacing_um_zyx), _triplet("origin_um_zyx", origin_um_zyx)
    psp = sp if pred_spacing_um_zyx is None else _triplet("pred_spacing_um_zyx", pred_spacing_um_zyx)
    porg = org if pred_origin_um_zyx is None else _triplet("pred_origin_um_zyx", pred_origin_um_zyx)
    if np.any(sp <= 0) or np.any(psp <= 0):
        raise VoxelomeError(f"spacings must be positive µm; got {sp.tolist()} and {psp.tolist()}.")
    idx = shape // 2 if index_zyx is None else np.asarray(index_zyx, dtype=int)
    if idx.shape != (3,) or np.any(idx < 0) or np.any(idx >= shape):
        raise VoxelomeError(f"index_zyx={index_zyx!r} must be a voxel index inside the CT of shape {tuple(shape)}.")
    world = org + idx * sp
    pidx = np.clip(np.rint((world - porg) / psp).astype(int), 0, pshape - 1)

    def sl(fixed: int, at) -> tuple:
        out = [slice(None)] * 3
        out[fixed] = int(at[fixed])
        return tuple(out)

    ct = [np.asarray(ct_zyx[sl(f, idx)], dtype=np.float32) for _, f, _, _ in _VIEWS]
    pr = [np.asarray(pred_czyx[(slice(None),) + sl(f, pidx)], dtype=np.float32) for _, f, _, _ in _VIEWS]
    glo, ghi = _limits(*ct, q=(0.5, 99.5))
    grey = ListedColormap(matplotlib.colormaps["gray"](np.linspace(0.0, 0.8, 256)))  # dimmed: overlays stay visible
    cols = _colours(c)
    m = min(c, max_signatures)
    size = shape * sp  # physical size per axis (µm)
    widths = [size[2], size[2], size[1]]
    inch_per_um = 9.6 / sum(widths)
    row_h = float(np.clip(inch_per_um * max(size[1], size[0]), 1.4, 4.5)) + 0.55
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(12.0, row_h * (m + 1) + 0.4), layout="constrained")
        gs = fig.add_gridspec(m + 1, 4, width_ratios=widths + [0.2 * sum(widths)])
        for row in range(m + 1):
            for v, (view, fixed, ra, ca) in enumerate(_VIEWS):
                ax = fig.add_subplot(gs[row, v])
                ax.imshow(ct[v], cmap=grey, vmin=glo, vmax=ghi, extent=_extent(shape, sp, org, ra, ca),
                          interpolation="nearest", origin="upper")
                pext = _extent(pshape, psp, porg, ra, ca)
                if row == 0:
                    p = pr[v]
                    ok = np.isfinite(p).any(axis=0) & (np.nansum(p, axis=0) > 0)  # NaN channels ignored
                    dom = np.ma.masked_array(np.argmax(np.nan_to_num(p, nan=-np.inf), axis=0), ~ok)
                    ax.imshow(dom, cmap=ListedColormap(cols), vmin=-0.5, vmax=c - 0.5, alpha=0.6,
                              extent=pext, interpolation="nearest", origin="upper")
                    label = "dominant"
                else:
                    ch = row - 1
                    cm = LinearSegmentedColormap.from_list(
                        f"a{ch}", [to_rgba(cols[ch], 0.0), to_rgba(cols[ch], 0.9)]).with_extremes(bad=(0, 0, 0, 0))
                    vmax = _limits(*(q[ch] for q in pr), q=(0.0, 99.5))[1]
                    im = ax.imshow(pr[v][ch], cmap=cm, vmin=0.0, vmax=max(vmax, 1e-6), extent=pext,
                                   interpolation="nearest", origin="upper")
                    label = names[ch]
                ax.set_xlim(*_extent(shape, sp, org, ra, ca)[:2])
                ax.set_ylim(*_extent(shape, sp, org, ra, ca)[2:])
                ax.set_aspect("equal")
                # where the other two planes cut this one
                ax.axvline(world[ca], color="w", lw=0.5, ls="--", alpha=0.5)
                ax.axhline(world[ra], color="w", lw=0.5, ls="--", alpha=0.5)
                ax.set_title(f"{label} · {view} ({'zyx'[fixed]} = {world[fixed]:.0f} µm)")
                ax.set_xlabel(f"{'zyx'[ca]} (µm)")
                ax.set_ylabel(f"{'zyx'[ra]} (µm)")
            side = fig.add_subplot(gs[row, 3])
            side.axis("off")
            if row == 0:
                side.legend(handles=[Patch(color=cols[i], label=names[i]) for i in range(c)],
                            loc="center left", frameon=False, fontsize=7, title="dominant")
            else:
                cax = side.inset_axes((0.0, 0.08, 0.12, 0.84))
                fig.colorbar(im, cax=cax, label=f"{names[row - 1]} proportion")
        fig.suptitle(title or f"Predicted signatures in 3D ({m} of {c} shown; CT voxel {tuple(int(i) for i in idx)})")
        return _save(fig, path)


# --- training curves ------------------------------------------------------------------
def training_curves(history: Sequence[dict], path, *, title: str = "Training curves") -> Path:
    """Loss per epoch (train, val and any other ``*loss*`` keys), other metrics and learning rate.

    Parameters
    ----------
    history : sequence of dict
        One dict per epoch with ``epoch``, ``train_loss`` and optionally ``val_loss`` and more
        numeric keys (``lr``/``learning_rate`` get their own log-scale panel).
    path : str or Path
    """
    if not history:
        raise VoxelomeError("history is empty; training_curves needs at least one epoch dict.")
    ep = np.array([h.get("epoch", i) for i, h in enumerate(history)], dtype=float)
    keys = [k for k in dict.fromkeys(k for h in history for k in h) if k != "epoch"]

    def series(k):
        return np.array([np.nan if not isinstance(h.get(k), (int, float, np.number)) or isinstance(h.get(k), bool)
                         else float(h[k]) for h in history])

    data = {k: series(k) for k in keys}
    data = {k: v for k, v in data.items() if np.isfinite(v).any()}
    groups = [[k for k in data if "loss" in k],
              [k for k in data if "loss" not in k and k not in ("lr", "learning_rate")],
              [k for k in data if k in ("lr", "learning_rate")]]
    groups = [g for g in groups if g]
    if not groups:
        raise VoxelomeError(f"history has no numeric values to plot besides 'epoch' (keys: {keys}).")
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(4.2 * len(groups), 3.4), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(groups)))
        for ax, g in zip(axes, groups):
            for k in g:
                ok = np.isfinite(data[k])
                ax.plot(ep[ok], data[k][ok], marker="o" if ok.sum() < 30 else None, ms=3, lw=1.2, label=k)
            vals = np.concatenate([data[k][np.isfinite(data[k])] for k in g])
            if g[0] in ("lr", "learning_rate") or (np.all(vals > 0) and vals.max() / vals.min() > 30):
                ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(frameon=False)
        axes[0].set_ylabel("loss")
        if "val_loss" in data and np.isfinite(data["val_loss"]).any():
            best = int(np.nanargmin(data["val_loss"]))
            axes[0].axvline(ep[best], color="grey", ls=":", lw=1)
            axes[0].set_title(f"best val_loss {data['val_loss'][best]:.4g} at epoch {ep[best]:g}")
        fig.suptitle(title)
        return _save(fig, path)


# --- predicted vs measured -------------------------------------------------------------
def scatter_pred_vs_true(pred, true, names, path, *, max_panels: int = 16, hexbin_above: int = 2000) -> Path:
    """Predicted vs measured value per signature, with the identity line and Pearson r.

    Parameters
    ----------
    pred, true : array-like, shape (n, k)
        Per-spot (or per-voxel sample) predictions and measurements.
    names : sequence of str, length k
    path : str or Path
    max_panels : int
        At most this many signatures (the first ones).
    hexbin_above : int
        With more points than this a log-count hexbin replaces the scatter.
    """
    pred, true = _table("pred", pred), _table("true", true)
    if pred.shape != true.shape:
        raise VoxelomeError(f"pred {pred.shape} and true {true.shape} must have the same (n, k) shape.")
    names = _names(names, pred.shape[1])
    r = pearson_per_column(pred, true)
    k = min(pred.shape[1], max_panels)
    ncol = min(4, math.ceil(math.sqrt(k)))
    nrow = math.ceil(k / ncol)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(3.1 * ncol, 3.0 * nrow + 0.3), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
        for j, ax in enumerate(axes):
            if j >= k:
                ax.axis("off")
                continue
            ok = np.isfinite(pred[:, j]) & np.isfinite(true[:, j])
            x, y = true[ok, j], pred[ok, j]
            lo, hi = _limits(x, y, q=(0.0, 100.0))
            pad = 0.03 * (hi - lo)
            lo, hi = lo - pad, hi + pad
            if ok.sum() > hexbin_above:
                hb = ax.hexbin(x, y, gridsize=40, bins="log", mincnt=1, cmap="viridis", extent=(lo, hi, lo, hi))
                fig.colorbar(hb, ax=ax, shrink=0.8, label="count")
            else:
                ax.scatter(x, y, s=6, alpha=0.5, linewidths=0, color="tab:blue")
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_aspect("equal")
            ax.set_title(f"{names[j]}  ({_fmt_r(r[j])}, n = {int(ok.sum())})")
            ax.set_xlabel("measured")
            ax.set_ylabel("predicted")
        extra = f" (first {k} of {pred.shape[1]})" if k < pred.shape[1] else ""
        fig.suptitle(f"Predicted vs measured{extra}")
        return _save(fig, path)


def section_order(similarity, names, suggested, path, *, gain: float | None = None) -> Path:
    """Pairwise section similarity in the given order and in the suggested one (``register order``).

    Parameters
    ----------
    similarity : array, shape (n, n)
        Symmetric similarity (mean per-gene r) of the sections ``names`` in their given order.
    names, suggested : list of str
        The given order and the suggested one (the same names).
    path : path-like
        PNG to write.
    gain : float, optional
        The suggested order's relative gain, shown in the title.

    Returns
    -------
    Path
    """
    sim = np.asarray(similarity, float)
    if sim.shape != (len(names), len(names)) or sorted(suggested) != sorted(names):
        raise VoxelomeError(f"similarity {sim.shape} must be n × n for the {len(names)} names, and suggested must "
                            "hold the same names.")
    finite = sim[np.isfinite(sim)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(7.6, 3.6))
        axes = fig.subplots(1, 2)
        for ax, order, title in ((axes[0], list(names), "given order"),
                                 (axes[1], list(suggested), "suggested order" + ("" if gain is None else f" (+{gain:.0%})"))):
            idx = [list(names).index(s) for s in order]
            im = ax.imshow(sim[np.ix_(idx, idx)], vmin=lo, vmax=hi, cmap="viridis")
            ax.set_xticks(range(len(order)), order, rotation=90)
            ax.set_yticks(range(len(order)), order)
            ax.set_title(title)
        fig.colorbar(im, ax=axes, shrink=0.8, label="per-gene r of a section predicted from the other")
        return _save(fig, path)
