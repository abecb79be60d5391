"""Datasets: the embedded default — a seeded synthetic micro-CT lung phantom with ground truth.

>>> from voxelome.datasets import make_lung_phantom, axial_placement
>>> ph = make_lung_phantom("small", seed=1)            # volume, truth (c, z, y, x), tissue, loadings
>>> adata = ph.cut_section(axial_placement(ph))        # simulated Visium section with ground truth
"""

from voxelome.datasets.phantom import (
    PRESETS,
    SIGNATURE_NAMES,
    LungPhantom,
    PhantomConfig,
    make_lung_phantom,
)
from voxelome.datasets.visium import (
    TRUE_LOADINGS_KEY,
    TRUE_SIGNATURES_KEY,
    axial_placement,
    cut_section,
    hex_grid,
    make_expression_model,
    oblique_placement,
)

__all__ = [
    "PRESETS",
    "SIGNATURE_NAMES",
    "TRUE_LOADINGS_KEY",
    "TRUE_SIGNATURES_KEY",
    "LungPhantom",
    "PhantomConfig",
    "axial_placement",
    "cut_section",
    "hex_grid",
    "make_expression_model",
    "make_lung_phantom",
    "oblique_placement",
]
