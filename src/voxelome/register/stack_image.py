"""Stack serial H&E sections into one 3D image and frame (``voxelome register stack --images``).

Each section is read at a working resolution (default 20 µm/px), turned into stain-normalised
optical density (robust to stain-strength differences), and registered onto the previous,
already aligned section with SimpleITK: a rigid ``Euler2DTransform`` from several starting
rotations (moments-centred), Mattes mutual information restricted to the fixed tissue mask (tears and
folds in one section do not pull the fit), then optionally a B-spline (``BSplineTransform``, LBFGSB).
Outputs: the registered RGB stack ``(c, z, y, x)`` (OME-Zarr when asked), the tissue masks, the
per-section transforms, and — when spot tables are given — one AnnData with ``obsm['spatial_3d']``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from voxelome.errors import VoxelomeError, check_positive


@dataclass
class ImageStackResult:
    """Output of :func:`stack_images`.

    Attributes
    ----------
    rgb : ndarray, shape (3, z, y, x), uint8
        Registered sections on the reference grid (white outside).
    masks : ndarray, shape (z, y, x), bool
        Registered tissue masks.
    pixel_size_um : float
        Working pixel size (µm) of ``rgb`` and ``masks``.
    z_um : list of float
        Depth of each section.
    transforms : list of sitk.Transform
        Per section: reference µm → section µm (ITK convention, used to resample).
    adata : AnnData or None
        The stacked spots when spot tables were given.
    """

    rgb: np.ndarray
    masks: np.ndarray
    pixel_size_um: float
    z_um: list
    transforms: list
    names: list
    seconds: float
    adata: object = None
    metrics: dict = field(default_factory=dict)


def read_downsampled(path, pixel_size_um: float, work_um: float) -> tuple[np.ndarray, float]:
    """Read an RGB image at about ``work_um`` µm/px (JPEG DCT scaling, then area averaging).

    Returns the image ``(h, w, 3)`` uint8 and its exact µm per pixel.
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise VoxelomeError(f"section image '{path}' does not exist.")
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        full = im.size
        factor = work_um / pixel_size_um
        if factor >= 2:
            im.draft("RGB", (int(full[0] / factor), int(full[1] / factor)))  # JPEG: decode at 1/2, 1/4, 1/8
        im = im.convert("RGB")
        w = max(int(round(full[0] * pixel_size_um / work_um)), 8)
        h = max(int(round(full[1] * pixel_size_um / work_um)), 8)
        im = im.resize((w, h), Image.Resampling.BOX)
        arr = np.asarray(im)
    return arr, pixel_size_um * full[0] / w


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue of a bright-field image: optical density above Otsu, cleaned (holes filled, specks removed)."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    from voxelome.datasets.histology import optical_density

    od = ndimage.gaussian_filter(optical_density(rgb), 1.0)
    mask = od > threshold_otsu(od)
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    return remove_small_objects(mask, max_size=max(16, mask.size // 2000))


def _od_image(rgb, px_um):
    import SimpleITK as sitk

    from voxelome.datasets.histology import optical_density

    od = ndimage.gaussian_filter(optical_density(rgb), 1.0)
    od = od / (np.percentile(od, 99) + 1e-6)  # stain-strength normalisation
    img = sitk.GetImageFromArray(od.astype(np.float32))
    img.SetSpacing((px_um, px_um))
    return img


def _mask_image(mask, px_um):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing((px_um, px_um))
    return img


def register_pair(fixed_rgb, moving_rgb, px_um: float, *, bspline: bool = False, n_angles: int = 16,
                  seed: int = 0):
    """Transform (fixed µm → moving µm) aligning ``moving_rgb`` onto ``fixed_rgb`` (same pixel size).

    Rigid from ``n_angles`` starting rotations about the moments-matched centres (best Mattes MI wins),
    then an optional 6 × 6 B-spline. Returns ``(transform, metric)``.
    """
    import SimpleITK as sitk

    fixed, moving = _od_image(fixed_rgb, px_um), _od_image(moving_rgb, px_um)
    fmask = _mask_image(ndimage.binary_dilation(tissue_mask(fixed_rgb), iterations=3), px_um)
    base = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler2DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    best = None
    for angle in np.linspace(0, 2 * np.pi, n_angles, endpoint=False):
        tx = sitk.Euler2DTransform(base)
        tx.SetAngle(float(angle))
        reg = _reg(px_um, seed)
        reg.SetMetricFixedMask(fmask)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=4 * px_um, minStep=0.01 * px_um,
                                                     numberOfIterations=200, relaxationFactor=0.6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SetInitialTransform(tx, inPlace=True)
        try:
            reg.Execute(fixed, moving)
            m = _full_metric(fixed, moving, fmask, tx)  # all pixels: starts compared without sampling noise
        except RuntimeError:
            continue
        if best is None or m < best[0]:
            best = (m, tx)
    if best is None:
        raise VoxelomeError("image registration failed from every starting angle: the sections share too little "
                            "tissue; check the order and that both images are of the same block.")
    metric, rigid = best
    if not bspline:
        return rigid, float(metric)
    bs = sitk.BSplineTransformInitializer(fixed, [6, 6], order=3)
    comp = sitk.CompositeTransform([sitk.Euler2DTransform(rigid), bs])
    reg = _reg(px_um, seed)
    reg.SetMetricFixedMask(fmask)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=60)
    reg.SetInitialTransform(comp, inPlace=True)
    reg.SetMovingInitialTransform(sitk.Transform())
    try:
        reg.Execute(fixed, moving)
        return comp, float(reg.GetMetricValue())
    except RuntimeError as exc:  # keep the rigid result rather than fail the stack
        warnings.warn(f"B-spline refinement failed ({str(exc).strip().splitlines()[-1][:120]}); kept the rigid fit.",
                      stacklevel=2)
        return rigid, float(metric)


def _full_metric(fixed, moving, fmask, tx) -> float:
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricFixedMask(fmask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(sitk.Euler2DTransform(tx))
    return float(reg.MetricEvaluate(fixed, moving))


def _reg(px_um, seed):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)  # results must not depend on the thread count; images here are small
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.5, int(seed) + 1)  # ITK: seed 0 means "wall clock"
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _resample_rgb(rgb, px_um, ref_shape, tx, origin_um):
    import SimpleITK as sitk

    out = np.empty((3,) + tuple(ref_shape), np.uint8)
    for c in range(3):
        img = sitk.GetImageFromArray(rgb[..., c])
        img.SetSpacing((px_um, px_um))
        ref = sitk.Image(int(ref_shape[1]), int(ref_shape[0]), sitk.sitkUInt8)
        ref.SetSpacing((px_um, px_um))
        ref.SetOrigin(tuple(float(o) for o in origin_um))
        out[c] = sitk.GetArrayFromImage(sitk.Resample(img, ref, tx, sitk.sitkLinear, 255.0, sitk.sitkUInt8))
    return out


def _apply(tx, pts: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint(tuple(float(v) for v in q)) for q in pts], float).reshape(-1, 2)


def _inverse_points(tx, pts_um: np.ndarray, n_iter: int = 20, tol_um: float = 1e-4) -> np.ndarray:
    """Reference µm of section points: solve ``tx(p) = q`` for each point ``q`` of ``pts_um`` (n, 2).

    Starts from the analytic inverse where ITK has one (rigid: exact), then Newton steps with a
    finite-difference Jacobian (B-spline composites). A plain fixed-point iteration ``p ← p − (tx(p) − q)``
    diverges for rotations beyond 60° (|1 − e^{iθ}| > 1), which serial sections often need.
    """
    q = np.asarray(pts_um, float).reshape(-1, 2)
    try:
        p = _apply(tx.GetInverse(), q)
    except RuntimeError:  # e.g. a B-spline: no closed-form inverse
        p = q.copy()
    h = 1.0  # µm; transforms here are smooth on the scale of a working pixel (≥ several µm)
    for _ in range(n_iter):
        r = _apply(tx, p) - q
        if not len(r) or np.abs(r).max() < tol_um:
            break
        jx = (_apply(tx, p + [h, 0.0]) - (r + q)) / h
        jy = (_apply(tx, p + [0.0, h]) - (r + q)) / h
        jac = np.stack([jx, jy], axis=2)  # (n, 2 out, 2 in)
        p = p - np.linalg.solve(jac, r[..., None])[..., 0]
    return p


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks."""
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def stack_images(paths, z_um, *, pixel_size_um=None, adatas=None, names=None, work_um: float = 20.0,
                 bspline: bool = False, allow_flip: bool = False, margin: float = 0.15, zarr_out=None,
                 seed: int = 0) -> ImageStackResult:
    """Register serial H&E sections into one 3D image.

    Parameters
    ----------
    paths : list of path
        Section images (RGB; JPEG/PNG/TIFF) in cutting order.
    z_um : sequence of float
        Depth of each section (µm), strictly increasing.
    pixel_size_um : float or list of float, optional
        µm per image pixel; default from each AnnData's ``uns['voxelome']['pixel_size_um']``.
    adatas : list of AnnData, optional
        Spot tables of the sections (``obsm['spatial']`` in full-resolution image pixels); when given the
        result holds one stacked AnnData with ``obsm['spatial_3d']``.
    work_um : float
        Working pixel size (µm) of the registration and of the output image.
    bspline : bool
        Add a B-spline refinement after the rigid fit.
    allow_flip : bool
        Also try each section mirrored (mounted face down); the better fit (Mattes MI) is kept and
        recorded in ``metrics['flipped']``.
    margin : float
        Padding of the reference grid (fraction of the first section's size).
    zarr_out : path, optional
        Write the registered stack as a multiscale OME-Zarr ``(c, z, y, x)`` uint8.

    Returns
    -------
    ImageStackResult
    """
    from voxelome.register.stack_expression import check_stack_inputs

    paths = [Path(p) for p in paths]
    names, z = check_stack_inputs(paths, z_um, names or [p.stem for p in paths])
    check_positive("work_um", work_um)
    if adatas is not None and len(adatas) != len(paths):
        raise VoxelomeError(f"{len(adatas)} spot tables for {len(paths)} images; give one per image, in the same order.")
    if pixel_size_um is None:
        if adatas is None:
            raise VoxelomeError("pixel_size_um is needed (µm per image pixel) when no spot tables carry it.")
        pixel_size_um = [float(a.uns["voxelome"]["pixel_size_um"]) for a in adatas]
    sizes = list(np.broadcast_to(np.asarray(pixel_size_um, float), (len(paths),)))
    for s in sizes:
        check_positive("pixel_size_um", s)
    t0 = time.perf_counter()
    imgs = []
    for p, s in zip(paths, sizes):
        rgb, px = read_downsampled(p, s, work_um)
        imgs.append(rgb)
    px = work_um
    h0, w0 = imgs[0].shape[:2]
    pad = int(round(margin * max(h0, w0)))
    ref_shape = (h0 + 2 * pad, w0 + 2 * pad)
    origin = (-pad * px, -pad * px)
    import SimpleITK as sitk

    transforms = [sitk.Euler2DTransform()]
    aligned = [_resample_rgb(imgs[0], px, ref_shape, transforms[0], origin)]
    metrics = {"pair_metric": []}
    flipped = [False] * len(imgs)
    widths = [im.shape[1] for im in imgs]
    for k in range(1, len(imgs)):
        # section k onto section k-1 (both as read: no padding in the fit), then chained onto the reference:
        # reference µm → section k-1 µm (transforms[-1]) → section k µm (tx)
        tx, m = register_pair(imgs[k - 1], imgs[k], px, bspline=bspline, seed=seed)
        if allow_flip:  # a section may have been mounted face down: try its mirror image too
            tx_f, m_f = register_pair(imgs[k - 1], imgs[k][:, ::-1], px, bspline=bspline, seed=seed)
            if m_f < m:
                tx, m = tx_f, m_f
                imgs[k] = np.ascontiguousarray(imgs[k][:, ::-1])
                flipped[k] = True
        full = sitk.CompositeTransform([tx, transforms[-1]])
        full.FlattenTransform()
        transforms.append(full)
        aligned.append(_resample_rgb(imgs[k], px, ref_shape, full, origin))
        metrics["pair_metric"].append(m)
    rgb = np.stack(aligned, axis=1)  # (3, z, y, x)
    masks = np.stack([tissue_mask(np.moveaxis(a, 0, -1)) for a in aligned])
    metrics["dice_adjacent"] = [dice(masks[k - 1], masks[k]) for k in range(1, len(masks))]
    seconds = time.perf_counter() - t0
    metrics["flipped"] = flipped
    res = ImageStackResult(rgb, masks, px, z.tolist(), transforms, names, seconds, metrics=metrics)
    if adatas is not None:
        res.adata = _stack_spots(adatas, sizes, transforms, z, names, res, flipped, widths, px)
    if zarr_out is not None:
        from voxelome.io.omezarr import write_volume_ome_zarr

        dz = float(np.median(np.diff(z)))
        if not np.allclose(np.diff(z), dz, rtol=0.05):
            warnings.warn(f"sections are not evenly spaced (z = {z.tolist()} µm); the OME-Zarr uses the median spacing "
                          f"{dz:g} µm — the exact depths are in the AnnData (uns['voxelome']['stack']['z_um']).",
                          stacklevel=2)
        write_volume_ome_zarr(zarr_out, rgb, spacing_um_zyx=(dz, px, px), origin_um_zyx=(float(z[0]),) + origin,
                              channel_names=["R", "G", "B"], overwrite=True)
    return res


def _stack_spots(adatas, sizes, transforms, z, names, res, flipped, widths, px):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from voxelome.constants import SPATIAL_3D_KEY, SPATIAL_KEY, UNS_KEY
    from voxelome.register.stack_expression import STACK_KEY, common_genes

    genes = common_genes(adatas)
    blocks = []
    for k, (a, s, tx) in enumerate(zip(adatas, sizes, transforms)):
        sec_um = np.asarray(a.obsm[SPATIAL_KEY], float) * s
        if flipped[k]:  # mirrored about the working image's centre column
            sec_um[:, 0] = (widths[k] - 1) * px - sec_um[:, 0]
        ref_um = _inverse_points(tx, sec_um)
        b = ad.AnnData(X=sp.csr_matrix(a[:, genes].X), obs=pd.DataFrame(index=[f"{names[k]}:{i}" for i in a.obs_names]),
                       var=pd.DataFrame(index=pd.Index(genes)))
        b.obs["section"] = names[k]
        b.obsm[SPATIAL_KEY] = np.asarray(a.obsm[SPATIAL_KEY], float)
        b.obsm[SPATIAL_3D_KEY] = np.column_stack([ref_um, np.full(len(ref_um), z[k])])
        blocks.append(b)
    out = ad.concat(blocks, merge="first")
    out.obs["section"] = pd.Categorical(out.obs["section"], categories=names)
    out.uns[UNS_KEY] = {STACK_KEY: {
        "sections": list(names), "z_um": [float(v) for v in z], "method": "image", "seconds": res.seconds,
        "work_pixel_size_um": res.pixel_size_um, "dice_adjacent": res.metrics["dice_adjacent"],
        "flipped": [bool(f) for f in flipped],
        "transforms_itk": [_tx_text(t) for t in transforms],
        "transform_doc": "per section: ITK transform (reference µm -> section µm), SimpleITK text; spots use its inverse"}}
    return out


def _tx_text(tx) -> str:
    import os
    import tempfile

    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "t.tfm")
        sitk.WriteTransform(tx, p)
        return Path(p).read_text()
