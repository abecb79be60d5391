"""Single-cell-like sections simulated from a spot section (for large-section tests and benchmarks).

Imaging-based ST (MERFISH, Xenium, CosMx) and binned Visium HD give tens of thousands of points per section, each
with few counts. :func:`cells_from_spots` turns a spot section (e.g. the lung phantom's,
:meth:`voxelome.datasets.LungPhantom.cut_section`) into such a section of the same tissue: each spot's counts are
split over ``per_spot`` cells scattered around it. Two seeds give two different cell draws of the same tissue,
i.e. two adjacent sections whose cells do not correspond one to one.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from voxelome.constants import PIXEL_SIZE_KEY, SPATIAL_KEY, UNS_KEY
from voxelome.errors import VoxelomeError, check_positive


def cells_from_spots(spots, per_spot: int, *, seed: int = 0, radius_um: float = 50.0):
    """Split every spot of ``spots`` into ``per_spot`` cells.

    Parameters
    ----------
    spots : AnnData
        Integer counts ``(n, g)`` (dense or sparse), ``obsm['spatial']`` px and
        ``uns['voxelome']['pixel_size_um']``.
    per_spot : int
        Cells per spot; the section gets ``n · per_spot`` cells.
    seed : int
        Seed of the cell positions and of the count split.
    radius_um : float
        Cells lie uniformly in a square of half side ``radius_um`` around their spot's centre (µm).

    Returns
    -------
    AnnData
        ``(n · per_spot, g)`` float32 CSR counts (each spot's counts split multinomially, equal shares),
        ``obsm['spatial']`` in µm with ``pixel_size_um = 1``, ``obs['spot']`` the parent spot's name.
    """
    import anndata as ad

    check_positive("per_spot", per_spot)
    check_positive("radius_um", radius_um)
    if SPATIAL_KEY not in spots.obsm or PIXEL_SIZE_KEY not in (spots.uns.get(UNS_KEY) or {}):
        raise VoxelomeError("spots needs obsm['spatial'] (px) and uns['voxelome']['pixel_size_um']; read it with "
                            "voxelome.io.read_section.")
    x = spots.X.toarray() if sp.issparse(spots.X) else np.asarray(spots.X)
    if np.any(x < 0) or not np.allclose(x, np.round(x)):
        raise VoxelomeError("spots.X must hold non-negative integer counts to split over cells.")
    rng = np.random.default_rng(seed)
    share = np.full(int(per_spot), 1.0 / per_spot)
    counts = np.vstack([rng.multinomial(row, share).T for row in np.round(x).astype(np.int64)])
    xy = np.repeat(np.asarray(spots.obsm[SPATIAL_KEY], float) * float(spots.uns[UNS_KEY][PIXEL_SIZE_KEY]),
                   per_spot, axis=0)
    xy += rng.uniform(-radius_um, radius_um, xy.shape)
    cells = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), var=spots.var[[]].copy())
    cells.obs_names = [f"cell{i}" for i in range(cells.n_obs)]
    cells.obs["spot"] = np.repeat(np.asarray(spots.obs_names), per_spot)
    cells.obsm[SPATIAL_KEY] = xy
    cells.uns[UNS_KEY] = {PIXEL_SIZE_KEY: 1.0}
    return cells
