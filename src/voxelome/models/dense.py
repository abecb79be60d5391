"""voxelome's dense 3D network: a volume block → a dense map of signature proportions.

Fully convolutional, so one forward pass predicts every output voxel of a window and
neighbouring outputs share computation — the reason it is far cheaper per output voxel than
one patch per prediction. In the spirit of PixNet (arXiv 2503.01347): the network predicts a
continuous map and is supervised only through its average inside each spot's footprint.

Layout: optional average-pool to the working input spacing → encoder (two stride-2 stages
with residual blocks, dilations widen the receptive field to ~30 working voxels) → decoder
back to the output stride with a skip connection → 1×1×1 head → softmax over signatures.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ChannelLayerNorm3d(nn.Module):
    """Layer norm over channels at every voxel of a ``(B, C, z, y, x)`` tensor (as in ConvNeXt)."""

    def __init__(self, ch: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None, None] + self.bias[:, None, None, None]


NORMS = ("batch", "layer", "group")


def _make_norm(kind: str, ch: int) -> nn.Module:
    # batch/layer keep the network local (an output voxel depends only on its receptive field), so
    # overlapping windows agree; group norm pools statistics over the whole window.
    if kind == "batch":
        return nn.BatchNorm3d(ch)
    if kind == "layer":
        return ChannelLayerNorm3d(ch)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, ch), ch)  # a group count that divides any width
    raise ValueError(f"norm={kind!r} must be one of {NORMS}.")


class _ResBlock(nn.Module):
    def __init__(self, ch: int, dilation: int = 1, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv3d(ch, ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm1 = _make_norm(norm, ch)
        self.conv2 = nn.Conv3d(ch, ch, 3, padding=1, bias=False)
        self.norm2 = _make_norm(norm, ch)

    def forward(self, x):
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(x + self.norm2(self.conv2(y)))


class DenseSignatureNet3D(nn.Module):
    """Dense signature map network.

    Parameters
    ----------
    n_signatures : int
        Output channels.
    width : int
        Channels of the first stage (doubled at each stride-2 stage).
    input_pool : int
        Average-pool factor applied first, turning the scan's voxels into working voxels
        (e.g. 5 for 1.6 µm micro-CT → 8 µm). 1 keeps the input spacing.
    output_stride : int
        Output voxel size in working voxels: 1, 2 or 4.
    norm : str
        Feature normalisation: ``batch``, ``layer`` (per voxel over channels) or ``group``.

    Input ``(B, 1, z, y, x)`` with every axis a multiple of :attr:`divisor`; output
    ``(B, n_signatures, z/f, y/f, x/f)`` proportions (softmax over channels) with
    ``f = input_pool * output_stride`` (:attr:`total_stride`).
    """

    def __init__(self, n_signatures: int, width: int = 24, input_pool: int = 1, output_stride: int = 2,
                 norm: str = "batch"):
        super().__init__()
        if output_stride not in (1, 2, 4):
            raise ValueError(f"output_stride={output_stride} must be 1, 2 or 4.")
        self.input_pool = int(input_pool)
        self.output_stride = int(output_stride)
        w1, w2, w3 = width, 2 * width, 4 * width

        def nrm(ch):
            return _make_norm(norm, ch)

        self.stem = nn.Sequential(nn.Conv3d(1, w1, 3, padding=1, bias=False), nrm(w1), nn.GELU())
        self.down1 = nn.Sequential(nn.Conv3d(w1, w2, 3, stride=2, padding=1, bias=False), nrm(w2), nn.GELU())
        self.stage1 = nn.Sequential(_ResBlock(w2, norm=norm), _ResBlock(w2, dilation=2, norm=norm))
        self.down2 = nn.Sequential(nn.Conv3d(w2, w3, 3, stride=2, padding=1, bias=False), nrm(w3), nn.GELU())
        self.stage2 = nn.Sequential(_ResBlock(w3, norm=norm), _ResBlock(w3, dilation=2, norm=norm),
                                    _ResBlock(w3, dilation=3, norm=norm))
        self.fuse2 = nn.Sequential(nn.Conv3d(w3 + w2, w2, 1, bias=False), nrm(w2), nn.GELU(), _ResBlock(w2, norm=norm))
        self.fuse1 = nn.Sequential(nn.Conv3d(w2 + w1, w1, 1, bias=False), nrm(w1), nn.GELU())
        out_ch = {1: w1, 2: w2, 4: w3}[self.output_stride]
        self.head = nn.Conv3d(out_ch, n_signatures, 1)

    @property
    def total_stride(self) -> int:
        """Input voxels per output voxel along each axis."""
        return self.input_pool * self.output_stride

    @property
    def divisor(self) -> int:
        """Every input axis must be a multiple of this."""
        return self.input_pool * 4

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_pool > 1:
            x = F.avg_pool3d(x, self.input_pool)
        s0 = self.stem(x)
        s1 = self.stage1(self.down1(s0))
        s2 = self.stage2(self.down2(s1))
        if self.output_stride == 4:
            return self.head(s2)
        f1 = self.fuse2(torch.cat([F.interpolate(s2, size=s1.shape[2:], mode="trilinear", align_corners=False), s1], 1))
        if self.output_stride == 2:
            return self.head(f1)
        f0 = self.fuse1(torch.cat([F.interpolate(f1, size=s0.shape[2:], mode="trilinear", align_corners=False), s0], 1))
        return self.head(f0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)
