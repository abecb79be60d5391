"""Overlay figure of a plane search: the section, the volume resampled on the found plane, a checkerboard."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voxelome.register.plane_search import PlaneSearchResult


def _norm(img: np.ndarray) -> np.ndarray:
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros_like(img, dtype=float)
    lo, hi = np.percentile(img[finite], [1, 99])
    return np.clip((np.where(finite, img, lo) - lo) / (hi - lo + 1e-12), 0, 1)


def plane_overlay_figure(result: PlaneSearchResult, image, pixel_size_um: float, path, *, tiles: int = 8):
    """Save a 3-panel PNG: section image, resampled oblique volume slice, checkerboard of both.

    Parameters
    ----------
    result : PlaneSearchResult
        Output of :func:`voxelome.register.plane_search.register_plane`.
    image : array, shape (h, w[, 3])
        The section image given to the search.
    pixel_size_um : float
        µm per section pixel (for the axes, in µm).
    path : path
        Output ``.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.transform import resize

    from voxelome.datasets.histology import optical_density

    sl = result.slice
    od = resize(optical_density(image), sl.shape, anti_aliasing=True, preserve_range=True)
    a, b = _norm(od), _norm(sl)
    yy, xx = np.indices(sl.shape)
    th, tw = max(sl.shape[0] // tiles, 1), max(sl.shape[1] // tiles, 1)
    check = np.where(((yy // th) + (xx // tw)) % 2 == 0, a, b)
    ext = [0, sl.shape[1] * result.slice_pixel_size_um, sl.shape[0] * result.slice_pixel_size_um, 0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), constrained_layout=True)
    img = np.asarray(image)
    axes[0].imshow(img if img.ndim == 3 else a, cmap=None if img.ndim == 3 else "gray",
                   extent=[0, img.shape[1] * pixel_size_um, img.shape[0] * pixel_size_um, 0])
    axes[0].set_title("section")
    axes[1].imshow(b, cmap="gray", extent=ext)
    axes[1].set_title(f"volume on found plane (tilt {result.tilt_deg:.1f}°)")
    axes[2].imshow(check, cmap="magma", extent=ext)
    axes[2].set_title(f"checkerboard · MI {result.score:.3f} · scale {result.scale:.3f}")
    for ax in axes:
        ax.set_xlabel("µm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
