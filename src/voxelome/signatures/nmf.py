"""Non-negative matrix factorisation signatures (the alternative to archetypes).

``X ≈ W H`` with ``X`` the log-normalised expression of the selected genes, ``H`` the
``(k, n_genes)`` gene programmes (sklearn's coordinate-descent NMF, NNDSVDa start, seeded)
and ``W >= 0`` the per-spot activities. Proportions are the rows of ``W`` normalised to
sum to one. To make fitting and projecting the same section agree exactly, ``W`` is always
recomputed for fixed ``H`` by one batched non-negative least-squares solve
(:func:`nonneg_lstsq`), never taken from ``fit_transform``.
"""

from __future__ import annotations

import warnings

import numpy as np

from voxelome.signatures.archetypes import fista_rows


def fit_nmf(x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 500) -> np.ndarray:
    """Fit NMF gene programmes.

    Parameters
    ----------
    x : ndarray, shape (n_spots, n_genes)
        Non-negative (log-normalised) expression.
    k : int
        Number of programmes.
    seed : int
        ``random_state`` of :class:`sklearn.decomposition.NMF` (NNDSVDa itself is
        deterministic; the seed only matters for ties).
    max_iter : int

    Returns
    -------
    ndarray, shape (k, n_genes)
        ``H``, non-negative, each row scaled to mean 1. NMF leaves the scale of a programme
        arbitrary (``W H = (W D)(D⁻¹ H)``); fixing it makes row-normalised activities the
        share of a spot's expression that each programme explains.
    """
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    model = NMF(n_components=k, init="nndsvda", solver="cd", max_iter=max_iter,
                random_state=seed, tol=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        warnings.warn(
            f"NMF did not converge in max_iter={max_iter} iterations; the signatures may be "
            "rough. Raise SignatureConfig.max_iter.",
            UserWarning,
            stacklevel=4,
        )
    h = np.asarray(model.components_, dtype=np.float64)
    mean = h.mean(axis=1, keepdims=True)
    return np.divide(h, mean, out=np.zeros_like(h), where=mean > 0)


def nonneg_lstsq(x: np.ndarray, basis: np.ndarray, *, max_iter: int = 2000,
                 tol: float = 1e-7) -> np.ndarray:
    """Non-negative coefficients of each row of ``x`` on the rows of ``basis``, batched.

    Solves ``min_{w_i >= 0} ||x_i - w_i B||²`` for all rows at once (accelerated projected
    gradient, :func:`voxelome.signatures.archetypes.fista_rows`).

    Parameters
    ----------
    x : ndarray, shape (n, g)
    basis : ndarray, shape (k, g)

    Returns
    -------
    ndarray, shape (n, k)
        Non-negative coefficients.
    """
    gram = basis @ basis.T
    rhs = x @ basis.T
    init = np.maximum(rhs @ np.linalg.pinv(gram), 0.0)
    return fista_rows(gram, rhs, lambda v: np.maximum(v, 0.0), init, max_iter=max_iter, tol=tol)


def activities_to_proportions(w: np.ndarray) -> np.ndarray:
    """Row-normalise NMF activities ``(n, k)`` onto the simplex.

    Spots with no activity at all (empty spots)
    get uniform proportions rather than NaN.
    """
    total = w.sum(axis=1, keepdims=True)
    k = w.shape[1]
    return np.divide(w, total, out=np.full_like(w, 1.0 / k), where=total > 0)


def nmf_proportions(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Proportions ``(n, k)`` of spots ``x`` ``(n, g)`` for fixed programmes ``h`` ``(k, g)``."""
    return activities_to_proportions(nonneg_lstsq(x, h))


def fit_nmf_signatures(x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 500) -> dict:
    """NMF signatures of log-normalised expression ``x`` (n_spots, n_genes).

    Returns
    -------
    dict
        ``programmes`` (k, g) from :func:`fit_nmf`, ordered by decreasing mean proportion;
        ``loadings`` (k, g), the non-negative least-squares profiles ``L`` minimising
        ``||x - P L||`` for the section's proportions ``P`` (so that ``P @ L`` predicts
        expression, whatever scale the programmes carry); ``gene_mean`` (g,).
    """
    h = fit_nmf(x, k, seed=seed, max_iter=max_iter)
    h = h[np.argsort(-nmf_proportions(x, h).mean(axis=0), kind="stable")]
    p = nmf_proportions(x, h)
    return {"programmes": h, "loadings": nonneg_lstsq(x.T, p.T).T, "gene_mean": x.mean(axis=0)}
