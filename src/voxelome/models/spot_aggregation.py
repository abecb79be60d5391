"""Spot values from a dense map: the map SUMMED over each spot's disk (PixNet), or over label masks.

PixNet (arXiv 2503.01347) predicts a continuous expression map and defines a spot's prediction as the
map summed inside the spot's disk. This is parameter-free, so the same map answers for spots of any
radius (or any centre) at inference. Here the sum is *exact* for a piecewise-constant map: each pixel
is weighted by the exact area of its intersection with the disk (analytic circle ∩ square), so a
constant map ``c`` summed over a disk that lies inside the image gives ``c · π r²`` for any radius and
any sub-pixel centre, and values change continuously with the radius.

Coordinates are *continuous pixel coordinates* of the map: pixel ``(row i, column j)`` covers
``[j, j+1) × [i, i+1)``, so its centre is ``(j + 0.5, i + 0.5)``. Readers' pixel indices (scverse
``obsm['spatial']``, whose pixel ``p`` is the pixel centred at index ``p``) become ``p + 0.5``;
:func:`image_px_to_map_xy` does this conversion and the rescaling between resolutions.
"""

from __future__ import annotations

import numpy as np
import torch

from voxelome.errors import VoxelomeError

__all__ = ["disk_area_weights", "disk_weight_matrix", "aggregate_disks", "aggregate_labels", "image_px_to_map_xy"]


def _S(t, r):
    """Antiderivative of ``sqrt(r² - t²)`` on ``[-r, r]``."""
    t = np.clip(t, -r, r)
    return 0.5 * (t * np.sqrt(np.maximum(r * r - t * t, 0.0)) + r * r * np.arcsin(np.clip(t / r, -1.0, 1.0)))


def _quadrant_area(x, y, r):
    """Exact area of ``{X² + Y² ≤ r²} ∩ {X ≤ x, Y ≤ y}`` (disk centred at the origin), vectorised."""
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    u = np.clip(x, -r, r)
    a = np.sqrt(np.maximum(r * r - y * y, 0.0))
    mid = np.clip(u, -a, a)
    # ∫_{-a}^{mid} (y + s(t)) dt — the strip where the chord [−s, min(y, s)] is partial
    middle = np.where(u > -a, y * (mid + a) + _S(mid, r) - _S(-a, r), 0.0)
    # y ≥ 0: the full chord 2 s(t) where s(t) ≤ y, i.e. |t| ≥ a
    left = 2.0 * (_S(np.minimum(u, -a), r) - _S(-r, r))
    right = 2.0 * (_S(np.maximum(u, a), r) - _S(a, r))
    out = np.where(y >= 0, left + middle + right, middle)
    return np.where(y <= -r, 0.0, out)


def disk_area_weights(centre_xy, radius: float, shape_yx=None):
    """Per-pixel area of intersection with one disk.

    Parameters
    ----------
    centre_xy : (float, float)
        Disk centre in continuous pixel coordinates (see the module docstring).
    radius : float
        Disk radius in pixels (> 0).
    shape_yx : (int, int), optional
        Image shape; the box is clipped to it (pixels outside the image contribute nothing).

    Returns
    -------
    y0, x0 : int
        Top-left pixel of the returned box.
    weights : ndarray, shape (h, w), float64
        Area (in pixel² units, in [0, 1]) of each pixel of the box inside the disk;
        ``weights.sum() == π r²`` when the disk lies inside the image.
    """
    r = float(radius)
    if not np.isfinite(r) or r <= 0:
        raise VoxelomeError(f"radius={radius!r} must be a finite number of pixels > 0.")
    cx, cy = float(centre_xy[0]), float(centre_xy[1])
    x0, x1 = int(np.floor(cx - r)), int(np.ceil(cx + r))
    y0, y1 = int(np.floor(cy - r)), int(np.ceil(cy + r))
    if shape_yx is not None:
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, int(shape_yx[1])), min(y1, int(shape_yx[0]))
        if x1 <= x0 or y1 <= y0:
            return max(y0, 0), max(x0, 0), np.zeros((0, 0))
    xs = np.arange(x0, x1 + 1, dtype=float) - cx  # pixel edges relative to the centre
    ys = np.arange(y0, y1 + 1, dtype=float) - cy
    q = _quadrant_area(xs[None, :], ys[:, None], r)  # (h + 1, w + 1) cumulative areas at pixel corners
    w = q[1:, 1:] - q[:-1, 1:] - q[1:, :-1] + q[:-1, :-1]
    return y0, x0, np.clip(w, 0.0, 1.0)


def _check_inside(centres, radius, shape_yx, what="spot"):
    c = np.asarray(centres, float)
    bad = ~np.isfinite(c).all(1) | (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] > shape_yx[1]) | (c[:, 1] > shape_yx[0])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise VoxelomeError(
            f"{int(bad.sum())} {what} centre(s) lie outside the map of {shape_yx[1]}×{shape_yx[0]} px (x × y), "
            f"e.g. #{i} at {tuple(np.round(c[i], 2))}; check that the spot coordinates belong to this image and "
            "that the pixel size is right (spots are in the image's pixels, obsm['spatial']).")


def disk_weight_matrix(shape_yx, centres_xy, radius, *, check_inside: bool = True):
    """Sparse ``(n_spots, H·W)`` matrix of exact disk-pixel overlap areas.

    Parameters
    ----------
    shape_yx : (int, int)
        Map shape.
    centres_xy : array-like, shape (n, 2)
        Spot centres, continuous pixel coordinates ``(x, y)`` of the map.
    radius : float or array-like of shape (n,)
        Disk radius per spot, in map pixels.
    check_inside : bool
        Raise :class:`VoxelomeError` if a centre is outside the map (default). Disks that only
        partly overlap the map are summed over the part inside.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n, H·W), float64
        ``M @ map.reshape(G, -1).T`` gives the ``(n, G)`` disk sums.
    """
    import scipy.sparse as sp

    shape_yx = (int(shape_yx[0]), int(shape_yx[1]))
    centres = np.asarray(centres_xy, float).reshape(-1, 2)
    radii = np.broadcast_to(np.asarray(radius, float), (len(centres),))
    if check_inside:
        _check_inside(centres, radii, shape_yx)
    rows, cols, vals = [], [], []
    for i, (c, r) in enumerate(zip(centres, radii)):
        y0, x0, w = disk_area_weights(c, r, shape_yx)
        if w.size == 0:
            continue
        yy, xx = np.nonzero(w > 0)
        rows.append(np.full(len(yy), i))
        cols.append((yy + y0) * shape_yx[1] + (xx + x0))
        vals.append(w[yy, xx])
    if not rows:
        return sp.csr_matrix((len(centres), shape_yx[0] * shape_yx[1]))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(len(centres), shape_yx[0] * shape_yx[1]))


def aggregate_disks(dense_map, centres_xy, radius, *, reduce: str = "sum", check_inside: bool = True):
    """Spot values: the map summed (PixNet) or averaged over each disk.

    Parameters
    ----------
    dense_map : ndarray or torch.Tensor, shape (G, H, W)
        Dense map (channels first). A tensor stays a tensor (differentiable w.r.t. the map).
    centres_xy : array-like, shape (n, 2)
        Centres in continuous map pixel coordinates ``(x, y)``.
    radius : float or array-like, shape (n,)
        Disk radius in map pixels (any value: nothing is learnt about it).
    reduce : {'sum', 'mean'}
        ``sum`` is PixNet's spot value; ``mean`` divides by the disk area inside the map.
    check_inside : bool
        Refuse centres outside the map.

    Returns
    -------
    ndarray or tensor, shape (n, G)
    """
    if reduce not in ("sum", "mean"):
        raise VoxelomeError(f"reduce={reduce!r} must be 'sum' or 'mean'.")
    if dense_map.ndim != 3:
        raise VoxelomeError(f"dense_map has shape {tuple(dense_map.shape)}; expected (channels, y, x).")
    g, h, w = dense_map.shape
    m = disk_weight_matrix((h, w), centres_xy, radius, check_inside=check_inside)
    area = np.asarray(m.sum(1)).ravel()
    if reduce == "mean":
        m = m.multiply(1.0 / np.maximum(area, 1e-12)[:, None]).tocsr()
    if isinstance(dense_map, torch.Tensor):
        coo = m.tocoo()
        idx = torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
        t = torch.sparse_coo_tensor(idx, torch.as_tensor(coo.data, dtype=dense_map.dtype), size=m.shape,
                                    device=dense_map.device, check_invariants=True)
        return torch.sparse.mm(t, dense_map.reshape(g, -1).T)
    flat = np.asarray(dense_map, dtype=np.float64).reshape(g, -1)
    return np.asarray(m @ flat.T)


def aggregate_labels(dense_map, labels, *, reduce: str = "sum", n_labels: int | None = None):
    """Values of arbitrary regions (cells, bins): the map summed or averaged over each label.

    Parameters
    ----------
    dense_map : ndarray, shape (G, H, W)
        Dense map.
    labels : ndarray of int, shape (H·k, W·k)
        Label image at the map's resolution (``k = 1``) or ``k`` times finer (integer ``k``, e.g. a
        cell segmentation at the image's resolution); 0 is background, regions are 1…n. A finer
        label pixel contributes its share ``1/k²`` of the map pixel it lies in, so sums stay exact.
    reduce : {'sum', 'mean'}
        ``mean`` divides by the region's area (in map pixels).
    n_labels : int, optional
        Number of regions (default ``labels.max()``).

    Returns
    -------
    ndarray, shape (n_labels, G)
        Row ``i`` holds region ``i + 1``; empty regions give 0 (sum) or NaN (mean).
    """
    if reduce not in ("sum", "mean"):
        raise VoxelomeError(f"reduce={reduce!r} must be 'sum' or 'mean'.")
    dense_map = np.asarray(dense_map, dtype=np.float64)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise VoxelomeError(f"labels must be an integer label image; got dtype {labels.dtype}.")
    g, h, w = dense_map.shape
    k = labels.shape[0] // h if h else 0
    if labels.ndim != 2 or k < 1 or labels.shape != (h * k, w * k):
        raise VoxelomeError(f"labels has shape {labels.shape}; expected the map's {(h, w)} or an integer multiple "
                            f"of it (a finer segmentation). Resample the labels to the map's grid.")
    if labels.min() < 0:
        raise VoxelomeError("labels must be ≥ 0 (0 = background).")
    n = int(labels.max()) if n_labels is None else int(n_labels)
    lab = labels.reshape(h, k, w, k).transpose(0, 2, 1, 3).reshape(h * w, k * k)
    out = np.zeros((n + 1, g))
    area = np.zeros(n + 1)
    flat = dense_map.reshape(g, -1).T / (k * k)
    for j in range(k * k):
        np.add.at(out, lab[:, j], flat)
        area += np.bincount(lab[:, j], minlength=n + 1)[: n + 1] / (k * k)
    out, area = out[1:], area[1:]
    if reduce == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            out = out / area[:, None]
    return out


def image_px_to_map_xy(spatial_px, image_pixel_size_um: float, map_pixel_size_um: float) -> np.ndarray:
    """Reader pixel coordinates (``obsm['spatial']``, pixel centres at integers) → continuous map coordinates.

    Parameters
    ----------
    spatial_px : array-like, shape (n, 2)
        ``(x, y)`` in pixels of the original image.
    image_pixel_size_um, map_pixel_size_um : float
        µm per pixel of the original image and of the map (the map covers the same field, origin at
        the image's top-left corner).
    """
    xy = np.asarray(spatial_px, float).reshape(-1, 2)
    return (xy + 0.5) * (float(image_pixel_size_um) / float(map_pixel_size_um))
