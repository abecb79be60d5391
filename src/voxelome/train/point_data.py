"""Training points for a field: 3D coordinates, section codes and expression, streamed from sparse counts.

:class:`PointData` is the one validating constructor between an AnnData stack and the field trainer.
Counts stay a CSR matrix (only the chosen genes' columns are kept, itself a sparse operation); a
batch of rows is gathered into a dense ``(batch, g)`` tensor by :meth:`PointData.rows`, a vectorised
CSR row gather that runs on CPU or GPU tensors. The whole matrix is never densified, so a stack of
10^8 cells × 10^3 genes costs its non-zeros, not ``n × g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from voxelome import constants as C
from voxelome.errors import VoxelomeError, check_positive, did_you_mean

DEFAULT_SECTION_KEY = "section"
#: most z-slabs :func:`z_slabs` makes (a thinner slab than the points' spacing leaves single-point "sections")
MAX_Z_SLABS = 10_000


@dataclass
class PointData:
    """Points of a registered stack, ready for the field trainer.

    Attributes
    ----------
    xyz_um : ndarray, shape (n, 3), float64 (float32 memmap from a point store)
        Point (spot/cell) centres in µm ``(x, y, z)``.
    section : ndarray, shape (n,), int64 (int32 memmap from a point store)
        Section code of each point (index into ``section_names``).
    section_names : list of str
        Section labels in code order.
    genes : list of str, length g
        Names of the modelled variables (genes, or signatures).
    values : csr_matrix, DiskCSR or ndarray, shape (n, g)
        Observations of the modelled variables (counts, or normalised values).
    library : ndarray, shape (n,), float64 (memmap from a point store)
        Library size of each point: the row sum over **all** genes of the counts matrix (1 when the
        values are not counts).
    is_counts : bool
        Whether ``values`` are non-negative integer counts.
    z_slab_um : float or None
        Thickness (µm) of the z-slabs that stand for sections (:func:`z_slabs`; volumetric data), ``None`` for
        real sections.
    """

    xyz_um: np.ndarray
    section: np.ndarray
    section_names: list
    genes: list
    values: sp.csr_matrix | np.ndarray
    library: np.ndarray
    is_counts: bool
    z_slab_um: float | None = None

    def __len__(self) -> int:
        return len(self.xyz_um)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @classmethod
    def from_anndata(cls, adata, *, genes=None, obsm_key: str | None = None, layer: str | None = None,
                     section_key: str = DEFAULT_SECTION_KEY, min_sections: int = 2,
                     z_slab_um: float | None = None) -> "PointData":
        """Validate a stack and extract the chosen variables.

        Parameters
        ----------
        adata : AnnData
            All sections concatenated: ``obsm['spatial_3d']`` ``(n, 3)`` µm and ``obs[section_key]``.
        genes : list of str, optional
            Genes to model (default: all ``var_names``); ignored with ``obsm_key``.
        obsm_key : str, optional
            Model the columns of ``adata.obsm[obsm_key]`` (e.g. ``'signatures'``) instead of genes;
            names from ``adata.uns['voxelome']['signature_names']`` when present.
        layer : str, optional
            Counts layer (default ``layers['counts']`` if present, else ``X``).
        section_key : str
            ``obs`` column naming each point's section.
        min_sections : int
            Refuse stacks with fewer sections (a field *between* sections needs ≥ 2).
        z_slab_um : float, optional
            For volumetric data without physical sections (3D STARmap, cleared-tissue imaging): group the points
            into z-slabs of this thickness (µm, :func:`z_slabs`) and use them as the sections (``obs[section_key]``
            is then not read). Slabs of one volume share no batch effect: fit them with ``section_dim=0``.
        """
        if C.SPATIAL_3D_KEY not in adata.obsm:
            raise VoxelomeError(
                f"the stack has no obsm[{C.SPATIAL_3D_KEY!r}] (point centres in µm, (x, y, z)); place each section "
                "first (voxelome.register.place_section) and concatenate them, or set adata.obsm['spatial_3d'].")
        xyz = np.asarray(adata.obsm[C.SPATIAL_3D_KEY], dtype=np.float64)
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            raise VoxelomeError(f"obsm['spatial_3d'] has shape {xyz.shape}; expected (n_points, 3) µm (x, y, z).")
        bad = ~np.isfinite(xyz).all(axis=1)
        if bad.any():
            raise VoxelomeError(f"obsm['spatial_3d'] has {int(bad.sum())} points with NaN/inf coordinates (first: "
                                f"{adata.obs_names[np.argmax(bad)]!r}); drop them (adata = adata[finite_mask]).")
        if z_slab_um is not None:
            codes, names = z_slabs(xyz[:, 2], z_slab_um)
        else:
            codes, names = section_codes(adata.obs, section_key)
        if len(names) < min_sections:
            what = (f"z-slab(s) of {z_slab_um:g} µm" if z_slab_um is not None
                    else f"section(s) in obs[{section_key!r}]")
            raise VoxelomeError(f"the stack has {len(names)} {what}; a field needs ≥ {min_sections} sections. "
                                + ("Use thinner slabs (z_slab_um, --z-slabs)." if z_slab_um is not None else
                                   "Concatenate the serial sections into one AnnData."))
        if obsm_key is not None:
            data = cls._from_obsm(adata, obsm_key, xyz, codes, names)
            data.z_slab_um = z_slab_um
            return data
        counts = _counts_matrix(adata, layer)
        var = list(map(str, adata.var_names))
        if genes is None:
            idx = np.arange(len(var))
        else:
            genes = [genes] if isinstance(genes, str) else list(genes)
            lookup = {g: i for i, g in enumerate(var)}
            missing = [g for g in genes if g not in lookup]
            if len(missing) == len(genes):
                raise VoxelomeError(f"none of the {len(genes)} requested genes is in the stack's var_names (e.g. "
                                    f"{genes[0]!r}).{did_you_mean(genes[0], var)} Check the identifiers "
                                    "(symbols vs Ensembl IDs).")
            if missing:
                raise VoxelomeError(f"genes {missing[:5]} are not in the stack's var_names."
                                    f"{did_you_mean(missing[0], var)} Drop them or fix their names.")
            idx = np.asarray([lookup[g] for g in genes])
        is_counts = _looks_like_counts(counts)
        library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        if len(idx) == len(var) and (idx == np.arange(len(var))).all():  # all genes, in order: no column copy
            values = counts if sp.issparse(counts) else np.ascontiguousarray(counts, dtype=np.float32)
        else:
            values = counts[:, idx] if sp.issparse(counts) else np.ascontiguousarray(counts[:, idx], dtype=np.float32)
        if is_counts and (library <= 0).any():
            raise VoxelomeError(f"{int((library <= 0).sum())} points have no counts at all; drop empty spots/cells "
                                "(adata = adata[adata.X.sum(1) > 0]; CLI: reconstruct fit --drop-empty).")
        return cls(xyz, codes, names, [var[i] for i in idx], values, library if is_counts else np.ones(len(xyz)),
                   is_counts, None if z_slab_um is None else float(z_slab_um))

    @classmethod
    def _from_obsm(cls, adata, key, xyz, codes, names):
        if key not in adata.obsm:
            raise VoxelomeError(f"obsm[{key!r}] is missing (have {list(adata.obsm)}).{did_you_mean(key, adata.obsm)}")
        vals = np.asarray(adata.obsm[key], dtype=np.float32)
        if vals.ndim != 2 or not np.isfinite(vals).all():
            raise VoxelomeError(f"obsm[{key!r}] must be a finite (n_points, k) array; got shape {vals.shape}.")
        uns = adata.uns.get(C.UNS_KEY, {}) if hasattr(adata, "uns") else {}
        cand = list(uns.get("signature_names", [])) if isinstance(uns, dict) else []
        var = cand if len(cand) == vals.shape[1] else [f"{key}_{i}" for i in range(vals.shape[1])]
        return cls(xyz, codes, names, var, vals, np.ones(len(xyz)), False)

    @classmethod
    def from_store(cls, path, **kwargs) -> "PointData":
        """Disk-backed points from a point store folder (see :mod:`voxelome.train.point_store`)."""
        from voxelome.train.point_store import open_point_store

        return open_point_store(path, **kwargs)

    # --- batches ----------------------------------------------------------------------
    def rows(self, idx) -> np.ndarray:
        """Dense float32 values ``(len(idx), g)`` of rows ``idx`` (only those rows are densified)."""
        idx = np.asarray(idx)
        if _is_disk_csr(self.values):
            return self.values.rows(idx)
        if sp.issparse(self.values):
            return self.values[idx].toarray().astype(np.float32, copy=False)
        return np.asarray(self.values[idx], dtype=np.float32)

    def to_tensors(self, device) -> "TensorRows":
        """The values as device tensors for vectorised row gathers (CSR stays CSR)."""
        return TensorRows.from_values(self.values, device)


class TensorRows:
    """Row gathers from a CSR (or dense) matrix held as torch tensors on any device."""

    def __init__(self, n_cols: int, *, indptr=None, indices=None, data=None, dense=None):
        self.n_cols, self.indptr, self.indices, self.data, self.dense = n_cols, indptr, indices, data, dense

    @classmethod
    def from_values(cls, values, device) -> "TensorRows":
        """Tensors of ``values`` on ``device``. On a CPU a float32 CSR is not copied: the tensors share the
        scipy arrays (column indices keep their int32/int64 dtype), so the matrix is held once; the
        memmaps of a point store (:class:`~voxelome.train.point_store.DiskCSR`) are shared likewise, so
        a batch reads only its rows' pages."""
        if _is_disk_csr(values):
            tensors = [torch.from_numpy(a) for a in (values.indptr, values.indices, values.data)]
            if torch.device(device).type == "cpu":
                return cls(values.shape[1], indptr=tensors[0], indices=tensors[1], data=tensors[2])
            return cls(values.shape[1], **{k: t.to(device) for k, t in zip(("indptr", "indices", "data"), tensors)})
        if sp.issparse(values):
            m = values.tocsr()
            m.sort_indices()
            indices = m.indices if m.indices.dtype in (np.int32, np.int64) else m.indices.astype(np.int64)
            return cls(m.shape[1], indptr=torch.from_numpy(np.asarray(m.indptr, np.int64)).to(device),
                       indices=torch.from_numpy(indices).to(device),
                       data=torch.from_numpy(np.asarray(m.data, np.float32)).to(device))
        return cls(values.shape[1], dense=torch.from_numpy(np.asarray(values, np.float32)).to(device))

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense ``(len(idx), n_cols)`` float32 rows ``idx`` (a 1-D int64 tensor on the same device)."""
        if self.dense is not None:
            return self.dense[idx]
        start = self.indptr[idx]
        lens = self.indptr[idx + 1] - start
        row = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), lens)
        first = torch.cumsum(lens, 0) - lens
        pos = start[row] + torch.arange(len(row), device=idx.device) - first[row]
        out = torch.zeros(len(idx), self.n_cols, device=idx.device)
        out[row, self.indices[pos]] = self.data[pos]
        return out


def variable_genes(adata, n_genes: int, *, layer: str | None = None, min_spot_fraction: float = 0.01,
                   chunk: int = 1_000_000) -> list[str]:
    """The ``n_genes`` most variable genes of a stack, to model when no genes are named.

    Variance of log1p(counts per 10k) over all points, with library sizes over all genes (as the field's
    normalisation; a matrix of normalised values is ranked as it is); only genes detected in at least
    ``min_spot_fraction`` of the points are ranked, so a handful of stray counts cannot make a gene
    "variable". A field's cost per iteration grows with the modelled genes (an output head and a
    likelihood over ``batch × g``), so whole transcriptomes (15–30 k genes) are rarely what to fit.
    Rows are read ``chunk`` at a time (a backed ``.h5ad`` is never loaded whole).

    Parameters
    ----------
    adata : AnnData
        The stack, in memory or backed (counts in ``layers[layer]``, ``layers['counts']`` or ``X``).
    n_genes : int
        How many to keep (all detected genes when the stack has no more).
    layer : str, optional
        Counts layer, as in :meth:`PointData.from_anndata`.
    min_spot_fraction : float
        Detection filter, a fraction of points in [0, 1).
    chunk : int
        Rows per read.

    Returns
    -------
    list of str
        Gene names, most variable first.
    """
    if not isinstance(n_genes, (int, np.integer)) or isinstance(n_genes, bool) or n_genes < 1:
        raise VoxelomeError(f"n_genes={n_genes!r} must be a positive integer (or name the genes to model).")
    if layer is not None and layer not in adata.layers:
        raise VoxelomeError(f"layers[{layer!r}] is missing (have {list(adata.layers)}).{did_you_mean(layer, adata.layers)}")
    key = layer or (C.COUNTS_LAYER if C.COUNTS_LAYER in adata.layers else None)
    m = adata.layers[key] if key else adata.X
    n, g = adata.shape
    s1, s2, detected, counts = np.zeros(g), np.zeros(g), np.zeros(g), None
    for a in range(0, n, chunk):
        block = m[a:min(a + chunk, n)]
        block = sp.csr_matrix(block, dtype=np.float64) if sp.issparse(block) else sp.csr_matrix(np.asarray(block, np.float64))
        if counts is None:
            counts = _looks_like_counts(block)
        if counts:  # log1p(counts per 10k), library over all genes
            lib = np.asarray(block.sum(axis=1)).ravel()
            scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
            block.data *= np.repeat(scale, np.diff(block.indptr))
            np.log1p(block.data, out=block.data)
        s1 += np.asarray(block.sum(axis=0)).ravel()
        s2 += np.asarray(block.multiply(block).sum(axis=0)).ravel()
        detected += np.bincount(block.indices[block.data != 0], minlength=g)
    var = s2 / n - (s1 / n) ** 2
    ok = (detected >= max(1, np.ceil(min_spot_fraction * n))) & (var > 1e-12)
    idx = np.flatnonzero(ok)[np.argsort(-var[ok], kind="stable")][:int(n_genes)]
    names = list(map(str, adata.var_names))
    return [names[i] for i in idx]


def _is_disk_csr(values) -> bool:
    from voxelome.train.point_store import DiskCSR

    return isinstance(values, DiskCSR)


def section_codes(obs, section_key: str = DEFAULT_SECTION_KEY) -> tuple[np.ndarray, list]:
    """Section codes ``(n,)`` int64 and names (code order) from ``obs[section_key]``; a clear error when the column
    is missing, naming both ways to supply it."""
    if section_key not in obs:
        raise VoxelomeError(f"obs[{section_key!r}] is missing; it must name each point's section (columns: "
                            f"{list(obs.columns)[:8]}).{did_you_mean(section_key, obs.columns)} Name the column with "
                            "section_key=... (CLI --section-key) or add it when concatenating (anndata.concat(label=...)); "
                            "for volumetric data without sections (3D STARmap, cleared tissue) group the points into "
                            "z-slabs instead: z_slab_um=... (CLI --z-slabs, e.g. 10 µm).")
    return _codes(obs[section_key])


def z_slabs(z_um, thickness_um: float) -> tuple[np.ndarray, list]:
    """Group points into z-slabs that stand for sections in volumetric data (no physical sections).

    Slab ``k`` holds ``k·t ≤ z < (k+1)·t`` µm (edges at multiples of the thickness ``t``, so any subset of the same
    points gets the same slab names); empty slabs are skipped. The slabs give a field what sections give it: the
    z spacing for the coordinate jitter (:func:`~voxelome.train.field_trainer.suggest_jitter`) and held-out slabs to
    choose settings on (:func:`~voxelome.train.field_selection.select_field`).

    Parameters
    ----------
    z_um : array, shape (n,)
        Point depths in µm.
    thickness_um : float
        Slab thickness in µm (e.g. a few cell diameters).

    Returns
    -------
    codes : ndarray, shape (n,), int64
        Slab code of each point (index into ``names``, in increasing z).
    names : list of str
        ``"z{lo}-{hi}um"`` per occupied slab.
    """
    check_positive("z_slab_um", thickness_um)
    z = np.asarray(z_um, dtype=np.float64)
    if not np.isfinite(z).all():
        raise VoxelomeError("z-slabs need finite z coordinates; drop points with NaN/inf in obsm['spatial_3d'].")
    k = np.floor(z / float(thickness_um)).astype(np.int64)
    occupied, codes = np.unique(k, return_inverse=True)
    if len(occupied) > MAX_Z_SLABS:
        raise VoxelomeError(f"z_slab_um={thickness_um:g} µm cuts the z range {z.min():g}–{z.max():g} µm into "
                            f"{len(occupied)} occupied slabs (at most {MAX_Z_SLABS}); use thicker slabs, e.g. "
                            f"{(z.max() - z.min()) / 20:.3g} µm for 20.")
    t = float(thickness_um)
    names = [f"z{lo * t:g}-{(lo + 1) * t:g}um" for lo in occupied]
    return codes.ravel().astype(np.int64), names


def _codes(column) -> tuple[np.ndarray, list]:
    import pandas as pd

    cat = pd.Categorical(column)
    if (cat.codes < 0).any():
        raise VoxelomeError("some points have no section label (NaN in the section column); label every point.")
    return cat.codes.astype(np.int64), [str(c) for c in cat.categories]


def _counts_matrix(adata, layer):
    if layer is not None:
        if layer not in adata.layers:
            raise VoxelomeError(f"layers[{layer!r}] is missing (have {list(adata.layers)}).{did_you_mean(layer, adata.layers)}")
        m = adata.layers[layer]
    else:
        m = adata.layers[C.COUNTS_LAYER] if C.COUNTS_LAYER in adata.layers else adata.X
    if m is None:
        raise VoxelomeError("the stack has no expression matrix (X is None); store counts in X or layers['counts'].")
    if sp.issparse(m):
        return m.tocsr() if not sp.isspmatrix_csr(m) else m
    if hasattr(m, "to_memory"):  # backed / lazy arrays
        m = m.to_memory()
    return np.asarray(m)


def _looks_like_counts(m) -> bool:
    """Non-negative integers, judged on (up to) the first million stored values."""
    vals = m.data[:1_000_000] if sp.issparse(m) else np.asarray(m).ravel()[:1_000_000]
    if vals.size and np.nanmin(vals) < 0:
        return False
    return bool(np.all(np.mod(vals, 1) == 0))
