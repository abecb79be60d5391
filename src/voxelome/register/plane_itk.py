"""SimpleITK side of the plane search: images in µm, Similarity3D ↔ SectionPlacement, the registration method."""

from __future__ import annotations

import numpy as np

from voxelome.register.placement import SectionPlacement


def sitk_volume(arr: np.ndarray, spacing_zyx, origin_zyx):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin_zyx[::-1]))
    return img


def sitk_section(od: np.ndarray, pixel_um: float, offset_um: float):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(od[None], dtype=np.float32))
    img.SetSpacing((pixel_um, pixel_um, pixel_um))
    img.SetOrigin((offset_um, offset_um, 0.0))
    return img


def similarity_from_placement(placement: SectionPlacement, pixel_size_um: float, centre_um):
    """The ``Similarity3DTransform`` (section plane µm → volume µm) nearest to an affine ``placement``.

    ``centre_um`` (x, y) is the rotation centre in section µm.
    """
    import SimpleITK as sitk

    u, v, n = placement.frame
    rot = np.column_stack([u, v, n])
    scale = placement.pixel_size_um / pixel_size_um
    c = np.array([centre_um[0], centre_um[1], 0.0])
    world_c = placement.map([c[:2] / pixel_size_um])[0]
    tx = sitk.Similarity3DTransform()
    tx.SetCenter(tuple(c))
    tx.SetMatrix(tuple(rot.ravel()))
    tx.SetScale(float(scale))
    tx.SetTranslation(tuple(world_c - c))
    return tx


def placement_from_similarity(tx, pixel_size_um: float) -> SectionPlacement:
    """Section pixels → volume µm of a SimpleITK transform acting on section µm ``(x, y, 0)``."""
    o = np.array(tx.TransformPoint((0.0, 0.0, 0.0)))
    ex = np.array(tx.TransformPoint((pixel_size_um, 0.0, 0.0))) - o
    ey = np.array(tx.TransformPoint((0.0, pixel_size_um, 0.0))) - o
    return SectionPlacement(np.column_stack([ex, ey, o]))


def registration_method(level_um: float, max_iterations: int, sampling: float, seed: int):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)  # results must not depend on the thread count; images here are small
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling), int(seed) + 1)  # ITK: seed 0 means "wall clock"
    # on-the-fly gradients: a gradient image of the whole volume costs seconds per call and gains nothing here
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0 * level_um, minStep=0.01 * level_um,
                                                 numberOfIterations=int(max_iterations),
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    return reg


def full_metric(fixed, moving, tx) -> float:
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(sitk.Similarity3DTransform(tx))
    return float(reg.MetricEvaluate(fixed, moving))
