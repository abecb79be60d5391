"""Where a 2D section lies in a volume: an affine map from section pixels to volume µm.

A :class:`SectionPlacement` is a ``(3, 3)`` matrix ``M`` with
``xyz_um = M @ (px_x, px_y, 1)``: its first two columns are the µm displacement per
section pixel along the image x and y axes (they span the section plane), the third is the
world position of pixel ``(0, 0)``. Three ways to build one, as X-Pression placed its
section: a slice index, an origin and a normal, or ≥ 3 landmark pairs fitted by least squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voxelome.errors import VoxelomeError, check_positive
from voxelome.io.volume import Volume


def _unit(vec, name: str) -> np.ndarray:
    vec = np.asarray(vec, dtype=float)
    norm = np.linalg.norm(vec)
    if vec.shape != (3,) or not np.isfinite(norm) or norm == 0:
        raise VoxelomeError(f"{name}={vec.tolist()!r} must be a non-zero 3-vector (x, y, z).")
    return vec / norm


@dataclass(frozen=True)
class SectionPlacement:
    """Affine placement of a section in the volume frame.

    Attributes
    ----------
    matrix : ndarray, shape (3, 3)
        ``xyz_um = matrix @ [px_x, px_y, 1]``; columns: µm per pixel along image x,
        µm per pixel along image y, world position (x, y, z) µm of pixel (0, 0).
    residual_um : float
        RMS landmark residual in µm when fitted from landmarks, else 0.
    """

    matrix: np.ndarray
    residual_um: float = 0.0

    # --- constructors ---------------------------------------------------------------
    @classmethod
    def from_slice(cls, volume: Volume, z_index: float, pixel_size_um: float,
                   offset_um=(0.0, 0.0)) -> "SectionPlacement":
        """Section lying in the axial plane ``z = z_index`` of ``volume``.

        Image x/y map to volume x/y; pixel ``(0, 0)`` sits at ``offset_um`` (x, y) from
        the centre of voxel ``(z_index, 0, 0)``.
        """
        check_positive("pixel_size_um", pixel_size_um)
        if not (0 <= z_index <= volume.shape[0] - 1):
            raise VoxelomeError(
                f"z_index={z_index} is outside the volume, which has {volume.shape[0]} slices "
                f"(valid: 0 … {volume.shape[0] - 1})."
            )
        origin = volume.index_to_xyz([z_index, 0.0, 0.0]) + np.array([offset_um[0], offset_um[1], 0.0])
        m = np.column_stack([[pixel_size_um, 0, 0], [0, pixel_size_um, 0], origin])
        return cls(m)

    @classmethod
    def from_origin_normal(cls, origin_xyz_um, normal_xyz, pixel_size_um: float,
                           in_plane_rotation_deg: float = 0.0) -> "SectionPlacement":
        """Section on the plane through ``origin_xyz_um`` (µm) with normal ``normal_xyz``.

        Pixel ``(0, 0)`` maps to the origin. The image x axis is the volume x axis projected
        onto the plane (the y axis when the normal is along x), then rotated by
        ``in_plane_rotation_deg`` about the normal; the image y axis completes a right-handed frame.
        """
        check_positive("pixel_size_um", pixel_size_um)
        n = _unit(normal_xyz, "normal_xyz")
        ref = np.array([1.0, 0, 0]) if abs(n[0]) < 0.9 else np.array([0, 1.0, 0])
        u = _unit(ref - ref.dot(n) * n, "in-plane axis")
        v = np.cross(n, u)
        a = np.deg2rad(in_plane_rotation_deg)
        u, v = np.cos(a) * u + np.sin(a) * v, -np.sin(a) * u + np.cos(a) * v
        origin = np.asarray(origin_xyz_um, dtype=float)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise VoxelomeError(f"origin_xyz_um={origin_xyz_um!r} must be 3 finite numbers (x, y, z) in µm.")
        return cls(np.column_stack([u * pixel_size_um, v * pixel_size_um, origin]))

    @classmethod
    def from_landmarks(cls, section_px, volume_xyz_um) -> "SectionPlacement":
        """Least-squares affine from ≥ 3 landmark pairs (as X-Pression placed its section).

        Parameters
        ----------
        section_px : array, shape (n, 2)
            Landmarks in section image pixels ``(x, y)``.
        volume_xyz_um : array, shape (n, 3)
            The same landmarks in the volume, µm ``(x, y, z)``.
        """
        src = np.asarray(section_px, dtype=float)
        dst = np.asarray(volume_xyz_um, dtype=float)
        if src.ndim != 2 or src.shape[1] != 2 or dst.ndim != 2 or dst.shape[1] != 3 or len(src) != len(dst):
            raise VoxelomeError(
                f"landmarks must be section_px (n, 2) and volume_xyz_um (n, 3) with the same n; "
                f"got {src.shape} and {dst.shape}."
            )
        if len(src) < 3:
            raise VoxelomeError(f"{len(src)} landmark pairs given; at least 3 non-collinear pairs are needed.")
        if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
            raise VoxelomeError("landmarks contain NaN or infinite values; remove those pairs.")
        design = np.column_stack([src, np.ones(len(src))])
        centred = src - src.mean(0)
        if np.linalg.matrix_rank(centred, tol=1e-6 * max(float(np.abs(centred).max()), 1.0)) < 2:
            raise VoxelomeError("section landmarks are collinear; pick ≥ 3 points that span the section.")
        sol, *_ = np.linalg.lstsq(design, dst, rcond=None)
        residual = float(np.sqrt(np.mean(np.sum((design @ sol - dst) ** 2, axis=1))))
        return cls(sol.T, residual_um=residual)

    # --- geometry -------------------------------------------------------------------
    def map(self, section_px) -> np.ndarray:
        """Section pixels ``(n, 2)`` ``(x, y)`` → volume points ``(n, 3)`` in µm ``(x, y, z)``."""
        px = np.asarray(section_px, dtype=float)
        return px @ self.matrix[:, :2].T + self.matrix[:, 2]

    @property
    def pixel_size_um(self) -> float:
        """Mean µm per section pixel along the two image axes."""
        return float(np.mean(np.linalg.norm(self.matrix[:, :2], axis=0)))

    @property
    def frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Orthonormal ``(u, v, normal)`` of the plane, each ``(3,)`` in (x, y, z); ``u`` follows image x."""
        u = _unit(self.matrix[:, 0], "placement x axis")
        v = self.matrix[:, 1] - self.matrix[:, 1].dot(u) * u
        v = _unit(v, "placement y axis")
        return u, v, np.cross(u, v)

    def scaled(self, factor: float) -> "SectionPlacement":
        """The same plane for pixels ``factor`` times larger (e.g. spots in full-resolution pixels when the
        registered image was downsampled: ``factor = section µm per px / image µm per px``)."""
        check_positive("factor", factor)
        m = self.matrix.copy()
        m[:, :2] *= float(factor)
        return SectionPlacement(m, self.residual_um)

    def to_dict(self) -> dict:
        """Plain dict for ``adata.uns`` / YAML."""
        return {"matrix": self.matrix.tolist(), "residual_um": float(self.residual_um)}

    @classmethod
    def from_dict(cls, d: dict) -> "SectionPlacement":
        m = np.asarray(d["matrix"], dtype=float)
        if m.shape != (3, 3):
            raise VoxelomeError(f"placement matrix has shape {m.shape}; expected (3, 3).")
        return cls(m, float(d.get("residual_um", 0.0)))
