"""The canonical volume: a lazy ``(z, y, x)`` array with its voxel spacing in µm.

Every reader returns a :class:`Volume`; code downstream trusts its layout and units.
World coordinates of voxel index ``(k, j, i)`` are ``origin_um + (k, j, i) * spacing_um``
in ``(z, y, x)`` order; point sets use ``(x, y, z)`` as scverse stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from voxelome.errors import VoxelomeError

DEFAULT_CHUNKS = (32, 256, 256)


def _as_triplet(name: str, value, *, positive: bool) -> tuple[float, float, float]:
    arr = np.broadcast_to(np.asarray(value, dtype=float), (3,)) if np.ndim(value) == 0 else np.asarray(value, dtype=float)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or (positive and np.any(arr <= 0)):
        what = "three positive numbers (z, y, x) in µm" if positive else "three finite numbers (z, y, x) in µm"
        raise VoxelomeError(
            f"{name}={value!r} must be {what} or one number for all axes; "
            "e.g. spacing_um=(1.6, 1.6, 1.6) for an isotropic 1.6 µm micro-CT scan."
        )
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class Volume:
    """A 3D image in the canonical layout.

    Attributes
    ----------
    data : dask.array.Array
        Intensities, shape ``(z, y, x)``; lazily read, never loaded whole unless small.
    spacing_um : tuple of float
        Voxel size ``(dz, dy, dx)`` in micrometres.
    origin_um : tuple of float
        World position ``(z, y, x)`` in µm of the centre of voxel ``(0, 0, 0)``.
    name : str
        A label for reports.
    """

    data: da.Array
    spacing_um: tuple[float, float, float]
    origin_um: tuple[float, float, float] = (0.0, 0.0, 0.0)
    name: str = "volume"

    @classmethod
    def from_array(cls, array, spacing_um, origin_um=(0.0, 0.0, 0.0), *, name: str = "volume",
                   chunks=DEFAULT_CHUNKS) -> "Volume":
        """Validate and wrap an array-like ``(z, y, x)`` into a :class:`Volume`.

        Parameters
        ----------
        array : array-like, shape (z, y, x)
            NumPy, dask or zarr array. A singleton leading channel axis is squeezed.
        spacing_um : float or sequence of 3 floats
            Voxel size in µm, ``(dz, dy, dx)``.
        origin_um : sequence of 3 floats
            World position of voxel ``(0, 0, 0)`` in µm, ``(z, y, x)``.
        chunks : tuple of int
            Chunking used when ``array`` is not already a dask array.
        """
        data = array if isinstance(array, da.Array) else da.from_array(
            array, chunks=tuple(min(c, s) for c, s in zip(chunks, np.shape(array)[-3:])) if np.ndim(array) == 3 else "auto"
        )
        while data.ndim > 3 and data.shape[0] == 1:
            data = data[0]
        if data.ndim != 3:
            raise VoxelomeError(
                f"volume has shape {tuple(data.shape)}; expected 3 axes (z, y, x). "
                "Pass a single-channel volume, or select one channel first (e.g. array[0])."
            )
        if min(data.shape) < 1:
            raise VoxelomeError(f"volume has an empty axis: shape {tuple(data.shape)}.")
        if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
            raise VoxelomeError(f"volume dtype {data.dtype} is not numeric; convert it to a number type.")
        return cls(
            data=data,
            spacing_um=_as_triplet("spacing_um", spacing_um, positive=True),
            origin_um=_as_triplet("origin_um", origin_um, positive=False),
            name=name,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel counts ``(z, y, x)``."""
        return tuple(int(s) for s in self.data.shape)

    @property
    def extent_um(self) -> np.ndarray:
        """Physical size ``(z, y, x)`` in µm (voxel centres of the first and last voxel span ``(n-1)*d``)."""
        return np.asarray(self.shape) * np.asarray(self.spacing_um)

    def index_to_xyz(self, index_zyx) -> np.ndarray:
        """Voxel indices ``(..., 3)`` in ``(z, y, x)`` → world points ``(..., 3)`` in µm ``(x, y, z)``."""
        zyx = np.asarray(self.origin_um) + np.asarray(index_zyx, dtype=float) * np.asarray(self.spacing_um)
        return zyx[..., ::-1]

    def xyz_to_index(self, points_xyz) -> np.ndarray:
        """World points ``(..., 3)`` in µm ``(x, y, z)`` → fractional voxel indices ``(..., 3)`` ``(z, y, x)``."""
        zyx = np.asarray(points_xyz, dtype=float)[..., ::-1]
        return (zyx - np.asarray(self.origin_um)) / np.asarray(self.spacing_um)

    def contains(self, points_xyz, margin_voxels: float = 0.5) -> np.ndarray:
        """Boolean mask ``(n,)`` of points inside the volume (within ``margin_voxels`` of its edge voxels)."""
        idx = self.xyz_to_index(points_xyz)
        hi = np.asarray(self.shape) - 1 + margin_voxels
        return np.all((idx >= -margin_voxels) & (idx <= hi), axis=-1)

    def with_data(self, data) -> "Volume":
        """Same geometry, other data of the same shape."""
        return Volume.from_array(data, self.spacing_um, self.origin_um, name=self.name)

    def binned(self, factor: int) -> "Volume":
        """The volume averaged over ``factor``³ blocks (lazily; a partial block at the far edges is dropped), its
        voxels ``factor`` times larger, their centres at the blocks' centres."""
        import dask.array as da

        factor = int(factor)
        if factor < 1:
            raise VoxelomeError(f"factor={factor!r} must be a positive integer.")
        if factor == 1:
            return self
        if min(self.shape) < factor:
            raise VoxelomeError(f"a {self.shape} volume cannot be binned by {factor} along every axis.")
        data = da.coarsen(np.mean, da.asarray(self.data).astype(np.float32), {0: factor, 1: factor, 2: factor},
                          trim_excess=True)
        spacing = np.asarray(self.spacing_um) * factor
        origin = np.asarray(self.origin_um) + (factor - 1) / 2 * np.asarray(self.spacing_um)
        return Volume.from_array(data, tuple(spacing), tuple(origin), name=self.name)
