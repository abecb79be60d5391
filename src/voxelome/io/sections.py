"""Section readers (10x Visium, legacy ST, ``.h5ad``) and the one validator every section passes.

Each reader returns an AnnData with raw counts in ``X`` (spots × genes, CSR), spot centres in
**pixels** of the section image in ``obsm['spatial']`` as ``(x, y)`` = (column, row), and ends in
:func:`validate_section`, which checks the counts and coordinates and records the physical scale
(``uns['voxelome'] = {'pixel_size_um', 'spot_diameter_um'}``) so code downstream works in µm.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from voxelome.constants import COUNTS_LAYER, PIXEL_SIZE_KEY, SPATIAL_KEY, SPOT_DIAMETER_KEY, UNS_KEY
from voxelome.errors import VoxelomeError, check_positive, did_you_mean
from voxelome.io.atomic import atomic_write_h5ad
from voxelome.io.guarded import missing_path_error

__all__ = ["read_section", "read_h5ad_section", "validate_section", "write_h5ad", "VISIUM_SPOT_DIAMETER_UM",
           "LEGACY_ST_SPOT_DIAMETER_UM", "LEGACY_ST_PITCH_UM"]

VISIUM_SPOT_DIAMETER_UM = 55.0
LEGACY_ST_SPOT_DIAMETER_UM = 100.0
#: Centre-to-centre distance of neighbouring spots on legacy ST arrays (Ståhl et al., 2016).
LEGACY_ST_PITCH_UM = 200.0
#: Allowed ratio spot diameter / half the median nearest-spot distance (Visium ≈ 1.1, ST ≈ 1.0).
_FIT_RANGE = (0.2, 5.0)
_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _anndata():
    import anndata  # imported lazily: anndata is slow to import and only sections need it

    return anndata


# --- validation ------------------------------------------------------------------------
def _check_counts(adata, where: str) -> None:
    m = adata.layers[COUNTS_LAYER] if where != "X" else adata.X
    if m is None:
        raise VoxelomeError("the section has no counts (adata.X is None and no layers['counts']).")
    if sp.issparse(m):
        coo = sp.coo_matrix(sp.csr_matrix(m))  # CSR → COO is row-major, so "first" is the first spot
        bad = ~np.isfinite(coo.data) | (coo.data < 0)
        rows, cols, values = coo.row[bad], coo.col[bad], coo.data[bad]
    else:
        dense = np.asarray(m)
        if not np.issubdtype(dense.dtype, np.number):
            raise VoxelomeError(f"counts in {where} have dtype {dense.dtype}; expected numbers.")
        rows, cols = np.nonzero(~np.isfinite(dense) | (dense < 0))
        values = dense[rows, cols]
    if values.size:
        n_nonfinite = int(np.sum(~np.isfinite(values)))
        raise VoxelomeError(
            f"counts in {where} have {values.size} bad entries ({n_nonfinite} NaN/inf, {values.size - n_nonfinite} "
            f"negative); the first is spot {adata.obs_names[rows[0]]!r}, gene {adata.var_names[cols[0]]!r} = "
            f"{values[0]}. Counts must be raw, finite, non-negative: pass the raw count matrix (e.g. "
            "adata.raw.to_adata() or layers['counts']), not log-normalised or scaled values."
        )


def _median_neighbour_distance(xy: np.ndarray) -> float | None:
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return None
    d, _ = cKDTree(xy).query(xy, k=2)
    d = d[:, 1][d[:, 1] > 0]
    return float(np.median(d)) if d.size else None


def validate_section(adata, *, pixel_size_um=None, spot_diameter_um=None):
    """Check a section and record its physical scale; the single gate every section reader ends in.

    Parameters
    ----------
    adata : anndata.AnnData
        Spots × genes. Raw counts in ``X`` or ``layers['counts']``; spot centres in pixels in
        ``obsm['spatial']`` ``(n_spots, 2)`` as ``(x, y)``.
    pixel_size_um : float, optional
        Size of one image pixel in µm; default ``adata.uns['voxelome']['pixel_size_um']``.
    spot_diameter_um : float, optional
        Spot diameter in µm; default ``adata.uns['voxelome']['spot_diameter_um']``.

    Returns
    -------
    anndata.AnnData
        The same object (modified in place): duplicate gene/spot names made unique (with a
        warning), ``obsm['spatial']`` as float64, ``uns['voxelome']`` holding ``pixel_size_um``
        and ``spot_diameter_um`` (other keys there are kept).

    Raises
    ------
    VoxelomeError
        No spots; non-finite or negative counts (how many, and the first spot/gene); missing or
        non-finite coordinates; unknown scale; or a spot diameter in pixels that does not fit the
        spacing of the spots (wrong ``pixel_size_um``).
    """
    if adata.n_obs < 1:
        raise VoxelomeError("the section has no spots (after keeping in-tissue spots that have counts). "
                            "Check that the count matrix and the spot positions come from the same section.")
    if adata.n_vars < 1:
        raise VoxelomeError("the section has no genes; check the count matrix.")
    _check_counts(adata, f"layers[{COUNTS_LAYER!r}]" if COUNTS_LAYER in adata.layers else "X")
    if SPATIAL_KEY not in adata.obsm:
        raise VoxelomeError(f"the section has no spot coordinates: adata.obsm[{SPATIAL_KEY!r}] is missing. "
                            "Store spot centres in image pixels as (x, y), shape (n_spots, 2).")
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise VoxelomeError(f"adata.obsm[{SPATIAL_KEY!r}] has shape {xy.shape}; expected (n_spots, 2) = (x, y) pixels.")
    if not np.all(np.isfinite(xy)):
        i = int(np.flatnonzero(~np.all(np.isfinite(xy), axis=1))[0])
        raise VoxelomeError(f"adata.obsm[{SPATIAL_KEY!r}] has non-finite coordinates, first at spot "
                            f"{adata.obs_names[i]!r}: {xy[i].tolist()}. Drop spots without positions.")
    adata.obsm[SPATIAL_KEY] = xy
    for axis in ("var", "obs"):
        names = getattr(adata, f"{axis}_names")
        if not names.is_unique:
            dup = names[names.duplicated()].unique()
            warnings.warn(f"{len(dup)} duplicate {'gene' if axis == 'var' else 'spot'} names (e.g. {list(dup[:3])}); "
                          "made unique by appending '-1', '-2', …", UserWarning, stacklevel=2)
            getattr(adata, f"{axis}_names_make_unique")()
    stored = dict(adata.uns.get(UNS_KEY, {}))
    pixel_size_um = stored.get(PIXEL_SIZE_KEY) if pixel_size_um is None else pixel_size_um
    spot_diameter_um = stored.get(SPOT_DIAMETER_KEY) if spot_diameter_um is None else spot_diameter_um
    if pixel_size_um is None or spot_diameter_um is None:
        raise VoxelomeError("the section's scale is unknown: pass pixel_size_um= (µm per image pixel) and "
                            "spot_diameter_um= (55 for Visium, 100 for legacy ST).")
    pixel_size_um = check_positive("pixel_size_um", pixel_size_um)
    spot_diameter_um = check_positive("spot_diameter_um", spot_diameter_um)
    pitch_px = _median_neighbour_distance(xy)
    if pitch_px is not None:
        d_px = spot_diameter_um / pixel_size_um
        ratio = d_px / (pitch_px / 2)
        if not _FIT_RANGE[0] <= ratio <= _FIT_RANGE[1]:
            raise VoxelomeError(
                f"section and image units do not fit: a {spot_diameter_um:g} µm spot is {d_px:.3g} px at "
                f"pixel_size_um={pixel_size_um:g}, but neighbouring spot centres are {pitch_px:.3g} px apart "
                f"(a spot should span {_FIT_RANGE[0] / 2:g}–{_FIT_RANGE[1] / 2:g} centre-to-centre distances). "
                f"If the centre-to-centre pitch is P µm, pixel_size_um = P / {pitch_px:.3g} (e.g. "
                f"{100 / pitch_px:.3g} for Visium's 100 µm, {200 / pitch_px:.3g} for legacy ST's 200 µm); "
                "pass pixel_size_um= (and spot_diameter_um=) explicitly."
            )
    stored.update({PIXEL_SIZE_KEY: pixel_size_um, SPOT_DIAMETER_KEY: spot_diameter_um})
    adata.uns[UNS_KEY] = stored
    return adata


def _scverse_spatial(adata, library_id: str, scalefactors: dict, images: dict | None = None) -> None:
    adata.uns["spatial"] = {library_id: {"images": images or {}, "scalefactors": dict(scalefactors),
                                         "metadata": {}}}




def section_image(adata, resolution: str = "hires"):
    """The section's own image stored the scverse way (``uns['spatial'][library]['images'][resolution]``, as Space
    Ranger's ``tissue_hires_image.png`` is read) and its pixel size in µm.

    Returns
    -------
    image : ndarray (h, w) or (h, w, 3|4)
    pixel_size_um : float
        ``uns['voxelome']['pixel_size_um']`` (full-resolution pixels) ``/ tissue_{resolution}_scalef``.
    """
    libs = adata.uns.get("spatial") or {}
    found = [(lib, d) for lib, d in libs.items() if isinstance(d, dict) and resolution in (d.get("images") or {})]
    if not found:
        raise VoxelomeError(f"the section stores no {resolution!r} image in uns['spatial'][library]['images'] "
                            f"(libraries: {list(libs)}); pass the H&E file and its pixel size instead "
                            "(--image HE.tif --pixel-size-um …).")
    if len(found) > 1:
        raise VoxelomeError(f"the section stores {resolution!r} images of several libraries {[f[0] for f in found]}; "
                            "keep one library per section.")
    lib, entry = found[0]
    scale = (entry.get("scalefactors") or {}).get(f"tissue_{resolution}_scalef")
    px = (adata.uns.get(UNS_KEY) or {}).get(PIXEL_SIZE_KEY)
    if not scale or not px:
        raise VoxelomeError(f"the {resolution!r} image of library {lib!r} has no scalefactors['tissue_{resolution}"
                            "_scalef'] or the section no uns['voxelome']['pixel_size_um']; read the section with "
                            "voxelome.io.read_section.")
    return np.asarray(entry["images"][resolution]), float(px) / float(scale)


def read_h5ad_section(path, *, pixel_size_um=None, spot_diameter_um=None, library_id=None):
    """Read an ``.h5ad`` section; scale from the argument, ``uns['voxelome']``, or scverse scalefactors.

    When only scverse ``uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres']`` is
    present, ``pixel_size_um = spot_diameter_um / spot_diameter_fullres`` with ``spot_diameter_um``
    defaulting to Visium's 55 µm. An argument that contradicts stored metadata wins, with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise missing_path_error(path, "h5ad file")
    try:
        adata = _anndata().read_h5ad(path)
    except Exception as exc:  # noqa: BLE001
        raise VoxelomeError(f"'{path}' is not a readable .h5ad file ({type(exc).__name__}: {exc}).") from exc
    stored = dict(adata.uns.get(UNS_KEY, {}))
    for key, arg in ((PIXEL_SIZE_KEY, pixel_size_um), (SPOT_DIAMETER_KEY, spot_diameter_um)):
        if arg is not None and stored.get(key) is not None and not np.isclose(float(arg), float(stored[key])):
            warnings.warn(f"{key}={arg} overrides the value {stored[key]} stored in '{path}'.",
                          UserWarning, stacklevel=2)
    pixel_size_um = pixel_size_um if pixel_size_um is not None else stored.get(PIXEL_SIZE_KEY)
    spot_diameter_um = spot_diameter_um if spot_diameter_um is not None else stored.get(SPOT_DIAMETER_KEY)
    if pixel_size_um is None and "spatial" in adata.uns:
        libs = list(adata.uns["spatial"].keys())
        if library_id is None and len(libs) != 1:
            raise VoxelomeError(f"'{path}' holds {len(libs)} libraries {libs} in uns['spatial']; pass library_id=.")
        library_id = library_id if library_id is not None else libs[0]
        if library_id not in adata.uns["spatial"]:
            raise VoxelomeError(f"library_id={library_id!r} not in uns['spatial'] of '{path}': {libs}."
                                f"{did_you_mean(library_id, libs)}")
        d_full = adata.uns["spatial"][library_id].get("scalefactors", {}).get("spot_diameter_fullres")
        if d_full:
            spot_diameter_um = VISIUM_SPOT_DIAMETER_UM if spot_diameter_um is None else spot_diameter_um
            pixel_size_um = float(spot_diameter_um) / float(d_full)
    return validate_section(adata, pixel_size_um=pixel_size_um, spot_diameter_um=spot_diameter_um)


# --- dispatch / writing ----------------------------------------------------------------
def read_section(path, *, pixel_size_um=None, spot_diameter_um=None, library_id=None, spots=None):
    """Read one ST section from any supported layout into a validated AnnData.

    Parameters
    ----------
    path : path, or (counts_tsv, spots_tsv)
        A Space Ranger ``outs`` folder (or its parent; Visium HD: one bin folder, e.g.
        ``outs/binned_outputs/square_008um``), a Xenium or MERSCOPE output folder (one row per cell:
        :mod:`voxelome.io.imaging_st`), an ``.h5ad`` file, a legacy ST pair, a
        legacy ST counts file (with ``spots``, or its ``<name>_selection.tsv`` found beside it or in
        ``../ST-spotfiles``), or a folder holding legacy ST files (her2st
        layout; choose the section with ``library_id``).
    pixel_size_um, spot_diameter_um : float, optional
        Scale overrides (µm per pixel, spot diameter in µm); defaults per technology.
    library_id : str, optional
        Visium/h5ad library key, or the legacy ST section name (e.g. ``'C2'``).
    spots : path, optional
        Legacy ST spot file when ``path`` is its counts file.
    """
    from voxelome.io.imaging_st import is_merscope, is_xenium, read_merscope, read_xenium
    from voxelome.io.legacy_st import _find_legacy_pair, read_legacy_st
    from voxelome.io.visium import read_visium

    if isinstance(path, (tuple, list)):
        if len(path) != 2:
            raise VoxelomeError("a section given as a sequence needs 2 paths (counts_tsv, spots_tsv), "
                                f"got {len(path)}.")
        counts, spots = path
        return read_legacy_st(counts, spots, pixel_size_um, spot_diameter_um, library_id=library_id)
    path = Path(path)
    if not path.exists():
        raise missing_path_error(path, "section file or folder")
    if path.is_dir():
        outs = path / "outs" if (path / "outs").is_dir() else path
        if is_xenium(outs):
            return read_xenium(outs, pixel_size_um=pixel_size_um, cell_diameter_um=spot_diameter_um)
        if is_merscope(outs):
            if pixel_size_um not in (None, 1.0):
                raise VoxelomeError(f"pixel_size_um={pixel_size_um}: a MERSCOPE section is read in µm (cell "
                                    "centres in cell_metadata.csv); leave pixel_size_um unset.")
            return read_merscope(outs, cell_diameter_um=spot_diameter_um)
        if (outs / "spatial").is_dir() or (outs / "binned_outputs").is_dir() or any(
                (outs / f).exists() for f in ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix")):
            return read_visium(outs, pixel_size_um=pixel_size_um, library_id=library_id,
                               spot_diameter_um=spot_diameter_um)
        counts, spots, library_id = _find_legacy_pair(path, library_id)
        return read_legacy_st(counts, spots, pixel_size_um, spot_diameter_um, library_id=library_id)
    name = path.name.lower()
    if name.endswith(".h5ad"):
        return read_h5ad_section(path, pixel_size_um=pixel_size_um, spot_diameter_um=spot_diameter_um,
                                 library_id=library_id)
    if name.endswith(".h5") and (path.parent / "spatial").is_dir():
        return read_visium(path.parent, pixel_size_um=pixel_size_um, library_id=library_id,
                           spot_diameter_um=spot_diameter_um)
    if name.endswith(".tsv") or name.endswith(".tsv.gz"):
        stem = path.name.split(".")[0]  # her2st layout: ST-cnts/C2.tsv.gz ↔ ST-spotfiles/C2_selection.tsv
        found = [c for c in (path.parent / f"{stem}_selection.tsv", path.parent.parent / "ST-spotfiles" /
                             f"{stem}_selection.tsv") if c.exists()]
        if spots is not None or found:
            return read_legacy_st(path, spots if spots is not None else found[0], pixel_size_um, spot_diameter_um,
                                  library_id=library_id)
    raise VoxelomeError(f"'{path}': unsupported section input. Supported: a Space Ranger outs folder, a Xenium or "
                        "MERSCOPE output folder, an .h5ad file, "
                        "a legacy ST (counts.tsv[.gz], spots_selection.tsv) pair or a folder of them "
                        "(for a counts file alone pass spots=).")


def write_h5ad(adata, path) -> Path:
    """Write a section to ``.h5ad`` atomically (a crash never leaves a truncated file)."""
    path = Path(path)
    if path.suffix.lower() != ".h5ad":
        raise VoxelomeError(f"'{path}' should end in .h5ad so that readers recognise it.")
    return atomic_write_h5ad(adata, path)
