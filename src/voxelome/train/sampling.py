"""Turn a volume and placed spots into training tensors.

Dense model: crops of the volume near the section, with, for each spot inside the crop, the
sample points of its footprint (a disk of the spot diameter on the section plane, through the
section thickness) in the normalised coordinates ``grid_sample`` expects on the output map.
X-Pression: one axis-aligned patch centred on each spot.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from voxelome.io.volume import Volume
from voxelome.register.sampling import disk_offsets
from voxelome.train.spots import IntensityScaler, SpotTargets


def odd_voxels(size_um: float, spacing_um: float) -> int:
    """Nearest odd voxel count ≥ 1 covering ``size_um`` (patches centre on a voxel)."""
    n = max(int(round(size_um / spacing_um)), 1)
    return n if n % 2 == 1 else n + 1


def multiple_voxels(size_um: float, spacing_um: float, divisor: int) -> int:
    """Voxel count nearest ``size_um`` that is a positive multiple of ``divisor``."""
    return max(int(round(size_um / spacing_um / divisor)), 1) * divisor


#: float32 bytes above which the region around the spots is read crop by crop from the scan instead of held in
#: memory (a 5 mm section in a 1.6 µm micro-CT spans ~40 GB of voxels once the crops' margin is added)
REGION_MEMORY_BYTES = 2 * 2**30
#: most voxels the intensity scaler is fitted on (16 z-planes of the region, strided in-plane above this)
SCALER_SAMPLE_VOXELS = 16 * 2**20


@dataclass
class Region:
    """A block of the volume: ``array[k, j, i]`` is voxel ``start + (k, j, i)``.

    Held in memory already scaled (``scaler`` None), or lazy (a dask view of the scan, ``scaler`` applied to each
    crop as it is read) when it would not fit (:data:`REGION_MEMORY_BYTES`).
    """

    array: np.ndarray
    start: np.ndarray
    scaler: IntensityScaler | None = None

    def crop(self, start_zyx, shape_zyx) -> np.ndarray:
        """Crop in global voxel indices, mirrored where it leaves the region.

        Mirroring (not edge replication, which draws streaks) keeps the texture a network sees
        beyond a volume face like the tissue inside it."""
        lo = np.asarray(start_zyx) - self.start
        hi = lo + np.asarray(shape_zyx)
        lo_c = np.clip(lo, 0, self.array.shape)
        hi_c = np.clip(hi, 0, self.array.shape)
        block = self.array[lo_c[0]:hi_c[0], lo_c[1]:hi_c[1], lo_c[2]:hi_c[2]]
        if self.scaler is not None:  # lazy: read this crop now
            block = self.scaler(np.asarray(block, dtype=np.float32))
        pad = [(int(a - b), int(c - d)) for a, b, c, d in zip(lo_c, lo, hi, hi_c)]
        if any(p != (0, 0) for p in pad):
            if block.size == 0:
                return np.zeros(tuple(shape_zyx), np.float32)
            block = np.pad(block, pad, mode="symmetric")
        return block


def load_region(volume: Volume, centres_xyz_um: np.ndarray, margin_um: float, scaler: IntensityScaler | None,
                *, max_bytes: int | None = None) -> tuple[Region, IntensityScaler]:
    """The bounding box of the spots plus ``margin_um``, scaled to ~[0, 1]: read once into memory, or, when its
    float32 voxels exceed ``max_bytes`` (default :data:`REGION_MEMORY_BYTES`), left lazy and read crop by crop
    (bounded memory, slower epochs). Both give the same crops.

    A new scaler is fitted on 16 evenly spaced z-planes of the box (strided in-plane when those planes hold more
    than :data:`SCALER_SAMPLE_VOXELS`), the same sample either way.
    """
    max_bytes = REGION_MEMORY_BYTES if max_bytes is None else max_bytes
    idx = volume.xyz_to_index(centres_xyz_um)
    m = np.ceil(margin_um / np.asarray(volume.spacing_um)).astype(int)
    lo = np.clip(np.floor(idx.min(0)).astype(int) - m, 0, None)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + m + 1, volume.shape)
    box = volume.data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    step_z = max(1, box.shape[0] // 16)
    n_planes = len(range(0, box.shape[0], step_z))
    step_yx = max(1, int(np.ceil(np.sqrt(n_planes * box.shape[1] * box.shape[2] / SCALER_SAMPLE_VOXELS))))
    lazy = 4 * int(np.prod(hi - lo)) > max_bytes
    if lazy:
        warnings.warn(f"the scan around the section ({tuple(int(v) for v in hi - lo)} voxels, "
                      f"{4 * np.prod(hi - lo) / 2**30:.1f} GiB as float32) is more than {max_bytes / 2**30:.1f} GiB: "
                      "training reads its crops from the scan as needed (bounded memory, slower epochs). A coarser "
                      "copy of the scan (e.g. 2× binned) trains faster.", UserWarning, stacklevel=2)
    raw = box if lazy else np.asarray(box, dtype=np.float32)
    if scaler is None:
        scaler = IntensityScaler.fit(np.asarray(raw[::step_z, ::step_yx, ::step_yx], dtype=np.float32))
    return (Region(raw, lo, scaler), scaler) if lazy else (Region(scaler(raw), lo), scaler)


def footprint_points(targets: SpotTargets, step_um: float) -> np.ndarray:
    """Footprint sample offsets ``(m, 3)`` in µm (x, y, z) shared by all spots."""
    disk = disk_offsets(targets.spot_diameter_um, step_um)
    n_depth = max(int(round(targets.thickness_um / step_um)), 1)
    depths = (np.arange(n_depth) - (n_depth - 1) / 2) * (targets.thickness_um / n_depth)
    pts = disk[:, 0, None, None] * targets.u + disk[:, 1, None, None] * targets.v
    pts = pts + depths[None, :, None] * targets.normal
    return pts.reshape(-1, 3)


class DenseCropSampler:
    """Draws training crops for :class:`~voxelome.models.DenseSignatureNet3D`.

    Parameters
    ----------
    region : Region
        Scaled volume around the section.
    volume : Volume
        Geometry (spacing, origin) of the scan.
    targets : SpotTargets
        Placed spots.
    crop_shape : tuple of int
        Crop size (z, y, x) in scan voxels, multiples of the net's divisor.
    total_stride : int
        Scan voxels per output voxel.
    footprint_step_um : float
        Pitch of the footprint sample points.
    margin_um : float
        Spots closer than this to a crop face are left out of that crop (zero-padding effects).
    """

    def __init__(self, region: Region, volume: Volume, targets: SpotTargets, crop_shape, total_stride: int,
                 footprint_step_um: float, margin_um: float):
        self.region, self.targets = region, targets
        self.crop_shape = np.asarray(crop_shape)
        self.stride = int(total_stride)
        offsets = footprint_points(targets, footprint_step_um)
        pts = targets.centres_xyz_um[:, None, :] + offsets[None]
        self.foot_idx = volume.xyz_to_index(pts)  # (n, m, 3) fractional scan voxels (z, y, x)
        self.centre_idx = volume.xyz_to_index(targets.centres_xyz_um)
        self.margin = np.asarray(margin_um) / np.asarray(volume.spacing_um)

    def _spots_in(self, start: np.ndarray, candidates: np.ndarray, margin=None) -> np.ndarray:
        margin = self.margin if margin is None else margin
        rel = self.foot_idx[candidates] - start
        ok = np.all((rel >= margin) & (rel <= self.crop_shape - 1 - margin), axis=(1, 2))
        return candidates[ok]

    def _grid(self, rel_idx: np.ndarray, crop_shape=None) -> torch.Tensor:
        """Scan-voxel coords relative to the crop ``(n, m, 3)`` → grid_sample coords ``(1, n, m, 1, 3)``."""
        out_shape = np.asarray(self.crop_shape if crop_shape is None else crop_shape) // self.stride
        o = (rel_idx - (self.stride - 1) / 2.0) / self.stride
        norm = 2.0 * o / np.maximum(out_shape - 1, 1) - 1.0
        return torch.from_numpy(norm[..., ::-1].copy()).float()[None, :, :, None, :]

    def _place(self, centre_idx: np.ndarray, rng: np.random.Generator | None, candidates: np.ndarray):
        """Start voxel of a crop near ``centre_idx`` (jittered with ``rng``) and the candidate spots it holds."""
        jitter = rng.uniform(-0.25, 0.25, 3) * self.crop_shape if rng is not None else np.zeros(3)
        jitter[0] = 0.0 if rng is None else jitter[0] * 0.2
        start = np.round(centre_idx + jitter - self.crop_shape / 2).astype(int)
        # Evaluation keeps only spots well inside the crop, so each sees its full context.
        return start, self._spots_in(start, candidates, None if rng is not None else self.crop_shape * 0.2)

    def crop_for(self, centre_idx: np.ndarray, rng: np.random.Generator | None, candidates: np.ndarray,
                 augment: bool, axes=(0, 1, 2)):
        """One crop centred near ``centre_idx`` with the candidate spots that fit in it.

        With ``augment``, random flips along every axis; ``axes`` then permutes the crop's axes
        (a 90° rotation in 3D), so that a model fit on one plane sees its structures in every
        orientation (for isotropic scans).
        """
        start, spots = self._place(centre_idx, rng, candidates)
        x = self.region.crop(start, self.crop_shape)
        rel = self.foot_idx[spots] - start
        if augment and rng is not None:
            for axis in range(3):
                if rng.random() < 0.5:
                    x = np.flip(x, axis)
                    rel[..., axis] = self.crop_shape[axis] - 1 - rel[..., axis]
        axes = list(axes)
        x = np.transpose(x, axes)
        rel = rel[..., axes]
        return np.ascontiguousarray(x), spots, self._grid(rel, self.crop_shape[axes])

    def batch(self, rng: np.random.Generator, batch_size: int, augment: bool, rotate_3d: bool = False):
        """``batch_size`` crops anchored on random training spots.

        Returns ``x`` ``(B, 1, z, y, x)``, and per crop the footprint grid and target proportions.
        With ``rotate_3d`` the whole batch shares one random axis permutation.
        """
        train = np.flatnonzero(self.targets.train_mask)
        axes = rng.permutation(3) if (augment and rotate_3d) else (0, 1, 2)
        if augment and not rotate_3d and self.crop_shape[1] == self.crop_shape[2] and rng.random() < 0.5:
            axes = (0, 2, 1)
        xs, grids, ys = [], [], []
        for anchor in rng.choice(train, size=batch_size):
            x, spots, grid = self.crop_for(self.centre_idx[anchor], rng, train, augment, axes)
            if augment:  # scanner gain/offset drift: the model must not rely on absolute intensity
                x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.08, 0.08)
            xs.append(x.astype(np.float32))
            grids.append(grid)
            ys.append(torch.from_numpy(self.targets.proportions[spots]))
        return torch.from_numpy(np.stack(xs))[:, None], grids, ys

    def cover(self, spots: np.ndarray, batch_size: int):
        """Deterministic crops that together contain every spot in ``spots`` once (for evaluation), read a batch at
        a time."""
        remaining = list(spots)
        plan = []  # (start, spots) of every crop first; pixels are read a batch at a time (bounded memory)
        while remaining:
            anchor = remaining[0]
            start, inside = self._place(self.centre_idx[anchor], None, np.asarray(remaining))
            if anchor not in inside:  # footprint wider than the crop allows: evaluate it alone, centred
                inside = np.asarray([anchor])
            plan.append((start, inside))
            taken = set(inside.tolist())
            remaining = [s for s in remaining if s not in taken]
        for i in range(0, len(plan), batch_size):
            part = plan[i:i + batch_size]
            x = np.stack([np.ascontiguousarray(self.region.crop(start, self.crop_shape)) for start, _ in part])
            yield (torch.from_numpy(x)[:, None], [inside for _, inside in part],
                   [self._grid(self.foot_idx[inside] - start) for start, inside in part])


class PatchSampler:
    """X-Pression patches: one axis-aligned ``patch_shape`` block centred on each spot's voxel."""

    def __init__(self, region: Region, volume: Volume, targets: SpotTargets, patch_shape, oversample_rare: bool):
        self.region, self.targets = region, targets
        self.patch_shape = np.asarray(patch_shape)
        self.centre_idx = np.round(volume.xyz_to_index(targets.centres_xyz_um)).astype(int)
        train = np.flatnonzero(targets.train_mask)
        weights = np.ones(len(train))
        if oversample_rare:
            # Rare dominant signatures are drawn as often as common ones (X-Pression's oversampling).
            dominant = targets.proportions[train].argmax(1)
            freq = np.bincount(dominant, minlength=targets.n_signatures)[dominant]
            weights = 1.0 / freq
        self.train, self.weights = train, weights / weights.sum()

    def patches(self, spots, rng: np.random.Generator | None = None, augment: bool = False) -> torch.Tensor:
        out = []
        for s in spots:
            p = self.region.crop(self.centre_idx[s] - self.patch_shape // 2, self.patch_shape)
            if augment and rng is not None:
                if rng.random() < 0.5:
                    p = p[:, ::-1]
                if rng.random() < 0.5:
                    p = p[:, :, ::-1]
                if p.shape[1] == p.shape[2]:
                    p = np.rot90(p, k=int(rng.integers(4)), axes=(1, 2))
            out.append(np.ascontiguousarray(p))
        return torch.from_numpy(np.stack(out))[:, None]

    def batch(self, rng: np.random.Generator, batch_size: int, augment: bool):
        spots = rng.choice(self.train, size=batch_size, p=self.weights)
        return self.patches(spots, rng, augment), torch.from_numpy(self.targets.proportions[spots])
