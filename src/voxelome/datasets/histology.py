"""H&E-like images of sections: what a pathologist's scan of a cut through the phantom lung (:func:`render_he`) or
through any 3D scan (:func:`render_he_from_volume`, stained by intensity alone) would look like.

The renderer stains the phantom's tissue structure on a (possibly oblique) plane with the
Beer–Lambert colour model of H&E (Ruifrok & Johnston 2001 stain vectors): eosin follows tissue
density (septa, vessel walls, consolidated alveoli are pink, alveolar and airway air spaces and
the outside are white), haematoxylin follows cell-rich niches (immune infiltrate, consolidation),
so the image shares *structure* with the CT volume but not its intensities (air is white in H&E and
dark in CT; consolidation and the immune rim are purple in H&E and only slightly brighter in CT).
Independent stain strength, section noise and optical blur are drawn from ``seed``.

Tissue density is the phantom's CT image smoothed by one voxel (removing most scanner noise),
mapped to [0, 1] by its air/tissue percentiles; the cell-rich niches come from the phantom's truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from voxelome.errors import VoxelomeError, check_positive
from voxelome.io.volume import Volume
from voxelome.register.placement import SectionPlacement
from voxelome.register.sampling import sample_points

if TYPE_CHECKING:
    from voxelome.datasets.phantom import LungPhantom

#: Optical-density stain vectors (R, G, B), Ruifrok & Johnston (2001), normalised.
HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
EOSIN_OD = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])


def section_pixel_box(placement: SectionPlacement, volume: Volume, margin_px: int = 0):
    """Image shape ``(h, w)`` and pixel offset ``(x0, y0)`` covering the part of the plane inside ``volume``.

    The plane is sampled on its pixel grid; the returned box is the bounding box of the pixels whose
    world point lies inside the volume (plus ``margin_px``), so a rendered section holds the whole cut
    and little else.
    """
    corners = volume.index_to_xyz(np.array(np.meshgrid(*[[0, n - 1] for n in volume.shape],
                                                       indexing="ij")).reshape(3, -1).T)
    px = np.linalg.lstsq(placement.matrix[:, :2], (corners - placement.matrix[:, 2]).T, rcond=None)[0].T
    lo, hi = np.floor(px.min(0)).astype(int), np.ceil(px.max(0)).astype(int)
    xs, ys = np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1)
    xx, yy = np.meshgrid(xs, ys, indexing="xy")
    inside = volume.contains(placement.map(np.column_stack([xx.ravel(), yy.ravel()])), margin_voxels=0.0)
    if not inside.any():
        raise VoxelomeError("the plane does not cross the volume; check the placement (origin, normal, units).")
    inside = inside.reshape(xx.shape)
    rows, cols = np.nonzero(inside)
    x0, y0 = xs[cols.min()] - margin_px, ys[rows.min()] - margin_px
    w, h = cols.max() - cols.min() + 1 + 2 * margin_px, rows.max() - rows.min() + 1 + 2 * margin_px
    return (int(h), int(w)), (int(x0), int(y0))


def render_he(phantom: LungPhantom, placement: SectionPlacement, *, shape=None, seed: int = 0,
              blur_um: float = 4.0, noise_sd: float = 0.03, stain_jitter: float = 0.15,
              crop: bool = True) -> tuple[np.ndarray, SectionPlacement]:
    """Render an H&E-like RGB image of ``phantom`` on ``placement``.

    Parameters
    ----------
    phantom : LungPhantom
        Source of the tissue structure (CT image, tissue mask, truth).
    placement : SectionPlacement
        The plane and pixel size (µm per pixel = ``placement.pixel_size_um``).
    shape : (int, int), optional
        Image ``(h, w)`` in pixels starting at pixel ``(0, 0)`` of ``placement``. Default with
        ``crop=True``: the bounding box of the plane inside the volume (the placement is shifted so
        that its pixel ``(0, 0)`` is the box corner).
    seed : int
        Seed of the stain strengths and noise.
    blur_um : float
        Optical blur (Gaussian sigma, µm) of the scan.
    noise_sd : float
        Additive noise on optical density.
    stain_jitter : float
        Relative random change of each stain's strength (section-to-section staining variation).
    crop : bool
        Crop to the plane ∩ volume (see ``shape``).

    Returns
    -------
    image : ndarray, shape (h, w, 3), uint8
        RGB; pixels whose world point is outside the volume are white background.
    placement : SectionPlacement
        The placement of this image's pixels (shifted when cropped): ground truth for registration.
    """
    check_positive("blur_um", blur_um, allow_zero=True)
    check_positive("noise_sd", noise_sd, allow_zero=True)
    vol = phantom.volume
    placement, pts = _section_grid(vol, placement, shape, crop, "render_he")
    h, w = pts.shape[:2]
    rng = np.random.default_rng(seed)

    ct = np.asarray(vol.data, dtype=np.float32)
    smooth = ndimage.gaussian_filter(ct, 1.0)
    lo, hi = np.percentile(smooth[phantom.tissue], [5, 99])
    dens_vol = vol.with_data(np.clip((smooth - lo) / (hi - lo + 1e-9), 0, 1))
    density = np.nan_to_num(sample_points(dens_vol, pts), nan=0.0)
    tissue = np.nan_to_num(sample_points(vol.with_data(phantom.tissue.astype(np.float32)), pts), nan=0.0)
    names = list(phantom.signature_names)

    def truth(name):
        if name not in names:
            return np.zeros((h, w), np.float32)
        return np.nan_to_num(sample_points(phantom.truth_volume(name), pts), nan=0.0)

    cells = truth("immune_infiltrate") + 0.6 * truth("consolidation") + 0.3 * truth("airway")
    e_strength, h_strength = 1.0 + stain_jitter * rng.uniform(-1, 1, 2)
    eosin = e_strength * 1.1 * density * tissue
    haem = h_strength * (0.25 * density + 0.9 * cells) * tissue
    return _stain(eosin, haem, vol.contains(pts.reshape(-1, 3), margin_voxels=0.0).reshape(h, w), placement, rng,
                  blur_um, noise_sd), placement


def render_he_from_volume(volume: Volume, placement: SectionPlacement, *, tissue_threshold: float | None = None,
                          shape=None, seed: int = 0, blur_um: float | None = None, noise_sd: float = 0.03,
                          stain_jitter: float = 0.15, crop: bool = True) -> tuple[np.ndarray, SectionPlacement]:
    """An H&E-like RGB image of any 3D scan cut on ``placement``: check the plane search on your own volume.

    The phantom's renderer (:func:`render_he`) knows where the cells are; a real scan does not, so this one
    stains by intensity alone, and not monotonically, so that the image shares the scan's structure but not
    its intensities (as a real H&E does not share a CT's): the scan, smoothed by one voxel, is mapped to a
    density in [0, 1] by its 5th–99th percentiles inside the tissue; eosin follows the density, haematoxylin
    peaks at mid densities (exp(−((d − 0.5) / 0.2)²)); outside the tissue the glass is white.

    Parameters
    ----------
    volume : Volume
        The scan ``(z, y, x)`` with its µm spacing.
    placement : SectionPlacement
        The cutting plane and pixel size.
    tissue_threshold : float, optional
        Scan intensity above which a voxel is tissue (default: Otsu's threshold of the smoothed scan).
    shape, seed, noise_sd, stain_jitter, crop
        As in :func:`render_he`.
    blur_um : float, optional
        Optical blur (Gaussian sigma, µm); default half a voxel.

    Returns
    -------
    image : ndarray, shape (h, w, 3), uint8
    placement : SectionPlacement
        The placement of the image's pixels (shifted when cropped): ground truth for registration.
    """
    from skimage.filters import threshold_otsu

    blur_um = 0.5 * float(min(volume.spacing_um)) if blur_um is None else blur_um
    check_positive("blur_um", blur_um, allow_zero=True)
    check_positive("noise_sd", noise_sd, allow_zero=True)
    placement, pts = _section_grid(volume, placement, shape, crop, "render_he_from_volume")
    h, w = pts.shape[:2]
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(np.asarray(volume.data, dtype=np.float32), 1.0)
    threshold = float(threshold_otsu(smooth)) if tissue_threshold is None else float(tissue_threshold)
    in_tissue = smooth > threshold
    if not in_tissue.any():
        raise VoxelomeError(f"tissue_threshold={threshold:g} leaves no tissue in the scan (its range is "
                            f"{smooth.min():g}–{smooth.max():g}); pass a lower tissue_threshold.")
    lo, hi = np.percentile(smooth[in_tissue], [5, 99])
    density = np.nan_to_num(sample_points(volume.with_data(np.clip((smooth - lo) / (hi - lo + 1e-9), 0, 1)), pts),
                            nan=0.0)
    tissue = np.nan_to_num(sample_points(volume.with_data(in_tissue.astype(np.float32)), pts), nan=0.0)
    e_strength, h_strength = 1.0 + stain_jitter * rng.uniform(-1, 1, 2)
    eosin = e_strength * 0.9 * density * tissue
    haem = h_strength * 0.8 * np.exp(-((density - 0.5) / 0.2) ** 2) * tissue
    return _stain(eosin, haem, volume.contains(pts.reshape(-1, 3), margin_voxels=0.0).reshape(h, w), placement, rng,
                  blur_um, noise_sd), placement


def _section_grid(volume: Volume, placement: SectionPlacement, shape, crop: bool, caller: str):
    """The placement of the image (shifted to the plane ∩ volume box when cropping) and its pixels' world points
    ``(h, w, 3)`` µm."""
    if shape is None:
        if not crop:
            raise VoxelomeError(f"{caller} needs shape=(h, w) when crop=False.")
        shape, (x0, y0) = section_pixel_box(placement, volume)
        m = placement.matrix.copy()
        m[:, 2] = placement.map([[x0, y0]])[0]
        placement = SectionPlacement(m)
    h, w = (int(s) for s in shape)
    if h < 4 or w < 4:
        raise VoxelomeError(f"shape={shape!r} must be at least (4, 4) pixels.")
    xx, yy = np.meshgrid(np.arange(w, dtype=float), np.arange(h, dtype=float), indexing="xy")
    return placement, placement.map(np.column_stack([xx.ravel(), yy.ravel()])).reshape(h, w, 3)


def _stain(eosin, haem, inside, placement: SectionPlacement, rng, blur_um: float, noise_sd: float) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)`` of eosin and haematoxylin optical densities ``(h, w)``: blur, Beer–Lambert mixing,
    noise; pixels outside the volume are white glass."""
    if blur_um > 0:
        sig = blur_um / placement.pixel_size_um
        eosin, haem = ndimage.gaussian_filter(eosin, sig), ndimage.gaussian_filter(haem, sig)
    od = eosin[..., None] * EOSIN_OD + haem[..., None] * HAEMATOXYLIN_OD + 0.02
    od += noise_sd * rng.standard_normal(od.shape)
    od[~inside] = 0.01 + 0.005 * rng.standard_normal(((~inside).sum(), 3))
    rgb = 255.0 * np.exp(-np.clip(od, 0, None))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def optical_density(image) -> np.ndarray:
    """Grey image ``(h, w)`` float32 of total optical density of an RGB/greyscale bright-field image.

    Dark (stained) pixels are high, white background ≈ 0 — the single channel registration uses.
    Accepts ``(h, w)``, ``(h, w, 3|4)`` (channels last) or ``(3, h, w)`` uint8 or float in [0, 1].
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise VoxelomeError(f"image has shape {img.shape}; expected a 2D image (h, w), (h, w, 3) or (3, h, w).")
    scale = 255.0 if img.dtype == np.uint8 or img.max(initial=0) > 1.5 else 1.0
    img = np.clip(img.astype(np.float32) / scale, 1.0 / 255.0, 1.0)
    od = -np.log(img)
    return (od.mean(-1) if od.ndim == 3 else od).astype(np.float32)
