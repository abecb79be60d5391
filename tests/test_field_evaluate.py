"""``reconstruct evaluate``: sections held out, the field fitted without them, scored beside the baselines."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_field_fit import synthetic_stack
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.errors import VoxelomeError
from voxelome.evaluate.field_baselines import BASELINE_KS, per_gene_scores, section_depths
from voxelome.evaluate.field_holdout import baseline_scores, choose_held_out
from voxelome.infer.field_export import FittedField

#: a short fit (the synthetic stack's field converges far sooner than a real one)
FAST = ["--settings", "ntf", "--seeds", "1", "--set", "iterations=150", "--set", "batch_size=1024"]


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluate") / "stack.h5ad"
    synthetic_stack().write_h5ad(path)
    return path


def test_held_out_sections_are_inner_and_evenly_spread_unless_named():
    depths = {f"s{k}": 10.0 * k for k in range(9)}
    assert choose_held_out(depths, None, 2) == ["s1", "s7"]
    assert choose_held_out(depths, None, 3) == ["s1", "s4", "s7"]
    assert choose_held_out(depths, ["s0"], 2) == ["s0"]  # an outer section: extrapolation, when asked for
    with pytest.raises(VoxelomeError, match="Did you mean 's4'"):
        choose_held_out(depths, ["s44"], 2)
    with pytest.raises(VoxelomeError, match="≥ 3 sections"):
        choose_held_out({"a": 0.0, "b": 10.0}, None, 2)
    with pytest.raises(VoxelomeError, match="--max-sections 0"):
        choose_held_out(depths, None, 0)


def test_baselines_choose_k_without_looking_at_the_held_out_section():
    stack = synthetic_stack()
    sec = stack.obs["section"].to_numpy()
    y = np.log1p(1e4 * stack.X / stack.X.sum(1, keepdims=True))
    tr, te = sec != "z200", sec == "z200"
    xyz = stack.obsm["spatial_3d"]
    real = baseline_scores(xyz[tr], sec[tr], y[tr], xyz[te], y[te])
    shuffled = baseline_scores(xyz[tr], sec[tr], y[tr], xyz[te], np.random.default_rng(0).permutation(y[te]))
    assert {b: v["k"] for b, v in real.items()} == {b: v["k"] for b, v in shuffled.items()}
    for b, v in real.items():
        assert v["k"] in BASELINE_KS[b] and "z200" not in v["validation_sections"]
        assert v["r"] > shuffled[b]["r"] + 0.1  # the scores do read the held-out spots
    # two training sections (a three-section stack): nothing to validate on, each baseline keeps its grid's middle
    two = np.isin(sec, ["z150", "z250"])
    fixed = baseline_scores(xyz[two], sec[two], y[two], xyz[te], y[te])
    assert {b: (v["k"], v["val_r"]) for b, v in fixed.items()} == {
        b: (grid[len(grid) // 2], None) for b, grid in BASELINE_KS.items()}


def test_cli_evaluate_scores_the_held_out_section_it_never_fitted(stack_file, tmp_path):
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["reconstruct", "evaluate", str(stack_file), "--out", str(out), "--held-out", "z200",
                                 "--n-genes", "0", *FAST])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert summary["held_out"] == report["held_out"] == ["z200"]
    row = report["sections"][0]
    assert row["section"] == "z200" and not row["outer"] and row["n_spots"] == 676
    # the field was fitted without the held-out section ...
    train = ad.read_h5ad(out / "z200" / "train.h5ad")
    assert "z200" not in set(train.obs["section"]) and train.n_obs == 8 * 676
    # ... and its score is the per-gene r of its prediction against the section's measured log1p(counts per 10k)
    stack = ad.read_h5ad(stack_file)
    test = stack[stack.obs["section"] == "z200"]
    field = FittedField.load(out / "z200" / "run")
    counts = np.asarray(test.X, np.float64)
    truth = np.log1p(1e4 * counts / counts.sum(1, keepdims=True))[:, [list(test.var_names).index(g) for g in field.genes]]
    pred = field.predict(np.asarray(test.obsm["spatial_3d"], float), value="measured")
    assert row["field"]["r"] == pytest.approx(per_gene_scores(pred, truth)["mean_r"], abs=1e-9)
    # on this smooth 3D field, the field beats copying the nearest section (fixed seeds)
    assert row["field"]["r"] > row["baselines"]["nearest_section"]["r"] + 0.02
    assert row["field_minus_best_baseline"] == pytest.approx(
        row["field"]["r"] - max(b["r"] for b in row["baselines"].values()))
    genes = pd.read_csv(out / "per_gene.csv")
    assert len(genes) == len(field.genes) and set(genes.columns) >= {"gene", "field_r", "knn_3d_r"}
    assert (out / "evaluate.png").stat().st_size > 10_000
    # a rerun reuses the finished fit and gives the same report
    again = CliRunner().invoke(app, ["reconstruct", "evaluate", str(stack_file), "--out", str(out), "--held-out",
                                     "z200", "--n-genes", "0", *FAST])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "report.json").read_text())["sections"][0]["field"] == row["field"]
    # ... but not for another stack (its finished fits would be of other spots)
    other = ad.read_h5ad(stack_file)
    other.X = other.X * 2
    other.write_h5ad(tmp_path / "other.h5ad")
    r = CliRunner().invoke(app, ["reconstruct", "evaluate", str(tmp_path / "other.h5ad"), "--out", str(out),
                                 "--held-out", "z200", *FAST])
    assert r.exit_code == 2 and "other spots or counts" in r.output


def test_cli_evaluate_bad_input(stack_file, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["reconstruct", "evaluate", str(stack_file), "--out", str(tmp_path / "e"),
                            "--held-out", "z205", *FAST])
    assert r.exit_code == 2 and "Did you mean" in r.output
    two = ad.read_h5ad(stack_file)
    two = two[two.obs["section"].isin(["z000", "z050"])].copy()
    two.write_h5ad(tmp_path / "two.h5ad")
    r = runner.invoke(app, ["reconstruct", "evaluate", str(tmp_path / "two.h5ad"), "--out", str(tmp_path / "e2")])
    assert r.exit_code == 2 and "≥ 3 sections" in r.output
    r = runner.invoke(app, ["reconstruct", "evaluate", str(stack_file), "--out", str(tmp_path / "e3"),
                            "--section-key", "slice"])
    assert r.exit_code == 2 and "--section-key" in r.output


def test_section_depths_are_in_z_order():
    xyz = np.array([[0, 0, 30.0], [1, 1, 10.0], [2, 2, 20.0]])
    assert list(section_depths(xyz, np.array(["c", "a", "b"]))) == ["a", "b", "c"]


def test_cli_evaluate_holds_out_whole_z_slabs_of_volumetric_cells(stack_file, tmp_path):
    """Cells without sections (``--z-slabs``): the slabs ``fit --z-slabs`` makes are held out whole."""
    cells = ad.read_h5ad(stack_file)
    del cells.obs["section"]
    cells.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["reconstruct", "evaluate", str(tmp_path / "cells.h5ad"), "--out", str(out),
                                 "--z-slabs", "50", "--held-out", "z200-250um", "--n-genes", "0", *FAST])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    row = report["sections"][0]
    assert report["z_slab_um"] == 50 and row["section"] == "z200-250um" and row["n_spots"] == 676
    assert "z-slabs of 50 µm stand for sections" in r.output  # fitted as `fit --z-slabs` fits: no section effects
    train = ad.read_h5ad(out / "z200-250um" / "train.h5ad")
    assert not np.any(np.asarray(train.obsm["spatial_3d"])[:, 2] == 200.0) and train.n_obs == 8 * 676
    assert row["field"]["r"] > row["baselines"]["nearest_section"]["r"]
    r = CliRunner().invoke(app, ["reconstruct", "evaluate", str(tmp_path / "cells.h5ad"), "--out", str(out / "x")])
    assert r.exit_code == 2 and "--z-slabs" in r.output
