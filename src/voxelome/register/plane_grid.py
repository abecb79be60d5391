"""Coarse stage of the plane search: mutual information of the section against many candidate planes at once.

Every combination of two tilts, in-plane rotation and depth is scored by vectorised joint
histograms at the coarsest level; the best distinct candidates seed the SimpleITK refinement
(:mod:`voxelome.register.plane_itk`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from voxelome.errors import VoxelomeError

BINS_GRID = 12  # joint-histogram bins of the grid stage


def rot_xyz(ax, ay, az):
    """Rotation matrices ``Rz(az) @ Rx(ax) @ Ry(ay)`` (ITK's Euler ZXY order), broadcast over inputs, (..., 3, 3)."""
    ax, ay, az = np.broadcast_arrays(*(np.asarray(a, float) for a in (ax, ay, az)))
    c, s = np.cos, np.sin
    one, zero = np.ones_like(ax), np.zeros_like(ax)
    rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, c(ax), -s(ax)], -1),
                   np.stack([zero, s(ax), c(ax)], -1)], -2)
    ry = np.stack([np.stack([c(ay), zero, s(ay)], -1), np.stack([zero, one, zero], -1),
                   np.stack([-s(ay), zero, c(ay)], -1)], -2)
    rz = np.stack([np.stack([c(az), -s(az), zero], -1), np.stack([s(az), c(az), zero], -1),
                   np.stack([zero, zero, one], -1)], -2)
    return rz @ rx @ ry


def mi_many(fixed_bins: np.ndarray, moving_vals: np.ndarray, edges: np.ndarray, min_valid: float) -> np.ndarray:
    """Mutual information of one fixed sample set against K moving sample sets ``(K, n)`` (NaN = outside)."""
    k, n = moving_vals.shape
    valid = np.isfinite(moving_vals)
    mb = np.clip(np.searchsorted(edges, np.where(valid, moving_vals, edges[0])) - 1, 0, BINS_GRID - 1)
    code = (np.arange(k)[:, None] * BINS_GRID + fixed_bins[None, :]) * BINS_GRID + mb
    joint = np.bincount(code[valid], minlength=k * BINS_GRID * BINS_GRID).reshape(k, BINS_GRID, BINS_GRID)
    nv = joint.sum((1, 2), keepdims=True).astype(float)
    p = joint / np.maximum(nv, 1)
    pf, pm = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.nansum(np.where(p > 0, p * np.log(p / (pf * pm)), 0.0), axis=(1, 2))
    mi[nv[:, 0, 0] < min_valid * n] = -np.inf
    return mi


class GridScorer:
    """Mutual information of the coarse section against the coarse volume on many candidate planes at once."""

    def __init__(self, coarse, origin_zyx, centre, vol_c, seed, n_samples=2000):
        sec, g, off = coarse["sec"], coarse["g"], coarse["off"]
        rng = np.random.default_rng(seed)
        yy, xx = np.nonzero(np.ones_like(sec, bool))
        pick = rng.choice(len(yy), size=min(len(yy), n_samples), replace=False)
        self.pts = np.column_stack([off + xx[pick] * g, off + yy[pick] * g, np.zeros(len(pick))]) - centre
        self.pts32 = self.pts.astype(np.float32)
        fvals = sec[yy[pick], xx[pick]]
        fedges = np.quantile(fvals, np.linspace(0, 1, BINS_GRID + 1))
        self.fbins = np.clip(np.searchsorted(fedges, fvals, side="right") - 1, 0, BINS_GRID - 1)
        self.vol = coarse["vol"]
        self.medges = np.quantile(self.vol[:: max(1, self.vol.shape[0] // 16)], np.linspace(0, 1, BINS_GRID + 1))
        self.medges[-1] += 1e-6
        self.origin, self.spacing, self.vol_c = np.asarray(origin_zyx), np.asarray(coarse["spacing"]), vol_c

    def __call__(self, rot: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """MI ``(r,)`` of planes ``x = rot @ (p - centre) + vol_c + shift``; rot (r, 3, 3), shift (r, 3) µm."""
        out = np.empty(len(rot))
        for i in range(0, len(rot), 256):
            # voxel index (z, y, x) of every sample on every plane, float32 (r, n, 3)
            r = (rot[i:i + 256][:, ::-1, :] / self.spacing[:, None]).astype(np.float32)
            base = ((self.vol_c[::-1] + shift[i:i + 256, ::-1] - self.origin) / self.spacing).astype(np.float32)
            idx = np.matmul(self.pts32[None], r.transpose(0, 2, 1)) + base[:, None, :]
            vals = ndimage.map_coordinates(self.vol, idx.reshape(-1, 3).T, order=1, mode="constant", cval=np.nan)
            out[i:i + 256] = mi_many(self.fbins, vals.reshape(len(r), -1), self.medges, min_valid=0.5)
        return out

    def best_offset(self, rot: np.ndarray, shift: np.ndarray, sec: np.ndarray, g: float, off: float,
                    centre: np.ndarray, margin_um: float) -> np.ndarray:
        """In-plane translation (world µm, (3,)) that best aligns the section with the volume on one plane.

        The volume is resampled on the plane over the section's extent plus ``margin_um`` and the
        section is matched to it by normalised cross-correlation (stained density and CT density rise
        together); the centroid seed is often ~100 µm off, more than the MI peak is wide.
        """
        from skimage.feature import match_template

        m = int(np.ceil(margin_um / g))
        h, w = sec.shape
        yy, xx = np.meshgrid(np.arange(-m, h + m), np.arange(-m, w + m), indexing="ij")
        p = np.stack([off + xx * g, off + yy * g, np.zeros_like(xx, float)], -1).reshape(-1, 3) - centre
        world = p @ rot.T + self.vol_c + shift
        idx = (world[:, ::-1] - self.origin) / self.spacing
        sl = ndimage.map_coordinates(self.vol, idx.T, order=1, mode="constant", cval=np.nan).reshape(xx.shape)
        sl = np.where(np.isfinite(sl), sl, np.nanmin(sl) if np.isfinite(sl).any() else 0.0)
        ncc = match_template(sl, sec)
        i, j = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
        s = np.array([(j - m) * g, (i - m) * g, 0.0])
        return rot @ s


def grid_starts(search, coarse, origin_zyx, centre, vol_c, half_depth, n_starts, seed, n_coarse=12):
    """Coarse (tilt x, tilt y, rotation, depth) grid scored by MI, then a finer local grid around its
    ``n_coarse`` best distinct points (the MI peak of a plane is narrower than the coarse steps);
    returns the ``n_starts`` best local-grid points as SimpleITK transforms."""
    import SimpleITK as sitk

    tilts, rots, depths = search.grid(float(min(coarse["spacing"])), half_depth)
    score = GridScorer(coarse, origin_zyx, centre, vol_c, seed)
    ax, ay, az, dd = (a.ravel() for a in np.meshgrid(tilts, tilts, rots, depths, indexing="ij"))
    rot = rot_xyz(ax, ay, az)
    zvec = np.array([0.0, 0.0, 1.0])
    scores = score(rot, dd[:, None] * zvec)
    shape = (len(tilts), len(tilts), len(rots), len(depths))
    wrap = len(rots) if search.max_rotation_deg >= 180 else 10**9
    seeds, chosen = [], []
    for flat in np.argsort(scores)[::-1]:
        if not np.isfinite(scores[flat]) or len(seeds) >= n_coarse:
            break
        key = np.array(np.unravel_index(flat, shape))
        near = False
        for k2 in chosen:  # non-maximum suppression: skip grid neighbours of a better point
            d = np.abs(key - k2)
            d[2] = min(d[2], wrap - d[2])
            near |= bool(d.max() <= 1)
        if not near:
            chosen.append(key)
            seeds.append(flat)
    if not seeds:
        raise VoxelomeError("no plane of the search grid lies mostly inside the volume; check pixel_size_um, "
                            "the volume spacing and PlaneSearchRange.depth_um.")
    # in-plane translation of each seed by template matching, then a local grid: ±2/3 of a coarse step
    # in tilts, rotation and depth, 5 values each, in the section's own frame
    frac = np.linspace(-2 / 3, 2 / 3, 5)
    ddx, ddy, ddr, ddz = (a.ravel() for a in np.meshgrid(
        frac * np.deg2rad(search.tilt_step_deg), frac * np.deg2rad(search.tilt_step_deg),
        frac * np.deg2rad(search.rotation_step_deg), frac * (depths[1] - depths[0] if len(depths) > 1 else 0),
        indexing="ij"))
    local = rot_xyz(ddx, ddy, np.zeros_like(ddx)) @ rot_xyz(0 * ddr, 0 * ddr, ddr)  # tilt after in-plane turn
    cands = []
    for k, flat in enumerate(seeds):
        shift = dd[flat] * zvec
        moved = shift + score.best_offset(rot[flat], shift, coarse["sec"], coarse["g"], coarse["off"], centre,
                                          margin_um=0.15 * coarse["g"] * max(coarse["sec"].shape))
        if score(rot[flat][None], moved[None])[0] > scores[flat]:
            shift = moved
        r_all = rot[flat] @ local
        s_all = shift + ddz[:, None] * zvec
        sc = score(r_all, s_all)
        for jj in np.argsort(sc)[::-1][:2]:  # the two best points of each local grid
            cands.append((float(sc[jj]), r_all[jj], s_all[jj], k, float(scores[flat])))
    cands.sort(key=lambda c: -c[0])
    starts = []
    for mi, r, shift, k, coarse_mi in cands[:n_starts]:
        t = vol_c + shift
        depth = float(shift[2])
        tx = sitk.Similarity3DTransform()
        tx.SetCenter(tuple(centre))
        tx.SetMatrix(tuple(r.ravel()))
        tx.SetTranslation(tuple(t - centre))
        normal = r[:, 2]
        starts.append(dict(source="grid", coarse_rank=k, coarse_mi=coarse_mi, grid_mi=mi, depth_um=depth,
                           tilt_deg=float(np.degrees(np.arccos(min(abs(normal[2]), 1.0)))),
                           rotation_deg=float(np.degrees(np.arctan2(r[1, 0], r[0, 0]))), tx=tx))
    return starts
