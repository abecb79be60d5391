"""Find a section's plane in a volume from a 2D image of the section (``voxelome register plane``).

X-Pression placed its ST section in the micro-CT volume by hand (angles chosen in a viewer, a
slice picked by eye). :func:`register_plane` does it automatically, coarse to fine:

1. **Seed.** The section's tissue centroid is put on the volume's tissue centroid (Otsu masks).
2. **Grid** (skipped when landmarks seed the search). At the coarsest level (4 voxels), every
   combination of two tilts, in-plane rotation and depth in :class:`PlaneSearchRange` is scored
   by mutual information between the section and the volume sampled on the candidate plane
   (vectorised joint histograms); the best few distinct candidates go on.
3. **Refine.** Each candidate is optimised with SimpleITK's registration framework: a
   ``Similarity3DTransform`` (rotation, translation, isotropic scale) mapping the section plane
   (a one-slice 3D image, µm) into the volume, Mattes mutual information (cross-modal: H&E and CT
   share structure, not intensities), regular-step gradient descent with physical-shift scales,
   on a pyramid of 4, 2, 1 voxels. The candidate with the best final metric wins.

The result is a :class:`~voxelome.register.placement.SectionPlacement` (section px → volume µm)
so everything downstream (``place_section``, training) uses it unchanged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from voxelome.errors import VoxelomeError, check_positive
from voxelome.io.volume import Volume
from voxelome.register.placement import SectionPlacement
from voxelome.register.plane_grid import grid_starts
from voxelome.register.plane_itk import (
    full_metric, placement_from_similarity, registration_method, similarity_from_placement, sitk_section, sitk_volume,
)
from voxelome.register.sampling import sample_points


@dataclass(frozen=True)
class PlaneSearchRange:
    """Where the grid stage looks; angles in degrees, lengths in µm.

    The plane normal is tilted by up to ``max_tilt_deg`` about each of the volume's x and y axes
    (so any tilt direction up to that angle), the section is rotated in-plane by up to
    ``±max_rotation_deg`` (180 = any rotation) and moved along the volume z axis by up to
    ``±depth_um`` from the volume's tissue centroid. The gradient refinement then moves freely
    (it can leave the grid by a fraction of a step); the scale must end within ``scale``.
    """

    max_tilt_deg: float = 15.0  #: largest tilt of the section normal from the volume z axis, per axis
    tilt_step_deg: float = 5.0  #: grid step of the two tilts
    max_rotation_deg: float = 180.0  #: largest in-plane rotation either way (180: all)
    rotation_step_deg: float = 15.0  #: grid step of the in-plane rotation
    depth_um: float | None = None  #: ± depth around the tissue centroid; default half the volume depth
    depth_step_um: float | None = None  #: grid step of the depth; default the coarse voxel size (4 voxels)
    scale: tuple[float, float] = (0.8, 1.25)  #: allowed final scale (tissue shrinkage/expansion vs. pixel size)

    def __post_init__(self):
        def bad(name, allowed):
            raise VoxelomeError(f"PlaneSearchRange.{name}={getattr(self, name)!r} is invalid: {allowed}. "
                                f"E.g. the default {name}={getattr(PlaneSearchRange, name)!r}.")
        if not (np.isfinite(self.max_tilt_deg) and 0 <= self.max_tilt_deg < 60):
            bad("max_tilt_deg", "it must be in [0, 60) degrees")
        if not (np.isfinite(self.max_rotation_deg) and 0 <= self.max_rotation_deg <= 180):
            bad("max_rotation_deg", "it must be in [0, 180] degrees")
        for name in ("tilt_step_deg", "rotation_step_deg"):
            v = getattr(self, name)
            if not (np.isfinite(v) and 0 < v <= 90):
                bad(name, "it must be in (0, 90] degrees")
        for name in ("depth_um", "depth_step_um"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v > 0 if name == "depth_step_um" else np.isfinite(v) and v >= 0):
                bad(name, "it must be a finite number of µm (> 0 for a step, ≥ 0 for a range) or None")
        s = self.scale
        if np.ndim(s) != 1 or len(s) != 2 or not (0 < s[0] <= 1 <= s[1] < 10):
            bad("scale", "it must be (min, max) with 0 < min ≤ 1 ≤ max < 10")
        object.__setattr__(self, "scale", (float(s[0]), float(s[1])))

    def grid(self, coarse_um: float, half_depth_um: float):
        """The grid axes: tilt (rad), rotation (rad), depth (µm) values."""
        def axis(limit, step):
            n = int(np.floor(limit / step + 1e-9))
            return np.arange(-n, n + 1) * step
        tilts = np.deg2rad(axis(self.max_tilt_deg, self.tilt_step_deg))
        if self.max_rotation_deg >= 180:
            rots = np.deg2rad(np.arange(-180.0, 180.0 - 1e-9, self.rotation_step_deg))
        else:
            rots = np.deg2rad(axis(self.max_rotation_deg, self.rotation_step_deg))
        depth = half_depth_um if self.depth_um is None else self.depth_um
        depths = axis(depth, self.depth_step_um or coarse_um) if depth > 0 else np.zeros(1)
        return tilts, rots, depths


@dataclass
class PlaneSearchResult:
    """Outcome of :func:`register_plane`.

    Attributes
    ----------
    placement : SectionPlacement
        Section image pixels ``(x, y)`` → volume µm ``(x, y, z)``.
    score : float
        Mattes mutual information (nats; higher is better) between the section and the volume on
        the found plane, at the finest level with all pixels sampled.
    slice : ndarray, shape (h', w'), float32
        The volume resampled on the found plane at ``slice_pixel_size_um`` (NaN outside the volume).
    slice_pixel_size_um : float
        Pixel size of ``slice`` (the finest working resolution, ≥ the voxel size).
    scale : float
        Fitted isotropic scale (1 = the given pixel size was right).
    tilt_deg : float
        Angle between the plane normal and the volume z axis.
    seconds : float
        Wall time of the search.
    candidates : list of dict
        Per refined candidate: start (grid) parameters, final metric, scale.
    """

    placement: SectionPlacement
    score: float
    slice: np.ndarray
    slice_pixel_size_um: float
    scale: float
    tilt_deg: float
    seconds: float
    candidates: list = field(default_factory=list)
    search: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain dict (JSON/YAML) without the slice image."""
        return {"placement": self.placement.to_dict(), "score": float(self.score), "scale": float(self.scale),
                "tilt_deg": float(self.tilt_deg), "seconds": float(self.seconds),
                "slice_pixel_size_um": float(self.slice_pixel_size_um), "candidates": self.candidates,
                "search": self.search}


# --- helpers ----------------------------------------------------------------------------


def _otsu_centroid(img: np.ndarray, spacing, origin) -> np.ndarray:
    """Centroid (µm, in array axis order) of the Otsu foreground of ``img``."""
    from skimage.filters import threshold_otsu

    finite = np.isfinite(img)
    thr = threshold_otsu(img[finite]) if finite.any() and np.ptp(img[finite]) > 0 else -np.inf
    mask = finite & (img > thr)
    if not mask.any():
        mask = finite
    idx = np.array(np.nonzero(mask), dtype=float).mean(1)
    return np.asarray(origin) + idx * np.asarray(spacing)


def _downsample_2d(img: np.ndarray, factor: float) -> tuple[np.ndarray, float]:
    """Anti-aliased downsampling by ``factor`` (≥ 1); returns the image and the µm offset factor of pixel 0."""
    if factor <= 1.0 + 1e-6:
        return img.astype(np.float32), 0.0
    from skimage.transform import rescale

    out = rescale(img, 1.0 / factor, anti_aliasing=True, preserve_range=True, order=1).astype(np.float32)
    # skimage maps output pixel k to input (k + 0.5) * f' - 0.5 with f' = in/out size ratio
    f_eff = img.shape[1] / out.shape[1]
    return out, (f_eff - 1) / 2.0


def _volume_level(arr: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return arr
    return ndimage.gaussian_filter(arr, 0.5 * factor)[::factor, ::factor, ::factor].copy()


def _check_inputs(volume, image, pixel_size_um):
    if not isinstance(volume, Volume):
        raise VoxelomeError(f"volume must be a voxelome Volume, got {type(volume).__name__}; "
                            "read it with voxelome.io.read_volume or wrap an array with Volume.from_array.")
    try:
        check_positive("pixel_size_um", pixel_size_um)
    except (TypeError, ValueError):
        raise VoxelomeError(f"pixel_size_um={pixel_size_um!r} must be a finite number > 0 (µm per section "
                            "image pixel, e.g. 0.5 for a 20× H&E scan).") from None
    from voxelome.datasets.histology import optical_density

    od = optical_density(image)
    if min(od.shape) < 8:
        raise VoxelomeError(f"section image has shape {od.shape}; it needs at least 8 × 8 pixels.")
    extent = np.asarray(od.shape) * pixel_size_um
    vol_ext = np.asarray(volume.extent_um)
    if extent.max() > 20 * vol_ext.max() or extent.max() < vol_ext[1:].min() / 20:
        raise VoxelomeError(
            f"the section spans {extent[::-1].round(0)} µm (x, y) at pixel_size_um={pixel_size_um:g}, but the volume "
            f"spans {vol_ext[::-1].round(0)} µm (x, y, z): more than 20× apart. Check pixel_size_um and the volume spacing.")
    return od


# --- the search -------------------------------------------------------------------------
#: voxels of the volume searched at most (256 MB as float32; its pyramid and ITK copies come on top)
MAX_VOLUME_VOXELS = 64 * 2**20


#: the coarsest pyramid level keeps at least this many voxels across the volume's y and x extents: on the ICBM152
#: brain MRI binned to 2 mm (98 voxels across) a 4× coarse level (24 across) lost every plane tried, a 2× one (49)
#: found them within 1.1 voxels (BENCHMARKS.md, registration, real scan)
MIN_COARSE_VOXELS = 32


def default_levels(shape) -> tuple[int, ...]:
    """The search pyramid for a volume of ``shape`` ``(z, y, x)``: (4, 2, 1) without the coarse levels that leave
    fewer than :data:`MIN_COARSE_VOXELS` voxels across y or x (at least (2, 1))."""
    levels = (4, 2, 1)
    while len(levels) > 2 and min(shape[1], shape[2]) / levels[0] < MIN_COARSE_VOXELS:
        levels = levels[1:]
    return levels


def register_plane(volume: Volume, image, pixel_size_um: float, *, search: PlaneSearchRange | None = None,
                   landmarks=None, n_seeds: int = 12, n_screen: int = 16, n_candidates: int = 3,
                   levels: tuple[int, ...] | None = None, grid_level: int | None = None,
                   max_iterations: int = 100, sampling: float = 0.3, max_samples: int = 6000,
                   seed: int = 0, max_voxels: int = MAX_VOLUME_VOXELS) -> PlaneSearchResult:
    """Find the plane of ``image`` (a section) in ``volume``.

    Parameters
    ----------
    volume : Volume
        The 3D image ``(z, y, x)`` (micro-CT, another 3D modality); read whole at the working resolution.
    image : array, shape (h, w) or (h, w, 3) or (3, h, w)
        The section: RGB bright-field (H&E) or a grey image (e.g. rendered from spots, high = tissue).
        RGB is turned into total optical density, so stained tissue is high and white glass is 0.
    pixel_size_um : float
        µm per section image pixel.
    search : PlaneSearchRange, optional
        The grid of the coarse stage (tilts, in-plane rotation, depth) and the allowed scale.
    landmarks : (array (n, 2), array (n, 3)), optional
        ≥ 3 pairs of section pixels ``(x, y)`` and volume µm ``(x, y, z)``; their least-squares
        placement seeds the refinement instead of the grid.
    n_seeds : int
        How many distinct coarse-grid optima get a template-matched translation and a local grid.
    n_screen : int
        How many local-grid optima are optimised at the second level (screening).
    n_candidates : int
        How many of the screened candidates (best metric) are refined through the finer levels.
    levels : tuple of int, optional
        Pyramid, in voxels per working pixel (coarse → fine). Screening optimises the ``n_screen``
        grid starts at ``grid_level``; the best ``n_candidates`` are refined
        through the finer ones. Default :func:`default_levels`: (4, 2, 1), without the coarsest levels that
        would leave fewer than ``MIN_COARSE_VOXELS`` voxels across the volume's y or x extent.
    grid_level : int, optional
        The level (one of ``levels``, not the finest) at which the grid is scored; default the coarsest.
    max_iterations : int
        Optimiser iterations per level and candidate.
    sampling : float
        Fraction of section pixels Mattes MI samples per iteration (random, seeded) ...
    max_samples : int
        ... but at most this many.
    seed : int
        Seed of the grid's and the metric's sampling.
    max_voxels : int
        A larger volume (a fine micro-CT: 2000³ voxels are 32 GB as float32) is first averaged over ``b``³ blocks,
        ``b`` the smallest integer that brings it under this, and searched at that resolution (recorded as
        ``search['volume_binning']``); the placement is in µm either way.

    Returns
    -------
    PlaneSearchResult
    """
    t0 = time.perf_counter()
    search = PlaneSearchRange() if search is None else search
    if not isinstance(search, PlaneSearchRange):
        raise VoxelomeError(f"search must be a PlaneSearchRange, got {type(search).__name__}.")
    od = _check_inputs(volume, image, pixel_size_um)
    binning = max(1, int(np.ceil((float(np.prod(volume.shape)) / max_voxels) ** (1 / 3) - 1e-9)))
    volume = volume.binned(binning)
    levels = default_levels(volume.shape) if levels is None else tuple(int(v) for v in levels)
    grid_level = levels[0] if grid_level is None and levels else grid_level
    if len(levels) < 2 or any(v < 1 for v in levels) or list(levels) != sorted(set(levels), reverse=True):
        raise VoxelomeError(f"levels={levels!r} must be ≥ 2 strictly decreasing positive integers, e.g. (4, 2, 1).")
    if grid_level not in levels[:-1]:
        raise VoxelomeError(f"grid_level={grid_level!r} must be one of levels={levels!r} other than the finest.")
    gi = levels.index(grid_level)
    if not 0 < sampling <= 1:
        raise VoxelomeError(f"sampling={sampling!r} must be in (0, 1]; e.g. 0.3.")
    if int(n_seeds) < 1:
        raise VoxelomeError(f"n_seeds={n_seeds!r} must be ≥ 1.")
    if int(n_candidates) < 1 or int(n_screen) < int(n_candidates):
        raise VoxelomeError(f"n_candidates={n_candidates!r} must be ≥ 1 and n_screen={n_screen!r} ≥ n_candidates.")
    vox = float(min(volume.spacing_um))
    vol_arr = np.asarray(volume.data, dtype=np.float32)
    spacing, origin = np.asarray(volume.spacing_um), np.asarray(volume.origin_um)

    # pyramid: the volume shrunk by each level, the section resampled to the same µm per pixel
    pyr = []
    for f in levels:
        sec, off = _downsample_2d(od, max(f * vox, pixel_size_um) / pixel_size_um)
        pyr.append(dict(factor=f, vol=_volume_level(vol_arr, f), spacing=spacing * f, sec=sec,
                        g=pixel_size_um * od.shape[1] / sec.shape[1], off=off * pixel_size_um))
    for p in pyr:
        p["fixed"] = sitk_section(p["sec"], p["g"], p["off"])
        p["moving"] = sitk_volume(p["vol"], p["spacing"], origin)
    coarse = pyr[gi]
    timings = {"pyramid_s": time.perf_counter() - t0}

    # seed: tissue centroids
    sec_c_yx = _otsu_centroid(coarse["sec"], (coarse["g"],) * 2, (coarse["off"],) * 2)
    centre = np.array([sec_c_yx[1], sec_c_yx[0], 0.0])
    vol_c = _otsu_centroid(coarse["vol"], coarse["spacing"], origin)[::-1]  # (x, y, z) µm
    half_depth = 0.5 * float(volume.extent_um[0])

    if landmarks is not None:
        try:
            src, dst = landmarks
        except (TypeError, ValueError):
            raise VoxelomeError("landmarks must be a pair (section_px (n, 2), volume_xyz_um (n, 3)).") from None
        seed_pl = SectionPlacement.from_landmarks(src, dst)
        starts = [dict(source="landmarks", residual_um=float(seed_pl.residual_um),
                       tx=similarity_from_placement(seed_pl, pixel_size_um, centre[:2]))]
        stages = [pyr[1:] if len(pyr) > 2 else pyr]  # a two-level pyramid (a small volume) refines through both
    else:
        starts = grid_starts(search, coarse, origin, centre, vol_c, half_depth, int(n_screen), seed,
                              n_coarse=int(n_seeds))
        stages = [pyr[gi:gi + 1], pyr[gi + 1:]]
    timings["grid_s"] = time.perf_counter() - t0 - timings["pyramid_s"]

    for k, stage in enumerate(stages):
        for start in starts:
            if start.get("error"):
                continue
            try:
                for p in stage:
                    frac = min(sampling, max_samples / p["sec"].size)
                    reg = registration_method(p["factor"] * vox, max_iterations, frac, seed)
                    reg.SetInitialTransform(start["tx"], inPlace=True)
                    reg.Execute(p["fixed"], p["moving"])
                start["metric"] = -full_metric(stage[-1]["fixed"], stage[-1]["moving"], start["tx"])
            except RuntimeError as exc:  # ITK: too many samples left the volume
                start.update(metric=None, error=str(exc).strip().splitlines()[-1][:200])
                continue
            start["scale"] = float(start["tx"].GetScale())
            start["within_scale"] = bool(search.scale[0] <= start["scale"] <= search.scale[1])
        if k < len(stages) - 1:  # screening: keep the best few for the fine levels
            ok = [st for st in starts if st.get("within_scale")]
            keep = sorted(ok, key=lambda st: -st["metric"])[: int(n_candidates)]
            for st in starts:
                st["screen_metric"] = st.pop("metric", None)
                st["refined"] = any(st is kst for kst in keep)
        timings[f"stage{k}_s"] = time.perf_counter() - t0 - sum(timings.values())
    fine = [st for st in starts if st.get("within_scale") and st.get("refined", True) and not st.get("error")]
    if not fine:
        raise VoxelomeError(
            "plane search found no plane: every candidate left the volume or ended with a scale outside "
            f"{search.scale}. Check pixel_size_um and the volume spacing, widen PlaneSearchRange, or seed with landmarks.")
    best = max(fine, key=lambda st: st["metric"])
    final = best["tx"]
    placement = placement_from_similarity(final, pixel_size_um)
    g0 = pyr[-1]["g"]
    step = g0 / pixel_size_um
    h, w = int(od.shape[0] / step), int(od.shape[1] / step)
    yy, xx = np.meshgrid((np.arange(h) + 0.5) * step - 0.5, (np.arange(w) + 0.5) * step - 0.5, indexing="ij")
    sl = sample_points(volume, placement.map(np.column_stack([xx.ravel(), yy.ravel()]))).reshape(h, w)
    normal = placement.frame[2]
    tilt = float(np.degrees(np.arccos(min(abs(normal[2]), 1.0))))
    for st in starts:
        st.pop("tx")
    timings["total_s"] = time.perf_counter() - t0
    return PlaneSearchResult(placement, float(best["metric"]), sl, float(g0), float(final.GetScale()), tilt,
                             timings["total_s"], starts,
                             search=dict(asdict(search), levels=list(levels), n_seeds=int(n_seeds), n_screen=int(n_screen),
                                         n_candidates=int(n_candidates), timings=timings, volume_binning=binning,
                                         seeded_by="landmarks" if landmarks is not None else "grid"))


