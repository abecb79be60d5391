"""Checking the cutting order of serial sections from their expression (``register order``, issue 3)."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.constants import SPATIAL_KEY
from voxelome.datasets import axial_placement
from voxelome.errors import VoxelomeError
from voxelome.register.section_order import EXACT_MAX, best_order, check_section_order, path_score

HER2ST = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
Z_SLICES = (3, 8, 13, 18, 23, 28)  # axial sections of the 32-slice test phantom, 50 µm apart


def _brute_force(sim):
    n = len(sim)
    return max(path_score(sim, p) for p in itertools.permutations(range(n)))


def test_best_order_is_the_exact_optimum_for_small_stacks():
    rng = np.random.default_rng(0)
    for n in (3, 5, 7):
        a = rng.random((n, n))
        sim = (a + a.T) / 2
        np.fill_diagonal(sim, np.nan)
        order = best_order(sim)
        assert sorted(order) == list(range(n))
        assert path_score(sim, order) == pytest.approx(_brute_force(sim))
        assert order.index(0) <= (n - 1) / 2  # oriented: the first given section in the first half


def test_best_order_recovers_a_shuffled_band_beyond_the_exact_size():
    n = EXACT_MAX + 6
    perm = np.random.default_rng(1).permutation(n)
    depth = np.empty(n)
    depth[perm] = np.arange(n)  # section perm[k] lies at depth k
    sim = -np.abs(depth[:, None] - depth[None, :])  # alike in proportion to closeness
    np.fill_diagonal(sim, np.nan)
    order = best_order(sim)
    assert order in (list(perm), list(perm[::-1]))


def _rotated(adata, angle_deg, shift_um):
    b = adata.copy()
    px = float(b.uns["voxelome"]["pixel_size_um"])
    xy = np.asarray(b.obsm[SPATIAL_KEY], float) * px
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    b.obsm[SPATIAL_KEY] = ((xy - xy.mean(0)) @ r.T + xy.mean(0) + np.asarray(shift_um)) / px
    return b


@pytest.fixture(scope="module")
def phantom_sections(phantom):
    """Axial sections in depth order, each turned and shifted on its slide (so the order check must align them)."""
    rng = np.random.default_rng(0)
    return [_rotated(phantom.cut_section(axial_placement(phantom, z), seed=k), rng.uniform(-60, 60),
                     rng.uniform(-200, 200, 2)) for k, z in enumerate(Z_SLICES)]


def test_shuffled_phantom_sections_are_put_back_in_depth_order(phantom_sections):
    names = [f"z{z}" for z in Z_SLICES]
    perm = [3, 0, 5, 1, 4, 2]
    with pytest.warns(UserWarning, match="does not follow the given order"):
        check = check_section_order([phantom_sections[i] for i in perm], [names[i] for i in perm])
    assert check.suggested in (names, names[::-1])
    assert not check.consistent and check.gain > 0.2
    assert check.similarity.shape == (6, 6) and np.allclose(check.similarity, check.similarity.T, equal_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the true order raises no order warning
        right = check_section_order(phantom_sections, names)
    assert right.consistent and right.gain == 0.0 and right.suggested == names
    assert right.given_score > 1.2 * check.given_score  # neighbours in depth are more alike than shuffled ones
    # each section's most alike other section is one of its depth neighbours
    assert all(p["closest"] in names[max(0, i - 1):i] + names[i + 1:i + 2] for i, p in enumerate(right.sections))


def test_order_check_rejects_what_it_cannot_judge(phantom_sections):
    with pytest.raises(VoxelomeError, match="at least 3 sections"):
        check_section_order(phantom_sections[:2])
    with pytest.raises(VoxelomeError, match="unique, one per section"):
        check_section_order(phantom_sections[:3], ["a", "b"])
    with pytest.raises(VoxelomeError, match="n_genes"):
        check_section_order(phantom_sections[:3], n_genes=0)


@pytest.mark.skipif(not HER2ST.exists(), reason="needs ../shared/data/her2st")
def test_her2st_patient_b_numbering_is_flagged_and_c_is_not():
    """Real serial sections: C's numbers follow its expression; B's do not (B2 resembles B6, B1 resembles B3)."""
    from voxelome.io.legacy_st import read_legacy_st

    def read(patient):
        names = sorted(p.name.split(".")[0] for p in (HER2ST / "ST-cnts").glob(f"{patient}*.tsv.gz"))
        return [read_legacy_st(HER2ST / "ST-cnts" / f"{s}.tsv.gz", HER2ST / "ST-spotfiles" / f"{s}_selection.tsv",
                               library_id=s) for s in names], names

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="gene sets differ")
        c = check_section_order(*read("C"), warn=False)
        b = check_section_order(*read("B"), warn=False)
    assert c.consistent and c.gain < 0.1
    assert not b.consistent and b.gain > 0.3
    per = {p["section"]: p for p in b.sections}
    assert per["B2"]["closest"] == "B6" and per["B1"]["closest"] == "B3"


def test_cli_register_order_and_the_check_in_register_stack(phantom_sections, tmp_path):
    from voxelome.io.sections import write_h5ad

    files = []
    for z, a in zip(Z_SLICES, phantom_sections):
        files.append(tmp_path / f"z{z}.h5ad")
        write_h5ad(a, files[-1])
    shuffled = [files[i] for i in (3, 0, 5, 1, 4, 2)]
    runner = CliRunner()
    r = runner.invoke(app, ["register", "order", *map(str, shuffled), "--out", str(tmp_path / "order.json"),
                            "--figure", str(tmp_path / "order.png")])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(tmp_path / "order.png").size[0] > 500
    saved = json.loads((tmp_path / "order.json").read_text())
    names = [f"z{z}" for z in Z_SLICES]
    assert saved["suggested"] in (names, names[::-1]) and saved["consistent"] is False
    assert len(saved["similarity"]) == 6 and saved["similarity"][0][0] is None
    fewer = tmp_path / f"z{Z_SLICES[1]}_fewer_genes.h5ad"  # one section without one gene: the stack uses the rest
    write_h5ad(phantom_sections[1][:, 1:].copy(), fewer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = runner.invoke(app, ["register", "stack", str(files[0]), str(fewer), *map(str, files[2:4]),
                                "--z", "0,50,100,150", "--out", str(tmp_path / "stack.h5ad")])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["order_check"]["consistent"] is True
    assert summary["order_check"]["suggested"] == [names[0], fewer.stem, *names[2:4]]
    said = [str(w.message) for w in caught if "gene sets differ" in str(w.message)]
    assert len(said) == 1 and "using the" in said[0]  # once, by the stack; the order check does not repeat it
    r = runner.invoke(app, ["register", "order", *map(str, files[:2])])
    assert r.exit_code != 0 and "at least 3 sections" in r.output


def _stacked(phantom, depth_of):
    """The phantom's axial sections as one stack (aligned: their own µm positions), section k placed at depth_of[k]."""
    import anndata as ad

    parts = []
    for k, z in enumerate(Z_SLICES):
        a = phantom.cut_section(axial_placement(phantom, z), seed=k)
        px = float(a.uns["voxelome"]["pixel_size_um"])
        a.obsm["spatial_3d"] = np.column_stack([np.asarray(a.obsm[SPATIAL_KEY], float) * px,
                                                np.full(a.n_obs, depth_of[k])])
        a.obs["section"] = f"z{z}"
        parts.append(a)
    return ad.concat(parts, index_unique="-", merge="first")


def test_a_stacks_z_order_is_checked_where_it_lies(phantom):
    from voxelome.register.section_order import check_stack_order

    stack = _stacked(phantom, [50.0 * k for k in range(6)])
    right = check_stack_order(stack, warn=False)
    assert right.consistent and right.names == [f"z{z}" for z in Z_SLICES]
    # counts kept in layers['counts'] beside normalised X (scanpy's habit) are what the check reads
    stack.layers["counts"] = stack.X.copy()
    stack.X = np.log1p(np.asarray(stack.X.todense() if hasattr(stack.X, "todense") else stack.X, float))
    np.testing.assert_allclose(check_stack_order(stack, warn=False).similarity, right.similarity)
    wrong_depths = [50.0 * k for k in (3, 0, 5, 1, 4, 2)]
    with pytest.warns(UserWarning, match="does not follow the given order"):
        wrong = check_stack_order(_stacked(phantom, wrong_depths))
    assert wrong.names == [f"z{Z_SLICES[i]}" for i in np.argsort(wrong_depths)]  # read in the stack's z order
    assert not wrong.consistent and wrong.suggested in ([f"z{z}" for z in Z_SLICES], [f"z{z}" for z in Z_SLICES][::-1])


def test_reconstruct_fit_warns_when_z_order_and_expression_disagree(phantom, tmp_path):
    stack = _stacked(phantom, [50.0 * k for k in (3, 0, 5, 1, 4, 2)])
    path = tmp_path / "stack.h5ad"
    stack.write_h5ad(path)
    fast = ["--settings", "ntf", "--seeds", "1", "--n-genes", "3", "--set", "iterations=5", "--set", "batch_size=64",
            "--set", "n_levels=3", "--set", "log2_table_size=8"]
    res = CliRunner().invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "run"), *fast])
    assert res.exit_code == 0, res.output
    assert "does not follow their z order" in res.output
    _stacked(phantom, [50.0 * k for k in range(6)]).write_h5ad(path)  # the same sections at their true depths
    res = CliRunner().invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "run2"), *fast])
    assert res.exit_code == 0, res.output
    assert "does not follow" not in res.output


def test_best_order_keeps_the_given_order_when_a_pair_has_no_score():
    sim = np.array([[np.nan, 0.1, 0.5], [0.1, np.nan, np.nan], [0.5, np.nan, np.nan]])
    assert best_order(sim) == [0, 1, 2]
