"""Fit niche signatures on one ST section and project them onto any other.

``method='archetypes'`` follows chrysalis (Demeter et al. 2025): spatially variable genes
(Moran's I) → PCA → archetypal analysis (PCHA, Mørup & Hansen 2012); a spot's proportions
are its PCA scores expressed as a convex mixture of the archetypes. ``method='nmf'`` uses
NMF programmes instead. Both keep gene loadings, so that predicted signature maps (e.g. an
X-Pression volume) turn back into gene maps with :meth:`SignatureModel.to_genes`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxelome.constants import SIGNATURE_LOADINGS_KEY, SIGNATURES_FILE, SIGNATURES_KEY, SPATIAL_KEY
from voxelome.errors import VoxelomeError, check_choice, check_positive, did_you_mean
from voxelome.signatures import svg
from voxelome.signatures.archetypes import fit_archetype_signatures, simplex_lstsq
from voxelome.signatures.nmf import fit_nmf_signatures, nmf_proportions

METHODS = ("archetypes", "nmf")
GENE_SELECTIONS = ("moran", "variance")
#: A signature needs this many spots per signature to be estimated at all.
MIN_SPOTS_PER_SIGNATURE = 10
#: Projection refuses sections holding less than this fraction of the model's genes.
MIN_GENE_FRACTION = 0.5
#: Iterations/tolerance of the per-spot proportion solve (shared by fit and project).
_SOLVE = dict(max_iter=5000, tol=1e-9)
#: dense float64 entries per chunk of spots when projecting (50 k spots × 1,000 genes = 400 MB)
PROJECT_CHUNK_ENTRIES = 50_000_000
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SignatureConfig:
    """How signatures are derived; saved with every model."""

    method: str = "archetypes"
    """'archetypes' (chrysalis: SVGs → PCA → archetypal analysis) or 'nmf'."""
    n_signatures: int = 6
    """Number of signatures (archetypes / NMF programmes), ≥ 2."""
    n_genes: int = 1000
    """Genes kept (best-ranked first); capped by the genes that pass the filters."""
    gene_selection: str = "moran"
    """'moran' (spatially variable genes, needs obsm['spatial']) or 'variance'."""
    n_pcs: int = 20
    """PCA components the archetypes live in (archetypes only); ≥ n_signatures - 1."""
    target_sum: float = 1e4
    """Counts per spot after library-size normalisation, before log1p."""
    seed: int = 0
    """Seeds every random step (FurthestSum starts, PCA, NMF)."""
    max_iter: int = 500
    """Outer iterations of archetypal analysis / NMF."""
    n_neighbors: int = 6
    """kNN graph size for Moran's I (6 = the Visium hexagon, as chrysalis)."""
    min_spot_fraction: float = 0.05
    """Genes must be detected in at least this fraction of spots to be ranked."""
    max_fit_spots: int = 50_000
    """Spots the archetypes / NMF programmes are fitted on at most (a seeded random subset of larger sections:
    Visium HD bins, single cells); every spot is then projected. Archetypal analysis' cost grows faster than the
    spots (100 k: 2.5 min, 200 k: 10 min on 2 cores)."""

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_choice("gene_selection", self.gene_selection, GENE_SELECTIONS)
        for name in ("n_signatures", "n_genes", "n_pcs", "max_iter", "n_neighbors", "max_fit_spots"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise VoxelomeError(f"{name}={value!r} must be a positive integer.")
        if self.n_signatures < 2:
            raise VoxelomeError(
                f"n_signatures={self.n_signatures} must be ≥ 2: one signature is the whole "
                "section. Use e.g. n_signatures=6."
            )
        if self.n_genes < self.n_signatures:
            raise VoxelomeError(
                f"n_genes={self.n_genes} is fewer than n_signatures={self.n_signatures}; keep at "
                f"least as many genes as signatures (e.g. n_genes=1000)."
            )
        if self.method == "archetypes" and self.n_pcs < self.n_signatures - 1:
            raise VoxelomeError(
                f"n_pcs={self.n_pcs} cannot hold {self.n_signatures} archetypes (a simplex with "
                f"k corners needs k - 1 dimensions); set n_pcs ≥ {self.n_signatures - 1}."
            )
        check_positive("target_sum", self.target_sum)
        if not 0 <= self.min_spot_fraction < 1:
            raise VoxelomeError(
                f"min_spot_fraction={self.min_spot_fraction!r} must be in [0, 1), e.g. 0.05."
            )

    def to_dict(self) -> dict:
        """Plain dict (YAML/JSON-ready)."""
        return dataclasses.asdict(self)


@dataclass
class SignatureModel:
    """Signatures fitted on one section; projects onto any section with the same genes.

    Attributes
    ----------
    config : SignatureConfig
    genes : list of str, length g
        Genes used, in the column order of every gene-sized array.
    names : list of str, length k
        Signature names ``"S0" … "S{k-1}"``, ordered by decreasing mean proportion on the
        fitted section.
    loadings : ndarray, shape (k, g)
        Expression of each signature on the log1p(normalised to ``target_sum``) scale;
        ``proportions @ loadings`` predicts expression. Archetypes: the archetype's expression
        (``C @ X``, a convex mixture of real spots); NMF: the non-negative least-squares
        profile given the fitted proportions.
    gene_mean : ndarray, shape (g,)
        Mean log-normalised expression on the fitted section (the PCA centre).
    components : ndarray, shape (d, g) or None
        PCA axes (archetypes only).
    archetypes : ndarray, shape (k, d) or None
        Archetype coordinates in PCA space (archetypes only).
    programmes : ndarray, shape (k, g) or None
        NMF programmes ``H``, rows with mean 1 (NMF only).
    gene_scores : ndarray, shape (g,)
        Moran's I (or variance) of each gene on the fitted section.
    """

    config: SignatureConfig
    genes: list
    names: list
    loadings: np.ndarray
    gene_mean: np.ndarray
    components: np.ndarray | None = None
    archetypes: np.ndarray | None = None
    programmes: np.ndarray | None = None
    gene_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def n_signatures(self) -> int:
        return len(self.names)

    # --- projection -------------------------------------------------------------------
    def proportions_from_expression(self, x: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        """Proportions ``(n, k)`` of log-normalised expression ``x`` ``(n, g_present)``.

        ``present`` is a boolean mask over :attr:`genes` giving the columns of ``x``
        (all genes by default). Missing genes are left out of the fit, not imputed.
        """
        present = np.ones(len(self.genes), bool) if present is None else present
        if self.config.method == "nmf":
            return nmf_proportions(x, self.programmes[:, present])
        centred = x - self.gene_mean[present]
        if present.all():
            scores = centred @ self.components.T
        else:  # least-squares PCA scores from the genes that are there
            scores = np.linalg.lstsq(self.components[:, present].T, centred.T, rcond=None)[0].T
        return simplex_lstsq(scores, self.archetypes, **_SOLVE)

    def project(self, adata) -> np.ndarray:
        """Signature proportions of every spot of ``adata`` (any section).

        Parameters
        ----------
        adata : anndata.AnnData
            Raw counts in ``layers['counts']`` or ``X``; genes matched by ``var_names``.
            Library sizes are taken over all of its genes, as at fitting time.

        Returns
        -------
        ndarray, shape (n_spots, k)
            Rows on the simplex (≥ 0, summing to 1).

        Raises
        ------
        VoxelomeError
            If fewer than half of the model's genes are in ``adata``. Warns when some are missing.
        """
        svg.check_unique_var_names(adata)
        idx = adata.var_names.get_indexer(self.genes)
        present = idx >= 0
        n_missing = int((~present).sum())
        if present.mean() < MIN_GENE_FRACTION:
            raise VoxelomeError(
                f"the section has only {int(present.sum())} of the {len(self.genes)} signature "
                f"genes (need ≥ {MIN_GENE_FRACTION:.0%}); e.g. missing {self.genes[np.argmin(present)]!r}. "
                "Check that var_names use the same gene identifiers (symbols vs Ensembl IDs)."
            )
        if n_missing:
            warnings.warn(
                f"{n_missing} of {len(self.genes)} signature genes are missing from the section "
                f"(e.g. {[g for g, p in zip(self.genes, present) if not p][:3]}); projecting on "
                f"the other {int(present.sum())}.",
                UserWarning,
                stacklevel=2,
            )
        x = svg.normalize_log1p(svg.get_counts(adata), self.config.target_sum)
        out = np.empty((adata.n_obs, self.n_signatures))
        step = max(1, PROJECT_CHUNK_ENTRIES // max(int(present.sum()), 1))  # rows densified at a time
        for a in range(0, adata.n_obs, step):
            rows = slice(a, min(a + step, adata.n_obs))
            out[rows] = self.proportions_from_expression(svg.dense_columns(x[rows], idx[present]), present)
        return out

    def to_genes(self, proportions, genes=None):
        """Predicted expression from signature proportions: ``proportions @ loadings``.

        Parameters
        ----------
        proportions : array-like, shape (n, k) or (k, ...)
            A 2-D array is spots × signatures. With 3 or more dimensions the signature axis
            comes first, e.g. a ``(k, z, y, x)`` volume or ``(k, y, x)`` image, and each voxel
            is mapped independently. NumPy or dask arrays (dask stays lazy; for whole volumes
            call this per block).
        genes : list of str, optional
            Only these genes (in this order); all of :attr:`genes` by default.

        Returns
        -------
        array, shape (n, g) or (g, ...)
            Expression on the log1p(normalised) scale, genes last for tables and first for
            rasters.
        """
        loadings = self.loadings
        if genes is not None:
            lookup = {g: i for i, g in enumerate(self.genes)}
            bad = [g for g in genes if g not in lookup]
            if bad:
                raise VoxelomeError(
                    f"genes={bad[:3]} are not signature genes.{did_you_mean(bad[0], self.genes)} "
                    "See SignatureModel.genes for the genes the model can predict."
                )
            loadings = loadings[:, [lookup[g] for g in genes]]
        p = proportions if hasattr(proportions, "ndim") else np.asarray(proportions, dtype=float)
        k = self.n_signatures
        if p.ndim == 2 and p.shape[1] == k:
            return p @ loadings
        if p.ndim >= 3 and p.shape[0] == k:
            return np.tensordot(loadings.T, p, axes=(1, 0))
        raise VoxelomeError(
            f"proportions of shape {tuple(p.shape)} do not fit {k} signatures: pass "
            f"(n_spots, {k}) or a raster with the signature axis first, ({k}, z, y, x)."
        )

    # --- persistence ------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the model as one ``.npz`` (arrays + a JSON header); no pickle.

        ``path`` may be a folder, in which case ``signatures.npz`` is written inside it.
        Returns the file written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / SIGNATURES_FILE
        from voxelome import __version__

        meta = {"format_version": _FORMAT_VERSION, "voxelome_version": __version__,
                "config": self.config.to_dict(), "genes": list(self.genes), "names": list(self.names)}
        arrays = {k: getattr(self, k) for k in ("loadings", "gene_mean", "components",
                                                "archetypes", "programmes", "gene_scores")}
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if v is not None}
        buf = io.BytesIO()  # write through a buffer so np.savez cannot append a suffix
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        return path

    @classmethod
    def load(cls, path) -> "SignatureModel":
        """Read a model written by :meth:`save` (``allow_pickle=False``)."""
        path = Path(path)
        if path.is_dir():
            path = path / SIGNATURES_FILE
        if not path.exists():
            raise VoxelomeError(f"no signature model at {str(path)!r}; save one with model.save(path).")
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = {k: f[k] for k in f.files if k != "meta"}
        known = {f.name for f in dataclasses.fields(SignatureConfig)}
        config = SignatureConfig(**{k: v for k, v in meta["config"].items() if k in known})
        return cls(config=config, genes=meta["genes"], names=meta["names"], **arrays)


def _resolve_config(config, overrides) -> SignatureConfig:
    config = SignatureConfig() if config is None else config
    known = [f.name for f in dataclasses.fields(SignatureConfig)]
    for key in overrides:
        if key not in known:
            raise VoxelomeError(f"unknown signature option {key!r}.{did_you_mean(key, known)} "
                                f"Options: {known}.")
    return dataclasses.replace(config, **overrides)


def fit_signatures(adata, config: SignatureConfig | None = None, **overrides) -> SignatureModel:
    """Derive niche signatures from one section.

    Parameters
    ----------
    adata : anndata.AnnData
        Raw counts (``layers['counts']`` or ``X``), spot centres in ``obsm['spatial']``
        (needed for ``gene_selection='moran'``).
    config : SignatureConfig, optional
    **overrides
        Fields of :class:`SignatureConfig` to change, e.g. ``method='nmf'``.

    Returns
    -------
    SignatureModel
        Its ``project(adata)`` gives the fitted section's proportions (fit = projection).
    """
    cfg = _resolve_config(config, overrides)
    svg.check_unique_var_names(adata)
    k, n = cfg.n_signatures, adata.n_obs
    if n < MIN_SPOTS_PER_SIGNATURE * k:
        fix = (f"lower n_signatures to ≤ {n // MIN_SPOTS_PER_SIGNATURE}"
               if n >= 2 * MIN_SPOTS_PER_SIGNATURE else "use a section with more spots")
        raise VoxelomeError(
            f"the section has {n} spots, too few for n_signatures={k} (need ≥ "
            f"{MIN_SPOTS_PER_SIGNATURE} spots per signature, {MIN_SPOTS_PER_SIGNATURE * k}); {fix}."
        )
    coords = adata.obsm[SPATIAL_KEY] if SPATIAL_KEY in adata.obsm else None
    x_all = svg.normalize_log1p(svg.get_counts(adata), cfg.target_sum)
    idx, scores = svg.select_genes(x_all, coords, method=cfg.gene_selection, n_genes=cfg.n_genes,
                                   min_spot_fraction=cfg.min_spot_fraction,
                                   n_neighbors=cfg.n_neighbors)
    if idx.size < k:
        raise VoxelomeError(
            f"only {idx.size} genes are detected in ≥ {cfg.min_spot_fraction:.0%} of spots and vary, "
            f"fewer than n_signatures={k}; lower n_signatures or min_spot_fraction."
        )
    rows = np.arange(n)
    if n > cfg.max_fit_spots:  # fit on a seeded subset; project() then gives every spot its proportions
        rows = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.max_fit_spots, replace=False))
    x = svg.dense_columns(x_all[rows] if len(rows) < n else x_all, idx)
    genes = adata.var_names[idx].astype(str).tolist()
    if cfg.method == "archetypes":
        parts = fit_archetype_signatures(x, cfg.n_signatures, n_pcs=cfg.n_pcs, seed=cfg.seed,
                                         max_iter=cfg.max_iter)
    else:
        parts = fit_nmf_signatures(x, cfg.n_signatures, seed=cfg.seed, max_iter=cfg.max_iter)
    names = [f"S{i}" for i in range(cfg.n_signatures)]
    return SignatureModel(config=cfg, genes=genes, names=names, gene_scores=scores, **parts)


def project_signatures(model: SignatureModel, adata, *, key: str = SIGNATURES_KEY):
    """Project ``model`` onto ``adata`` and store the result in place.

    Writes ``adata.obsm[key]`` (n_spots, k) proportions, ``adata.uns[key]`` (signature names
    and method) and ``adata.varm['signature_loadings']`` (n_genes, k), NaN for genes the
    model does not use. Returns ``adata``.
    """
    props = model.project(adata)
    adata.obsm[key] = props
    adata.uns[key] = {"names": list(model.names), "method": model.config.method}
    loadings = np.full((adata.n_vars, model.n_signatures), np.nan)
    idx = adata.var_names.get_indexer(model.genes)
    loadings[idx[idx >= 0]] = model.loadings.T[idx >= 0]
    adata.varm[SIGNATURE_LOADINGS_KEY] = loadings
    return adata
