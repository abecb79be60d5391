"""The X-Pression patch CNN (Túrós et al., 2025): one 3D patch → one signature vector.

The published recipe: a plain 3D CNN on a 21×128×128-voxel micro-CT patch (1.6 µm voxels)
centred on each spot; four Conv3D layers with 3×9×9 kernels and 32→64→128→256 filters, each
followed by max-pooling; a dense layer of 64 units, dropout 0.3 and a softmax over signatures.
"""

from __future__ import annotations

import torch
from torch import nn

FILTERS = (32, 64, 128, 256)
KERNEL = (3, 9, 9)


class XPressionCNN(nn.Module):
    """Patch classifier-style regressor of niche proportions.

    Parameters
    ----------
    n_signatures : int
        Output size (softmax over signatures).
    patch_shape : tuple of int
        Patch size ``(z, y, x)`` in voxels; pooling is skipped along an axis once it is 1.
    dense_units : int
        Width of the dense layer (64 in the paper).
    dropout : float
        Dropout before the output layer (0.3 in the paper).

    Input ``(B, 1, z, y, x)`` float; output ``(B, n_signatures)`` log-proportions
    (log-softmax, so the KL loss is numerically stable; ``exp`` gives proportions).
    """

    def __init__(self, n_signatures: int, patch_shape=(21, 128, 128), dense_units: int = 64,
                 dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        shape = list(patch_shape)
        in_ch = 1
        for filters in FILTERS:
            layers += [nn.Conv3d(in_ch, filters, KERNEL, padding="same"), nn.ReLU(inplace=True)]
            pool = tuple(2 if s >= 2 else 1 for s in shape)
            if any(p > 1 for p in pool):
                layers.append(nn.MaxPool3d(pool))
            shape = [s // p for s, p in zip(shape, pool)]
            in_ch = filters
        self.features = nn.Sequential(*layers)
        flat = in_ch * shape[0] * shape[1] * shape[2]
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, dense_units), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(dense_units, n_signatures),
        )
        self.patch_shape = tuple(int(s) for s in patch_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(self.features(x)), dim=1)
