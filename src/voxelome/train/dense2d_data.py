"""Data for dense 2D training: H&E images at a working resolution, spot targets, tiles around spots.

Geometry: the image is resampled once to the working pixel size ``input_um`` (box filter; a JPEG is
decoded at a reduced DCT scale first, so a 9,000 px slide loads in well under a second). Spot centres
become continuous working-pixel coordinates (pixel ``(i, j)`` covers ``[j, j+1) × [i, i+1)``; see
:mod:`voxelome.models.spot_aggregation`), the spot radius becomes working pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from voxelome.constants import PIXEL_SIZE_KEY, SIGNATURES_KEY, SPATIAL_KEY, SPOT_DIAMETER_KEY, UNS_KEY
from voxelome.errors import VoxelomeError
from voxelome.models.spot_aggregation import disk_weight_matrix

#: Value that pads tiles beyond the image (white slide background).
BACKGROUND = 255


def load_he_image(image, pixel_size_um: float, input_um: float):
    """Read an RGB image and resample it to ``input_um`` µm/px.

    Parameters
    ----------
    image : path or ndarray
        JPEG/PNG/TIFF file, or an array ``(y, x, 3)`` (uint8, or float in [0, 1]).
    pixel_size_um : float
        µm per pixel of the image as given.
    input_um : float
        Working pixel size.

    Returns
    -------
    array : ndarray, shape (y', x', 3), uint8
    scale_xy : (float, float)
        Working pixels per original pixel along x and y (exact, after rounding the size).
    """
    if pixel_size_um is None or not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise VoxelomeError(f"pixel_size_um={pixel_size_um!r}: the image's pixel size is needed (µm per pixel); "
                            "pass it (the her2st reader infers it from the spot pitch).")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise VoxelomeError(f"image file '{path}' does not exist.")
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path))
            img = None
        else:
            img = Image.open(path)
            full = img.size
            factor = float(input_um) / float(pixel_size_um)
            if img.format == "JPEG" and factor >= 2:
                img.draft("RGB", (int(full[0] / factor), int(full[1] / factor)))
            if img.mode not in ("RGB", "RGBA"):
                raise VoxelomeError(f"image '{path}' has mode {img.mode!r}; an RGB H&E image is needed.")
            arr = None
    else:
        arr, img, full = np.asarray(image), None, None
    if arr is not None:
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise VoxelomeError(f"image has shape {arr.shape}; an RGB image (y, x, 3) is needed.")
        if arr.dtype != np.uint8:
            arr = np.clip(np.asarray(arr, float) * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        full = (arr.shape[1], arr.shape[0])
        img = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    size = (max(1, int(round(full[0] * pixel_size_um / input_um))), max(1, int(round(full[1] * pixel_size_um / input_um))))
    img = img.convert("RGB")
    if img.size != size:
        img = img.resize(size, Image.BOX)
    return np.asarray(img, dtype=np.uint8), (size[0] / full[0], size[1] / full[1])


@dataclass
class SlideData:
    """One section at the working resolution.

    Attributes
    ----------
    image : ndarray, shape (y, x, 3), uint8
    pixel_size_um : float
        Working µm per pixel (mean of x and y).
    centres_xy : ndarray, shape (n, 2)
        Spot centres in continuous working-pixel coordinates.
    radius_px : float
        Spot radius in working pixels.
    targets : ndarray, shape (n, G), float32
    train : ndarray of bool, shape (n,)
        Spots used for fitting (the rest may be validated on).
    """

    image: np.ndarray
    pixel_size_um: float
    centres_xy: np.ndarray
    radius_px: float
    targets: np.ndarray
    train: np.ndarray = field(default=None)
    name: str = ""

    def __post_init__(self):
        if self.train is None:
            self.train = np.ones(len(self.centres_xy), bool)


def section_geometry(adata, pixel_size_um=None, spot_diameter_um=None) -> tuple[float, float]:
    """``(pixel_size_um, spot_diameter_um)`` of a section; checks they agree with the scverse scale factors."""
    meta = adata.uns.get(UNS_KEY, {})
    px = pixel_size_um if pixel_size_um is not None else meta.get(PIXEL_SIZE_KEY)
    diam = spot_diameter_um if spot_diameter_um is not None else meta.get(SPOT_DIAMETER_KEY)
    if px is None:
        raise VoxelomeError(f"the section has no pixel size (uns[{UNS_KEY!r}][{PIXEL_SIZE_KEY!r}]); pass "
                            "pixel_size_um= (µm per image pixel).")
    if diam is None:
        raise VoxelomeError("the section has no spot diameter; pass spot_diameter_um= (100 for legacy ST, 55 for Visium).")
    for lib in adata.uns.get("spatial", {}).values():
        fullres = lib.get("scalefactors", {}).get("spot_diameter_fullres") if isinstance(lib, dict) else None
        if fullres and abs(float(fullres) * float(px) / float(diam) - 1) > 0.25:
            raise VoxelomeError(
                f"pixel size {float(px):.4g} µm/px and spot diameter {float(diam):g} µm disagree with the image's "
                f"spot diameter of {float(fullres):.1f} px (that implies {float(diam) / float(fullres):.4g} µm/px); "
                "check pixel_size_um.")
    return float(px), float(diam)


def slide_from_section(image, adata, targets: np.ndarray, *, input_um: float, pixel_size_um=None,
                       spot_diameter_um=None, train=None, name: str = "") -> SlideData:
    """Pair a section's image with its spots and targets at the working resolution.

    Raises :class:`VoxelomeError` for a missing/inconsistent pixel size, a non-RGB image or spots
    outside the image.
    """
    px, diam = section_geometry(adata, pixel_size_um, spot_diameter_um)
    arr, (sx, sy) = load_he_image(image, px, input_um)
    xy = np.asarray(adata.obsm[SPATIAL_KEY], float)[:, :2]
    full_w, full_h = arr.shape[1] / sx, arr.shape[0] / sy
    outside = (xy[:, 0] < -0.5) | (xy[:, 1] < -0.5) | (xy[:, 0] > full_w - 0.5) | (xy[:, 1] > full_h - 0.5)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise VoxelomeError(f"{int(outside.sum())} spot(s) lie outside the {full_w:.0f}×{full_h:.0f} px image, e.g. "
                            f"spot {adata.obs_names[i]!r} at {tuple(np.round(xy[i], 1))}; is this the section's image "
                            "(and are obsm['spatial'] in its full-resolution pixels)?")
    centres = np.column_stack([(xy[:, 0] + 0.5) * sx, (xy[:, 1] + 0.5) * sy])
    work_px = px / ((sx + sy) / 2)
    return SlideData(arr, work_px, centres, diam / 2 / work_px, np.asarray(targets, np.float32), train, name)


def select_target_genes(adatas, n_genes: int, method: str = "variance") -> list[str]:
    """Top-``n_genes`` genes of the concatenated (training) sections, on log1p-normalised counts."""
    from voxelome.signatures.svg import get_counts, normalize_log1p, select_genes

    shared = sorted(set.intersection(*[set(map(str, a.var_names)) for a in adatas]))
    if not shared:
        raise VoxelomeError("the training sections share no gene names.")
    blocks, coords = [], []
    for a in adatas:
        x = normalize_log1p(get_counts(a))
        idx = a.var_names.get_indexer(shared)
        blocks.append(x[:, idx])
        coords.append(np.asarray(a.obsm[SPATIAL_KEY], float) + len(coords) * 1e7)  # sections far apart
    import scipy.sparse as sp

    x = sp.vstack(blocks).tocsr() if sp.issparse(blocks[0]) else np.vstack(blocks)
    idx, _ = select_genes(x, np.vstack(coords) if method == "moran" else None, method=method, n_genes=n_genes)
    return [shared[i] for i in idx]


def gene_targets(adata, genes) -> np.ndarray:
    """log1p-normalised values ``(n_spots, len(genes))`` (library size over all genes of the section)."""
    from voxelome.signatures.svg import dense_columns, get_counts, normalize_log1p

    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise VoxelomeError(f"{len(missing)} target genes are absent from the section, e.g. {missing[:5]}.")
    x = normalize_log1p(get_counts(adata))
    return dense_columns(x, adata.var_names.get_indexer(list(genes))).astype(np.float32)


def signature_targets(adata) -> np.ndarray:
    """Niche proportions ``obsm['signatures']`` as targets (from :mod:`voxelome.signatures`)."""
    if SIGNATURES_KEY not in adata.obsm:
        raise VoxelomeError(f"targets='signatures' needs obsm[{SIGNATURES_KEY!r}]; run `voxelome signatures` first "
                            "or use targets='genes'.")
    return np.asarray(adata.obsm[SIGNATURES_KEY], np.float32)


class TileSampler:
    """Random training tiles around training spots, with the exact disk weights of the spots inside.

    A spot is supervised in a tile when its whole disk, plus ``margin_px``, lies inside the tile (so
    the network sees context around it).
    """

    def __init__(self, slides: list[SlideData], tile_px: int, output_stride: int, margin_px: float = 8.0):
        self.slides, self.tile, self.stride, self.margin = slides, int(tile_px), int(output_stride), float(margin_px)
        self.weights = np.array([s.train.sum() for s in slides], float)
        if self.weights.sum() == 0:
            raise VoxelomeError("no training spots to sample tiles around.")
        self.weights /= self.weights.sum()

    def crop(self, slide: SlideData, x0: int, y0: int) -> np.ndarray:
        """``tile × tile × 3`` uint8 crop with top-left ``(x0, y0)``, background beyond the image."""
        t, (h, w) = self.tile, slide.image.shape[:2]
        out = np.full((t, t, 3), BACKGROUND, np.uint8)
        ys, xs = slice(max(y0, 0), min(y0 + t, h)), slice(max(x0, 0), min(x0 + t, w))
        if ys.stop > ys.start and xs.stop > xs.start:
            out[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = slide.image[ys, xs]
        return out

    def tile_at(self, slide: SlideData, centre_xy, rng=None, augment: bool = False, jitter: float = 0.0):
        """One tile centred near ``centre_xy`` → ``(x (3, t, t) float, weights (n, (t/s)²), targets (n, G))``."""
        t = self.tile
        c = np.asarray(centre_xy, float)
        if rng is not None:
            c = c + rng.uniform(-t / 4, t / 4, 2)
        x0, y0 = int(np.floor(c[0] - t / 2)), int(np.floor(c[1] - t / 2))
        img = self.crop(slide, x0, y0)
        rel = slide.centres_xy - [x0, y0]
        lim = slide.radius_px + self.margin
        keep = slide.train & (rel >= lim).all(1) & (rel <= t - lim).all(1)
        rel = rel[keep]
        if augment and rng is not None:
            if rng.random() < 0.5:
                img, rel = img[:, ::-1], np.column_stack([t - rel[:, 0], rel[:, 1]])
            for _ in range(int(rng.integers(4))):  # np.rot90: (x, y) → (y, t − x)
                img, rel = np.rot90(img), np.column_stack([rel[:, 1], t - rel[:, 0]])
        x = np.ascontiguousarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        if jitter > 0 and rng is not None:
            gain = rng.uniform(1 - jitter, 1 + jitter, (3, 1, 1))
            x = np.clip(x * gain + rng.uniform(-jitter / 2, jitter / 2, (3, 1, 1)), 0, 1).astype(np.float32)
        s = self.stride
        wm = disk_weight_matrix((t // s, t // s), rel / s, slide.radius_px / s).toarray().astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(wm), torch.from_numpy(slide.targets[keep])

    def batch(self, rng: np.random.Generator, batch_size: int, augment: bool, jitter: float):
        """``(x (B, 3, t, t), [weights_i], [targets_i])``; every tile holds ≥ 1 supervised spot."""
        xs, ws, ys = [], [], []
        while len(xs) < batch_size:
            slide = self.slides[int(rng.choice(len(self.slides), p=self.weights))]
            spot = int(rng.choice(np.flatnonzero(slide.train)))
            x, w, y = self.tile_at(slide, slide.centres_xy[spot], rng, augment, jitter)
            if len(y):
                xs.append(x), ws.append(w), ys.append(y)
        return torch.stack(xs), ws, ys
