"""Training targets: placed spots with their signature proportions, splits, intensity scaling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voxelome.constants import (HELD_OUT_KEY, PLANE_KEY, SIGNATURES_KEY, SPATIAL_3D_KEY,
                                SPOT_DIAMETER_KEY, UNS_KEY)
from voxelome.errors import VoxelomeError
from voxelome.io.volume import Volume
from voxelome.register.placement import SectionPlacement


@dataclass
class SpotTargets:
    """Spots placed in the volume with the proportions a model must reproduce.

    Attributes
    ----------
    centres_xyz_um : ndarray, shape (n, 3)
        Spot centres in volume µm.
    proportions : ndarray, shape (n, k)
        Niche proportions, rows on the simplex.
    u, v, normal : ndarray, shape (3,)
        Orthonormal frame of the section plane.
    spot_diameter_um, thickness_um : float
        Footprint of a spot: a disk on the plane through the section thickness.
    train_mask : ndarray, shape (n,) bool
        Spots used for fitting; the rest are held out.
    names : list of str
        Signature names.
    """

    centres_xyz_um: np.ndarray
    proportions: np.ndarray
    u: np.ndarray
    v: np.ndarray
    normal: np.ndarray
    spot_diameter_um: float
    thickness_um: float
    train_mask: np.ndarray
    names: list[str]

    @property
    def n_signatures(self) -> int:
        return self.proportions.shape[1]


def spatial_block_split(xy_um: np.ndarray, block_um: float, val_fraction: float, seed: int) -> np.ndarray:
    """Hold out whole square blocks of spots so validation is not a neighbour of training.

    Returns a boolean train mask ``(n,)``; blocks are drawn until ``val_fraction`` of spots is held out.
    """
    blocks = np.floor(np.asarray(xy_um) / block_um).astype(np.int64)
    _, block_id = np.unique(blocks, axis=0, return_inverse=True)
    block_id = block_id.ravel()
    rng = np.random.default_rng(seed)
    order = rng.permutation(block_id.max() + 1)
    counts = np.bincount(block_id)
    held = np.zeros(block_id.max() + 1, bool)
    target = val_fraction * len(block_id)
    total = 0
    for b in order:
        if total >= target:
            break
        held[b] = True
        total += counts[b]
    train = ~held[block_id]
    if train.sum() == 0 or (~train).sum() == 0:
        raise VoxelomeError(
            f"the spatial split left no {'training' if train.sum() == 0 else 'validation'} spots; "
            f"lower split_block_um={block_um} or change val_fraction={val_fraction}."
        )
    return train


def targets_from_section(adata, volume: Volume, *, val_fraction: float, block_um: float, seed: int,
                         thickness_um: float | None = None) -> SpotTargets:
    """Collect placed spots and their signatures from a section AnnData.

    The section must carry ``obsm['signatures']`` (see :mod:`voxelome.signatures`),
    ``obsm['spatial_3d']`` and ``uns['voxelome']['plane']`` (see :func:`voxelome.register.place_section`).
    A boolean ``obs['held_out']`` column, when present, fixes the split instead of drawing one.
    """
    for key, where, fix in ((SIGNATURES_KEY, "obsm", "run voxelome signatures / fit_signatures first"),
                            (SPATIAL_3D_KEY, "obsm", "place the section first (voxelome.register.place_section)")):
        if key not in adata.obsm:
            raise VoxelomeError(f"section has no {where}[{key!r}]; {fix}.")
    meta = adata.uns.get(UNS_KEY, {})
    if PLANE_KEY not in meta:
        raise VoxelomeError("section has no uns['voxelome']['plane']; place it with voxelome.register.place_section.")
    placement = SectionPlacement.from_dict(meta[PLANE_KEY])
    u, v, n = placement.frame
    centres = np.asarray(adata.obsm[SPATIAL_3D_KEY], dtype=float)
    props = np.asarray(adata.obsm[SIGNATURES_KEY], dtype=np.float32)
    if not np.all(np.isfinite(props)) or np.any(props < -1e-6):
        raise VoxelomeError("obsm['signatures'] holds NaN or negative proportions; refit the signatures.")
    props = np.clip(props, 0, None)
    props = props / np.clip(props.sum(1, keepdims=True), 1e-8, None)
    inside = volume.contains(centres)
    if not inside.all():
        raise VoxelomeError(
            f"{(~inside).sum()} of {len(inside)} spots lie outside the volume (first at {centres[~inside][0].round(1)} µm, "
            f"volume extent (x, y, z) = {volume.extent_um[::-1].round(1)} µm); check the placement and the units "
            "(pixel_size_um of the section, spacing_um of the volume)."
        )
    if HELD_OUT_KEY in adata.obs:
        train = ~adata.obs[HELD_OUT_KEY].to_numpy(bool)
    else:
        st = np.column_stack([(centres - centres[0]) @ u, (centres - centres[0]) @ v])
        train = spatial_block_split(st, block_um, val_fraction, seed)
    spot_d = float(meta.get(SPOT_DIAMETER_KEY, 55.0))
    thick = float(thickness_um if thickness_um is not None else meta.get("thickness_um", 10.0))
    fitted = adata.uns.get(SIGNATURES_KEY, {})
    names = list(fitted.get("names", meta.get("signature_names", [f"S{i}" for i in range(props.shape[1])])))
    if len(names) != props.shape[1]:
        names = [f"S{i}" for i in range(props.shape[1])]
    return SpotTargets(centres, props, u, v, n, spot_d, thick, train, names)


@dataclass(frozen=True)
class IntensityScaler:
    """Robust linear scaling of scan intensities to roughly [0, 1], stored with the model."""

    low: float
    high: float

    @classmethod
    def fit(cls, sample: np.ndarray) -> "IntensityScaler":
        lo, hi = np.percentile(np.asarray(sample, dtype=np.float32), [1.0, 99.0])
        if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
            raise VoxelomeError("the volume around the section is constant or non-finite; check the volume and placement.")
        return cls(float(lo), float(hi))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) - self.low) / (self.high - self.low)
