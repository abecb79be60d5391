"""Point data: sparse streaming never densifies; clear errors on bad stacks."""

import resource

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from voxelome.errors import VoxelomeError
from voxelome.train.field_trainer import make_field_config
from voxelome.train.point_data import PointData, TensorRows


def _stack(n=300, g=6, sections=3, seed=0, sparse=True):
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, (n, g)).astype(np.float32)
    obs = pd.DataFrame({"section": [f"s{i % sections}" for i in range(n)]}, index=[f"c{i}" for i in range(n)])
    a = ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs,
                   var=pd.DataFrame(index=[f"Gene{i}" for i in range(g)]))
    a.obsm["spatial_3d"] = rng.uniform(0, 100, (n, 3))
    return a


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_large_sparse_matrix_is_never_densified():
    # 2,000,000 × 20,000 float32 would be 160 GB dense; 4 M non-zeros (2 per row) are ~48 MB as CSR.
    n, g, nnz = 2_000_000, 20_000, 4_000_000
    rng = np.random.default_rng(0)
    indptr = np.arange(0, nnz + 1, 2)
    m = sp.csr_matrix((rng.integers(1, 5, nnz).astype(np.float32), rng.integers(0, g, nnz).astype(np.int32),
                       indptr), shape=(n, g))
    obs = pd.DataFrame({"section": np.repeat(["a", "b", "c", "d"], n // 4)})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=m, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    adata.obsm["spatial_3d"] = np.zeros((n, 3)) + rng.random((n, 1))
    before = _peak_rss_mb()
    data = PointData.from_anndata(adata, genes=[f"g{i}" for i in range(0, g, 20)])  # 1,000 genes
    rows = data.to_tensors("cpu")
    idx = torch.from_numpy(rng.integers(0, n, 4096))
    batch = rows(idx)
    assert batch.shape == (4096, 1000)
    np.testing.assert_array_equal(batch.numpy(), data.rows(idx.numpy()))
    grown = _peak_rss_mb() - before
    assert grown < 1500, f"peak RSS grew by {grown:.0f} MB: the matrix was densified"


def test_tensor_rows_match_scipy_including_empty_rows():
    rng = np.random.default_rng(1)
    m = sp.random(50, 7, density=0.2, format="csr", random_state=1, dtype=np.float32)
    keep = np.ones(50, np.float32)
    keep[3] = 0
    m = (sp.diags(keep) @ m).tocsr()
    m.eliminate_zeros()
    assert m[3].nnz == 0
    idx = rng.integers(0, 50, 40)
    rows = TensorRows.from_values(m, "cpu")
    got = rows(torch.from_numpy(idx)).numpy()
    np.testing.assert_array_equal(got, m[idx].toarray())
    assert rows.data.data_ptr() == m.data.ctypes.data  # a float32 CSR is shared on the CPU, not copied
    m64 = m.copy()
    m64.indices = m64.indices.astype(np.int64)
    np.testing.assert_array_equal(TensorRows.from_values(m64, "cpu")(torch.from_numpy(idx)).numpy(), got)


def test_dense_input_and_gene_selection():
    a = _stack(sparse=False)
    d = PointData.from_anndata(a, genes=["Gene3", "Gene1"])
    assert d.genes == ["Gene3", "Gene1"] and d.is_counts
    np.testing.assert_array_equal(d.rows([0, 5]), a.X[[0, 5]][:, [3, 1]])
    np.testing.assert_allclose(d.library, a.X.sum(1))


def test_all_genes_in_order_keep_the_matrix_without_a_copy():
    a = _stack()
    d = PointData.from_anndata(a)
    assert d.values is a.X and d.genes == list(a.var_names)  # no column copy of a large CSR
    np.testing.assert_array_equal(d.rows([4, 1]), a.X[[4, 1]].toarray())
    assert PointData.from_anndata(a, genes=["Gene5", "Gene0"]).values is not a.X


def test_errors_are_actionable():
    a = _stack()
    b = a.copy()
    del b.obsm["spatial_3d"]
    with pytest.raises(VoxelomeError, match="spatial_3d"):
        PointData.from_anndata(b)
    with pytest.raises(VoxelomeError, match="Did you mean 'Gene1'"):
        PointData.from_anndata(a, genes=["Gene1", "gene1x"])
    with pytest.raises(VoxelomeError, match="none of the 2 requested genes"):
        PointData.from_anndata(a, genes=["FOO", "BAR"])
    c = a.copy()
    c.obsm["spatial_3d"][4, 2] = np.nan
    with pytest.raises(VoxelomeError, match="NaN"):
        PointData.from_anndata(c)
    with pytest.raises(VoxelomeError, match="1 section"):
        PointData.from_anndata(_stack(sections=1))
    with pytest.raises(VoxelomeError, match="Did you mean 'section'"):
        PointData.from_anndata(a, section_key="sectoin")
    with pytest.raises(VoxelomeError, match="Did you mean 'nb'"):
        make_field_config("cpu", likelihood="nbb")
    with pytest.raises(VoxelomeError, match="Did you mean 'iterations'"):
        make_field_config("cpu", iteration=5)
