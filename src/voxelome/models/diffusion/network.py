"""The denoiser of cross-modal super-resolution: noisy high-res map + conditions → noise / clean map.

After Wang et al., "Cross-modal diffusion modelling for super-resolved spatial transcriptomics" (MICCAI 2024),
shrunk to train on a CPU:

- **Disentangling encoders** (:class:`ModalityEncoder`): the expression condition (the low-res spot map
  upsampled to the output grid, plus where it was observed) and the histology features each go through their own
  small encoder that splits its features into a *shared* part (what both modalities describe: tissue structure)
  and a *specific* part. The shared parts are averaged, so the network cannot rely on one modality alone for them.
  (The paper adds auxiliary disentangling losses; they are not used here.)
- **Cross-modal adaptive modulation** (:class:`CrossModalModulation`): every residual block normalises its
  features and modulates them per pixel with a scale and shift predicted from the condition features (and per
  channel from the diffusion time), as in SPADE/FiLM.
- **Dynamic cross-attention** (:class:`TissueCrossAttention`): at the coarsest level, every position (cell-level
  query) attends to a small set of tissue-level tokens pooled from the condition features; a per-position gate
  decides how much of the tissue context it takes.
- **Gene co-expression graph layer** (:class:`GeneGraphLayer`): the last layer mixes gene channels along a fixed
  co-expression graph (edges from gene–gene correlation on the training maps) with learned edge weights, which
  start at zero (identity).

Shapes: maps are ``(B, G, H, W)`` (genes as channels, ``H, W`` the output grid); histology features
``(B, F, H, W)``; the diffusion time ``(B,)`` integer steps. Any ``H, W`` work (padded internally to a multiple
of ``2 ** (levels - 1)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from voxelome.errors import VoxelomeError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion steps ``t`` (B,) → ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _groups(ch: int) -> int:
    return math.gcd(ch, 8)


class ModalityEncoder(nn.Module):
    """One modality's condition → ``(shared, specific)`` feature maps, each ``(B, width, H, W)``."""

    def __init__(self, in_ch: int, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU())
        self.shared = nn.Conv2d(width, width, 1)
        self.specific = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.shared(h), self.specific(h)


class CrossModalModulation(nn.Module):
    """Normalise ``h`` then scale/shift it per pixel from the condition and per channel from the time."""

    def __init__(self, ch: int, cond_ch: int, emb_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch, affine=False)
        self.from_cond = nn.Conv2d(cond_ch, 2 * ch, 1)
        self.from_time = nn.Linear(emb_dim, 2 * ch)
        for layer in (self.from_cond, self.from_time):  # start as plain normalisation
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        gc, bc = self.from_cond(cond).chunk(2, dim=1)
        gt, bt = self.from_time(emb)[:, :, None, None].chunk(2, dim=1)
        return self.norm(h) * (1 + gc + gt) + bc + bt


class ModulatedResBlock(nn.Module):
    """Two 3×3 convolutions, each after a cross-modal modulation, with a residual connection."""

    def __init__(self, cin: int, cout: int, cond_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.mod1 = CrossModalModulation(cin, cond_ch, emb_dim)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.mod2 = CrossModalModulation(cout, cond_ch, emb_dim)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h, cond, emb):
        x = self.conv1(F.silu(self.mod1(h, cond, emb)))
        x = self.conv2(self.drop(F.silu(self.mod2(x, cond, emb))))
        return self.skip(h) + x


class TissueCrossAttention(nn.Module):
    """Cell-level positions attend to ``tokens × tokens`` tissue-level tokens pooled from the condition."""

    def __init__(self, ch: int, cond_ch: int, tokens: int = 6, heads: int = 4):
        super().__init__()
        if ch % heads:
            raise VoxelomeError(f"attention width {ch} must be divisible by heads={heads}.")
        self.tokens = int(tokens)
        self.q_norm = nn.GroupNorm(_groups(ch), ch)
        self.kv = nn.Linear(cond_ch, ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)
        self.gate = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -2.0)  # mostly closed at the start

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, c, y, x = h.shape
        q = self.q_norm(h).flatten(2).transpose(1, 2)  # (B, y·x, c)
        kv = self.kv(F.adaptive_avg_pool2d(cond, self.tokens).flatten(2).transpose(1, 2))  # (B, T, c)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        out = out.transpose(1, 2).reshape(b, c, y, x)
        return h + torch.sigmoid(self.gate(h)) * out


class GeneGraphLayer(nn.Module):
    """``y + (A ⊙ W) y`` over the gene channels: mixing along a fixed co-expression graph.

    Parameters
    ----------
    adjacency : array, shape (G, G)
        Non-negative edge weights (0 = no edge; the diagonal is ignored), e.g. from
        :func:`coexpression_graph`. Rows are normalised to sum to 1.
    """

    def __init__(self, adjacency):
        super().__init__()
        a = torch.as_tensor(np.asarray(adjacency, np.float32)).clone()
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise VoxelomeError(f"adjacency must be a square (G, G) matrix, got shape {tuple(a.shape)}.")
        a.fill_diagonal_(0.0)
        a = a / a.sum(1, keepdim=True).clamp_min(1e-8)
        self.register_buffer("adjacency", a)
        self.weight = nn.Parameter(torch.zeros_like(a))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + torch.einsum("gk,bkyx->bgyx", self.adjacency * self.weight, y)


def coexpression_graph(maps: list[np.ndarray], masks: list[np.ndarray], k: int = 8) -> np.ndarray:
    """A gene co-expression graph: each gene linked to its ``k`` most positively correlated genes.

    Parameters
    ----------
    maps : list of array, shape (G, H, W)
        Training maps (same genes, any grid).
    masks : list of bool array, shape (H, W)
        Where each map is measured.
    k : int
        Neighbours per gene (fewer if fewer genes are positively correlated).

    Returns
    -------
    array, shape (G, G)
        Symmetric adjacency with the correlations as weights, zero diagonal.
    """
    values = np.concatenate([m[:, mk] for m, mk in zip(maps, masks)], axis=1).astype(np.float64)
    g = values.shape[0]
    corr = np.nan_to_num(np.corrcoef(values)) if values.shape[1] > 1 else np.zeros((g, g))
    np.fill_diagonal(corr, -np.inf)
    adj = np.zeros((g, g), np.float32)
    for i in range(g):
        for j in np.argsort(corr[i])[::-1][:max(0, min(k, g - 1))]:
            if corr[i, j] > 0:
                adj[i, j] = adj[j, i] = corr[i, j]
    return adj


class SuperResDenoiser(nn.Module):
    """A small conditional U-Net: ``(x_t, t, low_up, low_mask, image) → (B, G, H, W)``.

    Parameters
    ----------
    n_genes : int
        Channels ``G`` of the expression maps.
    n_image_features : int
        Channels ``F`` of the histology features (0: expression-only conditioning).
    width : int
        Channels at full resolution (doubled at every coarser level).
    levels : int
        Resolution levels (each halves ``H, W``).
    adjacency : array (G, G), optional
        Co-expression graph for the output :class:`GeneGraphLayer` (None: no graph layer).
    tokens, heads : int
        Tissue tokens per side and attention heads of :class:`TissueCrossAttention` (tokens=0: none).
    deterministic : bool
        Build the same network without the noisy-map input and the time signal: a plain regressor of the
        clean map, the baseline "deterministic network of the same size".
    dropout : float
        Dropout inside the residual blocks.
    self_condition : bool
        Also take the previous clean-map estimate as input (self-conditioning, Chen et al., "Analog Bits",
        ICLR 2023): ``G`` more input channels of the first convolution; zeros when there is none yet.
    """

    def __init__(self, n_genes: int, n_image_features: int = 0, *, width: int = 32, levels: int = 2,
                 adjacency=None, tokens: int = 6, heads: int = 4, deterministic: bool = False,
                 dropout: float = 0.0, self_condition: bool = False):
        super().__init__()
        if n_genes < 1 or width < 8 or levels < 1:
            raise VoxelomeError(f"need n_genes ≥ 1, width ≥ 8, levels ≥ 1 (got {n_genes}, {width}, {levels}).")
        self.n_genes, self.n_image_features = int(n_genes), int(n_image_features)
        self.levels, self.deterministic = int(levels), bool(deterministic)
        self.self_condition = bool(self_condition) and not self.deterministic
        emb = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.expr_encoder = ModalityEncoder(n_genes + 1, width)
        self.image_encoder = ModalityEncoder(n_image_features, width) if n_image_features else None
        cond_ch = 3 * width  # shared + expression-specific + image-specific
        in_ch = n_genes + 1 + (0 if deterministic else n_genes) + (n_genes if self.self_condition else 0)
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1)
        chans = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        for i, c in enumerate(chans):
            self.down.append(ModulatedResBlock(chans[i - 1] if i else width, c, cond_ch, emb, dropout))
            if i < levels - 1:
                self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid1 = ModulatedResBlock(chans[-1], chans[-1], cond_ch, emb, dropout)
        self.attn = TissueCrossAttention(chans[-1], cond_ch, tokens, heads) if tokens else None
        self.mid2 = ModulatedResBlock(chans[-1], chans[-1], cond_ch, emb, dropout)
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            cout = chans[i - 1] if i else width
            self.up.append(ModulatedResBlock(chans[i] * 2, cout, cond_ch, emb, dropout))
        self.head = nn.Sequential(nn.GroupNorm(_groups(width), width), nn.SiLU(), nn.Conv2d(width, n_genes, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # start at "no residual": the bicubic base (clean-map models)
        nn.init.zeros_(self.head[-1].bias)
        self.graph = GeneGraphLayer(adjacency) if adjacency is not None else None
        self._width = width

    def condition(self, low_up: torch.Tensor, low_mask: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """Condition features ``(B, 3·width, H, W)`` from the two modalities (computed once per sampling run)."""
        shared_e, spec_e = self.expr_encoder(torch.cat([low_up, low_mask], 1))
        if self.image_encoder is None:
            return torch.cat([shared_e, spec_e, torch.zeros_like(spec_e)], 1)
        if image is None:
            raise VoxelomeError("this model was trained with histology features; pass image=(B, F, H, W).")
        shared_i, spec_i = self.image_encoder(image)
        return torch.cat([(shared_e + shared_i) / 2, spec_e, spec_i], 1)

    def forward(self, x_t: torch.Tensor | None, t: torch.Tensor, low_up: torch.Tensor, low_mask: torch.Tensor,
                image: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                x_self: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ``(B, G, H, W)`` (noise, clean map or velocity: the process decides what it means).

        ``cond`` may be passed precomputed (:meth:`condition`) to save work across sampling steps; ``x_self``
        is the previous clean-map estimate for a self-conditioned network (None = zeros).
        """
        h0, w0 = low_up.shape[-2:]
        m = 2 ** (self.levels - 1)
        pad = (0, (-w0) % m, 0, (-h0) % m)
        if any(pad):
            low_up, low_mask = F.pad(low_up, pad, mode="replicate"), F.pad(low_mask, pad)
            image = F.pad(image, pad, mode="replicate") if image is not None else None
            x_t = F.pad(x_t, pad) if x_t is not None else None
            x_self = F.pad(x_self, pad) if x_self is not None else None
            cond = F.pad(cond, pad, mode="replicate") if cond is not None else None
        if cond is None:
            cond = self.condition(low_up, low_mask, image)
        if self.deterministic:
            t = torch.zeros(low_up.shape[0], device=low_up.device)
            h = self.stem(torch.cat([low_up, low_mask], 1))
        else:
            parts = [x_t, low_up, low_mask]
            if self.self_condition:
                parts.append(x_self if x_self is not None else torch.zeros_like(x_t))
            h = self.stem(torch.cat(parts, 1))
        emb = self.time_mlp(timestep_embedding(t, self._width))
        conds = [cond]
        for _ in range(self.levels - 1):
            conds.append(F.avg_pool2d(conds[-1], 2))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, conds[i], emb)
            skips.append(h)
            if i < self.levels - 1:
                h = self.pool[i](h)
        h = self.mid1(h, conds[-1], emb)
        if self.attn is not None:
            h = self.attn(h, conds[-1])
        h = self.mid2(h, conds[-1], emb)
        for j, block in enumerate(self.up):
            i = self.levels - 1 - j
            if h.shape[-2:] != skips[i].shape[-2:]:
                h = F.interpolate(h, size=skips[i].shape[-2:], mode="nearest")
            h = block(torch.cat([h, skips[i]], 1), conds[i], emb)
        out = self.head(h)
        if self.graph is not None:
            out = self.graph(out)
        return out[..., :h0, :w0]
