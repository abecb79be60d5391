"""Cell-segmented in situ platforms → validated section AnnData: 10x Xenium and Vizgen MERSCOPE output folders.

Both platforms give cell centroids in µm and a cells × genes count table. A section read here is one row per cell
with gene counts (control probes, blank and unassigned codewords dropped: they are not genes), ``obsm['spatial']``
in the pixels of the platform's morphology image where that scale is known (Xenium: ``experiment.xenium``'s
``pixel_size``, 0.2125 µm) and µm otherwise (MERSCOPE: ``pixel_size_um = 1``, its micron → mosaic pixel transform
kept in ``uns``). A cell's "spot diameter" is the diameter of the disk with its median area (Xenium ``cell_area``)
or of the sphere with its median volume (MERSCOPE ``volume``): what every spot-based step (``register stack``,
``reconstruct fit``) needs as the footprint of one measurement.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from voxelome.constants import SPATIAL_KEY, UNS_KEY
from voxelome.errors import VoxelomeError
from voxelome.io.guarded import missing_path_error
from voxelome.io.sections import _anndata, validate_section

#: Xenium's morphology-image pixel (µm), used when ``experiment.xenium`` is absent.
XENIUM_PIXEL_UM = 0.2125
#: Footprint (µm) assumed for a cell when its table gives neither area nor volume.
DEFAULT_CELL_DIAMETER_UM = 10.0
_DISPLAY = {"xenium": "Xenium", "merscope": "MERSCOPE"}
_XENIUM_CELLS = ("cells.csv.gz", "cells.csv", "cells.parquet")
_XENIUM_MATRIX = ("cell_feature_matrix.h5", "cell_feature_matrix")
_MERSCOPE_FILES = ("cell_by_gene.csv", "cell_metadata.csv")
#: Name prefixes (lower case) of control features that are not genes: MERSCOPE ``Blank-*``, Xenium ``BLANK_*``,
#: ``NegControlProbe_*``, ``NegControlCodeword_*``, ``UnassignedCodeword_*``, ``DeprecatedCodeword_*``, ``Intergenic_*``.
_NOT_GENES = ("blank", "negcontrol", "unassigned", "deprecated", "intergenic")


def is_xenium(folder: Path) -> bool:
    """Whether ``folder`` looks like a Xenium output folder (a cell table and a cell-feature matrix)."""
    return any((folder / f).exists() for f in _XENIUM_CELLS) and any((folder / f).exists() for f in _XENIUM_MATRIX)


def is_merscope(folder: Path) -> bool:
    """Whether ``folder`` looks like a MERSCOPE output folder (``cell_by_gene.csv`` and ``cell_metadata.csv``)."""
    return all((folder / f).exists() for f in _MERSCOPE_FILES)


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except ImportError as exc:
            raise VoxelomeError(f"'{path}' is Parquet, which needs pyarrow: pip install 'voxelome[hd]' (or read the "
                                "cells.csv.gz beside it).") from exc
    return pd.read_csv(path)


def _cells_section(counts, cell_ids, genes: pd.DataFrame, xy_um: np.ndarray, obs: pd.DataFrame, *,
                   pixel_size_um: float, diameter_um: float, platform: str, where: Path):
    """Cells with at least one gene count, as a validated section (``obsm['spatial']`` = µm / pixel size)."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    has_counts = np.asarray(counts.sum(1)).ravel() > 0
    if not has_counts.any():
        raise VoxelomeError(f"'{where}': no cell has a gene count (after dropping control probes and codewords).")
    if not has_counts.all():
        warnings.warn(f"{_DISPLAY[platform]} '{where}': {int((~has_counts).sum())} of {len(has_counts)} cells have no gene "
                      "counts and are dropped.", UserWarning, stacklevel=3)
    obs = obs.iloc[has_counts].copy()
    obs.index = pd.Index(np.asarray(cell_ids, dtype=str)[has_counts])
    adata = _anndata().AnnData(X=counts[has_counts], obs=obs, var=genes)
    adata.obsm[SPATIAL_KEY] = np.asarray(xy_um, float)[has_counts] / pixel_size_um
    adata.uns[UNS_KEY] = {"platform": platform}
    return validate_section(adata, pixel_size_um=pixel_size_um, spot_diameter_um=diameter_um)


def _is_gene(name: str) -> bool:
    return not name.lower().startswith(_NOT_GENES)


def read_xenium(path, *, pixel_size_um: float | None = None, cell_diameter_um: float | None = None):
    """Read a 10x Xenium output folder (Xenium Onboard Analysis / Xenium Ranger ``outs``).

    Parameters
    ----------
    path : str or path-like
        The folder holding ``cell_feature_matrix.h5`` (or the ``cell_feature_matrix/`` MTX folder) and
        ``cells.csv.gz`` (or ``cells.parquet``, which needs pyarrow); ``experiment.xenium`` is read for the pixel size.
    pixel_size_um : float, optional
        µm per pixel of ``obsm['spatial']``; default ``experiment.xenium``'s ``pixel_size`` (the morphology image's,
        0.2125 µm on current instruments).
    cell_diameter_um : float, optional
        Footprint of one cell (µm); default the diameter of the disk with the median ``cell_area``.

    Returns
    -------
    anndata.AnnData
        Cells × genes (``X`` CSR float32 counts, "Gene Expression" features only), cells without gene counts
        dropped (with a warning); ``obs`` keeps the cell table's columns (areas, counts); ``obsm['spatial']``
        ``(n_cells, 2)`` = centroid (x, y) / ``pixel_size_um``.
    """
    from voxelome.io.visium import _read_10x_h5, _read_10x_mtx

    folder = Path(path)
    if not folder.exists():
        raise missing_path_error(folder, "Xenium output folder")
    if not is_xenium(folder):
        raise VoxelomeError(f"'{folder}' is not a Xenium output folder: it needs one of {', '.join(_XENIUM_MATRIX)} "
                            f"and one of {', '.join(_XENIUM_CELLS)}.")
    h5 = folder / "cell_feature_matrix.h5"
    m, barcodes, var, _ = _read_10x_h5(h5) if h5.exists() else _read_10x_mtx(folder / "cell_feature_matrix")
    keep = np.asarray(var["feature_types"] == "Gene Expression") & np.array([_is_gene(g) for g in var.index])
    cells_path = next(folder / f for f in _XENIUM_CELLS if (folder / f).exists())
    cells = _read_table(cells_path)
    missing = {"cell_id", "x_centroid", "y_centroid"} - set(cells.columns)
    if missing:
        raise VoxelomeError(f"'{cells_path}' lacks the column(s) {sorted(missing)}; a Xenium cell table has cell_id, "
                            "x_centroid, y_centroid (µm).")
    cells.index = pd.Index([v.decode() if isinstance(v, bytes) else str(v) for v in cells.pop("cell_id")])
    barcodes = np.asarray([str(b) for b in barcodes])
    absent = ~pd.Index(barcodes).isin(cells.index)
    if absent.any():
        raise VoxelomeError(f"{int(absent.sum())} cells of the count matrix (e.g. '{barcodes[absent][0]}') are not in "
                            f"'{cells_path}': the matrix and the cell table come from different runs.")
    cells = cells.loc[barcodes]
    if pixel_size_um is None:
        meta = folder / "experiment.xenium"
        pixel_size_um = float(json.loads(meta.read_text()).get("pixel_size", XENIUM_PIXEL_UM)) if meta.exists() \
            else XENIUM_PIXEL_UM
    if cell_diameter_um is None:
        area = cells["cell_area"].to_numpy(float) if "cell_area" in cells else np.array([])
        area = area[np.isfinite(area) & (area > 0)]
        cell_diameter_um = 2 * np.sqrt(np.median(area) / np.pi) if area.size else DEFAULT_CELL_DIAMETER_UM
    xy = cells[["x_centroid", "y_centroid"]].to_numpy(float)
    return _cells_section(m[:, keep], barcodes, var[keep], xy, cells.drop(columns=["x_centroid", "y_centroid"]),
                          pixel_size_um=pixel_size_um, diameter_um=float(cell_diameter_um), platform="xenium",
                          where=folder)


def read_merscope(path, *, cell_diameter_um: float | None = None):
    """Read a Vizgen MERSCOPE output folder (``cell_by_gene.csv`` + ``cell_metadata.csv``).

    Parameters
    ----------
    path : str or path-like
        The region folder holding ``cell_by_gene.csv`` (cells × genes; ``Blank-*`` codewords are dropped) and
        ``cell_metadata.csv`` (``center_x``, ``center_y`` in µm; ``volume`` in µm³). ``images/
        micron_to_mosaic_pixel_transform.csv``, when there, is kept in ``uns['voxelome']['micron_to_mosaic_px']``.
    cell_diameter_um : float, optional
        Footprint of one cell (µm); default the diameter of the sphere with the median ``volume``.

    Returns
    -------
    anndata.AnnData
        Cells × genes (``X`` CSR float32), cells without counts dropped (with a warning); ``obsm['spatial']``
        ``(n_cells, 2)`` = centroids in µm (``pixel_size_um = 1``).
    """
    folder = Path(path)
    if not folder.exists():
        raise missing_path_error(folder, "MERSCOPE output folder")
    if not is_merscope(folder):
        raise VoxelomeError(f"'{folder}' is not a MERSCOPE output folder: it needs {' and '.join(_MERSCOPE_FILES)}.")
    table = pd.read_csv(folder / "cell_by_gene.csv", index_col=0)
    meta = pd.read_csv(folder / "cell_metadata.csv", index_col=0)
    table.index, meta.index = table.index.astype(str), meta.index.astype(str)
    missing = {"center_x", "center_y"} - set(meta.columns)
    if missing:
        raise VoxelomeError(f"'{folder / 'cell_metadata.csv'}' lacks {sorted(missing)} (cell centres in µm).")
    absent = ~table.index.isin(meta.index)
    if absent.any():
        raise VoxelomeError(f"{int(absent.sum())} cells of cell_by_gene.csv (e.g. '{table.index[absent][0]}') are "
                            "not in cell_metadata.csv: the two files come from different runs or regions.")
    meta = meta.loc[table.index]
    genes = [g for g in table.columns if _is_gene(str(g))]
    if cell_diameter_um is None:
        vol = meta["volume"].to_numpy(float) if "volume" in meta else np.array([])
        vol = vol[np.isfinite(vol) & (vol > 0)]
        cell_diameter_um = np.cbrt(6 * np.median(vol) / np.pi) if vol.size else DEFAULT_CELL_DIAMETER_UM
    adata = _cells_section(table[genes].to_numpy(), table.index, pd.DataFrame(index=pd.Index(genes, dtype=str)),
                           meta[["center_x", "center_y"]].to_numpy(float),
                           meta.drop(columns=["center_x", "center_y"]), pixel_size_um=1.0,
                           diameter_um=float(cell_diameter_um), platform="merscope", where=folder)
    transform = folder / "images" / "micron_to_mosaic_pixel_transform.csv"
    if transform.exists():
        adata.uns[UNS_KEY]["micron_to_mosaic_px"] = np.loadtxt(transform).reshape(3, 3).tolist()
    return adata
