"""Resample volumes at arbitrary µm points: spot footprints, oblique planes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from voxelome.io.volume import Volume


def sample_points(volume: Volume, points_xyz_um, *, order: int = 1, cval: float = np.nan) -> np.ndarray:
    """Interpolate ``volume`` at world points.

    Parameters
    ----------
    volume : Volume
        The image; only the bounding box of the points is read.
    points_xyz_um : array, shape (..., 3)
        Points in µm ``(x, y, z)``.
    order : int
        Spline order (0 nearest, 1 linear).
    cval : float
        Value outside the volume.

    Returns
    -------
    ndarray, shape (...)
        Interpolated values (float32).
    """
    pts = np.asarray(points_xyz_um, dtype=float)
    idx = volume.xyz_to_index(pts.reshape(-1, 3))
    if idx.size == 0:
        return np.zeros(pts.shape[:-1], np.float32)
    lo = np.clip(np.floor(np.nanmin(idx, axis=0)).astype(int) - 1, 0, np.array(volume.shape) - 1)
    hi = np.clip(np.ceil(np.nanmax(idx, axis=0)).astype(int) + 2, lo + 1, np.array(volume.shape))
    block = np.asarray(volume.data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    vals = ndimage.map_coordinates(block, (idx - lo).T, order=order, mode="constant", cval=cval)
    # map_coordinates' constant mode only applies beyond the block; points outside the *volume* get cval too.
    inside = volume.contains(pts.reshape(-1, 3))
    vals = np.where(inside, vals, cval)
    return vals.reshape(pts.shape[:-1]).astype(np.float32)


def disk_offsets(diameter_um: float, step_um: float) -> np.ndarray:
    """In-plane offsets ``(m, 2)`` in µm on a square grid of pitch ``step_um`` inside a disk.

    Used to average a field over a spot footprint; always returns at least the centre.
    """
    r = diameter_um / 2.0
    n = max(int(np.floor(r / step_um)), 0)
    g = np.arange(-n, n + 1) * step_um
    xx, yy = np.meshgrid(g, g, indexing="xy")
    keep = xx**2 + yy**2 <= r**2 + 1e-9
    return np.column_stack([xx[keep], yy[keep]])


def plane_grid(origin_xyz_um, u, v, shape_st: tuple[int, int], step_um: float) -> np.ndarray:
    """World points ``(nt, ns, 3)`` of a regular grid on a plane (rows along ``v``, columns along ``u``)."""
    s = np.arange(shape_st[1]) * step_um
    t = np.arange(shape_st[0]) * step_um
    ss, tt = np.meshgrid(s, t, indexing="xy")
    return np.asarray(origin_xyz_um)[None, None, :] + ss[..., None] * u + tt[..., None] * v


def sample_footprints(volume: Volume, centres_xyz_um, u, v, diameter_um: float, step_um: float,
                      *, thickness_um: float = 0.0, normal=None) -> np.ndarray:
    """Mean of ``volume`` over disks (optionally slabs) centred on each point.

    Parameters
    ----------
    centres_xyz_um : array, shape (n, 3)
        Spot centres in µm.
    u, v : array, shape (3,)
        Orthonormal in-plane axes.
    diameter_um : float
        Disk diameter (spot diameter).
    step_um : float
        Sampling pitch inside the disk.
    thickness_um : float
        Section thickness; with ``normal`` the disk is repeated across the slab.

    Returns
    -------
    ndarray, shape (n,)
        Footprint means (NaN where any sample falls outside the volume).
    """
    centres_xyz_um = np.asarray(centres_xyz_um, dtype=float).reshape(-1, 3)
    if len(centres_xyz_um) == 0:
        return np.zeros(0, np.float32)
    off = disk_offsets(diameter_um, step_um)
    pts = centres_xyz_um[:, None, :] + off[None, :, 0, None] * u + off[None, :, 1, None] * v
    if thickness_um > 0 and normal is not None:
        k = max(int(round(thickness_um / step_um)), 1)
        depths = (np.arange(k) - (k - 1) / 2) * (thickness_um / k)
        pts = (pts[:, :, None, :] + depths[None, None, :, None] * np.asarray(normal)).reshape(len(pts), -1, 3)
    return sample_points(volume, pts).mean(axis=1)
