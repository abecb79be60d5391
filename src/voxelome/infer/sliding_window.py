"""Sliding-window prediction: one explicit function, exact under any blocking of the output.

Windows lie on ONE global grid over the (padded) input. To fill an output region, every window
that touches it is predicted and blended into the region only, in the global window order, so
computing a volume region by region gives bit-for-bit the same result as computing it at once
(see ``tests/test_sliding_window.py``). Predictors map input windows ``(B, 1, *window)`` to
``(B, C, *window // stride)``: output voxel ``j`` covers input voxels ``[j·s, (j+1)·s)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import numpy as np

from voxelome.errors import VoxelomeError, check_choice
from voxelome.train.sampling import Region

BLENDS = ("gaussian", "constant")


@dataclass(frozen=True)
class WindowGrid:
    """Global window layout over an input of ``shape`` (z, y, x) voxels.

    Parameters
    ----------
    shape : tuple of int
        Input volume shape.
    window : tuple of int
        Window shape in input voxels, each a multiple of ``stride``.
    stride : int
        Input voxels per output voxel.
    overlap : float
        Fraction of a window shared with its neighbour, in [0, 1).
    margin : tuple of int, optional
        Context (input voxels, multiples of ``stride``) the windows reach beyond the volume on
        every side, filled by mirroring the volume. Default: a quarter of the window, so the
        volume's faces lie inside windows rather than on their least reliable borders.
    """

    shape: tuple[int, int, int]
    window: tuple[int, int, int]
    stride: int
    overlap: float
    margin: tuple[int, int, int] | None = None

    def __post_init__(self):
        if any(w % self.stride for w in self.window):
            raise VoxelomeError(f"window={self.window} must be a multiple of the output stride {self.stride}.")
        if not 0 <= self.overlap < 1:
            raise VoxelomeError(f"overlap={self.overlap} must lie in [0, 1).")
        margin = self.margin
        if margin is None:
            margin = tuple(w // 4 // self.stride * self.stride for w in self.window)
        margin = tuple(int(m) for m in margin)
        if len(margin) != 3 or any(m < 0 or m % self.stride for m in margin):
            raise VoxelomeError(f"margin={self.margin} must be three non-negative multiples of the stride {self.stride}.")
        object.__setattr__(self, "margin", margin)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """Output grid shape: ``ceil(shape / stride)``."""
        return tuple(-(-s // self.stride) for s in self.shape)

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        """Extent the windows cover, margins included (input voxels)."""
        return tuple(max(o * self.stride + 2 * m, w) for o, w, m in zip(self.out_shape, self.window, self.margin))

    def starts(self, axis: int) -> np.ndarray:
        """Window starts (input voxels, negative inside the low margin) along ``axis``; the first starts
        at ``-margin``, the last ends at the padded edge."""
        p, w, f, m = self.padded_shape[axis], self.window[axis], self.stride, self.margin[axis]
        step = max(f, int(w * (1 - self.overlap)) // f * f)
        s = list(range(0, p - w + 1, step))
        if s[-1] != p - w:
            s.append(p - w)
        return np.asarray(s) - m

    def touching(self, out_region: tuple[slice, slice, slice]) -> list[tuple[int, int, int]]:
        """Starts of the windows whose output overlaps ``out_region``, in global order."""
        per_axis = []
        for ax, sl in enumerate(out_region):
            s = self.starts(ax)
            lo, hi = s // self.stride, (s + self.window[ax]) // self.stride
            per_axis.append(s[(hi > sl.start) & (lo < sl.stop)])
        return list(product(*per_axis))


def blend_weights(shape, mode: str) -> np.ndarray:
    """Per-voxel window weights ``shape``: ``constant`` ones, or a Gaussian (σ = shape/8) that
    fades out window borders, where zero padding makes predictions least reliable."""
    check_choice("blend", mode, BLENDS)
    if mode == "constant":
        return np.ones(shape, np.float64)
    axes = []
    for n in shape:
        c = (n - 1) / 2.0
        sigma = max(n * 0.125, 1e-3)
        axes.append(np.exp(-0.5 * ((np.arange(n) - c) / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w / w.max(), 1e-4)


def sliding_window_inference(source, predictor: Callable[[np.ndarray], np.ndarray], *, window, stride: int,
                             n_channels: int, overlap: float = 0.25, blend: str = "gaussian",
                             out_region: tuple[slice, slice, slice] | None = None, batch_size: int = 1,
                             prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Predict an output region with blended overlapping windows.

    Parameters
    ----------
    source : array-like, shape (z, y, x)
        Input volume (numpy, dask or zarr); only the windows around ``out_region`` are read,
        in one read. Outside the volume it is mirrored.
    predictor : callable
        ``(B, 1, *window) float32 → (B, n_channels, *window // stride)``.
    window : tuple of int
        Window shape (input voxels), multiples of ``stride``.
    stride : int
        Input voxels per output voxel.
    n_channels : int
        Output channels.
    overlap : float
        Window overlap fraction.
    blend : str
        ``gaussian`` or ``constant``.
    out_region : tuple of slices, optional
        Region of the output grid to compute (default: all of it).
    batch_size : int
        Windows per predictor call.
    prepare : callable, optional
        Applied to the input block after reading (e.g. intensity scaling).

    Returns
    -------
    ndarray, shape (n_channels, *region shape), float32
    """
    grid = WindowGrid(tuple(int(s) for s in source.shape), tuple(int(w) for w in window), int(stride), overlap)
    if out_region is None:
        out_region = tuple(slice(0, o) for o in grid.out_shape)
    out_region = tuple(slice(sl.start, min(sl.stop, o)) for sl, o in zip(out_region, grid.out_shape))
    r0 = np.array([sl.start for sl in out_region])
    rshape = tuple(int(sl.stop - sl.start) for sl in out_region)
    starts = grid.touching(out_region)
    num = np.zeros((n_channels, *rshape), np.float64)
    den = np.zeros(rshape, np.float64)
    if not starts:
        return num.astype(np.float32)
    weights = blend_weights(tuple(w // stride for w in grid.window), blend)
    # One read of the input the touching windows need (clipped to the volume; mirrored beyond it on crop).
    lo = np.maximum(np.min(starts, axis=0), 0)
    hi = np.minimum(np.max(starts, axis=0) + np.asarray(grid.window), grid.shape)
    block = np.asarray(source[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    region = Region(prepare(block) if prepare is not None else block, lo)
    wout = np.asarray(grid.window) // stride
    for i in range(0, len(starts), batch_size):
        batch_starts = starts[i:i + batch_size]
        x = np.stack([region.crop(s, grid.window) for s in batch_starts])[:, None]
        y = np.asarray(predictor(x), dtype=np.float64)
        if y.shape[1:] != (n_channels, *wout):
            raise VoxelomeError(f"predictor returned {y.shape[1:]}; expected {(n_channels, *wout)} per window.")
        for s, pred in zip(batch_starts, y):
            o0 = np.asarray(s) // stride
            a = np.maximum(o0, r0)
            b = np.minimum(o0 + wout, r0 + rshape)
            src = tuple(slice(p - q, r - q) for p, q, r in zip(a, o0, b))
            dst = tuple(slice(p - q, r - q) for p, q, r in zip(a, r0, b))
            num[(slice(None), *dst)] += pred[(slice(None), *src)] * weights[src]
            den[dst] += weights[src]
    return (num / den).astype(np.float32)


def patch_grid_inference(source, predictor: Callable[[np.ndarray], np.ndarray], *, patch_shape, step,
                         n_channels: int, out_region: tuple[slice, slice, slice] | None = None,
                         batch_size: int = 64, prepare: Callable[[np.ndarray], np.ndarray] | None = None
                         ) -> np.ndarray:
    """X-Pression's whole-volume prediction: one patch per output cell, no blending.

    Output cell ``j`` covers input voxels ``[j·step, (j+1)·step)``; it takes the prediction of the
    ``patch_shape`` patch centred on the cell's centre voxel (mirrored at the volume border).

    Parameters
    ----------
    predictor : callable
        ``(B, 1, *patch_shape) → (B, n_channels)`` proportions.
    step : tuple of int
        Cell size (z, y, x) in input voxels (16 px in-plane, 21 slices in the paper).

    Returns
    -------
    ndarray, shape (n_channels, *region shape), float32
    """
    shape = np.asarray(source.shape)
    step = np.asarray(step)
    out_shape = -(-shape // step)
    if out_region is None:
        out_region = tuple(slice(0, int(o)) for o in out_shape)
    out_region = tuple(slice(sl.start, min(sl.stop, int(o))) for sl, o in zip(out_region, out_shape))
    cells = np.stack(np.meshgrid(*[np.arange(sl.start, sl.stop) for sl in out_region], indexing="ij"), -1).reshape(-1, 3)
    rshape = tuple(sl.stop - sl.start for sl in out_region)
    centres = np.minimum(cells * step + step // 2, shape - 1)
    half = np.asarray(patch_shape) // 2
    lo = np.clip(centres.min(0) - half, 0, None)
    hi = np.minimum(centres.max(0) + half + 1, shape)
    block = np.asarray(source[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    region = Region(prepare(block) if prepare is not None else block, lo)
    out = np.zeros((len(cells), n_channels), np.float32)
    for i in range(0, len(cells), batch_size):
        x = np.stack([region.crop(c - half, patch_shape) for c in centres[i:i + batch_size]])[:, None]
        out[i:i + batch_size] = predictor(x)
    return out.T.reshape(n_channels, *rshape)
