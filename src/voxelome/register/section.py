"""Put a section's spots into the volume frame (``obsm['spatial_3d']``) and check that they fit."""

from __future__ import annotations

import warnings

import numpy as np

from voxelome.constants import PIXEL_SIZE_KEY, PLANE_KEY, SPATIAL_3D_KEY, SPATIAL_KEY, UNS_KEY
from voxelome.errors import VoxelomeError
from voxelome.io.volume import Volume
from voxelome.register.placement import SectionPlacement

#: smallest placement µm-per-pixel / section µm-per-pixel accepted (and its inverse the largest)
MIN_SCALE_RATIO = 0.75


def place_section(adata, placement: SectionPlacement, volume: Volume | None = None, *, copy: bool = False):
    """Map spot pixels to volume µm with ``placement`` and store the result on the section.

    Writes ``obsm['spatial_3d']`` (x, y, z µm) and ``uns['voxelome']['plane']``.

    Raises
    ------
    VoxelomeError
        When the section's pixel size and the placement disagree (units that do not fit), when the
        plane misses the volume, or when spots fall outside it.
    """
    adata = adata.copy() if copy else adata
    if SPATIAL_KEY not in adata.obsm:
        raise VoxelomeError("section has no obsm['spatial'] (spot centres in pixels); read it with voxelome.io.read_section.")
    meta = adata.uns.setdefault(UNS_KEY, {})
    px_size = meta.get(PIXEL_SIZE_KEY)
    # a units check (mm vs µm, hires vs full-resolution pixels: factors of 5–1000), not a scale check: a registered
    # plane (register plane) carries the tissue's shrinkage or expansion, searched within 0.8–1.25
    ratio = None if px_size is None else placement.pixel_size_um / float(px_size)
    if ratio is not None and not MIN_SCALE_RATIO <= ratio <= 1 / MIN_SCALE_RATIO:
        raise VoxelomeError(
            f"section and volume units do not fit: the section has pixel_size_um={px_size:g} but the placement maps "
            f"one pixel to {placement.pixel_size_um:g} µm. Build the placement with pixel_size_um={px_size:g}, "
            "or fix the section's pixel size (read_section(..., pixel_size_um=...))."
        )
    xyz = placement.map(np.asarray(adata.obsm[SPATIAL_KEY], dtype=float))
    if volume is not None:
        inside = volume.contains(xyz)
        ext = volume.extent_um[::-1]
        if not inside.any():
            raise VoxelomeError(
                f"the section plane misses the volume: no spot lands inside it (spots span "
                f"{xyz.min(0).round(0)}–{xyz.max(0).round(0)} µm; volume spans (x, y, z) "
                f"{np.asarray(volume.origin_um)[::-1]}–{ext.round(0)} µm). Check the slice index / origin and units."
            )
        if not inside.all():
            frac = 1 - inside.mean()
            msg = (f"{(~inside).sum()} of {len(inside)} spots ({frac:.0%}) fall outside the volume "
                   f"(extent (x, y, z) {ext.round(0)} µm).")
            if frac > 0.05:
                raise VoxelomeError(msg + " Check the placement and units, or crop the section to the scanned region.")
            warnings.warn(msg + " They are dropped.", stacklevel=2)
            adata._inplace_subset_obs(inside)
            xyz = xyz[inside]
    adata.obsm[SPATIAL_3D_KEY] = xyz
    meta[PLANE_KEY] = placement.to_dict()
    return adata
