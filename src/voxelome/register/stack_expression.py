"""Stack serial ST sections without images into one 3D frame, from their expression (``register stack``).

Two pairwise aligners, each returning the rigid map (rotation + translation, µm) of a section onto
the previous, already aligned one:

* ``"fgw"`` — optimal transport in the spirit of PASTE (Zeira et al., Nat. Methods 2022): a fused
  Gromov–Wasserstein coupling (POT, ``ot.gromov.fused_gromov_wasserstein``) between spots, with
  expression cost = distance of joint PCA embeddings and structure = intra-section spot distances,
  then a weighted Procrustes fit of the coupling.
* ``"icp"`` — the fast path: iterative closest point on joint (position, expression-embedding)
  features from several starting rotations, each step a Kabsch fit of the mutual matches with
  outliers trimmed (robust to partial overlap). Milliseconds per pair (:mod:`voxelome.register.stack_icp`).

Sections with more than ``max_points`` spots or cells (single-cell platforms, Visium HD) are pooled on a square
grid and their bins aligned (:func:`voxelome.register.stack_icp.align_binned`), so memory and time stay bounded.

:func:`stack_sections` chains the pairwise maps (section 0 is the reference frame) and writes one
AnnData with ``obsm['spatial_3d']`` (x, y, z µm) and the per-section transforms.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from voxelome.constants import PIXEL_SIZE_KEY, SPATIAL_3D_KEY, SPATIAL_KEY, UNS_KEY
from voxelome.errors import VoxelomeError, check_choice, check_positive
from voxelome.register.stack_icp import align_binned, align_icp, bin_size_um, kabsch

STACK_KEY = "stack"  #: adata.uns['voxelome']['stack']: sections, z, transforms, method
METHODS = ("icp", "fgw")
#: option keys of align_icp (search budget; final soft / symmetric refinement, off by default)
ICP_OPTIONS = ("n_angles", "coarse_iter", "n_keep_starts", "n_iter", "soft_iter", "soft_scale", "sym_iter")
#: default ``max_points`` per method: above it sections are aligned as pooled bins (ICP's brute-force matching
#: and FGW's couplings grow with n_fixed × n_moving)
MAX_POINTS = {"icp": 5000, "fgw": 1500}


# --- shared pieces ----------------------------------------------------------------------
def log_normalise(X) -> np.ndarray:
    """Counts ``(n, g)`` → ``log1p(1e4 · counts / library size)`` dense float32."""
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    lib = X.sum(1, keepdims=True)
    return np.log1p(1e4 * X / np.maximum(lib, 1)).astype(np.float32)


def _log_values(X: sp.csr_matrix, scale: np.ndarray) -> np.ndarray:
    """Stored values of ``log1p(scale[row] · X)`` as float32, in one ``nnz``-sized buffer (fewer page faults).

    With ``scale = 1e4 / library size`` these are the log-normalised counts, aligned with ``X.indices``.
    """
    data = np.repeat(scale, np.diff(X.indptr))
    np.multiply(X.data, data, out=data, dtype=np.float32)
    np.log1p(data, out=data)
    return data


def _top_pcs(cov: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` leading eigenvectors ``(g, k)`` of a symmetric PSD matrix, largest first.

    ARPACK Lanczos (``scipy.sparse.linalg.eigsh``, fixed start vector: deterministic; converged to the
    matrix's precision) when only a few of many are wanted, else the full ``eigh``.
    """
    g = cov.shape[0]
    if g > 4 * k:
        from scipy.sparse.linalg import eigsh

        w, v = eigsh(cov, k=k, which="LA", v0=np.ones(g, cov.dtype))
    else:
        w, v = np.linalg.eigh(cov)
    return v[:, np.argsort(w)[::-1][:k]]


def joint_embedding(counts: list, n_components: int = 20, n_genes: int = 300, *,
                    dedup: bool = True) -> list[np.ndarray]:
    """PCA of all sections together (log-normalised counts, ``n_genes`` most variable genes).

    One CSR of all sections is log-normalised in place of its data; gene means/variances are sparse
    column sums (float32, then combined in float64); only the ``n_genes`` kept columns are densified;
    the ``n_components`` leading eigenvectors of their ``(n_genes, n_genes)`` covariance (float32)
    come from :func:`_top_pcs`.

    Parameters
    ----------
    counts : list of (n_i, g) arrays or sparse matrices
        Counts of each section over the same genes.
    dedup : bool
        Sum duplicate sparse entries first (``False`` only when the inputs are known to have none).

    Returns
    -------
    list of ndarray, each (n_i, k)
        Embeddings in one space, scaled so that PC1 has unit standard deviation.
    """
    X = sp.vstack([c if sp.issparse(c) else sp.csr_matrix(c) for c in counts], format="csr")
    return _split(_embed(X, n_components, n_genes, dedup), [c.shape[0] for c in counts])


def _split(emb, sizes):
    return np.split(emb, np.cumsum(sizes)[:-1])


def _embed(X, n_components: int, n_genes: int, dedup: bool) -> np.ndarray:
    """:func:`joint_embedding` of one stacked CSR ``(n, g)``; returns ``(n, k)`` float64.

    The log-normalised values (:func:`_log_values`) live in one ``nnz``-sized buffer: the gene sums of
    the log values, then of their squares (squared in place); the kept genes' columns are taken from
    ``X`` and log-normalised on their own (fewer large temporaries: page faults were a fifth of the CPU
    time).
    """
    X = X if sp.issparse(X) and X.format == "csr" else sp.csr_matrix(X)
    if dedup and not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    n, g = X.shape
    scale = (1e4 / np.maximum(np.asarray(X.sum(1), dtype=np.float64).ravel(), 1)).astype(np.float32)
    data = _log_values(X, scale)
    L = sp.csr_matrix((data, X.indices, X.indptr), shape=X.shape)
    one = np.ones(n, np.float32)
    mean = np.asarray(L.T @ one, dtype=np.float64) / n
    np.multiply(data, data, out=data)  # L now holds the squared values
    var = np.asarray(L.T @ one, dtype=np.float64) / n - mean ** 2
    del L, data
    keep = np.sort(np.argsort(var, kind="stable")[::-1][: min(n_genes, g)])
    xk = X[:, keep]
    x = sp.csr_matrix((_log_values(xk, scale), xk.indices, xk.indptr), shape=xk.shape).toarray()
    x -= mean[keep].astype(np.float32)
    k = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    emb = (x @ _top_pcs(x.T @ x, k)).astype(np.float64)  # genes × genes covariance: cheap for a few hundred genes
    emb /= emb[:, 0].std() + 1e-12
    return emb


# --- pairwise aligners ------------------------------------------------------------------
def align_fgw(fixed_xy, fixed_emb, moving_xy, moving_emb, *, alpha: float = 0.1, seed: int = 0):
    """Rigid map of ``moving`` onto ``fixed`` from a fused Gromov–Wasserstein coupling (PASTE-like).

    Expression cost: Euclidean distance of embeddings (scaled to max 1); structure: intra-section
    spot distances (scaled to max 1); uniform spot weights; ``alpha`` weighs structure against
    expression as in PASTE (0.1). The coupling's weighted Procrustes fit gives the rigid map.

    Returns
    -------
    R : ndarray (2, 2), t : ndarray (2,), pi : ndarray (n_fixed, n_moving)
    """
    import ot

    fx, mx = np.asarray(fixed_xy, float), np.asarray(moving_xy, float)
    m = ot.dist(np.asarray(fixed_emb, float), np.asarray(moving_emb, float), metric="euclidean")
    m /= m.max() + 1e-12
    da, db = ot.dist(fx, fx, metric="euclidean"), ot.dist(mx, mx, metric="euclidean")
    da /= da.max() + 1e-12
    db /= db.max() + 1e-12
    a, b = np.full(len(fx), 1 / len(fx)), np.full(len(mx), 1 / len(mx))
    pi = ot.gromov.fused_gromov_wasserstein(m, da, db, a, b, loss_fun="square_loss", alpha=alpha)
    i, j = np.nonzero(pi > 1e-12)
    r, t = kabsch(mx[j], fx[i], pi[i, j])
    return r, t, pi


# --- stacks -----------------------------------------------------------------------------
def section_xy_um(adata) -> np.ndarray:
    """Spot centres ``(n, 2)`` in µm: ``obsm['spatial']`` (px) × ``uns['voxelome']['pixel_size_um']``."""
    if SPATIAL_KEY not in adata.obsm:
        raise VoxelomeError("a section has no obsm['spatial'] (spot centres in pixels); read it with voxelome.io.read_section.")
    px = (adata.uns.get(UNS_KEY) or {}).get(PIXEL_SIZE_KEY)
    if px is None:
        raise VoxelomeError("a section has no uns['voxelome']['pixel_size_um']; read it with voxelome.io.read_section "
                            "(pixel_size_um=...) so that spots can be placed in µm.")
    return np.asarray(adata.obsm[SPATIAL_KEY], float) * float(px)


def check_stack_inputs(adatas, z_um, names=None):
    """Validate a stack: ≥ 2 sections, strictly increasing z, names; returns (names, z array)."""
    if len(adatas) < 2:
        raise VoxelomeError(f"a stack needs at least 2 sections; got {len(adatas)}. A single section needs no stacking.")
    z = np.asarray(z_um, dtype=float)
    if z.shape != (len(adatas),) or not np.all(np.isfinite(z)):
        raise VoxelomeError(f"z_um must give one finite depth (µm) per section: {len(adatas)} sections, got {list(z_um)!r}.")
    if np.any(np.diff(z) <= 0):
        raise VoxelomeError(f"z_um={z.tolist()} is not strictly increasing; list the sections in cutting order with "
                            "increasing depths (e.g. 0, 15, 30 for 15 µm spacing).")
    names = [f"section_{k}" for k in range(len(adatas))] if names is None else [str(n) for n in names]
    if len(set(names)) != len(names) or len(names) != len(adatas):
        raise VoxelomeError(f"section names must be unique, one per section; got {names}.")
    for n, a in zip(names, adatas):
        if getattr(a, "n_obs", 3) < 3:
            raise VoxelomeError(f"section {n!r} has {a.n_obs} spots; aligning needs at least 3.")
    return names, z


def _gene_positions(adatas):
    """Genes present in every section (a ``pandas.Index``, order of the first) and, per section, their column
    positions (int arrays). ``None`` stands for "all columns, in order" (no copy needed). Warns with the count when the gene sets
    differ; raises when fewer than 10 are shared or a section repeats a gene name.
    """
    import pandas as pd

    idxs = [pd.Index((v if v.inferred_type == "string" else v.astype(str)).to_numpy())
            for v in (a.var_names for a in adatas)]
    first, raw = idxs[0], []
    for k, idx in enumerate(idxs):
        if k and idx.equals(first):
            raw.append(None)
            continue
        where = first.get_indexer(idx) if first.is_unique else None  # one hash table (of section 0) for all
        hit = None if where is None else where[where >= 0]
        if where is None or np.bincount(hit, minlength=1).max(initial=0) > 1:
            dup = idx[idx.duplicated()][:3].tolist() or first[first.duplicated()][:3].tolist()
            raise VoxelomeError(f"section {0 if where is None else k} repeats gene names (e.g. {dup}); make them "
                                "unique first (adata.var_names_make_unique()) or sum the duplicated genes.")
        p = np.full(len(first), -1)
        p[hit] = np.flatnonzero(where >= 0)
        raw.append(None if k == 0 else p)
    shared = np.ones(len(first), bool)
    for p in raw:
        if p is not None:
            shared &= p >= 0
    genes = first[shared]
    sizes = [a.n_vars for a in adatas]
    if len(genes) < 10:
        raise VoxelomeError(f"the sections share only {len(genes)} genes (sizes {sizes}); check that they are of the "
                            "same species/panel and use the same gene identifiers (symbols vs Ensembl ids).")
    if any(s != len(genes) for s in sizes):
        warnings.warn(f"gene sets differ between sections ({sizes} genes); using the {len(genes)} genes they share.",
                      stacklevel=3)
    all_first = bool(shared.all())
    cols = np.flatnonzero(shared)
    pos = []
    for p, a in zip(raw, adatas):
        if p is None:
            pos.append(None if all_first else cols)
        else:
            q = p[shared]
            pos.append(None if len(q) == a.n_vars and np.array_equal(q, np.arange(len(q))) else q)
    return genes, pos


def common_genes(adatas) -> list[str]:
    """Genes present in every section (order of the first); warns with the count when sets differ."""
    return _gene_positions(adatas)[0].tolist()


def _csr(X, cols=None):
    """``X`` (dense or sparse) as CSR without duplicate entries, restricted to column positions ``cols`` if given."""
    X = X if sp.issparse(X) and X.format == "csr" else sp.csr_matrix(X)
    if not X.has_canonical_format:  # a cheap O(nnz) check for stored matrices; sums duplicates only if any
        X = X.copy()
        X.sum_duplicates()
    return X if cols is None else X[:, cols]


def _stack_shared(mats, cols) -> sp.csr_matrix:
    """``scipy.sparse.vstack([_csr(X, c) for X, c in zip(mats, cols)])`` (same arrays), with one section's selection alive
    at a time: each section's column selection is copied into output arrays allocated once and then freed (less
    transient memory: page faults were a fifth of the CPU time). The output arrays are views of buffers sized for
    all the sections' non-zeros (the unused tail, a few % for non-shared genes, is never touched).

    ``cols``: per section, the column positions of the shared genes in output order, or ``None`` (all, in order).
    """
    mats = [_csr(X) for X in mats]
    k = next(X.shape[1] if c is None else len(c) for X, c in zip(mats, cols))
    bound = sum(X.nnz for X in mats)
    idx_dtype = np.int32 if max(bound, k) <= np.iinfo(np.int32).max else np.int64
    data = np.empty(bound, dtype=np.result_type(*[X.data.dtype for X in mats]))
    indices = np.empty(bound, dtype=idx_dtype)
    indptr = np.empty(sum(X.shape[0] for X in mats) + 1, dtype=idx_dtype)
    indptr[0], row, at = 0, 0, 0
    for X, c in zip(mats, cols):
        part = X if c is None else X[:, c]
        size = part.nnz
        data[at:at + size], indices[at:at + size] = part.data, part.indices
        indptr[row + 1:row + X.shape[0] + 1] = part.indptr[1:] + at
        row, at = row + X.shape[0], at + size
        del part
    return sp.csr_matrix((data[:at], indices[:at], indptr), shape=(row, k))


def adjacent_overlap(fixed_xy, moving_xy, radius_um: float) -> float:
    """Fraction of ``moving`` spots with a ``fixed`` spot within ``radius_um``."""
    d, _ = cKDTree(fixed_xy).query(moving_xy)
    return float(np.mean(d <= radius_um))


def stack_sections(adatas, z_um, *, names=None, method: str = "icp", pitch_um: float | None = None,
                   expr_weight: float = 1.0, trim: float = 0.8, alpha: float = 0.1, n_components: int = 20,
                   n_genes: int = 300, icp_options: dict | None = None, seed: int = 0, min_overlap: float = 0.3,
                   max_points: int | None = None):
    """Align serial sections (without images) into one 3D frame from their expression.

    Parameters
    ----------
    adatas : list of AnnData
        Sections in cutting order, each with counts, ``obsm['spatial']`` (px) and
        ``uns['voxelome']['pixel_size_um']``.
    z_um : sequence of float
        Depth of each section (µm), strictly increasing (the user gives order and spacing).
    names : list of str, optional
        Section names (``obs['section']``).
    method : {"icp", "fgw"}
        Fast ICP on expression embeddings, or PASTE-like fused Gromov–Wasserstein (POT).
    pitch_um : float, optional
        Spot spacing (µm); default the median nearest-neighbour distance of the first section.
    expr_weight, trim, alpha : float
        ICP embedding weight and kept fraction of matches; FGW structure weight (PASTE's alpha).
    n_components, n_genes : int
        Principal components of the joint expression embedding, and the most variable genes it uses
        (300: the best mean accuracy on the held-out her2st patients E–H, see BENCHMARKS.md).
    icp_options : dict, optional
        Search budget of :func:`align_icp` (``n_angles``, ``coarse_iter``, ``n_keep_starts``, ``n_iter``).
    min_overlap : float
        Warn when fewer than this fraction of a section's aligned spots lie within one pitch (two bin
        sides for pooled sections) of the previous section's spots (sections that do not overlap cannot
        be aligned).
    max_points : int, optional
        Largest section aligned point by point (default 5,000 for ``icp``, 1,500 for ``fgw``). Larger
        sections (single cells, Visium HD bins) are pooled on a square grid sized so that each has at most
        about this many bins (centroids, mean embeddings), and the bins are aligned; the rigid map then
        moves every point. Memory and time then stay bounded whatever the number of cells.

    Returns
    -------
    AnnData
        All spots, shared genes, ``obs['section']``; ``obsm['spatial_3d']`` (x, y, z) µm in the frame of
        section 0; ``uns['voxelome']['stack']`` with names, z, method, ``seconds`` (the whole call),
        ``seconds_align`` (embedding + alignment, without input checks, gene matching and the output
        AnnData), n_common_genes and per section ``transform`` (3 × 3, section px → stack µm x, y
        homogeneous) and ``overlap``; ``bin_um`` (the pooling grid side, ``None`` when points were aligned).
    """
    import anndata as ad
    import pandas as pd

    check_choice("method", method, METHODS)
    for key, value in (icp_options or {}).items():
        check_choice("icp_options key", key, ICP_OPTIONS)
        check_positive(f"icp_options[{key!r}]", value,
                       allow_zero=key in ("n_iter", "coarse_iter", "soft_iter", "sym_iter"))
    check_positive("n_genes", n_genes)
    max_points = MAX_POINTS[method] if max_points is None else max_points
    if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or max_points < 10:
        raise VoxelomeError(f"max_points={max_points!r} must be an integer ≥ 10 (sections larger than it are aligned "
                            f"as pooled bins); e.g. {MAX_POINTS[method]}.")
    t0 = time.perf_counter()
    names, z = check_stack_inputs(adatas, z_um, names)
    genes, cols = _gene_positions(adatas)
    t1 = time.perf_counter()
    x_all = _stack_shared([a.X for a in adatas], cols)  # the output's X; also the counts unless a counts layer exists
    c_all = (_stack_shared([a.layers.get("counts", a.X) for a in adatas], cols)
             if any("counts" in a.layers for a in adatas) else x_all)
    xys = [section_xy_um(a) for a in adatas]
    sizes = [a.n_obs for a in adatas]
    embs = _split(_embed(c_all, n_components, n_genes, dedup=False), sizes)
    if pitch_um is None:
        d, _ = cKDTree(xys[0]).query(xys[0], k=2)
        pitch_um = float(np.median(d[:, 1]))
    bin_um = bin_size_um(xys, pitch_um, int(max_points))
    if method == "icp":
        aligner, kw = align_icp, dict(pitch_um=pitch_um, expr_weight=expr_weight, trim=trim, **(icp_options or {}))
    else:
        aligner, kw = align_fgw, dict(alpha=alpha, seed=seed)
    aligned = [xys[0]]
    rts = [(np.eye(2), np.zeros(2))]
    overlaps = [1.0]
    for k in range(1, len(adatas)):
        if bin_um is None:
            r, t, _ = aligner(aligned[-1], embs[k - 1], xys[k], embs[k], **kw)
        else:
            r, t, _ = align_binned(aligner, aligned[-1], embs[k - 1], xys[k], embs[k], bin_um=bin_um, **kw)
        aligned.append(xys[k] @ r.T + t)
        rts.append((r, t))
        # within one pitch; two bin sides for pooled sections (single cells of two sections do not face each other,
        # so a one-pitch radius would measure the cell density, not the overlap)
        radius = pitch_um if bin_um is None else 2 * bin_um
        overlaps.append(adjacent_overlap(aligned[-2], aligned[-1], radius))
        if overlaps[-1] < min_overlap:
            warnings.warn(f"section {names[k]!r} overlaps the previous one little after alignment "
                          f"({overlaps[-1]:.0%} of its spots within {radius:.3g} µm of the previous one's): check "
                          "the order and that both are of the same block.", stacklevel=2)
    seconds_align = time.perf_counter() - t1
    transforms = []
    for a, (r, t) in zip(adatas, rts):
        px = float(a.uns[UNS_KEY][PIXEL_SIZE_KEY])
        m = np.eye(3)
        m[:2, :2], m[:2, 2] = r * px, t
        transforms.append(m)
    obs = pd.DataFrame(index=pd.Index([f"{nm}:{i}" for nm, a in zip(names, adatas) for i in a.obs_names]))
    obs["section"] = pd.Categorical.from_codes(np.repeat(np.arange(len(adatas)), sizes), categories=names)
    out = ad.AnnData(X=x_all, obs=obs, var=pd.DataFrame(index=genes))
    out.obsm[SPATIAL_KEY] = np.vstack([np.asarray(a.obsm[SPATIAL_KEY], float) for a in adatas])
    out.obsm[SPATIAL_3D_KEY] = np.column_stack([np.vstack(aligned), np.repeat(z, sizes)])
    out.uns[UNS_KEY] = {STACK_KEY: {
        "sections": names, "z_um": z.tolist(), "method": method, "seconds": time.perf_counter() - t0,
        "seconds_align": seconds_align, "pitch_um": pitch_um, "bin_um": bin_um, "max_points": int(max_points),
        "n_common_genes": len(genes), "overlap": overlaps,
        "transforms": [m.tolist() for m in transforms],
        "transform_doc": "per section: 3x3 homogeneous map of obsm['spatial'] pixels (x, y, 1) to stack µm (x, y, 1); "
                         "z from z_um"}}
    return out


def apply_stack_transform(transform, spatial_px) -> np.ndarray:
    """Section pixels ``(n, 2)`` → stack µm ``(n, 2)`` with a stored 3 × 3 transform."""
    m = np.asarray(transform, float)
    return np.asarray(spatial_px, float) @ m[:2, :2].T + m[:2, 2]


def adjacent_expression_r(xy_a, expr_a, xy_b, expr_b) -> float:
    """Mean Pearson r between each spot of ``b`` and its nearest spot (in xy) of ``a`` (accuracy of a stack)."""
    _, j = cKDTree(xy_a).query(xy_b)
    a, b = expr_a[j], expr_b
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    r = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(np.mean(r))
