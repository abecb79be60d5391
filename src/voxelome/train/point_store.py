"""Disk-backed training points for the field: an on-disk CSR read through numpy memmaps.

A stack too large for RAM (10^8 cells) is written once, chunk by chunk, to a *point store*, a folder
of plain ``.npy`` files (readable with ``np.load(path, mmap_mode='r')`` by any tool)::

    STORE/points.json     {"format": "voxelome.points/1", "n_points", "genes", "section_names",
                           "is_counts", "nnz"}
    STORE/indptr.npy      int64   (n + 1,)  CSR row pointers (indptr[0] = 0, non-decreasing)
    STORE/indices.npy     int32   (nnz,)    column (gene) of each stored value, sorted within a row
    STORE/data.npy        float32 (nnz,)    stored values (counts, or normalised values)
    STORE/xyz_um.npy      float32 (n, 3)    point centres, µm (x, y, z)
    STORE/section.npy     int32   (n,)      section code (index into section_names)
    STORE/library.npy     float64 (n,)      row sum over all genes of the counts (1 if not counts)

:func:`open_point_store` returns a :class:`~voxelome.train.point_data.PointData` whose arrays are
memmaps: the field trainer gathers each batch's rows from the page cache / disk (the same vectorised
CSR gather as in RAM), so resident memory holds the pages read, not the matrix. Only the normalised
float32 coordinates ``(n, 3)`` and the log library ``(n,)`` are copied into RAM (16 B per point).

An ``.h5ad`` opened with ``anndata.read_h5ad(path, backed='r')`` is not used for training directly: a
random batch of 4,096 rows of a 1M × 500 backed CSR (anndata 0.12, h5py; sorted unique rows only) took
0.07–0.46 s on the shared 2-core box against 3–30 ms from this store's memmaps (same batches, first page
touches included), and a whole training step takes ~0.16 s. :func:`write_point_store` converts it
instead, reading contiguous row chunks (fast in backed mode: 100,000 rows in ~35 ms), never the whole matrix.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from voxelome import constants as C
from voxelome.errors import VoxelomeError, check_positive, did_you_mean
from voxelome.train.point_data import (
    DEFAULT_SECTION_KEY,
    PointData,
    _looks_like_counts,
    section_codes,
    z_slabs,
)

STORE_FORMAT = "voxelome.points/1"
MANIFEST = "points.json"
#: name -> (dtype, trailing shape) of every array of a store.
ARRAYS = {"indptr": (np.int64, ()), "indices": (np.int32, ()), "data": (np.float32, ()),
          "xyz_um": (np.float32, (3,)), "section": (np.int32, ()), "library": (np.float64, ())}
_HEADER = 128  # bytes reserved for each growing .npy file's header


class DiskCSR:
    """A CSR matrix ``(n, g)`` whose ``indptr``/``indices``/``data`` are memmaps (or any arrays).

    Assumed canonical (no duplicate entries in a row), as written by :class:`PointStoreWriter`.
    """

    def __init__(self, indptr, indices, data, shape):
        self.indptr, self.indices, self.data, self.shape = indptr, indices, data, tuple(shape)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, idx) -> np.ndarray:
        """Dense float32 rows ``idx`` ``(len(idx), g)``: only their stored values are read."""
        idx = np.asarray(idx, dtype=np.int64).ravel()
        start = np.asarray(self.indptr[idx])
        lens = np.asarray(self.indptr[idx + 1]) - start
        row = np.repeat(np.arange(len(idx)), lens)
        pos = np.repeat(start - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
        out = np.zeros((len(idx), self.shape[1]), np.float32)
        out[row, np.asarray(self.indices[pos])] = self.data[pos]
        return out

    def row_block(self, a: int, b: int) -> sp.csr_matrix:
        """Rows ``a:b`` as an in-RAM scipy CSR (a contiguous read)."""
        p = np.asarray(self.indptr[a:b + 1])
        return sp.csr_matrix((np.asarray(self.data[p[0]:p[-1]]), np.asarray(self.indices[p[0]:p[-1]]), p - p[0]),
                             shape=(b - a, self.shape[1]))


# --- writing ----------------------------------------------------------------------------------
def _npy_header(dtype, shape) -> bytes:
    d = f"{{'descr': {np.dtype(dtype).str!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    body = d.encode("latin1")
    pad = _HEADER - 10 - len(body) - 1
    if pad < 0:
        raise VoxelomeError(f"array shape {shape} too long for a point store header.")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER - 10) + body + b" " * pad + b"\n"


class _Growing:
    """An ``.npy`` file appended to chunk by chunk; its header is rewritten with the final shape on close."""

    def __init__(self, path: Path, dtype, tail: tuple):
        self.path, self.dtype, self.tail, self.n = path, np.dtype(dtype), tail, 0
        self.f = open(path, "wb")  # noqa: SIM115 - kept open across appends, closed in close()
        self.f.write(_npy_header(dtype, (0, *tail)))

    def append(self, a) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.shape[1:] != self.tail:
            raise VoxelomeError(f"{self.path.name}: chunk of shape {a.shape}, expected (k, {self.tail}).")
        self.f.write(a.tobytes())
        self.n += len(a)

    def close(self) -> None:
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, (self.n, *self.tail)))
        self.f.close()


class PointStoreWriter:
    """Write a point store chunk by chunk (rows in order); use as a context manager.

    Parameters
    ----------
    path : path
        Store folder (created; refused if it already holds a store, unless ``overwrite``).
    genes : list of str
        Column names, length g.
    section_names : list of str
        Section labels; chunk section codes index into it.
    z_slab_um : float, optional
        The sections are z-slabs of this thickness (µm; :func:`~voxelome.train.point_data.z_slabs`), recorded in
        the manifest and read back as :attr:`PointData.z_slab_um`.
    """

    def __init__(self, path, genes, section_names, *, overwrite: bool = False, z_slab_um: float | None = None):
        self.path = Path(path)
        if (self.path / MANIFEST).exists() and not overwrite:
            raise VoxelomeError(f"{self.path} already holds a point store; pass overwrite=True or another folder.")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MANIFEST).unlink(missing_ok=True)  # an incomplete store has no manifest
        self.genes, self.section_names = [str(g) for g in genes], [str(s) for s in section_names]
        self.z_slab_um = None if z_slab_um is None else float(z_slab_um)
        self.n_dropped_empty = 0  #: points left out by write_point_store(drop_empty=True), recorded in the manifest
        self.files = {k: _Growing(self.path / f"{k}.npy", dt, tail) for k, (dt, tail) in ARRAYS.items()}
        self.files["indptr"].append(np.zeros(1, np.int64))
        self.nnz, self.is_counts = 0, True
        self.first_empty = None  # first row with library ≤ 0 (refused at close if the store holds counts)

    def append(self, counts, xyz_um, section_codes, library=None) -> None:
        """Append rows: ``counts`` (k, g) sparse or dense, ``xyz_um`` (k, 3) µm, ``section_codes`` (k,) int;
        ``library`` (k,) defaults to the row sums of ``counts`` (pass it when ``counts`` holds a gene subset)."""
        m = sp.csr_matrix(counts, dtype=np.float32)
        if m.shape[1] != len(self.genes):
            raise VoxelomeError(f"chunk has {m.shape[1]} columns; the store has {len(self.genes)} genes.")
        m.sum_duplicates()  # canonical: sorted, unique columns per row
        xyz = np.asarray(xyz_um, dtype=np.float64)
        codes = np.asarray(section_codes)
        if xyz.shape != (m.shape[0], 3) or codes.shape != (m.shape[0],):
            raise VoxelomeError(f"chunk of {m.shape[0]} rows with xyz_um {xyz.shape} and section codes "
                                f"{codes.shape}; expected ({m.shape[0]}, 3) and ({m.shape[0]},).")
        if not np.isfinite(xyz).all():
            raise VoxelomeError("xyz_um has NaN/inf coordinates; drop those points before writing the store.")
        if len(codes) and (codes.min() < 0 or codes.max() >= len(self.section_names)):
            raise VoxelomeError(f"section codes must lie in [0, {len(self.section_names)}).")
        self.is_counts = self.is_counts and _looks_like_counts(m)
        f = self.files
        f["indptr"].append(self.nnz + m.indptr[1:].astype(np.int64))
        f["indices"].append(m.indices)
        f["data"].append(m.data)
        lib = np.asarray(m.sum(axis=1) if library is None else library, dtype=np.float64).ravel()
        if self.first_empty is None and (lib <= 0).any():
            self.first_empty = f["section"].n + int(np.flatnonzero(lib <= 0)[0])
        f["xyz_um"].append(xyz)
        f["section"].append(codes)
        f["library"].append(lib)
        self.nnz += m.nnz

    def close(self) -> Path:
        """Finish the arrays and write the manifest (last). A counts store with empty rows is refused here, so
        an invalid store never gets a manifest (the same rule as :func:`open_point_store`'s scan)."""
        n = self.files["section"].n
        for f in self.files.values():
            f.close()
        if n == 0:
            raise VoxelomeError(f"point store {self.path}: no points were written (the stack is empty).")
        if self.is_counts and self.first_empty is not None:
            raise VoxelomeError(f"{self.path}: some points have no counts at all (first: row {self.first_empty}); "
                                "drop empty spots/cells before writing the store.")
        if not self.is_counts:  # library = 1 for normalised values
            lib = np.load(self.path / "library.npy", mmap_mode="r+")
            lib[:] = 1.0
            lib.flush()
            del lib
        manifest = {"format": STORE_FORMAT, "n_points": n, "nnz": self.nnz, "genes": self.genes,
                    "section_names": self.section_names, "is_counts": bool(self.is_counts)}
        if self.z_slab_um is not None:
            manifest["z_slab_um"] = self.z_slab_um
        if self.n_dropped_empty:
            manifest["n_dropped_empty"] = self.n_dropped_empty
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, self.path / MANIFEST)  # the manifest last: a store without one is incomplete
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            for f in self.files.values():
                f.f.close()


def write_point_store(adata, path, *, genes=None, layer: str | None = None,
                      section_key: str = DEFAULT_SECTION_KEY, chunk: int = 1_000_000,
                      overwrite: bool = False, z_slab_um: float | None = None, drop_empty: bool = False) -> Path:
    """Convert an AnnData stack (in memory, backed, or an ``.h5ad`` path, opened ``backed='r'``) to a point
    store, reading ``chunk`` rows at a time.

    Parameters are those of :meth:`PointData.from_anndata` (counts from ``layer``, else
    ``layers['counts']``, else ``X``; ``obsm['spatial_3d']`` µm; ``obs[section_key]``, or z-slabs of
    ``z_slab_um`` µm as the sections). ``drop_empty`` leaves out points without any count (else the store refuses
    them); how many is in the manifest (``n_dropped_empty``).
    """
    import anndata as ad

    check_positive("chunk", chunk)
    genes = [genes] if isinstance(genes, str) else genes
    if isinstance(adata, (str, os.PathLike)):
        if not Path(adata).is_file():
            raise VoxelomeError(f"stack file {adata} does not exist.")
        adata = ad.read_h5ad(adata, backed="r")
    if C.SPATIAL_3D_KEY not in adata.obsm:
        raise VoxelomeError(f"the stack has no obsm[{C.SPATIAL_3D_KEY!r}] (point centres in µm, (x, y, z)).")
    if z_slab_um is not None:
        codes, names = z_slabs(np.asarray(adata.obsm[C.SPATIAL_3D_KEY][:, 2]), z_slab_um)
    else:
        codes, names = section_codes(adata.obs, section_key)
    if layer is not None and layer not in adata.layers:
        raise VoxelomeError(f"layers[{layer!r}] is missing (have {list(adata.layers)}).{did_you_mean(layer, adata.layers)}")
    key = layer or (C.COUNTS_LAYER if C.COUNTS_LAYER in adata.layers else None)
    m = adata.layers[key] if key else adata.X
    var = list(map(str, adata.var_names))
    cols = None
    if genes is not None:
        lookup = {g: i for i, g in enumerate(var)}
        missing = [g for g in genes if g not in lookup]
        if missing:
            raise VoxelomeError(f"genes {missing[:5]} are not in the stack's var_names.{did_you_mean(missing[0], var)}")
        cols = np.asarray([lookup[g] for g in genes])
    xyz_all = adata.obsm[C.SPATIAL_3D_KEY]
    with PointStoreWriter(path, genes or var, names, overwrite=overwrite, z_slab_um=z_slab_um) as w:
        for a in range(0, adata.n_obs, chunk):
            b = min(a + chunk, adata.n_obs)
            block = m[a:b]
            block = block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
            lib = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
            keep = lib > 0 if drop_empty else np.ones(len(lib), bool)
            w.n_dropped_empty += int((~keep).sum())
            block = block.tocsr()[keep] if not keep.all() else block
            if cols is not None:
                block = block.tocsr()[:, cols]
            w.append(block, np.asarray(xyz_all[a:b])[keep], codes[a:b][keep], library=lib[keep])  # library: all genes
    return Path(path)


# --- reading ----------------------------------------------------------------------------------
def open_point_store(path, *, check: bool = True, min_sections: int = 2, chunk: int = 10_000_000) -> PointData:
    """Open a point store as a memmap-backed :class:`PointData` (nothing loaded into RAM).

    ``check`` scans the row pointers, column indices, coordinates, section codes and library sizes in
    chunks (a sequential read of the store) and refuses a malformed store with a :class:`VoxelomeError`;
    stores with fewer than ``min_sections`` sections are refused (a field between sections needs 2).
    """
    path = Path(path)
    if not path.is_dir():
        raise VoxelomeError(f"point store {path} does not exist (expected a folder with {MANIFEST} and .npy "
                            "arrays; write one with voxelome.train.point_store.write_point_store).")
    if not (path / MANIFEST).is_file():
        raise VoxelomeError(f"{path} has no {MANIFEST}: not a point store, or its writing did not finish "
                            "(the manifest is written last). Write it again.")
    try:
        man = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise VoxelomeError(f"{path / MANIFEST} is not valid JSON ({e}).") from None
    if man.get("format") != STORE_FORMAT:
        raise VoxelomeError(f"{path / MANIFEST} has format {man.get('format')!r}; expected {STORE_FORMAT!r}.")
    n, nnz, genes, names = int(man["n_points"]), int(man["nnz"]), list(man["genes"]), list(man["section_names"])
    want = {"indptr": (n + 1,), "indices": (nnz,), "data": (nnz,), "xyz_um": (n, 3), "section": (n,), "library": (n,)}
    arr = {}
    for k, (dt, _) in ARRAYS.items():
        f = path / f"{k}.npy"
        if not f.is_file():
            raise VoxelomeError(f"point store {path} lacks {f.name}.{did_you_mean(k, [p.stem for p in path.glob('*.npy')])}")
        try:
            a = np.load(f, mmap_mode="c")  # copy-on-write: writable for torch.from_numpy, the file never changes
        except ValueError as e:
            raise VoxelomeError(f"{f} is not a readable .npy array ({e}).") from None
        if a.dtype != np.dtype(dt) or a.shape != want[k]:
            raise VoxelomeError(f"{f.name} is {a.dtype} {a.shape}; the layout needs {np.dtype(dt)} {want[k]} "
                                f"(n_points={n}, nnz={nnz} in {MANIFEST}).")
        arr[k] = a
    if len(names) < min_sections:
        raise VoxelomeError(f"point store {path} has {len(names)} section(s); a field needs ≥ {min_sections}.")
    if check:
        _check(arr, n, nnz, len(genes), len(names), bool(man["is_counts"]), chunk, path)
    values = DiskCSR(arr["indptr"], arr["indices"], arr["data"], (n, len(genes)))
    return PointData(arr["xyz_um"], arr["section"], names, genes, values, arr["library"], bool(man["is_counts"]),
                     man.get("z_slab_um"))


def _check(arr, n, nnz, g, n_sections, is_counts, chunk, path) -> None:
    if n == 0:
        raise VoxelomeError(f"point store {path} is empty (0 points).")
    ip = arr["indptr"]
    if ip[0] != 0 or ip[-1] != nnz:
        raise VoxelomeError(f"{path}/indptr.npy must start at 0 and end at nnz={nnz} (got {ip[0]}, {ip[-1]}).")
    for a in range(0, n, chunk):
        if (np.diff(ip[a:a + chunk + 1]) < 0).any():
            raise VoxelomeError(f"{path}/indptr.npy decreases (rows {a}–{a + chunk}); it must be CSR row pointers.")
        xyz = arr["xyz_um"][a:a + chunk]
        if not np.isfinite(xyz).all():
            raise VoxelomeError(f"{path}/xyz_um.npy has NaN/inf coordinates (rows {a}–{a + chunk}).")
        s = arr["section"][a:a + chunk]
        if len(s) and (s.min() < 0 or s.max() >= n_sections):
            raise VoxelomeError(f"{path}/section.npy has codes outside [0, {n_sections}) (rows {a}–{a + chunk}).")
        if is_counts and (arr["library"][a:a + chunk] <= 0).any():
            raise VoxelomeError(f"{path}: some points have no counts at all (rows {a}–{a + chunk}); drop empty "
                                "spots/cells before writing the store.")
    for a in range(0, nnz, 4 * chunk):
        i = arr["indices"][a:a + 4 * chunk]
        if len(i) and (i.min() < 0 or i.max() >= g):
            raise VoxelomeError(f"{path}/indices.npy has column indices outside [0, {g}) (the store has {g} genes).")


__all__ = ["DiskCSR", "PointStoreWriter", "open_point_store", "write_point_store"]
