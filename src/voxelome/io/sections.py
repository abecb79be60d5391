"""Section readers (10x Visium, legacy ST, ``.h5ad``) and the one validator every section passes.

Each reader returns an AnnData with raw counts in ``X`` (spots × genes, CSR), spot centres in
**pixels** of the section image in ``obsm['spatial']`` as ``(x, y)`` = (column, row), and ends in
:func:`validate_section`, which checks the counts and coordinates and records the physical scale
(``uns['voxelome'] = {'pixel_size_um', 'spot_diameter_um'}``) so code downstream works in µm.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from voxelome.constants import COUNTS_LAYER, PIXEL_SIZE_KEY, SPATIAL_KEY, SPOT_DIAMETER_KEY, UNS_KEY
from voxelome.errors import VoxelomeError, check_positive, did_you_mean
from voxelome.io.atomic import atomic_write_h5ad
from voxelome.io.volumes import missing_path_error

__all__ = ["read_section", "read_visium", "read_legacy_st", "read_h5ad_section", "validate_section",
           "write_h5ad", "infer_pixel_size_from_pitch", "VISIUM_SPOT_DIAMETER_UM", "LEGACY_ST_SPOT_DIAMETER_UM", "LEGACY_ST_PITCH_UM"]

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


# --- 10x Visium ------------------------------------------------------------------------
def _decode(a) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in a], dtype=object)


def _read_10x_h5(path: Path):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs_ids = f.attrs.get("library_ids")
            g = f["matrix"] if "matrix" in f else f[next(iter(f.keys()))]  # v2 files: one group per genome
            shape = tuple(int(s) for s in g["shape"][:])
            m = sp.csr_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=shape[::-1])
            barcodes = _decode(g["barcodes"][:])
            feat = g["features"] if "features" in g else g
            ids = _decode(feat["id"][:] if "id" in feat else feat["genes"][:])
            names = _decode(feat["name"][:] if "name" in feat else feat["gene_names"][:])
            types = (_decode(feat["feature_type"][:]) if "feature_type" in feat
                     else np.full(len(ids), "Gene Expression", object))
    except VoxelomeError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing datasets or a damaged file
        raise VoxelomeError(f"'{path}' is not a readable 10x feature-barcode matrix ({type(exc).__name__}: {exc}). "
                            "Expected Space Ranger's filtered_feature_bc_matrix.h5.") from exc
    library = _decode(attrs_ids)[0] if attrs_ids is not None and len(attrs_ids) else None
    # The CSC genes×cells matrix is, read as CSR with the shape swapped, exactly cells×genes.
    return m, barcodes, pd.DataFrame({"gene_ids": ids, "feature_types": types}, index=pd.Index(names)), library


def _read_10x_mtx(folder: Path):
    import scipy.io

    def find(*names):
        for n in names:
            for cand in (folder / n, folder / f"{n}.gz"):
                if cand.exists():
                    return cand
        raise missing_path_error(folder / names[0], "10x matrix file")

    m = sp.csr_matrix(scipy.io.mmread(str(find("matrix.mtx"))).T)
    barcodes = pd.read_csv(find("barcodes.tsv"), sep="\t", header=None)[0].to_numpy(dtype=object)
    feats = pd.read_csv(find("features.tsv", "genes.tsv"), sep="\t", header=None)
    types = feats[2].to_numpy() if feats.shape[1] > 2 else "Gene Expression"
    var = pd.DataFrame({"gene_ids": feats[0].to_numpy(), "feature_types": types}, index=pd.Index(feats[1].astype(str)))
    return m, barcodes, var, None


def _read_positions(spatial: Path) -> pd.DataFrame:
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        f = spatial / name
        if f.exists():
            # Space Ranger ≥ 2 writes a header, 1.x does not; sniff rather than trust the name.
            with f.open() as fh:
                has_header = fh.readline().lower().startswith("barcode")
            pos = pd.read_csv(f, header=0 if has_header else None)
            if not has_header:
                pos.columns = _POSITION_COLUMNS[: pos.shape[1]]
            missing = [c for c in _POSITION_COLUMNS if c not in pos.columns]
            if missing:
                raise VoxelomeError(f"'{f}' lacks columns {missing}; expected Space Ranger's {_POSITION_COLUMNS}.")
            return pos.set_index("barcode")
    raise missing_path_error(spatial / "tissue_positions.csv", "Space Ranger spot position file")


def _visium_images(spatial: Path) -> dict:
    try:
        from PIL import Image
    except ImportError:  # Pillow missing: images are optional (scverse plots work without)
        return {}
    return {res: np.asarray(Image.open(spatial / f"tissue_{res}_image.png")) for res in ("hires", "lowres")
            if (spatial / f"tissue_{res}_image.png").exists()}


def read_visium(path, *, pixel_size_um=None, spot_diameter_um=VISIUM_SPOT_DIAMETER_UM, library_id=None,
                load_images: bool = True):
    """Read a 10x Visium Space Ranger ``outs/`` folder.

    Parameters
    ----------
    path : str or path-like
        The ``outs`` folder (or its parent). Needs ``filtered_feature_bc_matrix.h5`` (or the
        ``filtered_feature_bc_matrix/`` MTX folder), ``spatial/tissue_positions.csv`` (Space Ranger
        ≥ 2; or ``tissue_positions_list.csv``) and ``spatial/scalefactors_json.json``.
    pixel_size_um : float, optional
        µm per full-resolution image pixel; default ``spot_diameter_um / spot_diameter_fullres``.
    spot_diameter_um : float
        Physical spot diameter (Visium: 55 µm).
    library_id : str, optional
        Key in ``uns['spatial']``; default from the h5 file, else the sample folder name.
    load_images : bool
        Load ``tissue_hires_image.png``/``tissue_lowres_image.png`` into ``uns['spatial']`` (needs Pillow).

    Returns
    -------
    anndata.AnnData
        In-tissue spots with counts; ``X`` CSR float32 counts (gene-expression features only);
        ``obs`` in_tissue/array_row/array_col; ``obsm['spatial']`` = (pxl_col, pxl_row) full-res px.
    """
    outs = Path(path)
    outs = outs / "outs" if (outs / "outs").is_dir() else outs
    if not outs.exists():
        raise missing_path_error(outs, "Space Ranger outs folder")
    if (outs / "filtered_feature_bc_matrix.h5").exists():
        m, barcodes, var, lib = _read_10x_h5(outs / "filtered_feature_bc_matrix.h5")
    elif (outs / "filtered_feature_bc_matrix").is_dir():
        m, barcodes, var, lib = _read_10x_mtx(outs / "filtered_feature_bc_matrix")
    else:
        raise missing_path_error(outs / "filtered_feature_bc_matrix.h5", "Space Ranger count matrix")
    keep_features = np.asarray(var["feature_types"] == "Gene Expression")
    m, var = m[:, keep_features], var[keep_features]
    pos = _read_positions(outs / "spatial")
    sf_path = outs / "spatial" / "scalefactors_json.json"
    if not sf_path.exists():
        raise missing_path_error(sf_path, "Space Ranger scale-factor file")
    scalefactors = json.loads(sf_path.read_text())
    pos = pos[pos["in_tissue"] == 1]
    keep = np.flatnonzero(pd.Index(barcodes).isin(pos.index))
    obs = pos.loc[barcodes[keep], ["in_tissue", "array_row", "array_col"]]
    adata = _anndata().AnnData(X=m[keep].astype(np.float32), obs=obs, var=var)
    adata.obsm[SPATIAL_KEY] = pos.loc[barcodes[keep], ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    library_id = library_id or lib or (outs.parent.name if outs.name == "outs" else outs.name)
    _scverse_spatial(adata, library_id, scalefactors, _visium_images(outs / "spatial") if load_images else {})
    if pixel_size_um is None:
        d_full = scalefactors.get("spot_diameter_fullres")
        if not d_full:
            raise VoxelomeError(f"'{sf_path}' has no spot_diameter_fullres; "
                                "pass pixel_size_um= (µm per full-res pixel).")
        pixel_size_um = spot_diameter_um / float(d_full)
    return validate_section(adata, pixel_size_um=pixel_size_um, spot_diameter_um=spot_diameter_um)


# --- legacy ST -------------------------------------------------------------------------
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


# --- h5ad ------------------------------------------------------------------------------
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


def read_section(path, *, pixel_size_um=None, spot_diameter_um=None, library_id=None, spots=None):
    """Read one ST section from any supported layout into a validated AnnData.

    Parameters
    ----------
    path : path, or (counts_tsv, spots_tsv)
        A Space Ranger ``outs`` folder (or its parent), an ``.h5ad`` file, a legacy ST pair, a
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
        if (outs / "spatial").is_dir() or any((outs / f).exists() for f in ("filtered_feature_bc_matrix.h5",
                                                                            "filtered_feature_bc_matrix")):
            return read_visium(outs, pixel_size_um=pixel_size_um, library_id=library_id,
                               spot_diameter_um=spot_diameter_um or VISIUM_SPOT_DIAMETER_UM)
        counts, spots, library_id = _find_legacy_pair(path, library_id)
        return read_legacy_st(counts, spots, pixel_size_um, spot_diameter_um, library_id=library_id)
    name = path.name.lower()
    if name.endswith(".h5ad"):
        return read_h5ad_section(path, pixel_size_um=pixel_size_um, spot_diameter_um=spot_diameter_um,
                                 library_id=library_id)
    if name.endswith(".h5") and (path.parent / "spatial").is_dir():
        return read_visium(path.parent, pixel_size_um=pixel_size_um, library_id=library_id,
                           spot_diameter_um=spot_diameter_um or VISIUM_SPOT_DIAMETER_UM)
    if name.endswith(".tsv") or name.endswith(".tsv.gz"):
        stem = path.name.split(".")[0]  # her2st layout: ST-cnts/C2.tsv.gz ↔ ST-spotfiles/C2_selection.tsv
        found = [c for c in (path.parent / f"{stem}_selection.tsv", path.parent.parent / "ST-spotfiles" /
                             f"{stem}_selection.tsv") if c.exists()]
        if spots is not None or found:
            return read_legacy_st(path, spots if spots is not None else found[0], pixel_size_um, spot_diameter_um,
                                  library_id=library_id)
    raise VoxelomeError(f"'{path}': unsupported section input. Supported: a Space Ranger outs folder, an .h5ad file, "
                        "a legacy ST (counts.tsv[.gz], spots_selection.tsv) pair or a folder of them "
                        "(for a counts file alone pass spots=).")


def write_h5ad(adata, path) -> Path:
    """Write a section to ``.h5ad`` atomically (a crash never leaves a truncated file)."""
    path = Path(path)
    if path.suffix.lower() != ".h5ad":
        raise VoxelomeError(f"'{path}' should end in .h5ad so that readers recognise it.")
    return atomic_write_h5ad(adata, path)
