"""Legacy Spatial Transcriptomics (counts ``.tsv`` + spot selection file, as in her2st) → section AnnData."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from voxelome.constants import SPATIAL_KEY, UNS_KEY
from voxelome.errors import VoxelomeError, did_you_mean
from voxelome.io.sections import (LEGACY_ST_PITCH_UM, LEGACY_ST_SPOT_DIAMETER_UM, _anndata, _scverse_spatial,
                                  validate_section)
from voxelome.io.guarded import missing_path_error


def infer_pixel_size_from_pitch(array_xy, pixel_xy, pitch_um: float = LEGACY_ST_PITCH_UM) -> tuple[float, float]:
    """µm per pixel from a spot grid of known pitch: median (pixel distance / array distance) of neighbours.

    Returns ``(pixel_size_um, px_per_array_step)``.
    """
    from scipy.spatial import cKDTree

    array_xy, pixel_xy = np.asarray(array_xy, float), np.asarray(pixel_xy, float)
    if len(array_xy) < 2:
        raise VoxelomeError("cannot infer the pixel size from fewer than 2 spots; pass pixel_size_um=.")
    d, j = cKDTree(array_xy).query(array_xy, k=2)
    ok = d[:, 1] > 0
    ratio = np.linalg.norm(pixel_xy[ok] - pixel_xy[j[ok, 1]], axis=1) / d[ok, 1]
    px_per_step = float(np.median(ratio))
    return pitch_um / px_per_step, px_per_step


def read_legacy_st(counts_tsv, spots_tsv, pixel_size_um=None, spot_diameter_um=LEGACY_ST_SPOT_DIAMETER_UM, *,
                   library_id=None):
    """Read a legacy Spatial Transcriptomics section (e.g. her2st, Andersson et al. 2021).

    Parameters
    ----------
    counts_tsv : path
        Tab-separated counts (``.tsv`` or ``.tsv.gz``), rows = spots with id ``"<x>x<y>"``, columns = genes.
    spots_tsv : path
        Spot file with columns ``x y new_x new_y pixel_x pixel_y selected``; ``pixel_x`` is the
        image column, ``pixel_y`` the row. Rows with ``selected == 0`` are dropped.
    pixel_size_um : float, optional
        µm per image pixel. Default: inferred from the 200 µm centre-to-centre pitch of the ST array
        (recorded in ``uns['voxelome']['pixel_size_source']``).
    spot_diameter_um : float or None
        Spot diameter (100 µm on legacy ST arrays; ``None`` means that default).
    library_id : str, optional
        Section name; default the counts file name without suffixes.

    Returns
    -------
    anndata.AnnData
        Spots present in both files, ``X`` CSR float32, ``obsm['spatial']`` = (pixel_x, pixel_y).
    """
    counts_tsv, spots_tsv = Path(counts_tsv), Path(spots_tsv)
    spot_diameter_um = LEGACY_ST_SPOT_DIAMETER_UM if spot_diameter_um is None else spot_diameter_um
    for p, what in ((counts_tsv, "ST count file"), (spots_tsv, "ST spot file")):
        if not p.exists():
            raise missing_path_error(p, what)
    try:
        counts = pd.read_csv(counts_tsv, sep="\t", index_col=0)
        spots = pd.read_csv(spots_tsv, sep="\t")
    except Exception as exc:  # noqa: BLE001
        raise VoxelomeError(f"could not parse '{counts_tsv}' / '{spots_tsv}' as tab-separated tables: {exc}.") from exc
    need = ["x", "y", "pixel_x", "pixel_y"]
    if [c for c in need if c not in spots.columns]:
        raise VoxelomeError(f"'{spots_tsv}' has columns {list(spots.columns)}; expected at least {need} "
                            "(x y new_x new_y pixel_x pixel_y selected).")
    if "selected" in spots.columns:
        spots = spots[spots["selected"] == 1]
    spots.index = [f"{int(x)}x{int(y)}" for x, y in zip(spots["x"], spots["y"])]
    spots = spots[~spots.index.duplicated()]
    counts.index = counts.index.astype(str)
    shared = counts.index[counts.index.isin(spots.index)]
    if len(shared) == 0:
        raise VoxelomeError(f"no spot ids of '{counts_tsv}' (e.g. {list(counts.index[:3])}) match '{spots_tsv}' "
                            f"(e.g. {list(spots.index[:3])}); check that both files are of the same section.")
    spots = spots.loc[shared]
    obs = spots.drop(columns=["pixel_x", "pixel_y"]).rename(columns={"x": "array_x", "y": "array_y"})
    adata = _anndata().AnnData(X=sp.csr_matrix(counts.loc[shared].to_numpy(dtype=np.float32)), obs=obs,
                               var=pd.DataFrame(index=counts.columns.astype(str)))
    adata.obsm[SPATIAL_KEY] = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    adata.uns[UNS_KEY] = {"pixel_size_source": "given"}
    if pixel_size_um is None:
        pixel_size_um, step = infer_pixel_size_from_pitch(spots[["x", "y"]], adata.obsm[SPATIAL_KEY])
        adata.uns[UNS_KEY]["pixel_size_source"] = (f"inferred from the {LEGACY_ST_PITCH_UM:g} µm ST pitch "
                                                   f"({step:.1f} px per array step)")
    library_id = library_id or counts_tsv.name.split(".")[0]
    _scverse_spatial(adata, library_id, {"spot_diameter_fullres": spot_diameter_um / pixel_size_um,
                                         "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 1.0})
    return validate_section(adata, pixel_size_um=pixel_size_um, spot_diameter_um=spot_diameter_um)



def _find_legacy_pair(folder: Path, library_id):
    spot_files = {p.name[: -len("_selection.tsv")]: p for p in folder.rglob("*_selection.tsv")}
    count_files = {p.name.split(".")[0]: p for pat in ("*.tsv", "*.tsv.gz") for p in folder.rglob(pat)
                   if not p.name.endswith("_selection.tsv")}
    sections = sorted(set(spot_files) & set(count_files))
    if library_id is None and len(sections) == 1:
        library_id = sections[0]
    if library_id not in sections:
        hint = did_you_mean(str(library_id), sections) if library_id is not None else ""
        raise VoxelomeError(f"folder '{folder}' holds {len(sections)} legacy ST sections with both counts and a spot "
                            f"file ({', '.join(sections[:12]) or 'none'}); choose one with library_id=.{hint}")
    return count_files[library_id], spot_files[library_id], library_id


