"""Super-resolution outputs: mean / spread / interval maps as OME-Zarr, and per-cell or per-bin tables.

A run's output folder holds one multiscale OME-Zarr per summary, each ``(c, y, x)`` for a section or
``(c, z, y, x)`` for a volume predicted slice by slice, with µm scale (NGFF 0.4, opens in napari with
napari-ome-zarr): ``mean.ome.zarr`` (mean of the samples), ``std.ome.zarr`` (per-pixel standard deviation),
``lower.ome.zarr`` / ``upper.ome.zarr`` (central interval, calibrated when the model was), and
``mask.ome.zarr`` (1 where the high-res grid is measured/tissue). ``summary.json`` records genes, level,
calibration, pixel size and the model run. The folder is written next to its final place and renamed into
it, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.io.atomic import atomic_dir
from voxelome.io.omezarr import write_image_ome_zarr

SUMMARIES = ("mean", "std", "lower", "upper")


def write_superres(folder, predictions, genes, pixel_size_um, *, masks=None,
                   section_spacing_um: float | None = None, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write predictive summaries of one section or of a slice-wise volume.

    Parameters
    ----------
    folder : path
        Output folder (``*.zarr`` or any name); holds one OME-Zarr per summary and ``summary.json``.
    predictions : SuperResPrediction or list of SuperResPrediction
        One (a section, written ``(c, y, x)``) or one per slice (written ``(c, z, y, x)``, slice ``k`` at
        ``z = k · section_spacing_um``).
    genes : list of str
        Channel names.
    pixel_size_um : float or (float, float)
        High-res pixel size (µm), or ``(y, x)`` sizes for anisotropic grids (Visium: rows √3/2 of a pitch apart).
    masks : bool array (H, W) or list of them, optional
        Measured/tissue pixels, written as ``mask.ome.zarr``.
    section_spacing_um : float, optional
        Required for volumes.
    overwrite : bool
        Replace an existing folder.
    extra : dict, optional
        Added to ``summary.json`` (e.g. the run folder, seed, steps).
    """
    from voxelome.io.omezarr import write_volume_ome_zarr

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise VoxelomeError(f"'{folder}' exists; pass overwrite=True (CLI --overwrite) or choose another path.")
    volume = isinstance(predictions, (list, tuple))
    preds = list(predictions) if volume else [predictions]
    if volume and not (section_spacing_um and section_spacing_um > 0):
        raise VoxelomeError(f"section_spacing_um={section_spacing_um!r}: a slice-wise volume needs the distance "
                            "between slices in µm (CLI --section-spacing-um).")
    try:
        yx = np.broadcast_to(np.asarray(pixel_size_um, float), (2,))
    except (TypeError, ValueError):
        yx = np.full(2, np.nan)
    if not np.all(np.isfinite(yx) & (yx > 0)):
        raise VoxelomeError(f"pixel_size_um={pixel_size_um!r} must be > 0 (µm per high-res pixel; one number or (y, x)).")
    yx = (float(yx[0]), float(yx[1]))
    names = [str(g) for g in genes]
    if any(p.mean.shape[0] != len(names) for p in preds):
        raise VoxelomeError(f"predictions have {preds[0].mean.shape[0]} channels but {len(names)} gene names.")
    mask_list = None if masks is None else (list(masks) if volume else [masks])
    items = {k: [getattr(p, k) for p in preds] for k in SUMMARIES}
    if mask_list is not None:
        items["mask"] = [np.asarray(m, np.float32)[None] for m in mask_list]
    summary = {"genes": names, "pixel_size_um": yx[0] if yx[0] == yx[1] else list(yx),
               "axes": "czyx" if volume else "cyx",
               "level": float(preds[0].level), "calibrated": bool(preds[0].calibrated),
               "unit": "targets' scale (log1p-normalised expression) per high-res pixel",
               "files": {k: f"{k}.ome.zarr" for k in items}, **(extra or {})}
    if volume:
        summary["section_spacing_um"] = float(section_spacing_um)
    with atomic_dir(folder) as tmp:  # a reader sees the old folder or the whole new one; a failed write leaves no debris
        tmp.mkdir()
        for key, arrays in items.items():
            path = tmp / f"{key}.ome.zarr"
            chans = names if key != "mask" else ["mask"]
            if volume:
                data = np.stack(arrays, axis=1)  # (c, z, y, x)
                write_volume_ome_zarr(path, data, (float(section_spacing_um), *yx), channel_names=chans)
            else:
                write_image_ome_zarr(path, arrays[0], chans, yx)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    return folder


def aggregate_to_labels(prediction, labels, genes, *, level: float | None = None):
    """Per-cell or per-bin values of a prediction: an AnnData with one row per label.

    Parameters
    ----------
    prediction : SuperResPrediction
        With ``samples`` kept (``predict(..., keep_samples=True)``) the per-label spread and interval are
        computed from the aggregated samples (exact); otherwise from the per-pixel summaries (the mean is
        exact, ``std`` is the mean per-pixel std — an upper bound for a label's std).
    labels : int array, shape (H, W) or an integer multiple of it
        0 = background, cells/bins 1…n (see :func:`voxelome.models.spot_aggregation.aggregate_labels`).
    genes : list of str

    Returns
    -------
    anndata.AnnData
        ``X`` the label means (n, G); ``layers['std']``, ``layers['lower']``, ``layers['upper']``;
        ``obs['label']``, ``obs['area_px']``; ``uns['voxelome']['superres']`` with the level and method.
    """
    import anndata as ad
    import pandas as pd

    from voxelome.models.spot_aggregation import aggregate_labels

    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if n < 1:
        raise VoxelomeError("labels has no region (all 0); pass a label image with cells/bins numbered from 1.")
    level = float(prediction.level if level is None else level)
    if prediction.samples is not None:
        per = np.stack([aggregate_labels(s, labels, reduce="mean", n_labels=n) for s in prediction.samples])
        mean, std = per.mean(0), per.std(0, ddof=1) if len(per) > 1 else np.zeros(per.shape[1:])
        lower, upper = np.quantile(per, [(1 - level) / 2, (1 + level) / 2], axis=0)
        method = "aggregated samples"
    else:
        mean = aggregate_labels(prediction.mean, labels, reduce="mean", n_labels=n)
        std = aggregate_labels(prediction.std, labels, reduce="mean", n_labels=n)
        lower = aggregate_labels(prediction.lower, labels, reduce="mean", n_labels=n)
        upper = aggregate_labels(prediction.upper, labels, reduce="mean", n_labels=n)
        method = "aggregated per-pixel summaries (std is an upper bound)"
    k = labels.shape[0] // prediction.mean.shape[1]
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:] / (k * k)
    obs = pd.DataFrame({"label": np.arange(1, n + 1), "area_px": area}, index=[str(i) for i in range(1, n + 1)])
    adata = ad.AnnData(X=mean.astype(np.float32), obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))
    for key, val in (("std", std), ("lower", lower), ("upper", upper)):
        adata.layers[key] = np.asarray(val, np.float32)
    adata.uns["voxelome"] = {"superres": {"level": level, "method": method, "calibrated": bool(prediction.calibrated)}}
    return adata
