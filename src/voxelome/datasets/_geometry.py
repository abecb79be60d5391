"""Geometry of the lung phantom: lobe outline, branching tubes, foci, smooth noise and distance fields.

Every function is deterministic given its ``rng``; lengths are µm, arrays ``(z, y, x)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from voxelome.datasets.phantom import PhantomConfig

BIG_UM = 1.0e4  # "far away" for capped distance fields (µm)


# --- small numerical helpers ----------------------------------------------------------
def upsample(a: np.ndarray, shape, factor: float) -> np.ndarray:
    """Separable linear interpolation: output index ``i`` reads input position ``i / factor``."""
    a = a.astype(np.float32, copy=False)
    for ax, n in enumerate(shape):
        pos = np.minimum(np.arange(n) / factor, a.shape[ax] - 1)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, a.shape[ax] - 1)
        w = (pos - i0).astype(np.float32).reshape([-1 if k == ax else 1 for k in range(a.ndim)])
        a = np.take(a, i0, axis=ax) * (1 - w) + np.take(a, i1, axis=ax) * w
    return a


def smooth_noise(rng, shape, spacing_um, corr_um) -> tuple[np.ndarray, np.ndarray]:
    """Unit-variance Gaussian random field ``(z, y, x)`` of correlation ``corr_um``: (full-size, coarse grid)."""
    factor = int(np.clip(corr_um / spacing_um / 1.5, 1, 4))  # coarse grid still resolves the correlation
    cshape = tuple(int(np.ceil(n / factor)) + 1 for n in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(cshape, dtype=np.float32), corr_um / (spacing_um * factor))
    f = (f - f.mean()) / (f.std() + 1e-12)
    return upsample(f, shape, factor), f


def axis_um(n, sp, ax, start=0):
    """World coordinates (µm) of voxels ``start … n-1`` along axis ``ax`` of a (z, y, x) grid, broadcastable."""
    return (np.arange(start, n, dtype=np.float32) * sp).reshape([-1 if k == ax else 1 for k in range(3)])


def block(lo_xyz, hi_xyz, shape, sp):
    """Voxel slices ``(z, y, x)`` of the µm box ``[lo, hi]`` clipped to the volume, and its coordinate axes."""
    lo = np.maximum(np.floor(np.asarray(lo_xyz) / sp).astype(int)[::-1], 0)
    hi = np.minimum(np.ceil(np.asarray(hi_xyz) / sp).astype(int)[::-1] + 1, shape)
    if np.any(hi <= lo):
        return None, (None, None, None)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), tuple(axis_um(hi[i], sp, i, lo[i]) for i in range(3))


# --- geometry -------------------------------------------------------------------------
class Lobe:
    """Rounded superellipse lobe through the whole z range, with a wobbly, z-varying outline."""

    def __init__(self, cfg: PhantomConfig, rng):
        z, y, x = (np.asarray(cfg.shape) - 1) * cfg.spacing_um
        self.ext = np.array([x, y, z])
        self.centre = self.ext / 2
        self.axes = cfg.lobe_fill * self.ext[:2] / 2
        self.a = rng.uniform(0, 0.025, 4)
        self.phi = rng.uniform(0, 2 * np.pi, 4)
        self.b = rng.uniform(0, 0.02, 4)
        self.psi = rng.uniform(0, 2 * np.pi, 4)

    def margin(self, x, y, z):
        """Normalised depth inside the lobe (> 0 inside, ≈ µm / semi-axis); broadcasts."""
        cx, cy, cz = (float(v) for v in self.centre)  # python floats keep float32 grids in float32
        X = (x - cx) / float(self.axes[0])
        Y = (y - cy) / float(self.axes[1])
        zn = (z - cz) / max(cz, 1e-6)
        theta = np.arctan2(Y, X)
        r = (np.abs(X) ** 4 + np.abs(Y) ** 4) ** 0.25
        k = np.arange(2, 6, dtype=np.float32).reshape((-1,) + (1,) * np.ndim(theta))
        h = np.sum(self.a.reshape(k.shape) * np.cos(k * theta + self.phi.reshape(k.shape)), axis=0)
        g = np.sum(self.b.reshape(k.shape) * np.cos(k * theta + self.psi.reshape(k.shape)), axis=0)
        return ((1 + h + g * zn - 0.04 * zn**2) - r).astype(np.float32, copy=False)


def grow_tree(rng, lobe, root, direction, length, radius, n_gen, taper, zlim, piece_um=150.0):
    """Segments ``(a_xyz, b_xyz, r_a, r_b)`` (µm) of a branching tube tree grown inside the lobe.

    Branches are split into ~150 µm pieces with a small random bend each (curved tubes) and
    run mostly in xy so that axial sections cut them at shallow angles.
    """
    segs, stack = [], [(np.asarray(root, float), np.asarray(direction, float), length, radius, 0)]
    while stack:
        p, d, L, r, g = stack.pop()
        n_piece = max(1, int(np.ceil(L / piece_um)))
        r_end, alive = r * taper, True
        for k in range(n_piece):
            d = d + rng.normal(0, 0.12, 3) * (1, 1, 0.3)
            d[2] = np.clip(d[2], -0.3, 0.3)
            d = d / np.linalg.norm(d)
            q = p + d * L / n_piece
            if not zlim[0] <= q[2] <= zlim[1]:  # reflect off the z limits to stay in the volume
                d[2] = -d[2]
                q = p + d * L / n_piece
            if lobe.margin(q[0], q[1], q[2]) < 0.06:
                alive = False
                break
            segs.append((p, q, r + (r_end - r) * k / n_piece, r + (r_end - r) * (k + 1) / n_piece))
            p = q
        if alive and g + 1 < n_gen:
            up = rng.choice([-1.0, 1.0])  # one child climbs, the other dives: the tree fans out in z
            for sign in (-1.0, 1.0):
                a = sign * np.deg2rad(rng.uniform(25, 45))
                c, s = np.cos(a), np.sin(a)
                d2 = np.array([c * d[0] - s * d[1], s * d[0] + c * d[1], sign * up * rng.uniform(0.08, 0.22)])
                stack.append((p, d2 / np.linalg.norm(d2), L * rng.uniform(0.65, 0.85), r_end, g + 1))
    return segs


def render_tubes(segs, shape, sp, wall_fn=None):
    """Signed distances (µm) to the union of tapered capsules, near the tubes only.

    Returns ``s_out`` (to the outer surface, < 0 inside) and, with ``wall_fn(r_lumen) → wall µm``,
    ``s_in`` (to the lumen surface); both ``(z, y, x)`` float32, capped at +1e4 far away.
    """
    s_out = np.full(shape, BIG_UM, np.float32)
    s_in = np.full(shape, BIG_UM, np.float32) if wall_fn else None
    for a, b, ra, rb in segs:
        a, b, ra, rb = a.astype(np.float32), b.astype(np.float32), float(ra), float(rb)  # float32 maths
        wa, wb = (wall_fn(ra), wall_fn(rb)) if wall_fn else (0.0, 0.0)
        reach = max(ra + wa, rb + wb) + 3 * sp
        blk, (zz, yy, xx) = block(np.minimum(a, b) - reach, np.maximum(a, b) + reach, shape, sp)
        if blk is None:
            continue
        ab = (b - a).astype(np.float32)
        px, py, pz = xx - a[0], yy - a[1], zz - a[2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-9), 0, 1)
        d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
        r_in = ra + t * (rb - ra)
        np.minimum(s_out[blk], d - r_in - (wa + t * (wb - wa)), out=s_out[blk])
        if wall_fn:
            np.minimum(s_in[blk], d - r_in, out=s_in[blk])
    return s_out, s_in


def distance_outside(s_out, shape, sp):
    """Distance (µm) outside a tube union, from a half-resolution EDT (smooth fields need no more)."""
    mask = s_out[::2, ::2, ::2] < 0
    if not mask.any():
        return np.full(shape, BIG_UM, np.float32)
    d = ndimage.distance_transform_edt(~mask).astype(np.float32) * (2 * sp)
    d = upsample(np.maximum(d - sp, 0), shape, 2.0)  # −sp: from the mask voxel centre to its surface
    d[s_out < 0] = 0.0
    return d


def place_foci(rng, cfg, lobe):
    """Focus centres (µm xyz) and radii, inside the lobe, near mid-depth, not overlapping their rims."""
    foci, rim = [], cfg.immune_rim_um + cfg.immune_rim_width_um
    for _ in range(cfg.n_foci):
        for attempt in range(200):
            r = rng.uniform(*cfg.focus_radius_um)
            c = np.array([rng.uniform(0, lobe.ext[0]), rng.uniform(0, lobe.ext[1]),
                          lobe.centre[2] + rng.uniform(-0.12, 0.12) * lobe.ext[2]])
            far = all(np.linalg.norm(c - c2) > (r + r2 + (2 * rim if attempt < 150 else 0)) for c2, r2 in foci)
            if lobe.margin(*c) > (r + rim) / lobe.axes.min() and far:
                foci.append((c, r))
                break
    return foci


def focus_distance(foci, shape, sp, wobble, elong):
    """Approximate signed distance (µm, < 0 inside) to the union of irregular spherical foci."""
    sd = np.full(shape, BIG_UM, np.float32)
    for c, r in foci:
        c, r = c.astype(np.float32), float(r)
        reach = 1.6 * r * elong + 800.0
        blk, (zz, yy, xx) = block(c - reach, c + reach, shape, sp)
        if blk is None:
            continue
        # z-elongated ellipsoid: z is shrunk by `elong`, so the rim is up to `elong`× thicker at the z poles
        dist = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + ((zz - c[2]) / elong) ** 2)
        np.minimum(sd[blk], dist - r * (1 + 0.18 * wobble[blk]), out=sd[blk])
    return sd


# --- fields → image and truth ---------------------------------------------------------
