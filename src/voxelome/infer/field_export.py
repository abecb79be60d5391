"""Query a fitted transcriptomic field: points, measured spots (denoised), virtual sections, volumes.

A field is continuous, so every output is a set of point queries: any point, any plane (oblique
included), any voxel grid. Volumes are written chunk by chunk to OME-Zarr ``(c, z, y, x)`` through
:func:`voxelome.infer.blocks.run_blockwise` (done-markers: a killed export re-run with the same
arguments computes only unfinished chunks), so the volume is never held in memory.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from voxelome.constants import CHECKPOINT_FILE
from voxelome.errors import VoxelomeError, did_you_mean
from voxelome.infer.blocks import all_done, run_blockwise
from voxelome.infer.predict import _check_same_job
from voxelome.io.omezarr import build_pyramid, create_ome_zarr
from voxelome.io.volume import _as_triplet
from voxelome.register.placement import SectionPlacement
from voxelome.register.sampling import plane_grid
from voxelome.train.checkpoint import load_checkpoint
from voxelome.train.field_trainer import FieldConfig, build_field_model, field_config_from_dict
from voxelome.train.point_data import DEFAULT_SECTION_KEY
from voxelome.train.trainer import resolve_device

#: ``obsm`` key of denoised per-spot expression written by :meth:`FittedField.denoise`.
FIELD_DENOISED_KEY = "field_denoised"


@dataclass
class FittedField:
    """A field reloaded from its run folder (``checkpoint.pt`` alone)."""

    config: FieldConfig
    meta: dict
    model: torch.nn.Module
    device: torch.device
    fingerprint: str = ""

    @classmethod
    def load(cls, run_dir, device: str | None = None) -> "FittedField":
        """Load ``run_dir/checkpoint.pt`` (``weights_only=True``); a folder of several fields (``ensemble.json``,
        ``reconstruct fit --ensemble``) gives their :class:`~voxelome.infer.field_ensemble.FieldEnsemble`."""
        path = Path(run_dir)
        from voxelome.infer.field_ensemble import FieldEnsemble, is_ensemble_run

        if path.is_dir() and is_ensemble_run(path):
            return FieldEnsemble.load(path, device)
        path = path / CHECKPOINT_FILE if path.is_dir() else path
        ckpt = load_checkpoint(path)
        if ckpt.get("meta", {}).get("format") != "voxelome.field/1":
            raise VoxelomeError(f"{path} is not a field run (no field metadata); pass a folder written by "
                                "fit_field / `voxelome reconstruct fit`.")
        config = field_config_from_dict(ckpt["config"])
        dev = resolve_device(device or config.device)
        model = build_field_model(config, ckpt["meta"])
        model.load_state_dict(ckpt["model_state"])
        fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return cls(config, ckpt["meta"], model.to(dev).eval(), dev, fingerprint)

    @property
    def genes(self) -> list[str]:
        return list(self.meta["genes"])

    @property
    def box_um(self) -> tuple[np.ndarray, np.ndarray]:
        """The field's bounding box ``(lo, hi)`` in µm ``(x, y, z)``; queries outside read its edge."""
        return np.asarray(self.meta["box_lo"]), np.asarray(self.meta["box_hi"])

    @property
    def points_box_um(self) -> tuple[np.ndarray, np.ndarray]:
        """The training points' bounding box ``(lo, hi)`` µm ``(x, y, z)``: the stack from its first to its last
        section (runs written before it was recorded: the field's box)."""
        if "points_lo" not in self.meta:
            return self.box_um
        return np.asarray(self.meta["points_lo"]), np.asarray(self.meta["points_hi"])

    def gene_index(self, genes=None) -> np.ndarray:
        if genes is None:
            return np.arange(len(self.genes))
        genes = [genes] if isinstance(genes, str) else list(genes)
        lookup = {g: i for i, g in enumerate(self.genes)}
        bad = [g for g in genes if g not in lookup]
        if bad:
            raise VoxelomeError(f"gene {bad[0]!r} is not modelled by this field.{did_you_mean(bad[0], self.genes)} "
                                f"It has {len(self.genes)} genes (FittedField.genes).")
        return np.asarray([lookup[g] for g in genes])

    @torch.no_grad()
    def predict(self, points_xyz_um, genes=None, *, section=None, value: str = "rate", library=None,
                batch_size: int = 65536) -> np.ndarray:
        """Denoised expression at points.

        Parameters
        ----------
        points_xyz_um : array, shape (..., 3)
            Query points in µm ``(x, y, z)``.
        genes : list of str, optional
            Genes to return (default all modelled genes).
        section : array of int, shape (...), optional
            Training-section code of each point to include its batch effect; default the average section.
        value : {"rate", "measured"}
            ``rate`` (default): the denoised expression, ``log1p(target_sum · rate)`` for count
            likelihoods. ``measured``: the expected *measured* value ``E[log1p(target_sum · Y / L)]``
            of a spot of library ``library`` under the fitted likelihood — the best squared-error
            prediction of noisy log-normalised spots (lower than ``rate``: log1p is concave).
            Identical for the Gaussian likelihood.
        library : float or array, shape (...), optional
            Library size (total counts) of the spot each point stands for, with ``value="measured"``;
            default the field's own prediction of the local library where it has a library field
            (``FieldConfig.model_library``), else the median library of the training points.
        batch_size : int
            Points per forward pass (bounds memory).

        Returns
        -------
        ndarray, shape (..., g), float32
            ``log1p(counts per target_sum)`` for count likelihoods, the modelled value for gaussian.
        """
        if value not in ("rate", "measured"):
            raise VoxelomeError(f"value={value!r} is not one of 'rate' (denoised expression) or 'measured' "
                                "(expected measured log1p value).")
        shape, unit, sec = self._queries(points_xyz_um, section)
        idx = torch.from_numpy(self.gene_index(genes)).to(self.device)
        lib = None
        # a count field's library field predicts each point's depth when no library is given
        own_library = value == "measured" and library is None and self.model.library_head
        if value == "measured" and self.model.counts and not own_library:
            lib = self.meta.get("median_library") if library is None else library
            if lib is None:
                raise VoxelomeError("this field's run predates stored library sizes; pass library= (total counts "
                                    "of a typical spot) with value='measured'.")
            lib = np.broadcast_to(np.asarray(lib, np.float64), shape).ravel()
            if not (np.isfinite(lib).all() and (lib > 0).all()):
                raise VoxelomeError("library sizes must be positive and finite (total counts per spot).")
            lib = np.log(lib).astype(np.float32)
        out = np.empty((len(unit), len(idx)), np.float32)
        for rows, x, s in self._batches(unit, sec, batch_size):
            if own_library:
                y = self.model.expected_measurement(x, None, s, target_sum=self.config.target_sum)
            elif lib is not None:
                y = self.model.expected_measurement(x, torch.from_numpy(lib[rows]).to(self.device), s,
                                                    target_sum=self.config.target_sum)
            else:
                y = self.model.expression(x, s, target_sum=self.config.target_sum)
            out[rows] = y[:, idx].float().cpu().numpy()
        return out.reshape(*shape, len(idx))

    @torch.no_grad()
    def library(self, points_xyz_um, *, section=None, batch_size: int = 65536) -> np.ndarray:
        """Library size (total counts) the library field expects of a spot at each point.

        Parameters
        ----------
        points_xyz_um : array, shape (..., 3)
            Query points in µm ``(x, y, z)``.
        section : array of int, shape (...), optional
            Training-section code of each point (its depth offset); default the average section.

        Returns
        -------
        ndarray, shape (...), float64
            ``exp`` of the predicted log library, counts.
        """
        if not self.model.library_head:
            raise VoxelomeError("this field has no library field (a Gaussian field, or one fitted with "
                                "model_library=False or before it existed); refit a count likelihood to predict depth.")
        shape, unit, sec = self._queries(points_xyz_um, section)
        out = np.empty(len(unit))
        for rows, x, s in self._batches(unit, sec, batch_size):
            out[rows] = torch.exp(self.model.log_library(x, s).double()).cpu().numpy()
        return out.reshape(shape)

    def _queries(self, points_xyz_um, section):
        """Checked query points → (their leading shape, ``(n, 3)`` float32 unit-cube coordinates, ``(n,)`` section
        codes or None)."""
        pts = np.asarray(points_xyz_um, dtype=np.float64)
        if pts.shape[-1:] != (3,):
            raise VoxelomeError(f"points have shape {pts.shape}; expected (..., 3) µm (x, y, z).")
        flat = pts.reshape(-1, 3)
        if not np.isfinite(flat).all():
            raise VoxelomeError(f"{int((~np.isfinite(flat).all(1)).sum())} query points have NaN/inf coordinates; "
                                "drop them first.")
        lo, hi = self.box_um
        unit = ((flat - lo) / (hi - lo)).astype(np.float32)
        sec = None if section is None else np.broadcast_to(np.asarray(section, np.int64), pts.shape[:-1]).ravel().copy()
        return pts.shape[:-1], unit, sec

    def _batches(self, unit: np.ndarray, sec, batch_size: int):
        """``(rows slice, coordinates tensor, section tensor or None)`` per forward pass, on the field's device."""
        for i in range(0, len(unit), batch_size):
            rows = slice(i, i + batch_size)
            yield (rows, torch.from_numpy(unit[rows]).to(self.device),
                   None if sec is None else torch.from_numpy(sec[rows]).to(self.device))

    def section_codes(self, labels) -> np.ndarray:
        """Training-section codes of section labels; unknown labels get ``-1``."""
        lookup = {s: i for i, s in enumerate(self.meta["section_names"])}
        return np.asarray([lookup.get(str(s), -1) for s in labels], dtype=np.int64)

    def denoise(self, adata, genes=None, *, section_key: str = DEFAULT_SECTION_KEY, with_section_effect: bool = True,
                key: str | None = FIELD_DENOISED_KEY) -> np.ndarray:
        """Field values at the measured spots of ``adata`` (its ``obsm['spatial_3d']``).

        With ``with_section_effect`` each spot of a training section gets that section's batch
        effect (spots of unknown sections get the average). Stored in ``adata.obsm[key]`` (columns:
        ``adata.uns['voxelome']['field_genes']``) unless ``key`` is None.

        Returns
        -------
        ndarray, shape (n_spots, g)
        """
        if "spatial_3d" not in adata.obsm:
            raise VoxelomeError("adata has no obsm['spatial_3d'] (spot centres in µm); place the section first.")
        xyz = np.asarray(adata.obsm["spatial_3d"], dtype=np.float64)
        sec = None
        if with_section_effect and section_key in adata.obs:
            codes = self.section_codes(adata.obs[section_key].astype(str))
            if (codes >= 0).all():
                sec = codes
            elif (codes >= 0).any():  # mixed: predict the two groups separately
                out = self.predict(xyz, genes)
                known = codes >= 0
                out[known] = self.predict(xyz[known], genes, section=codes[known])
                return self._store(adata, out, genes, key)
        return self._store(adata, self.predict(xyz, genes, section=sec), genes, key)

    def _store(self, adata, values, genes, key):
        if key is not None:
            adata.obsm[key] = values
            adata.uns.setdefault("voxelome", {})["field_genes"] = [self.genes[i] for i in self.gene_index(genes)]
        return values

    def virtual_section(self, placement: SectionPlacement, shape_yx, genes=None) -> np.ndarray:
        """Expression on a plane: pixel ``(row, col)`` of the output sits at ``placement.map((col, row))``.

        Parameters
        ----------
        placement : SectionPlacement
            The plane (axial, oblique via ``SectionPlacement.from_origin_normal``, or fitted); its
            pixel size is the output's.
        shape_yx : tuple of 2 int
            Output rows × columns.

        Returns
        -------
        ndarray, shape (g, rows, cols), float32
        """
        if not isinstance(placement, SectionPlacement):
            raise VoxelomeError(f"placement must be a SectionPlacement, got {type(placement).__name__}.")
        u, v, _ = placement.frame
        pts = plane_grid(placement.matrix[:, 2], u, v, tuple(int(s) for s in shape_yx), placement.pixel_size_um)
        return np.moveaxis(self.predict(pts, genes), -1, 0)

    def volume_geometry(self, spacing_um, bbox_um=None):
        """Output grid for a box ``((x0, y0, z0), (x1, y1, z1))`` µm (default the training points' box: the field's
        own box is a padded cube, mostly empty space beyond a thin stack).

        Returns ``shape_zyx, spacing_zyx, origin_zyx`` (origin = centre of voxel 0, the box's low corner).
        """
        spacing = np.asarray(_as_triplet("spacing_um", spacing_um, positive=True))
        lo, hi = self.points_box_um if bbox_um is None else (np.asarray(bbox_um[0], float), np.asarray(bbox_um[1], float))
        if lo.shape != (3,) or hi.shape != (3,) or not (np.isfinite(lo).all() and np.isfinite(hi).all()) \
                or (hi < lo).any():
            raise VoxelomeError(f"bbox_um={bbox_um!r} must be ((x0, y0, z0), (x1, y1, z1)) µm with x1 ≥ x0 etc.")
        lo_zyx, hi_zyx = lo[::-1], hi[::-1]
        shape = tuple(int(np.floor((h - l) / s + 1e-9)) + 1 for l, h, s in zip(lo_zyx, hi_zyx, spacing))
        return shape, tuple(float(s) for s in spacing), tuple(float(v) for v in lo_zyx)

    def write_volume(self, out_path, spacing_um, *, bbox_um=None, genes=None, chunks=(16, 64, 64),
                     overwrite: bool = False, pyramid: bool = True, progress: bool = True,
                     batch_size: int = 65536) -> dict:
        """Write the field on a voxel grid into a multiscale OME-Zarr ``(g, z, y, x)``, chunk by chunk, resumably.

        Parameters
        ----------
        out_path : path
            Output ``.ome.zarr``. An interrupted export of the same field and grid resumes (only
            chunks without a done-marker are computed); another field or grid is refused unless
            ``overwrite``.
        spacing_um : float or (dz, dy, dx)
            Voxel size in µm (any: the field is continuous).
        bbox_um : ((x0, y0, z0), (x1, y1, z1)), optional
            Box in µm; default the training points' bounding box (first to last section).
        genes : list of str, optional
            Channels (default all genes).
        chunks : (z, y, x)
            Output chunk; memory is about ``prod(chunks) · g · 4`` bytes per block.

        Returns
        -------
        dict
            Path, shape, spacing, origin, blocks computed/skipped, seconds, voxels per second.
        """
        out, grid = self.open_volume_output(out_path, spacing_um, bbox_um=bbox_um, genes=genes, chunks=chunks,
                                            overwrite=overwrite)
        names, shape, chunks = grid.names, grid.shape, grid.chunks
        org, sp = np.asarray(grid.origin), np.asarray(grid.spacing)

        def compute(region):
            axes = [org[a] + sp[a] * np.arange(r.start, r.stop) for a, r in enumerate(region)]
            zz, yy, xx = np.meshgrid(*axes, indexing="ij")
            pts = np.stack([xx, yy, zz], axis=-1)
            return np.moveaxis(self.predict(pts, names, batch_size=batch_size), -1, 0)

        t0 = time.perf_counter()
        stats = run_blockwise(compute, out, out_path, chunks_zyx=chunks, progress=progress, desc="field volume")
        seconds = time.perf_counter() - t0
        if pyramid and all_done(out_path, shape, chunks):
            build_pyramid(out_path)
        return grid.summary(out_path, stats, seconds)

    def open_volume_output(self, out_path, spacing_um, *, bbox_um=None, genes=None, chunks=(16, 64, 64),
                           overwrite: bool = False):
        """Create (or reopen, to resume) the OME-Zarr store of :meth:`write_volume`.

        Shared by the serial export and the Dask one (:func:`voxelome.infer.distributed.write_field_volume_distributed`),
        so either can resume the other's output. Returns the zarr array ``(g, z, y, x)`` and its :class:`VolumeGrid`.
        """
        idx = self.gene_index(genes)
        names = [self.genes[i] for i in idx]
        shape, spacing, origin = self.volume_geometry(spacing_um, bbox_um)
        chunks = tuple(int(c) for c in chunks)
        identity = {"field": self.fingerprint, "genes": names, "shape_zyx": list(shape),
                    "spacing_um_zyx": list(spacing), "origin_um_zyx": list(origin)}
        _check_same_job(out_path, identity, overwrite)
        out = create_ome_zarr(out_path, (len(names), *shape), chunks_czyx=(min(len(names), 32), *chunks),
                              dtype="float32", spacing_um_zyx=spacing, origin_um_zyx=origin, channel_names=names,
                              overwrite=overwrite)
        zarr.open_group(str(out_path), mode="a").attrs["voxelome"] = identity
        return out, VolumeGrid(names, tuple(shape), tuple(spacing), tuple(origin), chunks)


@dataclass(frozen=True)
class VolumeGrid:
    """Channels and voxel grid of an exported field volume: shape ``(z, y, x)``, spacing/origin in µm ``(z, y, x)``."""

    names: list
    shape: tuple
    spacing: tuple
    origin: tuple
    chunks: tuple

    def summary(self, out_path, stats: dict, seconds: float) -> dict:
        """The export's result: path, geometry, blocks computed/skipped, seconds, voxels per second."""
        n = int(np.prod(self.shape)) * stats["computed"] / max(stats["blocks"], 1)
        return {"path": str(out_path), "shape_czyx": [len(self.names), *self.shape],
                "spacing_um_zyx": list(self.spacing), "origin_um_zyx": list(self.origin), "chunks": list(self.chunks),
                **stats, "seconds": seconds, "voxels_per_s": n / max(seconds, 1e-9)}


def load_field(run_dir, device: str | None = None) -> FittedField:
    """Shorthand for :meth:`FittedField.load`."""
    return FittedField.load(run_dir, device)
