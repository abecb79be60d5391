"""Fast rigid alignment of two ST sections by ICP on joint (position, expression-embedding) features.

The ``"icp"`` path of :func:`voxelome.register.stack_expression.stack_sections`: iterative closest
point (Besl & McKay 1992) with trimmed matches (partial overlap, tears) and a closed-form 2D Kabsch
fit per step, from several starting rotations. Large sections (more than a few thousand points) are aligned as
pooled grid bins (:func:`align_binned`), since the brute-force matching grows as n_fixed × n_moving.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

CHUNK_BYTES = 1 << 20  #: distance-matrix block of the batched matching step (fits L2; same values as one block)


def kabsch(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted rigid fit ``dst ≈ src @ R.T + t`` (2D, proper rotation, closed form); ``(R (2, 2), t (2,))``."""
    w = np.ones(len(src)) if w is None else np.asarray(w, float)
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    a, b = src - ms, dst - md
    dot = np.sum(w * (a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1]))
    cross = np.sum(w * (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]))
    r = _rot(np.arctan2(cross, dot))
    return r, md - ms @ r.T


def _rot(theta: float) -> np.ndarray:
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def _rots(theta: np.ndarray) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def align_icp(fixed_xy, fixed_emb, moving_xy, moving_emb, *, pitch_um: float, expr_weight: float = 1.0,
              n_angles: int = 12, n_iter: int = 40, trim: float = 0.8, n_keep_starts: int = 2, coarse_iter: int = 2,
              soft_iter: int = 0, soft_scale: float = 0.5, sym_iter: int = 0):
    """Rigid map of ``moving`` onto ``fixed`` by ICP on joint position + expression features.

    Each moving spot is matched to the fixed spot nearest in ``(position / pitch, expr_weight ·
    embedding)``; the closest ``trim`` fraction of matches gives a Kabsch fit; repeat until the cost
    stops falling (an iteration that does not lower it is discarded). All ``n_angles`` starting
    rotations run ``coarse_iter`` iterations together (one batched matching step per iteration), the
    ``n_keep_starts`` best run on to convergence (also batched). Matching is brute force on float32
    ``(starts, n_moving, n_fixed)`` arrays whose expression and fixed-position parts are computed once
    (faster than a k-d tree in 2 + k dimensions at these sizes).

    Parameters
    ----------
    fixed_xy, moving_xy : array, shape (n, 2)
        Spot centres in µm.
    fixed_emb, moving_emb : array, shape (n, k)
        Expression embeddings in a shared space (:func:`joint_embedding`).
    pitch_um : float
        Spot spacing; positions are measured in pitches so one pitch weighs like one embedding unit.
    expr_weight : float
        Weight of the embedding against position in the matching distance.
    n_angles : int
        Starting rotations (evenly spaced); the best final fit wins.
    n_iter, coarse_iter, n_keep_starts : int
        Iteration cap of the refinement; iterations of every start; starts refined.
    trim : float
        Fraction of the closest matches used in each Kabsch fit (partial overlap, tears).
    soft_iter, soft_scale : int, float
        Iterations of a final soft-assignment refinement (EM-ICP, Granger & Pennec 2002; the weighted
        Procrustes of PASTE's coupling in spirit), 0 = off: each of the ``trim`` closest moving spots is
        pulled to the posterior mean of all fixed spots, weights ``exp(−(d² − d²_min) / 2σ²)`` over the joint
        squared distance, ``σ² = soft_scale² ×`` the mean squared joint distance of the kept matches; a
        Kabsch fit of those pairs gives the next pose. Stops early when the pose moves < 1e-6 pitch.
        Off by default: on the held-out her2st patients E–H every setting tried lowered the mean accuracy.
    sym_iter : int
        Iterations of a final symmetric trimmed ICP (0 = off): the ``trim`` closest matches moving → fixed
        and fixed → moving enter one Kabsch fit; stops when their mean distance stops falling. Off by
        default: on E–H it tied the default (within 1e-5 mean r).

    Returns
    -------
    R : ndarray (2, 2), t : ndarray (2,), cost : float
        ``aligned = moving_xy @ R.T + t``; cost = mean joint distance of the kept matches.
    """
    fx, mx = np.asarray(fixed_xy, float) / pitch_um, np.asarray(moving_xy, float) / pitch_um
    fe, me = np.asarray(fixed_emb, float), np.asarray(moving_emb, float)
    # the squared joint distance = base + |moving position|² − 2 moving·fixed; base (expression + |fixed|²)
    # never changes: computed once; |moving|² is constant along a row, added only to the chosen match
    base = np.add((me ** 2).sum(1)[:, None], (fe ** 2).sum(1)[None, :])
    base -= 2 * me @ fe.T
    base *= expr_weight ** 2
    base += (fx ** 2).sum(1)[None, :]
    base = base.astype(np.float32)
    fxt = np.ascontiguousarray((-2.0 * fx.T).astype(np.float32))  # C order: a faster sgemm, same values
    n, m = len(mx), len(fx)
    n_keep = min(n, max(3, int(trim * n)))
    chunk = max(1, min(max(n_angles, n_keep_starts), CHUNK_BYTES // (4 * n * m)))  # poses per L2-sized block
    buf = np.empty((chunk, n, m), np.float32)  # reused distance matrices
    flat_rows = np.arange(chunk * n)
    batch = np.arange(max(n_angles, n_keep_starts))[:, None]

    def step(r, t):
        """Matches of ``b`` poses at once: kept rows (b, n_keep), matches (b, n), costs (b,)."""
        b = len(r)
        cur = mx @ r.transpose(0, 2, 1)
        cur += t[:, None, :]
        c32 = cur.astype(np.float32)
        j = np.empty((b, n), np.intp)
        dj = np.empty((b, n), np.float32)
        for a in range(0, b, chunk):
            e = min(b, a + chunk)
            d2 = np.matmul(c32[a:e], fxt, out=buf[:e - a])
            d2 += base
            jj = d2.argmin(2)
            j[a:e] = jj
            dj[a:e] = d2.reshape((e - a) * n, m)[flat_rows[:(e - a) * n], jj.ravel()].reshape(e - a, n)
        d = dj + np.einsum("bni,bni->bn", cur, cur)
        d = np.sqrt(np.maximum(d, 0.0))
        keep = np.argpartition(d, n_keep - 1, axis=1)[:, :n_keep]
        return keep, j, np.add.reduce(d[batch[:b], keep], 1) / n_keep

    mx1, fx1 = np.column_stack([mx, np.ones(n)]), np.column_stack([fx, np.ones(m)])  # (x, y, 1) rows

    def fit(keep, j):
        """Batched Kabsch of the kept matches (uniform weights): r (b, 2, 2), t (b, 2).

        One product of the (x, y, 1) rows gives the cross moments and both sums (centred from them).
        """
        mo = np.matmul(mx1[keep].transpose(0, 2, 1), fx1[j[batch[:len(keep)], keep]]) / n_keep  # (b, 3, 3)
        ms, md = mo[:, :2, 2], mo[:, 2, :2]
        h = mo[:, :2, :2] - ms[:, :, None] * md[:, None, :]  # cross-covariance / n_keep
        r = _rots(np.arctan2(h[:, 0, 1] - h[:, 1, 0], h[:, 0, 0] + h[:, 1, 1]))
        return r, md - np.einsum("bij,bj->bi", r, ms)

    def run(r, t, iters):
        keep, j, cost = step(r, t)
        active = np.arange(len(r))
        for _ in range(iters):
            if not len(active):
                break
            r2, t2 = fit(keep[active], j[active])
            keep2, j2, cost2 = step(r2, t2)
            better = cost2 < cost[active]
            done = ~better | (cost[active] - cost2 < 1e-4 * cost2)
            up = active[better]
            r[up], t[up], keep[up], j[up], cost[up] = r2[better], t2[better], keep2[better], j2[better], cost2[better]
            active = active[~done]
        return r, t, cost

    rows, dist = np.arange(n), buf[0]

    def refine(r, t, iters):
        """:func:`run` for one pose, with 2D arrays (fewer, smaller numpy calls: the loop is overhead-bound).

        The pose is carried as ``p = [Rᵀ; t]`` (3 × 2), applied to the (x, y, 1) rows in one product.
        """
        def match(p):
            cur = mx1 @ p
            np.matmul(cur.astype(np.float32), fxt, out=dist)
            np.add(dist, base, out=dist)
            j = dist.argmin(1)
            d = dist[rows, j] + np.einsum("ni,ni->n", cur, cur)
            np.sqrt(np.maximum(d, 0.0, out=d), out=d)
            keep = np.argpartition(d, n_keep - 1)[:n_keep]
            return keep, j, float(np.add.reduce(d[keep])) / n_keep

        p = np.vstack([r.T, t])
        keep, j, cost = match(p)
        for _ in range(iters):
            (h00, h01, sx), (h10, h11, sy), (dx, dy, _) = (mx1[keep].T @ fx1[j[keep]]).tolist()  # moments, sums
            sx, sy, dx, dy = sx / n_keep, sy / n_keep, dx / n_keep, dy / n_keep
            theta = math.atan2((h01 - n_keep * sx * dy) - (h10 - n_keep * sy * dx),
                               (h00 - n_keep * sx * dx) + (h11 - n_keep * sy * dy))
            c, s = math.cos(theta), math.sin(theta)
            p2 = np.array([[c, s], [-s, c], [dx - (c * sx - s * sy), dy - (s * sx + c * sy)]])
            keep2, j2, cost2 = match(p2)
            if cost2 >= cost:
                break
            converged = cost - cost2 < 1e-4 * cost2
            p, keep, j, cost = p2, keep2, j2, cost2
            if converged:
                break
        return p[:2].T.copy(), p[2].copy(), cost

    cf, cm = fx.mean(0), mx.mean(0)
    r = _rots(np.linspace(0, 2 * np.pi, n_angles, endpoint=False))
    r, t, cost = run(r, cf - np.einsum("bij,j->bi", r, cm), coarse_iter)
    best = np.argsort(cost, kind="stable")[:n_keep_starts]
    r, t, cost = min((refine(r[i], t[i], n_iter) for i in best), key=lambda s: s[2])
    for _ in range(soft_iter):
        cur = mx @ r.T
        cur += t
        np.matmul(cur.astype(np.float32), fxt, out=dist)
        np.add(dist, base, out=dist)
        dist += np.einsum("ni,ni->n", cur, cur).astype(np.float32)[:, None]  # squared joint distances
        j = dist.argmin(1)
        dmin = dist[rows, j]
        keep = np.argpartition(dmin, n_keep - 1)[:n_keep]
        w = dist[keep]
        w -= dmin[keep, None]
        w *= np.float32(-0.5 / (soft_scale ** 2 * max(float(np.maximum(dmin[keep], 0).mean()), 1e-12)))
        np.exp(w, out=w)
        w /= w.sum(1, keepdims=True)
        r2, t2 = kabsch(mx[keep], w.astype(np.float64) @ fx)
        moved = np.abs(cur[keep] - (mx[keep] @ r2.T + t2)).max()
        r, t = r2, t2
        if moved < 1e-6:
            break
    m_keep, cols, prev, rp, tp = min(m, max(3, int(trim * m))), np.arange(m), np.inf, r, t
    for _ in range(sym_iter):  # symmetric trimmed ICP: matches in both directions
        cur = mx @ r.T
        cur += t
        np.matmul(cur.astype(np.float32), fxt, out=dist)
        np.add(dist, base, out=dist)
        dist += np.einsum("ni,ni->n", cur, cur).astype(np.float32)[:, None]
        j, i = dist.argmin(1), dist.argmin(0)
        dm, df = np.sqrt(np.maximum(dist[rows, j], 0)), np.sqrt(np.maximum(dist[i, cols], 0))
        km, kf = np.argpartition(dm, n_keep - 1)[:n_keep], np.argpartition(df, m_keep - 1)[:m_keep]
        c = (dm[km].sum() + df[kf].sum()) / (n_keep + m_keep)
        if c >= prev:
            r, t = rp, tp
            break
        prev, rp, tp = c, r, t
        r, t = kabsch(np.vstack([mx[km], mx[i[kf]]]), np.vstack([fx[j[km]], fx[kf]]))
    return r, t * pitch_um, cost


# --- large sections: align bins, not points -----------------------------------------------------------
def bin_size_um(xys, pitch_um: float, max_points: int) -> float | None:
    """Side (µm) of a square grid that leaves at most about ``max_points`` occupied bins in every section, or
    ``None`` when no section has more than ``max_points`` points (no binning needed).

    Starts from the side that keeps the point density (``pitch · √(n / max_points)``) and grows it by 20 %
    until every section fits.
    """
    n = max(len(x) for x in xys)
    if n <= max_points:
        return None
    size = pitch_um * math.sqrt(n / max_points)
    while max(_n_bins(x, size) for x in xys) > max_points:
        size *= 1.2
    return float(size)


def _n_bins(xy: np.ndarray, size: float) -> int:
    return len(np.unique(np.floor((xy - xy.min(0)) / size).astype(np.int64), axis=0))


def bin_points(xy: np.ndarray, emb: np.ndarray, size_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Points pooled on a square grid of side ``size_um``: centroids ``(b, 2)`` µm and mean embeddings ``(b, k)``.

    Centroids, not grid centres, so that a rigid map of the bins is the rigid map of their points.
    """
    xy, emb = np.asarray(xy, float), np.asarray(emb, float)
    _, inv, counts = np.unique(np.floor((xy - xy.min(0)) / size_um).astype(np.int64), axis=0,
                               return_inverse=True, return_counts=True)
    inv = inv.ravel()
    pool = sp.csr_matrix((1.0 / counts[inv], (inv, np.arange(len(inv)))), shape=(len(counts), len(inv)))
    return pool @ xy, pool @ emb


def align_binned(aligner, fixed_xy, fixed_emb, moving_xy, moving_emb, *, bin_um: float, **kwargs):
    """``aligner`` (:func:`align_icp`-like: ``(fixed_xy, fixed_emb, moving_xy, moving_emb, **kw) → (R, t, extra)``)
    run on both sections pooled into ``bin_um`` bins (:func:`bin_points`): memory and time then scale with the
    bins, not with the points (brute-force matching of 100 k × 100 k cells would need 40 GB).

    Pooled embeddings are less spread than single points'; both sections' are rescaled together so that their
    first component has unit standard deviation over the bins, as :func:`joint_embedding` does for points. An
    ICP ``pitch_um`` becomes ``bin_um``. ``R, t`` map the moving section's points like its bins.
    """
    fxy, fe = bin_points(fixed_xy, fixed_emb, bin_um)
    mxy, me = bin_points(moving_xy, moving_emb, bin_um)
    scale = np.concatenate([fe[:, 0], me[:, 0]]).std() + 1e-12
    if "pitch_um" in kwargs:
        kwargs["pitch_um"] = bin_um
    return aligner(fxy, fe / scale, mxy, me / scale, **kwargs)
