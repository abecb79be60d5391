"""Cross-modal conditional diffusion for super-resolved spatial transcriptomics (Wang et al., MICCAI 2024).

Three objects (DESIGN.md): the denoiser network (:mod:`.network`), the diffusion process
(:mod:`.process`: schedule, loss, DDIM sampler from ``diffusers``) and the trainer
(:mod:`voxelome.train.superres_trainer`); :mod:`.normalise` maps expression pairs to the network's tensors,
:mod:`.calibration` turns sample spreads into calibrated intervals.
"""

from voxelome.models.diffusion.network import SuperResDenoiser, coexpression_graph
from voxelome.models.diffusion.process import GaussianDiffusion

__all__ = ["GaussianDiffusion", "SuperResDenoiser", "coexpression_graph"]
