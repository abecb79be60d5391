"""10x Visium Space Ranger ``outs/`` folders → validated section AnnData.

Standard Visium (55 µm spots on a hexagonal lattice) and Visium HD bins: a ``binned_outputs/square_NNNum`` folder
(square bins of 2, 8 or 16 µm; positions in ``tissue_positions.parquet``, read with pyarrow; scale from
``microns_per_pixel`` and ``bin_size_um`` of its scale factors).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from voxelome.constants import SPATIAL_KEY
from voxelome.errors import VoxelomeError
from voxelome.io.sections import (VISIUM_SPOT_DIAMETER_UM, _POSITION_COLUMNS, _anndata, _scverse_spatial,
                                  validate_section)
from voxelome.io.guarded import missing_path_error


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


def _read_parquet_positions(f: Path) -> pd.DataFrame:
    try:
        pos = pd.read_parquet(f)
    except ImportError:
        raise VoxelomeError(f"'{f}' (Visium HD positions) is a Parquet file; reading it needs pyarrow: "
                            "pip install pyarrow (or voxelome[hd]).") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types on damaged files
        raise VoxelomeError(f"'{f}' is not a readable Parquet file ({type(exc).__name__}: {exc}).") from None
    if "barcode" not in pos.columns:
        pos = pos.rename_axis("barcode").reset_index()
    missing = [c for c in _POSITION_COLUMNS if c not in pos.columns]
    if missing:
        raise VoxelomeError(f"'{f}' lacks columns {missing}; expected Space Ranger's {_POSITION_COLUMNS}.")
    return pos.set_index("barcode")


def _read_positions(spatial: Path) -> pd.DataFrame:
    if (spatial / "tissue_positions.parquet").exists():  # Visium HD bins
        return _read_parquet_positions(spatial / "tissue_positions.parquet")
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


def hd_bins(outs: Path) -> list[str]:
    """Names of the Visium HD bin folders of an ``outs`` folder (``square_002um``, …), empty for standard Visium."""
    binned = outs / "binned_outputs"
    return sorted(p.name for p in binned.iterdir() if p.is_dir()) if binned.is_dir() else []


def read_visium(path, *, pixel_size_um=None, spot_diameter_um=None, library_id=None, load_images: bool = True):
    """Read a 10x Visium Space Ranger ``outs/`` folder.

    Parameters
    ----------
    path : str or path-like
        The ``outs`` folder (or its parent), or a Visium HD bin folder (``outs/binned_outputs/square_008um``).
        Needs ``filtered_feature_bc_matrix.h5`` (or the ``filtered_feature_bc_matrix/`` MTX folder),
        ``spatial/tissue_positions.csv`` (Space Ranger ≥ 2; or ``tissue_positions_list.csv``; Visium HD:
        ``tissue_positions.parquet``) and ``spatial/scalefactors_json.json``.
    pixel_size_um : float, optional
        µm per full-resolution image pixel; default the scale factors' ``microns_per_pixel`` (Visium HD), else
        ``spot_diameter_um / spot_diameter_fullres``.
    spot_diameter_um : float, optional
        Physical spot diameter; default 55 µm (Visium), or for Visium HD bins the diameter of the disk with the
        bin's area (``2 · bin_size_um / √π``: a spot's footprint is modelled as a disk).
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
    bins = hd_bins(outs)
    if bins and not (outs / "filtered_feature_bc_matrix.h5").exists():
        raise VoxelomeError(f"'{outs}' is a Visium HD run: read one of its bin sizes, e.g. "
                            f"'{outs / 'binned_outputs' / ('square_008um' if 'square_008um' in bins else bins[0])}' "
                            f"(bins here: {', '.join(bins)}; 8 µm is 10x's recommended size for analysis).")
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
    bin_um = scalefactors.get("bin_size_um")
    if spot_diameter_um is None:
        spot_diameter_um = 2 * float(bin_um) / np.sqrt(np.pi) if bin_um else VISIUM_SPOT_DIAMETER_UM
    if pixel_size_um is None and scalefactors.get("microns_per_pixel"):
        pixel_size_um = float(scalefactors["microns_per_pixel"])
    if pixel_size_um is None:
        d_full = scalefactors.get("spot_diameter_fullres")
        if not d_full:
            raise VoxelomeError(f"'{sf_path}' has no spot_diameter_fullres; "
                                "pass pixel_size_um= (µm per full-res pixel).")
        pixel_size_um = spot_diameter_um / float(d_full)
    adata = validate_section(adata, pixel_size_um=pixel_size_um, spot_diameter_um=spot_diameter_um)
    if bin_um:
        adata.uns["voxelome"]["bin_size_um"] = float(bin_um)
    return adata


