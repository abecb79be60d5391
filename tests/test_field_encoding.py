"""Hash-grid encoding: exact at grid vertices, continuous, collisions handled, gradients flow."""

import numpy as np
import pytest
import torch

from voxelome.errors import VoxelomeError
from voxelome.models.field import HashGridConfig, TorchHashGrid, TranscriptomicField, resolve_backend
from voxelome.models.field.encoding import level_layout


def _grid(**kw):
    torch.manual_seed(0)
    enc = TorchHashGrid(HashGridConfig(**kw))
    with torch.no_grad():
        enc.table.normal_()  # features of order 1 so that interpolation errors would show
    return enc


def test_layout_dense_then_hashed():
    res, sizes, hashed = level_layout(HashGridConfig())
    assert res[:4] == [2, 3, 4, 6] and len(res) == 12
    assert hashed == [False] * 10 + [True] * 2  # (N+1)^3 > 2^19 from N = 115 on
    assert sizes[0] == 27 and sizes[-1] == 2**19


def test_exact_at_vertices_of_dense_levels():
    enc = _grid(n_levels=4, log2_table_size=12)
    res, sizes, _ = level_layout(enc.config)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for lv, n in enumerate(res):
        ijk = np.stack(np.meshgrid(*[np.arange(n + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
        x = torch.tensor(ijk / n, dtype=torch.float32)
        out = enc(x).reshape(len(x), enc.config.n_levels, enc.config.n_features)[:, lv]
        rows = offsets[lv] + ijk[:, 0] + ijk[:, 1] * (n + 1) + ijk[:, 2] * (n + 1) ** 2
        np.testing.assert_allclose(out.detach().numpy(), enc.table.detach().numpy()[rows], atol=1e-5)


def test_continuous_across_cells_and_trilinear_inside():
    enc = _grid(n_levels=6, log2_table_size=10)  # the finest levels are hashed
    assert level_layout(enc.config)[2][-1]
    x = torch.rand(200, 3)
    eps = 1e-4
    with torch.no_grad():
        d = (enc(x + eps) - enc(x)).abs().max()
    assert float(d) < 0.05  # Lipschitz: no jumps, even across cell faces and hashed levels
    # along one axis inside one cell of the coarsest level the output is linear
    t = torch.linspace(0.05, 0.45, 5)[:, None]
    with torch.no_grad():
        line = enc(torch.cat([t, torch.full_like(t, 0.3), torch.full_like(t, 0.7)], 1))[:, :2]
    second = line[2:] - 2 * line[1:-1] + line[:-2]
    assert float(second.abs().max()) < 1e-5


def test_hash_collisions_share_entries_and_stay_in_range():
    enc = _grid(n_levels=8, log2_table_size=8)  # 256 entries: fine levels collide a lot
    res, sizes, hashed = level_layout(enc.config)
    lv = len(res) - 1
    assert hashed[lv]
    n = res[lv]
    ijk = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(n + 1)] * 3, indexing="ij"), -1).reshape(-1, 3))
    ijk_all = ijk[:, None, None, :].expand(-1, enc.config.n_levels, 1, 3)
    rows = enc.vertex_index(ijk_all)[:, lv, 0]
    lo = int(enc.offset[lv])
    assert int(rows.min()) >= lo and int(rows.max()) < lo + sizes[lv]
    assert len(torch.unique(rows)) < len(rows)  # (n+1)^3 vertices in 256 entries: collisions exist
    assert len(torch.unique(rows)) > 0.9 * sizes[lv]  # ... and the hash spreads them over the table
    y = enc(torch.rand(500, 3))
    assert torch.isfinite(y).all()


def test_gradients_reach_table_and_mlp():
    model = TranscriptomicField(5, "nb", n_sections=3, encoding=HashGridConfig(n_levels=4, log2_table_size=10))
    x = torch.rand(64, 3)
    y = torch.poisson(torch.full((64, 5), 3.0))
    loss = -model.log_prob(x, y, torch.zeros(64), torch.randint(0, 3, (64,))).mean()
    loss.backward()
    enc = model.field.encoding
    assert enc.table.grad is not None and float(enc.table.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in model.field.mlp.parameters())
    assert model.gene_params["log_theta"].grad is not None
    assert model.section_out.weight.grad is not None


def test_half_precision_tables_and_backend_choice():
    enc = TorchHashGrid(HashGridConfig(n_levels=3, log2_table_size=8), table_dtype="bfloat16")
    assert enc.table.dtype == torch.bfloat16 and enc(torch.rand(4, 3)).dtype == torch.float32
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(VoxelomeError, match="tinycudann"):
        resolve_backend("tcnn", "cpu")
    with pytest.raises(VoxelomeError, match="Did you mean 'torch'"):
        resolve_backend("torhc", "cpu")
    with pytest.raises(VoxelomeError, match="n_levels"):
        HashGridConfig(n_levels=0)
