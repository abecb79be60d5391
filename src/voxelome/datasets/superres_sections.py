"""Super-resolution pairs from a user's own ST sections (legacy ST square arrays or Visium), with H&E features.

Two kinds of pair, same grid conventions as :mod:`voxelome.datasets.superres` (low-res pixel ``(i, j)``
covers high-res pixels ``[i·f, (i+1)·f) × [j·f, (j+1)·f)``):

- **restore** (:func:`restore_pair`, for training and for scoring): the measured spots on their array grid
  are the high-res target and ``factor × factor`` blocks of spots (their mean) are the low-res input — the
  section degraded on purpose, so the truth is known;
- **beyond** (:func:`beyond_pair`, for use): the measured spots are the low-res input and the output grid is
  ``factor`` times finer than the array. Each output pixel's value means *what a spot of the measured size
  centred there would read*; the model learned it one scale up (blocks → spots), so this mode rests on the
  usual assumption of self-supervised super-resolution that the relation holds one scale down.

Visium's hexagonal lattice is handled in *offset coordinates*: along a row the spots' ``array_col`` steps by 2,
so ``x = array_col // 2`` (after removing the row's parity) numbers them consecutively and alternate rows carry a
half-pitch shift, kept apart for the geometry (image features are sampled where the spots really are). The grid's
pixels are then anisotropic (a spot pitch wide, √3/2 of it high); ``pair.extra['pixel_size_yx_um']`` has both sizes
and the written OME-Zarr carries them.

Histology features are :func:`voxelome.datasets.superres.grid_features` (colour/texture in the spot disk and
a 2× context disk) reduced by :class:`HistologyFeatures` (standardisation + PCA fitted on the training
sections, stored with the run as plain numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voxelome.datasets.superres import SuperResPair, block_mean, grid_features
from voxelome.errors import VoxelomeError

_GRID_COLUMNS = (("array_x", "array_y"), ("array_col", "array_row"))


def array_grid(adata) -> tuple[np.ndarray, np.ndarray]:
    """Integer grid coordinates ``(ax, ay)`` of the spots (offset coordinates on a hexagonal Visium lattice).

    Raises a :class:`VoxelomeError` for sections without integer array coordinates or with two spots at one position.
    """
    ax, ay, _ = _lattice(adata)
    return ax, ay


def _lattice(adata):
    """``(ax, ay, row_shift)``: grid coordinates and a function giving the x offset (array units, 0 or 0.5) of
    grid rows — the half-pitch shift of alternate Visium rows, 0 everywhere on square arrays."""
    for cx, cy in _GRID_COLUMNS:
        if cx in adata.obs and cy in adata.obs:
            ax, ay = adata.obs[cx].to_numpy(), adata.obs[cy].to_numpy()
            break
    else:
        raise VoxelomeError(f"the section has none of the array-coordinate columns {_GRID_COLUMNS} in obs; "
                            "super-resolution works on spot arrays (legacy ST array_x/array_y).")
    if not (np.allclose(ax, np.round(ax)) and np.allclose(ay, np.round(ay))):
        raise VoxelomeError("array coordinates must be integers (one per array position).")
    ax, ay = np.round(ax).astype(int), np.round(ay).astype(int)
    if len(set(zip(ax.tolist(), ay.tolist()))) != len(ax):
        raise VoxelomeError("two spots share one array position; de-duplicate the section first.")
    if cx == "array_col" and len(ax) > 3 and np.all((ax + ay) % 2 == (ax[0] + ay[0]) % 2):
        parity = int(ax[0] + ay[0]) % 2  # Visium: array_col + array_row has one parity over the whole slide

        def row_shift(rows):
            return ((parity - np.asarray(rows)) % 2) / 2.0  # the row's first column is 0 or 1 → 0 or ½ pitch

        return ax // 2, ay, row_shift  # col = 2·x + (0 or 1): floor division drops the row's parity bit
    return ax, ay, lambda rows: np.zeros(np.shape(rows))


def _section_scale(adata) -> tuple[float, float]:
    meta = adata.uns.get("voxelome", {})
    px, diam = meta.get("pixel_size_um"), meta.get("spot_diameter_um")
    if not px or not diam:
        raise VoxelomeError("the section lacks uns['voxelome']['pixel_size_um'] / ['spot_diameter_um']; read it with "
                            "voxelome.io.read_section (or pass --pixel-size-um).")
    return float(px), float(diam)


def _grid_to_px(adata, ax, ay, row_shift) -> np.ndarray:
    """2×3 affine: array (x + row shift, y, 1) → full-resolution image pixel (x, y), least squares over the spots."""
    a = np.column_stack([ax + row_shift(ay), ay, np.ones(len(ax))])
    return np.linalg.lstsq(a, np.asarray(adata.obsm["spatial"], float)[:, :2], rcond=None)[0].T


@dataclass
class SectionImage:
    """An H&E at a working resolution: ``rgb (y, x, 3)`` uint8 and its scale from full-resolution pixels."""

    rgb: np.ndarray
    scale_xy: tuple[float, float]

    @classmethod
    def read(cls, path, adata, input_um: float = 4.0) -> SectionImage:
        from voxelome.train.dense2d_data import load_he_image

        px, _ = _section_scale(adata)
        rgb, scale = load_he_image(path, px, input_um)
        return cls(rgb, tuple(float(s) for s in scale))


def _features_at(image: SectionImage, adata, grid_xy: np.ndarray, aff: np.ndarray) -> np.ndarray:
    """Raw features at array positions ``grid_xy`` (n, 2) (fractional allowed)."""
    px, diam = _section_scale(adata)
    sx, sy = image.scale_xy
    full = np.column_stack([grid_xy, np.ones(len(grid_xy))]) @ aff.T
    centres = np.column_stack([(full[:, 0] + 0.5) * sx, (full[:, 1] + 0.5) * sy])
    return grid_features(image.rgb, centres, diam / 2 / (px / ((sx + sy) / 2)))


@dataclass
class HistologyFeatures:
    """Standardise + PCA of raw grid features, fitted on training sections; ``transform`` → unit-sd components."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray  #: (k, n_raw)
    sd: np.ndarray  #: (k,)

    @classmethod
    def fit(cls, raw: np.ndarray, n_components: int = 8) -> HistologyFeatures:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(raw)
        k = int(min(n_components, raw.shape[1], len(raw)))
        pca = PCA(n_components=k, random_state=0).fit(scaler.transform(raw))
        return cls(scaler.mean_, scaler.scale_, pca.components_, np.sqrt(pca.explained_variance_))

    def transform(self, raw: np.ndarray) -> np.ndarray:
        return (((raw - self.mean) / self.scale) @ self.components.T / self.sd).astype(np.float32)

    def to_dict(self) -> dict:
        return {k: np.asarray(getattr(self, k)).tolist() for k in ("mean", "scale", "components", "sd")}

    @classmethod
    def from_dict(cls, d: dict) -> HistologyFeatures:
        return cls(*(np.asarray(d[k], np.float64) for k in ("mean", "scale", "components", "sd")))


def section_targets(adata, genes) -> np.ndarray:
    """log1p-normalised values ``(n_spots, G)`` of ``genes`` (the dense-prediction issue's targets)."""
    from voxelome.train.dense2d_data import gene_targets

    missing = [g for g in genes if g not in set(map(str, adata.var_names))]
    if missing:
        raise VoxelomeError(f"the section lacks {len(missing)} of the model's genes, e.g. {missing[:5]}; "
                            "super-resolve sections measured with the same panel.")
    return gene_targets(adata, list(genes))


def array_box(adatas) -> tuple[int, int, int, int]:
    """``(x0, y0, width, height)`` in array units covering every section's spots (a common frame for stacks)."""
    grids = [array_grid(a) for a in adatas]  # sections of one array layout (Visium: the same row parity)
    x0, y0 = min(int(g[0].min()) for g in grids), min(int(g[1].min()) for g in grids)
    x1, y1 = max(int(g[0].max()) for g in grids), max(int(g[1].max()) for g in grids)
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def _box(ax, ay, box):
    if box is None:
        return int(ax.min()), int(ay.min()), int(ax.max() - ax.min()) + 1, int(ay.max() - ay.min()) + 1
    x0, y0, w, h = (int(v) for v in box)
    if ax.min() < x0 or ay.min() < y0 or ax.max() >= x0 + w or ay.max() >= y0 + h:
        raise VoxelomeError(f"box={box!r} does not contain every spot (array x {ax.min()}–{ax.max()}, y "
                            f"{ay.min()}–{ay.max()}); use array_box() of all sections.")
    return x0, y0, w, h


def restore_pair(adata, genes, *, factor: int = 2, image: SectionImage | None = None,
                 features: HistologyFeatures | None = None, min_spots: int = 1, name: str = "section",
                 raw_features: bool = False, box=None):
    """The section degraded on purpose: blocks of ``factor × factor`` spots → the spots.

    Returns a :class:`SuperResPair` at the array pitch (``pixel_size_um`` = the spot pitch in µm), or with
    ``raw_features=True`` the tuple ``(pair without image, raw features (H·W, n_raw))`` for fitting
    :class:`HistologyFeatures`. ``box`` ``(x0, y0, width, height)`` in array units fixes the grid (e.g.
    :func:`array_box` of a stack); by default it is the section's own extent.
    """
    ax, ay, row_shift = _lattice(adata)
    f = int(factor)
    x0, y0, w, h = _box(ax, ay, box)
    H, W = -(-h // f) * f, -(-w // f) * f
    vals = section_targets(adata, genes)
    high = np.zeros((len(genes), H, W), np.float32)
    mask = np.zeros((H, W), bool)
    high[:, ay - y0, ax - x0] = vals.T
    mask[ay - y0, ax - x0] = True
    low, cnt = block_mean(high, mask, f)
    low_mask = cnt >= int(min_spots)
    aff = _grid_to_px(adata, ax, ay, row_shift)
    pitch = _pitch_um(adata, aff)
    hexagonal = bool(np.any(row_shift(np.arange(2))))
    extra = {"array_origin": (x0, y0), "grid_to_px": aff, "mode": "restore", **_anisotropy(adata, aff, 1),
             "output_to_image_px": _output_to_image(aff, x0, y0, 1, hexagonal)}
    pair = SuperResPair(name, list(genes), f, pitch, high, mask, (low * low_mask).astype(np.float32), low_mask, None,
                        None, extra)
    if image is None:
        return (pair, None) if raw_features else pair.validate()
    gy, gx = np.mgrid[0:H, 0:W]
    gy, gx = gy.ravel() + y0, gx.ravel() + x0
    raw = _features_at(image, adata, np.column_stack([gx + row_shift(gy), gy]), aff)
    if raw_features:
        return pair, raw
    if features is None:
        raise VoxelomeError("features=None with an image: fit HistologyFeatures on the training sections first.")
    pair.image = features.transform(raw).T.reshape(-1, H, W)
    return pair.validate()


def beyond_pair(adata, genes, *, factor: int = 2, image: SectionImage | None = None,
                features: HistologyFeatures | None = None, name: str = "section", box=None):
    """The measured spots as the low-res input of a grid ``factor`` times finer than the array (``box``: as in
    :func:`restore_pair`)."""
    ax, ay, row_shift = _lattice(adata)
    f = int(factor)
    x0, y0, w, h = _box(ax, ay, box)
    vals = section_targets(adata, genes)
    low = np.zeros((len(genes), h, w), np.float32)
    low_mask = np.zeros((h, w), bool)
    low[:, ay - y0, ax - x0] = vals.T
    low_mask[ay - y0, ax - x0] = True
    aff = _grid_to_px(adata, ax, ay, row_shift)
    H, W = h * f, w * f
    mask = np.kron(low_mask, np.ones((f, f), bool))
    pair = SuperResPair(name, list(genes), f, _pitch_um(adata, aff) / f, np.zeros((len(genes), H, W), np.float32),
                        mask, low, low_mask, None, None,
                        {"array_origin": (x0, y0), "grid_to_px": aff, "mode": "beyond", **_anisotropy(adata, aff, f),
                         "output_to_image_px": _output_to_image(aff, x0, y0, f, bool(np.any(row_shift(np.arange(2)))))})
    if image is not None:
        if features is None:
            raise VoxelomeError("features=None with an image: use the run's fitted HistologyFeatures.")
        gy, gx = np.mgrid[0:H, 0:W]
        # sub-pixel (a, b) of array position (i, j) sits at array coordinate j + (b + 0.5)/f − 0.5, shifted with
        # its spot's row on a hexagonal lattice
        gy, gx = gy.ravel(), gx.ravel()
        grid = np.column_stack([x0 + (gx + 0.5) / f - 0.5 + row_shift(y0 + gy // f), y0 + (gy + 0.5) / f - 0.5])
        pair.image = features.transform(_features_at(image, adata, grid, aff)).T.reshape(-1, H, W)
    return pair.validate()


def _output_to_image(aff: np.ndarray, x0: int, y0: int, f: int, hexagonal: bool):
    """2×3 affine: output pixel (column, row, 1) → full-resolution image pixel (x, y) as in ``obsm['spatial']``, for
    an output grid ``f`` times finer than the array starting at array position ``(x0, y0)``; ``None`` on a hexagonal
    lattice (alternate rows are shifted, which no single affine map says)."""
    if hexagonal:
        return None
    c = 0.5 / f - 0.5  # output pixel b's centre sits at array coordinate x0 + (b + 0.5)/f − 0.5
    grid = np.array([[1.0 / f, 0.0, x0 + c], [0.0, 1.0 / f, y0 + c], [0.0, 0.0, 1.0]])
    return (aff @ grid).tolist()


def _pitch_um(adata, aff: np.ndarray) -> float:
    px, _ = _section_scale(adata)
    return float(np.mean(np.linalg.norm(aff[:, :2], axis=0)) * px)


def _anisotropy(adata, aff: np.ndarray, f: int) -> dict:
    """``{'pixel_size_yx_um': (y, x)}`` of the output grid when its rows and columns differ by > 1 % (Visium rows are
    √3/2 of a pitch apart), else ``{}`` (square arrays keep one pixel size)."""
    px, _ = _section_scale(adata)
    sx, sy = np.linalg.norm(aff[:, :2], axis=0) * px / f
    return {"pixel_size_yx_um": (float(sy), float(sx))} if abs(sx - sy) > 0.01 * max(sx, sy) else {}
