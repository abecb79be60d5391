"""Archetypal analysis on the simplex (Cutler & Breiman 1994; PCHA, Mørup & Hansen 2012).

Each spot's coordinates ``X[i]`` (here: PCA scores of spatially variable genes, as in
chrysalis, Demeter et al. 2025) are approximated by a convex mixture of ``K`` archetypes,
which are themselves convex mixtures of spots::

    X ≈ S @ Z,   Z = C @ X,   rows of S (n, K) and of C (K, n) on the probability simplex.

This is PCHA's ``X ≈ X C S`` written for row-major data (``C``/``S`` transposed). As in PCHA
the fit alternates projected-gradient steps on ``S`` and ``C`` with an adaptive step size,
starting from FurthestSum. The per-spot proportions of *any* set of coordinates given fixed
archetypes are one batched, accelerated projected-gradient solve (:func:`simplex_lstsq`),
vectorised over spots; the fit returns proportions computed by exactly that solve, so that
fitting and projecting the same section give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto the probability simplex.

    Sort-based algorithm of Held et al. (1974) / Duchi et al. (2008), vectorised over rows.

    Parameters
    ----------
    v : ndarray, shape (n, k)

    Returns
    -------
    ndarray, shape (n, k)
        Rows ``>= 0`` summing to 1, each the closest such point to the row of ``v``.
    """
    v = np.asarray(v, dtype=np.float64)
    k = v.shape[1]
    u = -np.sort(-v, axis=1)
    css = np.cumsum(u, axis=1) - 1.0
    cond = u - css / np.arange(1, k + 1) > 0
    rho = k - 1 - np.argmax(cond[:, ::-1], axis=1)  # last index where cond holds
    theta = css[np.arange(v.shape[0]), rho] / (rho + 1)
    return np.maximum(v - theta[:, None], 0.0)


def fista_rows(gram: np.ndarray, rhs: np.ndarray, project, init: np.ndarray, *,
               max_iter: int = 2000, tol: float = 1e-7) -> np.ndarray:
    """Minimise ``0.5 tr(S G S') - tr(S B')`` over rows of ``S`` in a convex set, batched.

    Row ``i`` solves ``min_s 0.5 ||x_i - s D||²`` with ``G = D D'`` and ``B = X D'``. Uses
    FISTA (Beck & Teboulle 2009) with step ``1/λmax(G)`` and per-row adaptive restart
    (O'Donoghue & Candès 2015), so ill-conditioned archetypes still converge; all rows move
    together, so the cost is a few small matrix products per iteration.

    Parameters
    ----------
    gram : ndarray, shape (k, k)
    rhs : ndarray, shape (n, k)
    project : callable
        Projection of an ``(n, k)`` array onto the feasible set (row-wise).
    init : ndarray, shape (n, k)
        Feasible starting point.
    max_iter : int
    tol : float
        Stop when no entry changes by more than ``tol`` in one iteration.

    Returns
    -------
    ndarray, shape (n, k)
    """
    lip = float(np.linalg.eigvalsh(gram)[-1])
    if lip <= 0:
        return init
    step = 1.0 / lip
    s = init.copy()
    y = s.copy()
    t = np.ones((s.shape[0], 1))
    for _ in range(max_iter):
        s_new = project(y - step * (y @ gram - rhs))
        delta = s_new - s
        # Restart momentum on rows where it points uphill (keeps convergence monotone-ish).
        restart = np.einsum("ij,ij->i", y - s_new, delta)[:, None] > 0
        t_new = np.where(restart, 1.0, 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t)))
        y = s_new + np.where(restart, 0.0, (t - 1.0) / t_new) * delta
        s, t = s_new, t_new
        if np.max(np.abs(delta)) < tol:
            break
    return s


def simplex_lstsq(x: np.ndarray, z: np.ndarray, *, max_iter: int = 2000, tol: float = 1e-7,
                  init: np.ndarray | None = None) -> np.ndarray:
    """Proportions of each row of ``x`` on the simplex spanned by archetypes ``z``.

    Solves ``min_{s_i in simplex} ||x_i - s_i Z||²`` for every row at once.

    Parameters
    ----------
    x : ndarray, shape (n, d)
        Coordinates of the spots (e.g. PCA scores).
    z : ndarray, shape (k, d)
        Archetype coordinates.
    max_iter, tol : see :func:`fista_rows`.
    init : ndarray, shape (n, k), optional
        Warm start; by default the unconstrained least-squares solution projected on the
        simplex (a deterministic, usually close start).

    Returns
    -------
    ndarray, shape (n, k)
        Rows on the simplex.
    """
    gram = z @ z.T
    rhs = x @ z.T
    if init is None:
        init = project_simplex(rhs @ np.linalg.pinv(gram))
    return fista_rows(gram, rhs, project_simplex, init, max_iter=max_iter, tol=tol)


def furthest_sum(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """FurthestSum initialisation of archetypes (Mørup & Hansen 2012).

    Start at a random spot, then repeatedly add the spot with the largest summed distance to
    those already chosen; the random start is then swapped out for one more furthest spot so
    that it does not bias the result.

    Parameters
    ----------
    x : ndarray, shape (n, d)
    k : int
    seed : int

    Returns
    -------
    ndarray of int, shape (k,)
        Indices of the chosen spots.
    """
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(n))]
    dist_sum = np.zeros(n)
    for it in range(k + 1):
        if it == k:  # drop the random seed point and pick its replacement
            dist_sum -= np.linalg.norm(x - x[chosen[0]], axis=1)
            chosen = chosen[1:]
        else:
            dist_sum += np.linalg.norm(x - x[chosen[-1]], axis=1)
        masked = dist_sum.copy()
        masked[chosen] = -np.inf
        chosen.append(int(np.argmax(masked)))
    return np.array(chosen[:k])


@dataclass
class ArchetypeFit:
    """Result of :func:`fit_archetypes`.

    Attributes
    ----------
    archetypes : ndarray, shape (k, d)
        ``Z = C @ X``.
    weights : ndarray, shape (k, n)
        ``C``: each archetype as a convex combination of spots.
    proportions : ndarray, shape (n, k)
        ``S`` from the last alternating step (warm, not the final projection).
    sse : float
        ``||X - S Z||²``.
    n_iter : int
        Outer iterations run.
    """

    archetypes: np.ndarray
    weights: np.ndarray
    proportions: np.ndarray
    sse: float
    n_iter: int


def fit_archetypes(x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 500,
                   tol: float = 1e-6, n_init: int = 3, inner: int = 10) -> ArchetypeFit:
    """Archetypal analysis of ``x`` with ``k`` archetypes (PCHA-style alternating updates).

    Parameters
    ----------
    x : ndarray, shape (n, d)
        Data rows (spots × PCA scores).
    k : int
        Number of archetypes.
    seed : int
        Seeds the FurthestSum starts (``seed, seed + 1, ...``).
    max_iter : int
        Outer alternations at most.
    tol : float
        Stop when the relative SSE decrease of an outer iteration falls below ``tol``.
    n_init : int
        Independent FurthestSum starts; the lowest SSE wins (chrysalis uses 3 via the
        ``archetypes`` package). AA has local minima, so a few starts are cheap insurance.
    inner : int
        Projected-gradient steps on ``S`` and on ``C`` per outer iteration (PCHA uses 10).

    Returns
    -------
    ArchetypeFit
    """
    x = np.asarray(x, dtype=np.float64)
    best = None
    for r in range(n_init):
        fit = _fit_once(x, k, seed + r, max_iter, tol, inner)
        if best is None or fit.sse < best.sse:
            best = fit
    return best


def _fit_once(x, k, seed, max_iter, tol, inner) -> ArchetypeFit:
    n = x.shape[0]
    xx = float(np.sum(x * x))
    sigma2 = float(np.linalg.norm(x, 2) ** 2)  # Lipschitz factor of the C-gradient
    c = np.zeros((k, n))
    c[np.arange(k), furthest_sum(x, k, seed)] = 1.0
    z = c @ x
    s = simplex_lstsq(x, z, max_iter=inner)
    mu = None

    def sse_of(sx, sts, z_mat):  # ||X - S Z||² from small Gram products
        return xx - 2.0 * np.sum(sx * z_mat) + np.sum((sts @ z_mat) * z_mat)

    sse = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        s = simplex_lstsq(x, z, max_iter=inner, tol=0.0, init=s)
        sts, sx = s.T @ s, s.T @ x
        cur = sse_of(sx, sts, z)
        if mu is None:
            mu = 1.0 / max(float(np.linalg.eigvalsh(sts)[-1]) * sigma2, 1e-300)
        for _ in range(inner):
            grad = (sts @ z - sx) @ x.T  # d/dC of 0.5||X - S C X||², shape (k, n)
            # PCHA line search: grow the step after success, halve it until the SSE drops.
            while True:
                c_new = project_simplex(c - mu * grad)
                z_new = c_new @ x
                new = sse_of(sx, sts, z_new)
                if new <= cur * (1 + 1e-12) or mu < 1e-300:
                    break
                mu *= 0.5
            c, z, cur = c_new, z_new, new
            mu *= 1.2
        if abs(sse - cur) < tol * abs(cur):  # abs: an inexact S-step may nudge SSE up
            sse = cur
            break
        sse = cur
    return ArchetypeFit(archetypes=z, weights=c, proportions=s, sse=float(sse), n_iter=it)


def fit_archetype_signatures(x: np.ndarray, k: int, *, n_pcs: int = 20, seed: int = 0,
                             max_iter: int = 500) -> dict:
    """chrysalis-style signatures: PCA of the expression, then archetypes in PCA space.

    Parameters
    ----------
    x : ndarray, shape (n_spots, n_genes)
        Log-normalised expression of the selected (spatially variable) genes.
    k : int
        Number of archetypes.
    n_pcs : int
        PCA components; capped at ``min(n_genes, n_spots - 1)``.
    seed, max_iter : see :func:`fit_archetypes`.

    Returns
    -------
    dict
        ``gene_mean`` (g,) and ``components`` (d, g) of the PCA; ``archetypes`` (k, d);
        ``loadings`` (k, g) = ``C @ x``, each archetype's expression as the convex mixture of
        real spots that defines it (non-negative, unlike a PCA back-projection, and mapped
        by the PCA exactly onto the archetype). Archetypes are ordered by decreasing mean
        proportion so that names are stable.
    """
    from sklearn.decomposition import PCA

    n, g = x.shape
    d = int(min(n_pcs, g, n - 1))
    pca = PCA(n_components=d, random_state=seed).fit(x)
    mean, comps = pca.mean_.astype(np.float64), pca.components_.astype(np.float64)
    fit = fit_archetypes((x - mean) @ comps.T, k, seed=seed, max_iter=max_iter)
    order = np.argsort(-fit.proportions.mean(axis=0), kind="stable")
    return {"gene_mean": mean, "components": comps, "archetypes": fit.archetypes[order],
            "loadings": fit.weights[order] @ x}
