"""Counts → log-normalised expression, and spatially variable gene (SVG) selection.

chrysalis (Demeter et al. 2025) builds niche signatures only from genes whose expression
is spatially autocorrelated: genes expressed in at least a few percent of spots, ranked by
global Moran's I on a row-standardised 6-nearest-neighbour graph of the spot centres, after
library-size normalisation and ``log1p``. This module does the same, vectorised over genes
with :mod:`scipy.sparse` (chrysalis loops over genes with esda). Ranking by plain variance
of the log-normalised expression is the fallback when spot coordinates are unreliable.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from voxelome.constants import COUNTS_LAYER, SPATIAL_KEY
from voxelome.errors import VoxelomeError

#: Densify at most this many matrix entries at a time when scoring genes (~160 MB float64).
_CHUNK_ENTRIES = 20_000_000


def check_unique_var_names(adata) -> None:
    """Raise :class:`VoxelomeError` unless genes can be matched by ``var_names``."""
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:3].tolist()
        raise VoxelomeError(
            f"var_names are not unique (e.g. {dup}); genes are matched by name. "
            "Call adata.var_names_make_unique() first."
        )


def get_counts(adata):
    """Return the raw counts of a section after checking them.

    Parameters
    ----------
    adata : anndata.AnnData
        Section with counts in ``layers['counts']`` (preferred) or ``X``; dense or sparse.

    Returns
    -------
    ndarray or scipy.sparse.csr_matrix, shape (n_spots, n_genes)
        The counts as float64 (a CSR copy when sparse).

    Raises
    ------
    VoxelomeError
        When the counts hold NaN/inf or negative values.
    """
    where = f"adata.layers[{COUNTS_LAYER!r}]" if COUNTS_LAYER in adata.layers else "adata.X"
    x = adata.layers[COUNTS_LAYER] if COUNTS_LAYER in adata.layers else adata.X
    x = sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    values = x.data if sp.issparse(x) else x
    n_bad = int(np.count_nonzero(~np.isfinite(values)))
    if n_bad:
        raise VoxelomeError(
            f"{where} holds {n_bad} NaN/inf values; signatures need raw counts. "
            "Fill or drop those spots/genes (e.g. adata = adata[:, np.isfinite(X).all(0)])."
        )
    n_neg = int(np.count_nonzero(values < 0))
    if n_neg:
        raise VoxelomeError(
            f"{where} holds {n_neg} negative values (min {values.min():g}); signatures need raw, "
            f"non-negative counts. Put the raw counts in adata.layers[{COUNTS_LAYER!r}]."
        )
    if values.size and np.any(values != np.round(values)):
        # Normalised or log data would be normalised twice; warn rather than fail because
        # some pipelines store ambient-corrected (fractional) counts on purpose.
        warnings.warn(
            f"{where} holds non-integer values; signatures expect raw counts and will normalise "
            f"them again. If these are normalised/log values, put raw counts in "
            f"adata.layers[{COUNTS_LAYER!r}].",
            UserWarning,
            stacklevel=3,
        )
    return x


def normalize_log1p(counts, target_sum: float = 1e4):
    """Library-size normalise each spot to ``target_sum`` and apply ``log1p``.

    Parameters
    ----------
    counts : ndarray or scipy.sparse matrix, shape (n_spots, n_genes)
        Raw counts. Library sizes are taken over *all* genes given here.
    target_sum : float
        Counts per spot after scaling (1e4 as in scanpy's ``normalize_total`` convention).

    Returns
    -------
    ndarray or scipy.sparse.csr_matrix, shape (n_spots, n_genes)
        ``log1p(counts / library_size * target_sum)``; sparse input stays sparse.
        Empty spots stay all-zero instead of dividing by zero.
    """
    lib = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib, dtype=np.float64), where=lib > 0)
    if sp.issparse(counts):
        out = sp.csr_matrix(sp.diags(scale) @ counts)
        np.log1p(out.data, out=out.data)
        return out
    return np.log1p(counts * scale[:, None])


def dense_columns(x, cols) -> np.ndarray:
    """``x[:, cols]`` as a dense float64 array, shape (n_spots, len(cols))."""
    sub = x[:, cols]
    return np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float64)


def spatial_weights(coords, n_neighbors: int = 6, radius: float | None = None) -> sp.csr_matrix:
    """Row-standardised spatial weight matrix of spot centres.

    Parameters
    ----------
    coords : array-like, shape (n_spots, 2) or (n_spots, 3)
        Spot centres (any unit; ``obsm['spatial']`` pixels are fine).
    n_neighbors : int
        Neighbours per spot of the kNN graph (chrysalis uses 6, the Visium hexagon).
    radius : float, optional
        If given, link all spots within this distance (same unit as ``coords``) instead.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n_spots, n_spots)
        ``W[i, j] = 1 / deg(i)`` for neighbours ``j != i``; rows of isolated spots are zero.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or not np.all(np.isfinite(coords)):
        raise VoxelomeError(
            f"obsm[{SPATIAL_KEY!r}] must be a finite (n_spots, 2|3) array; got shape "
            f"{coords.shape}. Fix the coordinates or use gene_selection='variance'."
        )
    n = coords.shape[0]
    tree = cKDTree(coords)
    if radius is not None:
        w = tree.sparse_distance_matrix(tree, float(radius), output_type="coo_matrix")
        w = sp.csr_matrix((np.ones_like(w.data), (w.row, w.col)), shape=(n, n))
        w.setdiag(0)
        w.eliminate_zeros()
    else:
        k = int(min(n_neighbors, n - 1))
        _, idx = tree.query(coords, k=k + 1)
        idx = idx.reshape(n, k + 1)
        is_self = idx == np.arange(n)[:, None]
        # With duplicated coordinates "self" may not come first or at all: drop the furthest.
        is_self[~is_self.any(axis=1), -1] = True
        keep = ~is_self
        rows = np.repeat(np.arange(n), k)
        w = sp.csr_matrix((np.ones(n * k), (rows, idx[keep])), shape=(n, n))
    deg = np.asarray(w.sum(axis=1)).ravel()
    inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
    return sp.csr_matrix(sp.diags(inv) @ w)


def morans_i(x, weights) -> np.ndarray:
    """Global Moran's I of every gene, vectorised.

    ``I_g = n / S0 * (z_g' W z_g) / (z_g' z_g)`` with ``z_g`` the centred expression and
    ``S0`` the sum of weights (Moran 1950; the statistic chrysalis ranks genes by).

    Parameters
    ----------
    x : ndarray or scipy.sparse matrix, shape (n_spots, n_genes)
        Log-normalised expression.
    weights : scipy.sparse matrix, shape (n_spots, n_spots)
        Spatial weights, e.g. from :func:`spatial_weights`.

    Returns
    -------
    ndarray, shape (n_genes,)
        Moran's I in about [-1, 1]; NaN for constant genes.
    """
    n, g = x.shape
    s0 = float(weights.sum())
    out = np.full(g, np.nan)
    step = max(1, _CHUNK_ENTRIES // max(n, 1))
    for start in range(0, g, step):  # chunks of genes bound the memory of densifying
        cols = np.arange(start, min(start + step, g))
        z = dense_columns(x, cols)
        z -= z.mean(axis=0)
        num = np.einsum("ij,ij->j", z, weights @ z)
        den = np.einsum("ij,ij->j", z, z)
        ok = den > 1e-12 * n
        out[cols[ok]] = (n / s0) * num[ok] / den[ok]
    return out


def gene_variance(x) -> np.ndarray:
    """Per-gene variance of ``x`` (dense or sparse), shape (n_genes,)."""
    if sp.issparse(x):
        mean = np.asarray(x.mean(axis=0)).ravel()
        return np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
    return np.var(x, axis=0)


def select_genes(x, coords=None, *, method: str = "moran", n_genes: int = 1000,
                 min_spot_fraction: float = 0.05, n_neighbors: int = 6):
    """Pick the genes the signatures are built from.

    Parameters
    ----------
    x : ndarray or scipy.sparse matrix, shape (n_spots, n_genes)
        Log-normalised expression (:func:`normalize_log1p`).
    coords : array-like, shape (n_spots, 2|3), optional
        Spot centres; required for ``method='moran'``.
    method : {'moran', 'variance'}
        Rank genes by Moran's I (chrysalis) or by variance (highly variable genes).
    n_genes : int
        How many to keep; capped by how many genes pass the filters.
    min_spot_fraction : float
        Only genes detected in at least this fraction of spots are ranked (chrysalis: 5-10 %),
        because Moran's I of near-empty genes is dominated by a few counts.
    n_neighbors : int
        kNN graph size for Moran's I.

    Returns
    -------
    index : ndarray of int, shape (n_kept,)
        Column indices of the kept genes, best first.
    score : ndarray, shape (n_kept,)
        Their Moran's I or variance.
    """
    if method == "moran" and coords is None:
        raise VoxelomeError(
            f"gene_selection='moran' needs spot centres in adata.obsm[{SPATIAL_KEY!r}], which is "
            "missing; add them or use gene_selection='variance'."
        )
    n = x.shape[0]
    detected = np.asarray((x > 0).sum(axis=0)).ravel()
    candidates = np.flatnonzero(detected >= max(1, np.ceil(min_spot_fraction * n)))
    if method == "moran":
        score = morans_i(x[:, candidates], spatial_weights(coords, n_neighbors))
    else:
        score = gene_variance(x[:, candidates])
        score[score <= 1e-12] = np.nan
    ok = np.isfinite(score)
    candidates, score = candidates[ok], score[ok]
    order = np.argsort(-score, kind="stable")[:n_genes]
    return candidates[order], score[order]
