"""Readers for serial-section data used by the stack registration: PASTE-style CSV layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from voxelome.constants import SPATIAL_KEY
from voxelome.errors import VoxelomeError
from voxelome.io.sections import validate_section
from voxelome.io.volumes import missing_path_error

#: Legacy ST array pitch (centre to centre, µm): one array unit of PASTE's sample coordinates.
LEGACY_ST_PITCH_UM = 200.0


def read_st_csv_layer(counts_csv, coords_csv, *, unit_um: float = LEGACY_ST_PITCH_UM, spot_diameter_um: float = 100.0):
    """Read a PASTE-style layer: counts CSV (spots × genes, first column spot id) + coordinates CSV (x, y).

    Coordinates are in array units; ``obsm['spatial']`` keeps them and ``pixel_size_um = unit_um``
    (one "pixel" = one array unit), so µm = spatial × unit_um as for any section.
    """
    counts_csv, coords_csv = Path(counts_csv), Path(coords_csv)
    for p, what in ((counts_csv, "counts CSV"), (coords_csv, "coordinates CSV")):
        if not p.exists():
            raise missing_path_error(p, what)
    counts = pd.read_csv(counts_csv, index_col=0)
    coords = pd.read_csv(coords_csv, header=None) if _headerless(coords_csv) else pd.read_csv(coords_csv)
    coords = coords.select_dtypes("number").iloc[:, -2:]
    if len(coords) != len(counts):
        raise VoxelomeError(f"'{coords_csv}' has {len(coords)} rows but '{counts_csv}' has {len(counts)} spots; "
                            "they must be in the same order, one row per spot.")
    import anndata as ad

    adata = ad.AnnData(X=sp.csr_matrix(counts.to_numpy(np.float32)), obs=pd.DataFrame(index=counts.index.astype(str)),
                       var=pd.DataFrame(index=counts.columns.astype(str)))
    adata.obsm[SPATIAL_KEY] = coords.to_numpy(float)
    return validate_section(adata, pixel_size_um=unit_um, spot_diameter_um=spot_diameter_um)


def _headerless(path: Path) -> bool:
    first = path.open().readline().split(",")
    try:
        [float(v) for v in first[-2:]]
        return True
    except ValueError:
        return False
