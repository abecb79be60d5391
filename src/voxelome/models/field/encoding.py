"""Multi-resolution hash-grid encoding of 3D points (Müller et al., *Instant NGP*, SIGGRAPH 2022).

The encoding used by the Neural Transcriptomic Field (Gong et al., bioRxiv 2026): ``L`` grids of
resolution ``N_l = floor(N_min · b^l)`` cover the unit cube; each grid vertex owns an ``F``-vector of
trainable features, a point reads the trilinear interpolation of its cell's 8 vertices at every level,
and the ``L`` results are concatenated. Coarse levels, whose ``(N_l + 1)^3`` vertices fit in ``T``
entries, are indexed densely (one entry per vertex, no collision); finer levels hash vertices into
``T`` entries with the spatial hash ``(i·1) ⊕ (j·2654435761) ⊕ (k·805459861) mod T``. Colliding
vertices share an entry and its gradient; the MLP behind the encoding sorts them out.

Two backends with one interface (``forward(x01) -> (n, L·F)``): :class:`TorchHashGrid`, pure torch,
all levels and all 8 corners in one vectorised gather (CPU and GPU; tables in fp32, bf16 or fp16),
and :class:`TcnnHashGrid`, the fused CUDA kernel of ``tinycudann`` when it is installed and a GPU is
there. :func:`make_encoding` picks one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from voxelome.errors import VoxelomeError, check_choice

#: Primes of the Instant-NGP spatial hash (the first is 1: coherent along x for cache locality).
HASH_PRIMES = (1, 2654435761, 805459861)
BACKENDS = ("auto", "torch", "tcnn")
TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HashGridConfig:
    """Hash-grid hyper-parameters; the defaults are the published NTF / Instant-NGP ones."""

    n_levels: int = 12
    """Number of resolution levels ``L``."""
    n_features: int = 2
    """Features per level ``F`` (the encoding has ``L · F`` outputs)."""
    log2_table_size: int = 19
    """``log2 T``: entries of the hash table of one level (a coarse level uses fewer, one per vertex)."""
    base_resolution: int = 2
    """Cells per axis of the coarsest grid, ``N_min``."""
    per_level_scale: float = 1.5
    """Growth ``b`` of the resolution from one level to the next."""

    def __post_init__(self):
        for name, lo, hi in (("n_levels", 1, 32), ("n_features", 1, 8), ("log2_table_size", 4, 26),
                             ("base_resolution", 1, 1 << 20)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
                raise VoxelomeError(f"HashGridConfig.{name}={v!r} must be an integer in [{lo}, {hi}]; "
                                    f"the published default is {getattr(HashGridConfig, name)!r}.")
        if not (isinstance(self.per_level_scale, (int, float)) and 1.0 <= float(self.per_level_scale) <= 4.0):
            raise VoxelomeError(f"HashGridConfig.per_level_scale={self.per_level_scale!r} must be in [1, 4]; "
                                "the published default is 1.5.")

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features

    def resolutions(self) -> list[int]:
        """Cells per axis ``N_l`` of every level (``floor(N_min · b^l)``)."""
        return [int(np.floor(self.base_resolution * self.per_level_scale ** lv)) for lv in range(self.n_levels)]

    def to_dict(self) -> dict:
        return asdict(self)


def level_layout(config: HashGridConfig) -> tuple[list[int], list[int], list[bool]]:
    """Per level: resolution ``N_l``, table size and whether the level is hashed.

    A level whose ``(N_l + 1)^3`` vertices fit in ``T`` is dense (table size ``(N_l + 1)^3``);
    the others are hashed into ``T`` entries.
    """
    t = 1 << config.log2_table_size
    res = config.resolutions()
    sizes = [min((n + 1) ** 3, t) for n in res]
    hashed = [(n + 1) ** 3 > t for n in res]
    return res, sizes, hashed


class TorchHashGrid(nn.Module):
    """Pure-torch multi-resolution hash grid: one vectorised gather for all levels and corners.

    Parameters
    ----------
    config : HashGridConfig
        Levels, features, table size, resolutions.
    table_dtype : {"float32", "bfloat16", "float16"}
        Storage of the feature tables. Half precision halves memory and bandwidth on a GPU (the
        interpolation weights stay fp32); keep fp32 on a CPU and when the optimiser updates the
        tables in place (Adam on fp16 loses small updates).

    Notes
    -----
    Input ``x`` of shape ``(n, 3)`` must lie in ``[0, 1]^3`` (values outside are clamped).
    Output ``(n, L · F)`` float32 (level-major: level 0's F features first).
    """

    backend = "torch"

    def __init__(self, config: HashGridConfig = HashGridConfig(), table_dtype: str = "float32"):
        super().__init__()
        check_choice("table_dtype", table_dtype, TABLE_DTYPES)
        self.config = config
        res, sizes, hashed = level_layout(config)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.register_buffer("resolution", torch.tensor(res, dtype=torch.float32), persistent=False)
        self.register_buffer("res_int", torch.tensor(res, dtype=torch.int64), persistent=False)
        self.register_buffer("table_size", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        self.register_buffer("offset", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("hashed", torch.tensor(hashed), persistent=False)
        corners = torch.tensor([[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=torch.int64)
        self.register_buffer("corners", corners, persistent=False)  # (8, 3) offsets in (x, y, z)
        self.register_buffer("primes", torch.tensor(HASH_PRIMES, dtype=torch.int64), persistent=False)
        table = torch.empty(int(sum(sizes)), config.n_features).uniform_(-1e-4, 1e-4)
        self.table = nn.Parameter(table.to(TABLE_DTYPES[table_dtype]))

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def vertex_index(self, ijk: torch.Tensor) -> torch.Tensor:
        """Rows of the concatenated table of integer vertices ``ijk`` ``(..., L, m, 3)`` (x, y, z) → ``(..., L, m)``."""
        n1 = (self.res_int + 1)[:, None]
        dense = ijk[..., 0] + ijk[..., 1] * n1 + ijk[..., 2] * n1 * n1
        p = ijk * self.primes
        hashed = torch.bitwise_xor(torch.bitwise_xor(p[..., 0], p[..., 1]), p[..., 2]) % self.table_size[:, None]
        return torch.where(self.hashed[:, None], hashed, dense) + self.offset[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points ``x`` ``(n, 3)`` in ``[0, 1]^3`` → features ``(n, L · F)`` float32."""
        x = x.float().clamp(0.0, 1.0)
        pos = x[:, None, :] * self.resolution[None, :, None]                           # (n, L, 3)
        cell = torch.minimum(pos.floor().long(), (self.res_int - 1).clamp(min=0)[None, :, None])
        frac = pos - cell                                                                # (n, L, 3) in [0, 1]
        ijk = cell[:, :, None, :] + self.corners[None, None]                            # (n, L, 8, 3)
        rows = self.vertex_index(ijk)                                                    # (n, L, 8)
        feats = nn.functional.embedding(rows, self.table)                                # (n, L, 8, F)
        c = self.corners.to(frac.dtype)
        w = (c * frac[:, :, None, :] + (1 - c) * (1 - frac[:, :, None, :])).prod(-1)    # (n, L, 8)
        out = (feats.float() * w[..., None]).sum(2)                                      # (n, L, F)
        return out.reshape(len(x), -1)


class TcnnHashGrid(nn.Module):
    """The same encoding through ``tinycudann``'s fused CUDA kernel (needs a GPU and ``tinycudann``).

    Its table layout differs from :class:`TorchHashGrid` (tcnn pads and aligns tables), so a
    checkpoint reloads only with the backend it was trained with; the run folder records which.
    """

    backend = "tcnn"

    def __init__(self, config: HashGridConfig = HashGridConfig(), table_dtype: str = "float16"):
        super().__init__()
        import tinycudann as tcnn  # noqa: PLC0415 - optional dependency

        self.config = config
        self.enc = tcnn.Encoding(3, {"otype": "HashGrid", "n_levels": config.n_levels,
                                     "n_features_per_level": config.n_features,
                                     "log2_hashmap_size": config.log2_table_size,
                                     "base_resolution": config.base_resolution,
                                     "per_level_scale": float(config.per_level_scale)})

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x.float().clamp(0.0, 1.0)).float()


def tcnn_available() -> bool:
    """True when ``tinycudann`` imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """``auto`` → ``tcnn`` on a GPU with tinycudann installed, else ``torch``."""
    check_choice("backend", backend, BACKENDS)
    on_gpu = torch.device(device).type == "cuda"
    if backend == "auto":
        return "tcnn" if on_gpu and tcnn_available() else "torch"
    if backend == "tcnn" and not (on_gpu and tcnn_available()):
        raise VoxelomeError("backend='tcnn' needs a CUDA device and the tinycudann package "
                            "(pip install git+https://github.com/NVlabs/tiny-cuda-nn#subdirectory=bindings/torch); "
                            "use backend='torch' (works everywhere) or 'auto'.")
    return backend


def make_encoding(config: HashGridConfig = HashGridConfig(), backend: str = "torch",
                  table_dtype: str = "float32") -> nn.Module:
    """Build the hash-grid encoding with the named backend (``torch`` or ``tcnn``; resolve ``auto`` first)."""
    backend = check_choice("backend", backend, ("torch", "tcnn"))
    if backend == "tcnn":
        return TcnnHashGrid(config, table_dtype)
    return TorchHashGrid(config, table_dtype)
