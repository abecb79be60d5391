"""Dense 2D expression maps from histology (PixNet, arXiv 2503.01347): image → non-negative ``(G, y, x)`` map.

PixNet predicts a continuous expression map with an encoder–decoder; a spot's prediction is the map
summed over the spot's disk (:mod:`voxelome.models.spot_aggregation`), so the model is supervised on
measured spots only and can be queried at any spot size afterwards.

Layout: an **encoder** returning feature maps at increasing strides (pluggable: ``small`` — a from-scratch
CNN that trains on CPU — any ``timm:<name>`` or ``torchvision:<name>`` backbone when those packages are
installed, or an encoder registered with :func:`register_encoder`), optional weights from a local file
(nothing is downloaded), an FPN-style **decoder** that merges the features down to the output stride, and a
1×1 **head** with a softplus, scaled per gene, so the map is non-negative and starts at the training mean.

The map's unit: expression (the targets' unit, e.g. log1p-normalised counts) per output pixel of
``output_um`` µm; a region's value is the sum over the region. The head works on any ``(B, 3, y, x)``
image and, via :meth:`DenseExpressionNet2D.forward_volume`, slice-wise on ``(3, z, y, x)`` stacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from voxelome.errors import VoxelomeError, did_you_mean

#: Channel statistics images are normalised with (of RGB in [0, 1]; H&E-typical, fixed so every slide
#: is treated alike).
RGB_MEAN = (0.70, 0.55, 0.70)
RGB_STD = (0.18, 0.20, 0.15)

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make an encoder available by name.

    ``factory(**kwargs)`` must return a module whose ``forward(x)`` maps ``(B, 3, y, x)`` to a list of
    feature maps and which has attributes ``channels`` (list of int) and ``strides`` (list of int, input
    pixels per feature pixel, increasing), one per feature map.
    """
    _ENCODERS[str(name)] = factory


def _norm(ch: int) -> nn.Module:
    # Batch norm: local at prediction time (running statistics), so overlapping tiles agree.
    return nn.BatchNorm2d(ch)


class _Res(nn.Module):
    def __init__(self, ch: int, dilation: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.n1 = _norm(ch)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.n2 = _norm(ch)

    def forward(self, x):
        return F.gelu(x + self.n2(self.c2(F.gelu(self.n1(self.c1(x))))))


def _down(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), _norm(cout), nn.GELU())


class SmallCNNEncoder(nn.Module):
    """From-scratch CNN encoder: features at strides 2, 4, 8 and 16 of the input.

    Parameters
    ----------
    width : int
        Channels at stride 2 (doubled at strides 4 and 8, kept at 16).
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = int(width)
        self.channels = [w, 2 * w, 4 * w, 4 * w]
        self.strides = [2, 4, 8, 16]
        self.s1 = nn.Sequential(nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False), _norm(w), nn.GELU())
        self.s2 = nn.Sequential(_down(w, 2 * w), _Res(2 * w))
        self.s3 = nn.Sequential(_down(2 * w, 4 * w), _Res(4 * w), _Res(4 * w, dilation=2))
        self.s4 = nn.Sequential(_down(4 * w, 4 * w), _Res(4 * w), _Res(4 * w, dilation=2))

    def forward(self, x):
        f1 = self.s1(x)
        f2 = self.s2(f1)
        f3 = self.s3(f2)
        return [f1, f2, f3, self.s4(f3)]


class _TimmEncoder(nn.Module):
    def __init__(self, name: str):
        try:
            import timm
        except ImportError as exc:
            raise VoxelomeError(f"encoder='timm:{name}' needs the timm package (pip install timm, with the torch "
                                "you already have); or use encoder='small'.") from exc
        super().__init__()
        try:
            self.body = timm.create_model(name, pretrained=False, features_only=True)
        except Exception as exc:  # noqa: BLE001 - unknown model names etc.
            names = timm.list_models()
            raise VoxelomeError(f"timm cannot build encoder {name!r} ({exc}).{did_you_mean(name, names)}") from exc
        self.channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())

    def forward(self, x):
        return list(self.body(x))


class _TorchvisionEncoder(nn.Module):
    def __init__(self, name: str):
        try:
            import torchvision
            from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
        except ImportError as exc:
            raise VoxelomeError(f"encoder='torchvision:{name}' needs torchvision (pip install torchvision matching "
                                "your torch); or use encoder='small'.") from exc
        super().__init__()
        names = torchvision.models.list_models()
        if name not in names:
            raise VoxelomeError(f"torchvision has no model {name!r}.{did_you_mean(name, names)}")
        net = torchvision.models.get_model(name, weights=None)
        nodes = [n for n in get_graph_node_names(net)[1] if n.startswith("layer") and n.count(".") == 0]
        if not nodes:
            raise VoxelomeError(f"torchvision:{name} has no ResNet-style layer1…layer4 stages; use a timm name "
                                "(features_only) or register_encoder().")
        self.body = create_feature_extractor(net, return_nodes={n: n for n in nodes})
        with torch.no_grad():
            outs = self.body(torch.zeros(1, 3, 64, 64))
        self.channels = [int(v.shape[1]) for v in outs.values()]
        self.strides = [64 // int(v.shape[-1]) for v in outs.values()]

    def forward(self, x):
        return list(self.body(x).values())


register_encoder("small", SmallCNNEncoder)


def available_encoders() -> list[str]:
    """Registered encoder names (``timm:<name>`` and ``torchvision:<name>`` are accepted too)."""
    return sorted(_ENCODERS)


def build_encoder(spec: str, *, width: int = 16, weights: str | Path | None = None) -> nn.Module:
    """Build an encoder from its name.

    Parameters
    ----------
    spec : str
        ``small`` (default, from scratch), a registered name, ``timm:<model>`` or ``torchvision:<model>``.
    width : int
        Width of the ``small`` encoder.
    weights : path, optional
        Local file of encoder weights (a ``state_dict`` saved by ``torch.save``, or a ``.safetensors``
        file; a dict with a ``state_dict``/``model`` entry is unwrapped). voxelome never downloads
        weights: fetch the foundation-model file yourself and pass its path.
    """
    spec = str(spec)
    if spec.startswith("timm:"):
        enc = _TimmEncoder(spec[5:])
    elif spec.startswith("torchvision:"):
        enc = _TorchvisionEncoder(spec[12:])
    elif spec in _ENCODERS:
        enc = _ENCODERS[spec](width=width) if spec == "small" else _ENCODERS[spec]()
    else:
        raise VoxelomeError(f"encoder={spec!r} is not known; choose one of {available_encoders()}, "
                            f"'timm:<model>' or 'torchvision:<model>'.{did_you_mean(spec, _ENCODERS)}")
    if weights is not None:
        load_encoder_weights(enc, weights)
    return enc


def load_encoder_weights(encoder: nn.Module, path) -> None:
    """Load a local weights file into ``encoder`` (``weights_only`` loading; keys may carry a prefix)."""
    path = Path(path)
    if not path.is_file():
        raise VoxelomeError(
            f"encoder weights file '{path}' does not exist. voxelome does not download weights (no network "
            "access is assumed): download the backbone's weights (e.g. a pathology foundation model's "
            "pytorch_model.bin / model.safetensors) and pass its local path as encoder_weights=PATH "
            "(CLI: --set encoder_weights=PATH), or leave encoder_weights unset to train from scratch.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as exc:
        raise VoxelomeError(f"reading '{path}' needs the safetensors package (pip install safetensors).") from exc
    except Exception as exc:  # noqa: BLE001
        raise VoxelomeError(f"could not read encoder weights '{path}' ({exc}); expected a torch state_dict "
                            "or a .safetensors file.") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = encoder.state_dict()
    matched = {}
    for k, v in state.items():
        tail = k.split(".", 1)[-1]
        for cand in (k, "body." + k, tail, "body." + tail):
            if cand in own and tuple(own[cand].shape) == tuple(v.shape):
                matched[cand] = v
                break
    if len(matched) < max(1, len(own) // 2):
        raise VoxelomeError(f"encoder weights '{path}' match only {len(matched)} of {len(own)} encoder tensors; "
                            "is the file for this backbone?")
    encoder.load_state_dict(matched, strict=False)


class DenseExpressionNet2D(nn.Module):
    """PixNet-style dense expression network.

    Parameters
    ----------
    n_genes : int
        Output channels (genes or signatures).
    encoder : str
        See :func:`build_encoder`.
    output_stride : int
        Input pixels per output pixel (a power of two ≤ the encoder's finest stride × 8). With input
        at ``input_um`` µm/px the map has ``input_um · output_stride`` µm/px.
    decoder_width : int
        Channels of the decoder.
    width : int
        Width of the ``small`` encoder.
    encoder_weights : path, optional
        Local encoder weights file.
    output_scale : sequence of float, optional
        Per-gene value of an output pixel when the head's pre-activation is 0 (set by the trainer to the
        training mean per spot divided by the spot's area in output pixels, so training starts at the
        mean). Stored as a buffer.

    Input ``(B, 3, y, x)`` RGB in [0, 1] with ``y, x`` multiples of :attr:`divisor`; output
    ``(B, n_genes, y / output_stride, x / output_stride)``, non-negative.
    """

    def __init__(self, n_genes: int, *, encoder: str = "small", output_stride: int = 2, decoder_width: int = 32,
                 width: int = 16, encoder_weights=None, output_scale=None):
        super().__init__()
        self.encoder = build_encoder(encoder, width=width, weights=encoder_weights)
        strides = list(self.encoder.strides)
        self.output_stride = int(output_stride)
        if self.output_stride < 1 or self.output_stride & (self.output_stride - 1):
            raise VoxelomeError(f"output_stride={output_stride!r} must be a power of two (1, 2, 4, 8…).")
        d = int(decoder_width)
        # features finer than the output are not needed (the coarsest one is always used)
        self.used = [i for i, st in enumerate(strides) if st >= self.output_stride] or [len(strides) - 1]
        self.lateral = nn.ModuleList(nn.Conv2d(self.encoder.channels[i], d, 1) for i in self.used)
        self.smooth = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), _norm(d), nn.GELU(),
                                    nn.Conv2d(d, d, 3, padding=1, bias=False), _norm(d), nn.GELU())
        self.head = nn.Conv2d(d, int(n_genes), 1)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=1e-3)
        scale = torch.ones(int(n_genes)) if output_scale is None else torch.as_tensor(output_scale, dtype=torch.float32)
        self.register_buffer("output_scale", scale.reshape(-1).clone())
        self._divisor = max(strides)
        self.n_genes = int(n_genes)

    @property
    def divisor(self) -> int:
        """Input sides must be multiples of this (the encoder's coarsest stride)."""
        return max(self._divisor, self.output_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, y, x)`` RGB in [0, 1] → ``(B, G, y/s, x/s)`` non-negative map."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise VoxelomeError(f"input has shape {tuple(x.shape)}; expected (batch, 3, y, x) RGB.")
        if x.shape[-1] % self.divisor or x.shape[-2] % self.divisor:
            raise VoxelomeError(f"input of {x.shape[-2]}×{x.shape[-1]} px: both sides must be multiples of "
                                f"{self.divisor}; pad or crop the image.")
        mean = x.new_tensor(RGB_MEAN)[None, :, None, None]
        std = x.new_tensor(RGB_STD)[None, :, None, None]
        feats = self.encoder((x - mean) / std)
        out_size = (x.shape[-2] // self.output_stride, x.shape[-1] // self.output_stride)
        y = None
        for f, lat in zip(reversed([feats[i] for i in self.used]), reversed(list(self.lateral))):
            z = lat(f)
            if y is not None:
                z = z + F.interpolate(y, size=z.shape[-2:], mode="bilinear", align_corners=False)
            y = z
        if tuple(y.shape[-2:]) != out_size:
            y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
        y = self.smooth(y)
        return F.softplus(self.head(y)) * (self.output_scale / math.log(2.0))[None, :, None, None]

    @torch.no_grad()
    def forward_volume(self, stack: torch.Tensor, batch: int = 4) -> torch.Tensor:
        """Slice-wise prediction on an RGB image stack ``(3, z, y, x)`` → ``(G, z, y/s, x/s)``."""
        if stack.ndim != 4 or stack.shape[0] != 3:
            raise VoxelomeError(f"stack has shape {tuple(stack.shape)}; expected (3, z, y, x) RGB.")
        slices = stack.permute(1, 0, 2, 3)
        outs = [self(slices[i:i + batch]) for i in range(0, slices.shape[0], batch)]
        return torch.cat(outs).permute(1, 0, 2, 3)
