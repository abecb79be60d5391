"""The field: a hash-grid encoding of (x, y, z) followed by a small MLP (NTF: one hidden layer of 64)."""

from __future__ import annotations

import torch
from torch import nn


class NeuralField(nn.Module):
    """``f(x) = MLP(encoding(x))`` for points ``x`` in the unit cube.

    Parameters
    ----------
    encoding : nn.Module
        Maps ``(n, 3)`` points in ``[0, 1]^3`` to ``(n, encoding.out_dim)`` features
        (:func:`voxelome.models.field.encoding.make_encoding`).
    n_outputs : int
        Outputs per point (genes, or latent factors in the low-rank model).
    hidden : int
        Width of the hidden layers (64 in NTF).
    n_hidden_layers : int
        Number of hidden layers (1 in NTF); 0 makes the head linear in the features.
    """

    def __init__(self, encoding: nn.Module, n_outputs: int, hidden: int = 64, n_hidden_layers: int = 1):
        super().__init__()
        self.encoding = encoding
        layers: list[nn.Module] = []
        width = encoding.out_dim
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, n_outputs))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """``(n, 3)`` points in ``[0, 1]^3`` → ``(n, n_outputs)`` (float32 unless under autocast)."""
        return self.mlp(self.encoding(x01))
