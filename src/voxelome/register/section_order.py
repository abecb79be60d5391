"""Check the cutting order of serial sections from their expression (``voxelome register order``).

Serial sections are numbered by hand; a well label, a slide position or a re-cut can make the numbers disagree
with the depth order, and every 3D method (stacking, fields, interpolation between sections) then reads the wrong
neighbours. Adjacent sections of one block share their expression *patterns* more than distant ones, so the
order that makes neighbours most alike — the maximum-similarity path through all sections (seriation) — is
evidence about the cutting order. It cannot tell the direction (top from bottom), and it is only as good as the
similarity: sections far apart in a homogeneous tissue look alike too. Use it as a check, not as ground truth.

Similarity of a pair: the moving section is aligned rigidly onto the other (the ICP of
:func:`~voxelome.register.stack_expression.stack_sections`), then each section's spots are predicted from the
other's ``k`` nearest aligned spots (in-plane) and the per-gene Pearson r over spots is averaged over the
``n_genes`` highest-mean genes and both directions. Unlike the nearest-spot profile correlation used to score
stacks, this measures whether the two sections show the same *spatial* pattern gene by gene.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from voxelome.errors import VoxelomeError, check_positive
from voxelome.evaluate.field_baselines import knn_3d, per_gene_scores, section_depths

#: sections up to which the best order is found exactly (Held–Karp, O(2ⁿ n²)); beyond, greedy paths + 2-opt
EXACT_MAX = 12
#: points per section read by :func:`stacked_similarity` (a seeded subset above it)
REFERENCE_SPOTS = 20000
#: the given order is flagged when the suggested order's mean neighbour similarity is higher by this fraction
WARN_GAIN = 0.2


@dataclass
class OrderCheck:
    """Result of :func:`check_section_order` / :func:`check_stack_order`.

    Attributes
    ----------
    names : list of str
        Sections in the given order.
    similarity : ndarray, shape (n, n)
        Symmetric pairwise similarity (mean per-gene r; diagonal NaN).
    given_score, suggested_score : float
        Mean similarity of adjacent sections in the given / suggested order.
    suggested : list of str
        The most consistent order (oriented to start nearer the given first section).
    gain : float
        ``suggested_score / given_score − 1`` (0 when the given order is already the best).
    sections : list of dict
        Per section: ``neighbours_r`` (mean similarity with its given neighbours), ``closest`` (the most similar
        other section) and ``closest_r``.
    consistent : bool
        ``gain < warn_gain``.
    """

    names: list
    similarity: np.ndarray
    given_score: float
    suggested: list
    suggested_score: float
    gain: float
    sections: list = field(default_factory=list)
    consistent: bool = True

    def to_dict(self) -> dict:
        """JSON-ready summary (the similarity as nested lists, NaN diagonal as ``None``)."""
        sim = [[None if not np.isfinite(v) else round(float(v), 4) for v in row] for row in self.similarity]
        return {"names": self.names, "given_score": round(self.given_score, 4), "suggested": self.suggested,
                "suggested_score": round(self.suggested_score, 4), "gain": round(self.gain, 4),
                "consistent": self.consistent, "sections": self.sections, "similarity": sim}


def path_score(similarity: np.ndarray, order) -> float:
    """Mean similarity of consecutive sections along ``order`` (indices)."""
    order = list(order)
    return float(np.mean([similarity[a, b] for a, b in zip(order, order[1:])]))


def best_order(similarity: np.ndarray) -> list[int]:
    """The path through every section with the highest summed similarity of neighbours.

    Exact (Held–Karp dynamic programme) for up to ``EXACT_MAX`` sections; beyond, the best of the greedy paths
    from every start, improved by 2-opt reversals until none helps. Oriented so that section 0 lies in the first
    half (a path and its reverse score the same).

    Parameters
    ----------
    similarity : ndarray, shape (n, n)
        Symmetric; the diagonal is ignored.

    Returns
    -------
    list of int
        Section indices in the suggested order.
    """
    s = np.nan_to_num(np.asarray(similarity, float), nan=-np.inf)
    n = len(s)
    off_diagonal = s[~np.eye(n, dtype=bool)]
    if n <= 2 or not np.isfinite(off_diagonal).all():  # a pair without a score: no order can be judged
        return list(range(n))
    path = _held_karp(s) if n <= EXACT_MAX else _two_opt(s, max((_greedy(s, a) for a in range(n)),
                                                             key=lambda p: _total(s, p)))
    return path if path.index(0) <= (n - 1) / 2 else path[::-1]


def _total(s, path) -> float:
    return float(sum(s[a, b] for a, b in zip(path, path[1:])))


def _held_karp(s: np.ndarray) -> list[int]:
    n = len(s)
    full = (1 << n) - 1
    best = np.full((1 << n, n), -np.inf)
    back = np.full((1 << n, n), -1, dtype=np.int64)
    for v in range(n):
        best[1 << v, v] = 0.0
    for mask in range(1, full + 1):  # increasing masks: every subset is finished before its supersets
        for v in (i for i in range(n) if (mask >> i) & 1):
            if not np.isfinite(best[mask, v]):
                continue
            for u in range(n):
                if (mask >> u) & 1:
                    continue
                cand = best[mask, v] + s[v, u]
                if cand > best[mask | (1 << u), u]:
                    best[mask | (1 << u), u], back[mask | (1 << u), u] = cand, v
    v, mask, path = int(np.argmax(best[full])), full, []
    while v >= 0:
        path.append(v)
        v, mask = int(back[mask, v]), mask & ~(1 << v)
    return path[::-1]


def _greedy(s: np.ndarray, start: int) -> list[int]:
    path, left = [start], set(range(len(s))) - {start}
    while left:
        nxt = max(left, key=lambda u: s[path[-1], u])
        path.append(nxt)
        left.remove(nxt)
    return path


def _two_opt(s: np.ndarray, path: list[int]) -> list[int]:
    improved = True
    while improved:
        improved = False
        for i, j in itertools.combinations(range(len(path) + 1), 2):
            if j - i < 2:
                continue
            cand = path[:i] + path[i:j][::-1] + path[j:]
            if _total(s, cand) > _total(s, path) + 1e-12:
                path, improved = cand, True
    return path


def _top_mean_genes(X: sp.csr_matrix, n_genes: int) -> np.ndarray:
    """Columns of the ``n_genes`` highest mean log1p(counts per 10k) (sparse: nothing densified)."""
    lib = np.maximum(np.asarray(X.sum(1), float).ravel(), 1.0)
    L = sp.diags(1e4 / lib) @ X
    L.data = np.log1p(L.data)
    return np.argsort(-np.asarray(L.mean(0)).ravel(), kind="stable")[:n_genes]


def _pair_similarity(xys, ys, *, k: int, max_spots: int, seed: int, progress: bool, align=None) -> np.ndarray:
    """Symmetric (n, n) mean per-gene r of each pair (see :func:`section_similarity`); ``align(a, b)`` returns the
    rigid map ``(R, t)`` of section b onto a (``None``: the sections are already in one frame)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    picks = [np.sort(rng.choice(len(x), max_spots, replace=False)) if len(x) > max_spots else np.arange(len(x))
             for x in xys]
    n = len(xys)
    sim = np.full((n, n), np.nan)
    for a, b in tqdm(list(itertools.combinations(range(n), 2)), desc="section similarity", unit="pair",
                     disable=not progress):
        xb = xys[b]
        if align is not None:
            r, t = align(a, b)
            xb = xb @ r.T + t
        sim[a, b] = sim[b, a] = spatial_agreement(xys[a], ys[a], xb, ys[b], k=k, query_a=picks[a], query_b=picks[b])
    return sim


def spatial_agreement(xy_a, y_a, xy_b, y_b, *, k: int = 8, query_a=None, query_b=None) -> float:
    """Do two aligned sections show the same spatial pattern, gene by gene?

    Each section's spots are predicted from the other's ``k`` nearest spots (inverse-distance weights, in-plane);
    the per-gene Pearson r over spots is averaged over genes and over both directions.

    Parameters
    ----------
    xy_a, xy_b : array, shape (n_a, 2), (n_b, 2)
        Spot centres (µm) in one frame.
    y_a, y_b : array, shape (n_a, g), (n_b, g)
        The same genes' values (e.g. log1p counts per 10k, :func:`scored_genes`).
    k : int
        Neighbours averaged.
    query_a, query_b : array of int, optional
        Spots predicted (default all).

    Returns
    -------
    float
        Mean per-gene r (NaN-mean over genes constant in a section).
    """
    qa = np.arange(len(xy_a)) if query_a is None else query_a
    qb = np.arange(len(xy_b)) if query_b is None else query_b
    ab = per_gene_scores(knn_3d(xy_a, y_a, np.asarray(xy_b)[qb], k=k), np.asarray(y_b)[qb])["mean_r"]
    ba = per_gene_scores(knn_3d(xy_b, y_b, np.asarray(xy_a)[qa], k=k), np.asarray(y_a)[qa])["mean_r"]
    return float(np.nanmean([ab, ba]))


def scored_genes(X, n_genes: int = 100) -> np.ndarray:
    """log1p(counts per 10k) ``(n, n_genes)`` of the highest-mean genes of counts ``X`` (spots × genes, sparse ok)."""
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    top = _top_mean_genes(X, n_genes)
    lib = np.maximum(np.asarray(X.sum(1), float).ravel(), 1.0)
    return np.log1p(X[:, top].toarray() * (1e4 / lib)[:, None])


def section_similarity(adatas, *, n_genes: int = 100, k: int = 8, max_spots: int = 2000, pitch_um=None,
                       max_points: int = 5000, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Pairwise spatial-expression similarity of sections after rigid alignment (see the module docstring).

    Parameters
    ----------
    adatas : list of AnnData
        Sections with counts (``layers['counts']`` when there, else ``X``), ``obsm['spatial']`` (px) and
        ``uns['voxelome']['pixel_size_um']``.
    n_genes : int
        Genes scored: the highest mean log1p(counts per 10k) over all sections' shared genes.
    k : int
        Spots of the other section averaged (inverse-distance weights) to predict a spot.
    max_spots : int
        Spots predicted per section and direction (a seeded random subset above it: cell-level sections).
    pitch_um, max_points : optional
        As :func:`~voxelome.register.stack_expression.stack_sections` (ICP scale; sections above ``max_points``
        are aligned as pooled bins).
    progress : bool
        Show a progress bar over the pairs.

    Returns
    -------
    ndarray, shape (n, n)
        Symmetric similarity (mean per-gene r, higher = more alike), NaN on the diagonal.
    """
    from voxelome.register.stack_expression import (
        _embed, _gene_positions, _split, _stack_shared, section_xy_um)
    from voxelome.register.stack_icp import align_binned, align_icp, bin_size_um

    _check_options(n_genes, k, max_spots)
    _, cols = _gene_positions(adatas)
    X = _stack_shared([a.layers["counts"] if "counts" in a.layers else a.X for a in adatas], cols)  # counts if kept
    sizes = [a.n_obs for a in adatas]
    embs = _split(_embed(X, 20, 300, dedup=False), sizes)  # stack_sections' default embedding (20 PCs, 300 genes)
    ys = _split(scored_genes(X, n_genes), sizes)
    xys = [section_xy_um(a) for a in adatas]
    if pitch_um is None:
        d, _ = cKDTree(xys[0]).query(xys[0], k=2)
        pitch_um = float(np.median(d[:, 1]))
    bin_um = bin_size_um(xys, pitch_um, int(max_points))

    def align(a, b):
        if bin_um is None:
            return align_icp(xys[a], embs[a], xys[b], embs[b], pitch_um=pitch_um)[:2]
        return align_binned(align_icp, xys[a], embs[a], xys[b], embs[b], bin_um=bin_um, pitch_um=pitch_um)[:2]

    return _pair_similarity(xys, ys, k=k, max_spots=max_spots, seed=seed, progress=progress, align=align)


def stacked_similarity(stack, *, section_key: str = "section", layer=None, n_genes: int = 100, k: int = 8,
                       max_spots: int = 2000, seed: int = 0) -> tuple[list, np.ndarray]:
    """:func:`section_similarity` of sections already in one frame (a stack's ``obsm['spatial_3d']``, no alignment).

    Parameters
    ----------
    stack : AnnData
        All sections: counts in ``layers[layer]``, else ``layers['counts']``, else ``X``; ``obsm['spatial_3d']``
        (µm); ``obs[section_key]``.

    Returns
    -------
    names : list of str
        Sections in increasing median z (their depth order in the stack).
    similarity : ndarray, shape (n, n)
        In that order.
    """
    from voxelome.constants import SPATIAL_3D_KEY

    _check_options(n_genes, k, max_spots)
    if SPATIAL_3D_KEY not in stack.obsm or section_key not in stack.obs:
        raise VoxelomeError(f"the stack needs obsm[{SPATIAL_3D_KEY!r}] and obs[{section_key!r}] to check its order.")
    xyz = np.asarray(stack.obsm[SPATIAL_3D_KEY], float)
    sec = stack.obs[section_key].astype(str).to_numpy()
    names = list(section_depths(xyz, sec))
    # at most REFERENCE_SPOTS points per section (seeded): bounded memory for a cell-level stack of millions
    rng = np.random.default_rng(seed)
    rows = [np.flatnonzero(sec == s) for s in names]
    rows = [np.sort(rng.choice(r, REFERENCE_SPOTS, replace=False)) if len(r) > REFERENCE_SPOTS else r for r in rows]
    X = stack.layers[layer] if layer else stack.layers["counts"] if "counts" in stack.layers else stack.X
    X = X[np.concatenate(rows)]
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    ys = np.split(scored_genes(X, n_genes), np.cumsum([len(r) for r in rows])[:-1])
    xys = [xyz[r, :2] for r in rows]
    return names, _pair_similarity(xys, ys, k=k, max_spots=max_spots, seed=seed, progress=False)


def _check_options(n_genes, k, max_spots) -> None:
    check_positive("n_genes", n_genes)
    check_positive("k", k)
    check_positive("max_spots", max_spots)


def check_section_order(adatas, names=None, *, warn_gain: float = WARN_GAIN, warn: bool = True,
                        **similarity_options) -> OrderCheck:
    """Compare the given order of serial sections with the order their expression suggests.

    Parameters
    ----------
    adatas : list of AnnData
        Sections in the order the user believes is the cutting order (at least 3).
    names : list of str, optional
        Section names (default ``section_0`` …).
    warn_gain : float
        Flag the given order (``consistent=False`` and a warning) when the suggested order's mean neighbour
        similarity is at least this fraction higher.
    warn : bool
        Emit the warning (``False``: only report).
    **similarity_options
        Passed to :func:`section_similarity`.

    Returns
    -------
    OrderCheck
    """
    from voxelome.register.stack_expression import check_stack_inputs

    if len(adatas) < 3:
        raise VoxelomeError(f"checking an order needs at least 3 sections (got {len(adatas)}): with two, every "
                            "order is the same up to direction.")
    names, _ = check_stack_inputs(adatas, np.arange(len(adatas), dtype=float), names)
    return order_check(section_similarity(adatas, **similarity_options), names, warn_gain=warn_gain, warn=warn)


def check_stack_order(stack, *, section_key: str = "section", layer=None, warn_gain: float = WARN_GAIN,
                      warn: bool = True, **similarity_options) -> OrderCheck:
    """:func:`check_section_order` for a stack already in one 3D frame: is its z order its expression's order?

    For a stack built elsewhere (or by ``register stack``) before fitting a field; sections are compared where
    they lie (no alignment), in increasing median z. Options as :func:`stacked_similarity`.
    """
    names, sim = stacked_similarity(stack, section_key=section_key, layer=layer, **similarity_options)
    if len(names) < 3:
        raise VoxelomeError(f"checking an order needs at least 3 sections (got {len(names)}): with two, every "
                            "order is the same up to direction.")
    return order_check(sim, names, warn_gain=warn_gain, warn=warn)


def order_check(similarity: np.ndarray, names: list, *, warn_gain: float = WARN_GAIN, warn: bool = True) -> OrderCheck:
    """The :class:`OrderCheck` of sections ``names`` (in their given order) with pairwise ``similarity``."""
    sim, n = similarity, len(names)
    given = path_score(sim, range(n))
    order = best_order(sim)
    suggested = path_score(sim, order)
    gain = max(0.0, suggested / given - 1.0) if given > 0 else (np.inf if suggested > given else 0.0)
    per = []
    for i in range(n):
        nb = [j for j in (i - 1, i + 1) if 0 <= j < n]
        others = np.where(np.arange(n) == i, -np.inf, np.nan_to_num(sim[i], nan=-np.inf))
        j = int(np.argmax(others))
        per.append({"section": names[i], "neighbours_r": round(float(np.mean(sim[i, nb])), 4),
                    "closest": names[j], "closest_r": round(float(sim[i, j]), 4)})
    check = OrderCheck(names=list(names), similarity=sim, given_score=given, suggested=[names[i] for i in order],
                       suggested_score=suggested, gain=float(gain), sections=per, consistent=bool(gain < warn_gain))
    if warn and not check.consistent:
        odd = [p["section"] for p in per if p["closest"] not in _neighbours(names, p["section"])]
        warnings.warn(f"the sections' expression does not follow the given order {names}: neighbours in "
                      f"{check.suggested} are {gain:.0%} more alike (mean per-gene r {suggested:.3f} vs "
                      f"{given:.3f}); most alike to a non-neighbour: {odd}. Check the numbering (slide wells are "
                      "not always the cutting order) before stacking or fitting a 3D field.", stacklevel=3)
    return check


def _neighbours(names, name):
    i = names.index(name)
    return names[max(0, i - 1):i] + names[i + 1:i + 2]
