"""Baselines for super-resolved ST: upsampling of the spot map, and the dense image model on the high-res grid.

- :func:`nearest_upsample` — every high-res pixel takes its spot's value (the trivial baseline);
- :func:`bicubic_upsample` — unobserved spots filled with the nearest observed spot, the grid padded by
  6 spots of odd reflection (linear extrapolation, so ramps continue across the border), then cubic-spline
  interpolation (:func:`scipy.ndimage.map_coordinates`, order 3) with pixel centres aligned (high-res pixel
  ``I`` sits at low-res coordinate ``(I + 0.5) / factor − 0.5``); clipped at 0 when the spots are ≥ 0
  (log1p expression);
- :func:`dense_grid_prediction` — a trained PixNet-style dense model
  (:class:`voxelome.train.dense2d_trainer.TrainedDense2D`) queried at every high-res position with the spot
  disk, the spot value it was trained to give (her2st: the issue-5 leave-one-out runs).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from voxelome.errors import VoxelomeError

__all__ = [
    "bicubic_upsample",
    "dense_grid_prediction",
    "fill_unobserved",
    "her2st_dense_baseline",
    "nearest_upsample",
]


def fill_unobserved(low: np.ndarray, low_mask: np.ndarray) -> np.ndarray:
    """``low (G, h, w)`` with every unobserved pixel set to its nearest observed pixel's value (Euclidean)."""
    low, low_mask = np.asarray(low), np.asarray(low_mask, bool)
    if low.ndim != 3 or low_mask.shape != low.shape[1:]:
        raise VoxelomeError(f"low must be (G, h, w) and low_mask (h, w); got {low.shape} and {low_mask.shape}.")
    if not low_mask.any():
        raise VoxelomeError("low_mask observes no spot; nothing to upsample.")
    if low_mask.all():
        return low.copy()
    _, (iy, ix) = ndimage.distance_transform_edt(~low_mask, return_indices=True)
    return low[:, iy, ix]


def nearest_upsample(low: np.ndarray, low_mask: np.ndarray, factor: int) -> np.ndarray:
    """Block replication ``(G, h·f, w·f)`` float32 of the nearest-filled spot map."""
    f = int(factor)
    return np.repeat(np.repeat(fill_unobserved(low, low_mask), f, axis=1), f, axis=2).astype(np.float32)


def bicubic_upsample(low: np.ndarray, low_mask: np.ndarray, factor: int) -> np.ndarray:
    """Cubic-spline upsampling ``(G, h·f, w·f)`` float32 of the spot map (see the module notes).

    A linear ramp is reproduced exactly, up to the grid border.
    """
    f = int(factor)
    if f < 1:
        raise VoxelomeError(f"factor={factor!r} must be an integer ≥ 1.")
    filled = fill_unobserved(low, low_mask).astype(np.float64)
    G, h, w = filled.shape
    p = 6
    padded = np.pad(filled, ((0, 0), (p, p), (p, p)), mode="reflect", reflect_type="odd") if min(h, w) > 1 \
        else np.pad(filled, ((0, 0), (p, p), (p, p)), mode="edge")
    cy = (np.arange(h * f) + 0.5) / f - 0.5 + p
    cx = (np.arange(w * f) + 0.5) / f - 0.5 + p
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    out = np.empty((G, h * f, w * f), np.float32)
    for g in range(G):
        out[g] = ndimage.map_coordinates(padded[g], [yy, xx], order=3, mode="nearest")
    if (filled >= 0).all():
        np.maximum(out, 0, out=out)
    return out


def dense_grid_prediction(trained, rgb: np.ndarray, centres_xy: np.ndarray, radius_px: float, genes,
                          grid_shape) -> np.ndarray:
    """Spot values of a dense model at every high-res position: ``(G, H, W)`` float32 map.

    Parameters
    ----------
    trained : TrainedDense2D
        A dense model; its outputs are matched to ``genes`` by name.
    rgb : ndarray, shape (y, x, 3), uint8
        The H&E at the model's working resolution.
    centres_xy : ndarray, shape (H·W, 2)
        Centre of every high-res position in working pixels (row-major over the grid).
    radius_px : float
        Disk radius (working px) summed over, i.e. the spot the model was trained on.
    genes : list of str
    grid_shape : (int, int)

    Returns
    -------
    ndarray, shape (G, H, W)
        The map summed over each disk (the model's spot value); positions whose disk leaves the image get
        the value of the nearest position inside.
    """
    from voxelome.train.dense2d_data import SlideData

    idx = [trained.genes.index(g) if g in trained.genes else -1 for g in genes]
    if min(idx) < 0:
        missing = [g for g, i in zip(genes, idx) if i < 0]
        raise VoxelomeError(f"the dense model lacks {len(missing)} of the genes, e.g. {missing[:5]}; use a run "
                            "trained on these genes.")
    H, W = grid_shape
    c = np.asarray(centres_xy, float).reshape(H * W, 2)
    h, w = rgb.shape[:2]
    inside = (c[:, 0] - radius_px >= 0) & (c[:, 1] - radius_px >= 0) & (c[:, 0] + radius_px <= w) & \
        (c[:, 1] + radius_px <= h)
    if not inside.any():
        raise VoxelomeError("no grid position's disk lies inside the image; check the grid → image mapping.")
    slide = SlideData(rgb, trained.input_um, c[inside], float(radius_px), np.zeros((int(inside.sum()), 1), np.float32))
    vals = trained.predict_spots(slide)[:, idx]
    full = np.zeros((len(genes), H * W), np.float32)
    full[:, inside] = vals.T
    ok = inside.reshape(H, W)
    if not ok.all():
        _, (iy, ix) = ndimage.distance_transform_edt(~ok, return_indices=True)
        full = full.reshape(len(genes), H, W)[:, iy, ix]
    return full.reshape(len(genes), H, W)


def her2st_dense_baseline(pair, run_dir, *, input_um: float | None = None, image_cache=None) -> np.ndarray:
    """Dense-model map ``(G, H, W)`` of a her2st pair from an issue-5 run; also stored in ``pair.extra["dense"]``.

    Parameters
    ----------
    pair : SuperResPair
        From :func:`voxelome.datasets.superres.her2st_pairs` (uses ``extra['grid_to_px']``, ``image_path``,
        ``image_pixel_size_um``, ``spot_diameter_um``, ``array_origin``).
    run_dir : path
        A ``TrainedDense2D`` run folder trained *without* this section, e.g.
        ``benchmarks/out/pixnet_her2st/run_C2`` for ``her2st_C2``.
    input_um : float, optional
        Working µm/px; default the run's.
    image_cache : path, optional
        ``.npz`` with ``image`` and ``scale`` (as ``bench_pixnet_her2st`` caches it) to skip decoding the JPEG.
    """
    from pathlib import Path

    from voxelome.constants import CHECKPOINT_FILE
    from voxelome.train.checkpoint import load_checkpoint
    from voxelome.train.dense2d_data import load_he_image
    from voxelome.train.dense2d_trainer import TrainedDense2D

    sec = pair.extra.get("section")
    seen = load_checkpoint(Path(run_dir) / CHECKPOINT_FILE).get("meta", {}).get("sections", [])
    if sec is not None and sec in seen:
        raise VoxelomeError(f"{run_dir} was trained on {seen}, which includes the held-out section {sec!r}; "
                            f"use the run that left {sec} out (run_{sec}).")
    trained = TrainedDense2D.load(run_dir, device="cpu")
    work = trained.input_um if input_um is None else float(input_um)
    if image_cache is not None and Path(image_cache).exists():
        z = np.load(image_cache)
        rgb, (sx, sy) = z["image"], tuple(z["scale"])
    else:
        rgb, (sx, sy) = load_he_image(pair.extra["image_path"], pair.extra["image_pixel_size_um"], work)
    H, W = pair.shape
    x0, y0 = pair.extra["array_origin"]
    gy, gx = np.mgrid[0:H, 0:W]
    full = np.column_stack([gx.ravel() + x0, gy.ravel() + y0, np.ones(H * W)]) @ np.asarray(pair.extra["grid_to_px"]).T
    centres = np.column_stack([(full[:, 0] + 0.5) * sx, (full[:, 1] + 0.5) * sy])
    px_work = pair.extra["image_pixel_size_um"] / ((sx + sy) / 2)
    dense = dense_grid_prediction(trained, rgb, centres, pair.extra["spot_diameter_um"] / 2 / px_work, pair.genes, (H, W))
    pair.extra["dense"] = dense
    return dense
