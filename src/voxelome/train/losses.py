"""Losses between predicted and measured niche proportions."""

from __future__ import annotations

import torch
from torch.nn import functional as F

EPS = 1e-6


def kl_to_targets(log_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean KL(target ‖ pred) over rows; ``log_pred`` and ``target`` are ``(n, k)``."""
    target = target.clamp_min(0)
    return (target * (torch.log(target + EPS) - log_pred)).sum(1).mean()


def footprint_means(prob_map: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Average a dense proportion map over spot footprints.

    Parameters
    ----------
    prob_map : tensor, shape (k, z, y, x)
        One crop's output map.
    grid : tensor, shape (1, n, m, 1, 3)
        Footprint sample points in ``grid_sample`` coordinates (x, y, z order, in [-1, 1]).

    Returns
    -------
    tensor, shape (n, k)
        Mean proportions inside each footprint (trilinear sampling, so sub-voxel footprints work).
    """
    vals = F.grid_sample(prob_map[None], grid.to(prob_map.dtype), mode="bilinear", align_corners=True,
                         padding_mode="border")  # (1, k, n, m, 1)
    return vals[0, :, :, :, 0].mean(2).T
