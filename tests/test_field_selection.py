"""Choosing a field's settings on held-out sections (``select_field``, ``reconstruct fit --settings select``), the default settings and the
default gene choice of ``reconstruct fit`` (``--n-genes``), on the seeded synthetic stack of test_field_fit."""

import json

import anndata as ad
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from test_field_fit import GENES, synthetic_stack
from voxelome.cli import app
from voxelome.errors import VoxelomeError
from voxelome.evaluate.field_baselines import per_gene_scores
from voxelome.infer.field_ensemble import FieldEnsemble
from voxelome.infer.field_export import FittedField
from voxelome.train.field_selection import (
    FIELD_CANDIDATES,
    PAIR_CANDIDATES,
    ROBUST_CANDIDATE,
    SELECTION_FILE,
    candidate_config,
    candidate_overrides,
    pca_loadings,
    select_field,
    split_section,
)
from voxelome.train.field_trainer import fit_field, suggest_jitter
from voxelome.train.point_data import PointData, variable_genes

TINY = dict(iterations=200, batch_size=512, n_levels=6, log2_table_size=12, seed=0)
#: a sensible smoothing and one that blurs the ~1 mm stack almost flat (σ = 12 spot pitches in-plane)
CANDIDATES = {"sharp": {"likelihood": "gaussian", "jitter_scale": (0.5, 1.0)},
              "blurred": {"likelihood": "gaussian", "jitter_scale": (12.0, 1.0)}}


@pytest.fixture(scope="module")
def stack():
    return synthetic_stack(z_planes=np.arange(0, 201, 50.0))  # 5 sections: z000 … z200


@pytest.fixture(scope="module")
def data(stack):
    return PointData.from_anndata(stack, genes=GENES)


def test_selection_keeps_the_best_held_out_score_and_resumes(data, tmp_path):
    res = select_field(data, tmp_path, candidates=CANDIDATES, max_validation_sections=1, progress=False, **TINY)
    assert res["validation_sections"] == ["z050"]  # an inner section; the ends are never held out
    assert res["best"] == "sharp" and res["mean_r"]["sharp"] > res["mean_r"]["blurred"] + 0.1
    assert res["overrides"]["likelihood"] == "gaussian"
    # the recorded score is what an independent fit on the other sections scores on z050
    code = data.section_names.index("z050")
    train, test = split_section(data, code)
    assert len(train) + len(test) == len(data) and (test.section == code).all() and (train.section != code).all()
    fit_field(train, candidate_config(train, CANDIDATES["sharp"], **TINY), tmp_path / "check", progress=False)
    pred = FittedField.load(tmp_path / "check").predict(test.xyz_um)
    y = test.values.toarray() if hasattr(test.values, "toarray") else np.asarray(test.values)
    truth = np.log1p(y / test.library[:, None] * 1e4)
    assert per_gene_scores(pred, truth)["mean_r"] == pytest.approx(res["scores"]["sharp"]["z050"], abs=1e-6)
    # the two candidates' averaged prediction is scored on the same spots (the ensemble of `--ensemble 2`)
    fit_field(train, candidate_config(train, CANDIDATES["blurred"], **TINY), tmp_path / "check2", progress=False)
    pair = (pred + FittedField.load(tmp_path / "check2").predict(test.xyz_um, value="measured")) / 2
    assert res["pair_mean_r"] == [{"members": ["sharp", "blurred"], "mean_r": pytest.approx(
        per_gene_scores(pair, truth)["mean_r"], abs=1e-6)}]
    assert res["top2_mean_r"] == res["pair_mean_r"][0]["mean_r"] and not (tmp_path / "predictions").exists()
    # jitter in µm = the suggestion for the whole stack × the candidate's scale
    assert res["overrides"]["jitter_um"] == pytest.approx(candidate_config(data, CANDIDATES["sharp"], **TINY).jitter_um)
    # resume: recorded scores are reused, not refitted (a planted score survives) …
    path = tmp_path / SELECTION_FILE
    record = json.loads(path.read_text())
    record["scores"]["blurred"]["z050"] = 0.99
    path.write_text(json.dumps(record))
    again = select_field(data, tmp_path, candidates=CANDIDATES, max_validation_sections=1, progress=False, **TINY)
    assert again["best"] == "blurred" and again["mean_r"]["blurred"] == 0.99
    assert again["scores"]["sharp"] == res["scores"]["sharp"]
    # … unless the comparison changed (other settings → every score recomputed)
    other = select_field(data, tmp_path, candidates=CANDIDATES, max_validation_sections=1, progress=False,
                         **{**TINY, "iterations": 201})
    assert other["best"] == "sharp" and other["mean_r"]["blurred"] < 0.99


def test_pca_loadings_are_the_principal_axes_of_log1p_values(data):
    y = np.asarray(data.values, np.float64)
    y = np.log1p(y / data.library[:, None] * 1e4)
    _, _, vt = np.linalg.svd(y - y.mean(0), full_matrices=False)
    w = pca_loadings(data, 3)
    assert w.shape == (3, len(GENES))
    np.testing.assert_allclose(np.abs((w * vt[:3]).sum(1)), 1.0, atol=1e-8)  # the same axes, up to sign
    low_rank = FIELD_CANDIDATES[next(k for k in FIELD_CANDIDATES if "low rank" in k)]
    assert candidate_config(data, low_rank).low_rank == "linear"  # signed axes need the linear output


def test_selection_bad_input(stack, data, tmp_path):
    two = PointData.from_anndata(stack[stack.obs["section"].isin(["z000", "z050"])].copy(), genes=GENES)
    with pytest.raises(VoxelomeError, match="≥ 3 sections"):
        select_field(two, tmp_path, candidates=CANDIDATES, progress=False, **TINY)
    values = PointData(data.xyz_um, data.section, data.section_names, data.genes,
                       np.log1p(np.asarray(data.values)), data.library, False)
    with pytest.raises(VoxelomeError, match="count likelihoods need raw counts"):
        select_field(values, tmp_path, candidates={"nb": {"likelihood": "nb"}}, progress=False, **TINY)
    with pytest.raises(VoxelomeError, match="max_validation_sections"):
        select_field(data, tmp_path, candidates=CANDIDATES, max_validation_sections=0, progress=False, **TINY)


def test_variable_genes_are_the_top_variance_log1p_genes(stack, tmp_path):
    X = np.asarray(stack.X, np.float64)
    y = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    detected = (X > 0).mean(0) >= 0.01
    var = np.where(detected, y.var(0), -np.inf)
    expected = [str(stack.var_names[i]) for i in np.argsort(-var, kind="stable")[:3]]
    assert variable_genes(stack, 3) == expected
    path = tmp_path / "stack.h5ad"
    stack.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")  # read 500 rows at a time, never whole
    assert variable_genes(backed, 3, chunk=500) == expected
    backed.file.close()
    assert len(variable_genes(stack, 100)) == stack.n_vars
    with pytest.raises(VoxelomeError, match="n_genes=0"):
        variable_genes(stack, 0)


def test_cli_fit_default_genes_and_select(stack, tmp_path):
    path = tmp_path / "stack.h5ad"
    stack.write_h5ad(path)
    runner = CliRunner()
    tiny = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    run = tmp_path / "run"
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(run), "--n-genes", "4", "--settings", "select",
                              "--select-sections", "1", "--ensemble", "1", "--seeds", "1", *tiny])
    assert res.exit_code == 0, res.output
    assert "most variable of 13 genes" in res.output and "chosen on held-out z050" in res.output
    assert FittedField.load(run).genes == variable_genes(stack, 4)
    selection = json.loads((run / "selection" / SELECTION_FILE).read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    cfg = config["config"]
    assert cfg["likelihood"] == selection["chosen_config"]["likelihood"]
    assert cfg["jitter_um"] == pytest.approx(selection["chosen_config"]["jitter_um"])
    assert set(selection["scores"]) == set(selection["mean_r"]) and len(selection["scores"]) >= 3
    res = runner.invoke(app, ["reconstruct", "store", str(path), "--out", str(tmp_path / "store"), "--n-genes", "4",
                              "--chunk", "700"])
    assert res.exit_code == 0, res.output
    assert PointData.from_store(tmp_path / "store").genes == variable_genes(stack, 4)
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "r2"), "--settings", "select",
                              "--jitter", "20"])
    assert res.exit_code == 2 and "--settings select chooses" in res.output
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "r3"), "--n-genes", "-1"])
    assert res.exit_code == 2 and "--n-genes -1" in res.output


def test_cli_default_and_ntf_settings(stack, tmp_path):
    path = tmp_path / "stack.h5ad"
    stack.write_h5ad(path)
    data = PointData.from_anndata(stack, genes=variable_genes(stack, 4))
    quick = ["--n-genes", "4", "--set", "iterations=5", "--set", "batch_size=64", "--set", "n_levels=3",
             "--set", "log2_table_size=8", "--seeds", "1"]
    runner = CliRunner()
    expected = {"robust": candidate_overrides(data, FIELD_CANDIDATES[ROBUST_CANDIDATE]),
                "ntf": {"likelihood": "nb", "jitter_um": suggest_jitter(data), "section_dim": 8}}
    for settings, want in expected.items():
        res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / settings), *quick,
                                  "--settings", settings])
        assert res.exit_code == 0, res.output
        cfg = yaml.safe_load((tmp_path / settings / "config.yaml").read_text())["config"]
        assert cfg["likelihood"] == want["likelihood"] and cfg["section_dim"] == want.get("section_dim", 0)
        assert cfg["jitter_um"] == pytest.approx(list(want["jitter_um"]))
    assert expected["robust"]["likelihood"] == "gaussian" and expected["robust"]["section_dim"] == 0
    # single fields still override the settings (the default then starts from NTF's recipe)
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "nb"), *quick,
                              "--likelihood", "nb", "--jitter", "30"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((tmp_path / "nb" / "config.yaml").read_text())["config"]
    assert "auto → ntf (--likelihood/--jitter/--set given)" in res.output
    assert cfg["likelihood"] == "nb" and cfg["jitter_um"] == [30.0, 30.0, 30.0] and cfg["section_dim"] == 8
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "x"), "--settings", "robst"])
    assert res.exit_code == 2 and "Did you mean 'robust'" in res.output
    # select: choose on held-out sections (what auto fits for values that are not counts on ≥ 3 sections)
    wide = [q if q != "batch_size=64" else "batch_size=4096" for q in quick]  # above the selection's cap
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "auto"), *wide,
                              "--settings", "select"])
    assert res.exit_code == 0, res.output
    picked = json.loads((tmp_path / "auto" / "selection" / SELECTION_FILE).read_text())
    assert picked["budget"] == [400, 2048] and len(picked["scores"]) == len(FIELD_CANDIDATES)
    # the chosen candidates are fitted with the schedule they were compared at, not the longer one asked for
    assert "compared at: 5 iterations × 2048 points" in res.output
    members = json.loads((tmp_path / "auto" / "ensemble.json").read_text())["members"]
    for member in members:
        cfg = yaml.safe_load((tmp_path / "auto" / member / "config.yaml").read_text())["config"]
        assert cfg["batch_size"] == 2048 and cfg["iterations"] == 5
    two = tmp_path / "two.h5ad"
    stack[stack.obs["section"].isin(["z000", "z050"])].copy().write_h5ad(two)
    res = runner.invoke(app, ["reconstruct", "fit", str(two), "--out", str(tmp_path / "two"), *quick])
    # the default (auto) on counts, two sections or more: the fixed pair (an NB field + a low-rank Gaussian one)
    assert res.exit_code == 0 and "--settings auto → pair (counts held in memory)" in res.output, res.output
    record = json.loads((tmp_path / "two" / "ensemble.json").read_text())
    assert record["names"] == list(PAIR_CANDIDATES) and "--settings pair" in record["rule"]
    cfgs = [yaml.safe_load((tmp_path / "two" / m / "config.yaml").read_text())["config"] for m in record["members"]]
    assert [c["likelihood"] for c in cfgs] == ["nb", "gaussian"] and cfgs[1]["low_rank"] == "linear"
    two_data = PointData.from_anndata(ad.read_h5ad(two), genes=variable_genes(ad.read_h5ad(two), 4))
    for cfg, name in zip(cfgs, PAIR_CANDIDATES):
        assert cfg["jitter_um"] == pytest.approx(list(candidate_overrides(two_data, FIELD_CANDIDATES[name])["jitter_um"]))
    mean = FieldEnsemble.load(tmp_path / "two").predict(two_data.xyz_um[:5])
    parts = [FittedField.load(tmp_path / "two" / m).predict(two_data.xyz_um[:5]) for m in record["members"]]
    np.testing.assert_allclose(mean, np.mean(parts, 0), rtol=1e-5)
    res = runner.invoke(app, ["reconstruct", "fit", str(two), "--out", str(tmp_path / "two2"), *quick,
                              "--settings", "pair", "--jitter", "30"])
    assert res.exit_code == 2 and "--settings pair fixes" in res.output


def test_ensemble_is_the_mean_of_its_members_in_every_query(data, stack, tmp_path):
    from voxelome.infer.field_ensemble import ENSEMBLE_FILE, FieldEnsemble, write_ensemble

    for i, (name, cand) in enumerate(CANDIDATES.items()):
        fit_field(data, candidate_config(data, cand, **TINY), tmp_path / "members" / str(i), progress=False)
    write_ensemble(tmp_path, ["members/0", "members/1"], list(CANDIDATES), rule="test")
    ens = FittedField.load(tmp_path)
    assert isinstance(ens, FieldEnsemble) and ens.member_names == list(CANDIDATES)
    one, two = (FittedField.load(tmp_path / "members" / str(i)) for i in range(2))
    pts = data.xyz_um[::7]
    for kwargs in ({}, {"value": "measured"}, {"section": data.section[::7]}):
        mean = (one.predict(pts, **kwargs) + two.predict(pts, **kwargs)) / 2
        np.testing.assert_allclose(ens.predict(pts, **kwargs), mean, rtol=1e-6)
        assert not np.allclose(one.predict(pts, **kwargs), two.predict(pts, **kwargs), atol=1e-3)  # a real average
    # the other queries go through predict: denoised spots and a volume equal the mean of the members' own
    adata = stack[::50].copy()
    np.testing.assert_allclose(ens.denoise(adata), (one.denoise(adata.copy()) + two.denoise(adata.copy())) / 2,
                               rtol=1e-6, atol=1e-6)
    summary = ens.write_volume(tmp_path / "v.ome.zarr", 60.0, chunks=(2, 8, 8), progress=False)
    import zarr

    vol = np.asarray(zarr.open_group(str(tmp_path / "v.ome.zarr"), mode="r")["0"])
    shape, spacing, origin = ens.volume_geometry(60.0)
    z, y, x = (o + s * np.arange(n) for o, s, n in zip(origin, spacing, shape))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    direct = np.moveaxis(ens.predict(np.stack([xx, yy, zz], -1)), -1, 0)
    np.testing.assert_allclose(vol, direct, rtol=1e-5, atol=1e-6)
    assert summary["shape_czyx"] == [len(GENES), *shape]
    assert ens.fingerprint not in (one.fingerprint, two.fingerprint)
    # members that cannot be averaged, or missing, are refused with the fix
    fit_field(PointData.from_anndata(stack, genes=GENES[:2]), candidate_config(data, CANDIDATES["sharp"], **TINY),
              tmp_path / "members" / "other", progress=False)
    with pytest.raises(VoxelomeError, match="other genes"):
        write_ensemble(tmp_path, ["members/0", "members/other"], ["a", "b"], rule="test")
    with pytest.raises(VoxelomeError, match="≥ 2 members"):
        write_ensemble(tmp_path, ["members/0"], ["a"], rule="test")
    record = json.loads((tmp_path / ENSEMBLE_FILE).read_text())
    (tmp_path / ENSEMBLE_FILE).write_text(json.dumps({**record, "members": ["members/0", "members/gone"]}))
    with pytest.raises(VoxelomeError, match="missing"):
        FittedField.load(tmp_path)


def test_cli_select_ensemble_default_and_single(stack, tmp_path):
    path = tmp_path / "stack.h5ad"
    stack.write_h5ad(path)
    runner = CliRunner()
    tiny = ["--n-genes", "4", "--select-sections", "1", "--settings", "select", "--knn-blend", "off",  # the mean alone
            *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]]
    run = tmp_path / "run"
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(run), *tiny])
    assert res.exit_code == 0 and "member 4/4" in res.output, res.output
    selection = json.loads((run / "selection" / SELECTION_FILE).read_text())
    record = json.loads((run / "ensemble.json").read_text())
    best2 = selection["ranking"][:2]  # the two best mean r on the held-out section, each fitted with seeds 0 and 1
    assert record["names"] == [f"{n}, seed {k}" for n in best2 for k in (0, 1)]
    assert selection["mean_r"][best2[0]] >= selection["mean_r"][best2[1]]
    for member, name in zip(record["members"], record["names"]):
        cfg = yaml.safe_load((run / member / "config.yaml").read_text())["config"]
        assert cfg["likelihood"] == FIELD_CANDIDATES[name.rsplit(", seed", 1)[0]].get("likelihood", "nb")
        assert cfg["seed"] == int(name[-1])
    points = tmp_path / "points.csv"
    points.write_text("x,y,z\n100,100,50\n300,200,120\n")
    res = runner.invoke(app, ["reconstruct", "predict", str(run), "--points", str(points), "--out",
                              str(tmp_path / "values.csv")])
    assert res.exit_code == 0, res.output
    import pandas as pd

    got = pd.read_csv(tmp_path / "values.csv")[variable_genes(stack, 4)].to_numpy()
    members = [FittedField.load(run / m) for m in record["members"]]
    xyz = np.array([[100, 100, 50], [300, 200, 120]], float)
    np.testing.assert_allclose(got, sum(m.predict(xyz) for m in members) / 4, rtol=1e-5)
    # --ensemble 1 --seeds 1 reuses the recorded selection and fits the best alone into RUN; the old record must not
    # shadow it
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(run), *tiny, "--ensemble", "1",
                              "--seeds", "1"])
    assert res.exit_code == 0, res.output
    assert not (run / "ensemble.json").exists() and type(FittedField.load(run)) is FittedField
    for bad, message in ((["--ensemble", "9"], "--ensemble 9 must be between 1 and the 5"),
                         (["--settings", "robust", "--ensemble", "3"], "applies to --settings select")):
        res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "bad"), *tiny, *bad])
        assert res.exit_code == 2 and message in res.output, res.output


def test_cli_named_genes_plus_the_most_variable_others(stack, tmp_path):
    path = tmp_path / "stack.h5ad"
    stack.write_h5ad(path)
    runner = CliRunner()
    quick = ["--settings", "ntf", "--set", "iterations=2", "--set", "batch_size=64", "--set", "n_levels=3",
             "--set", "log2_table_size=8"]
    named = [g for g in GENES if g not in variable_genes(stack, 4)][:1]  # a gene the top 4 would not include
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "u"), "--genes", named[0],
                              "--n-genes", "3", *quick])
    assert res.exit_code == 0 and "the 1 named genes and the 3 most variable others of 13" in res.output, res.output
    top = [g for g in variable_genes(stack, 4) if g not in named][:3]
    assert FittedField.load(tmp_path / "u").genes == named + top
    # --genes alone still means only those genes
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "n"), "--genes", named[0], *quick])
    assert res.exit_code == 0 and FittedField.load(tmp_path / "n").genes == named, res.output
    res = runner.invoke(app, ["reconstruct", "store", str(path), "--out", str(tmp_path / "store"), "--genes", named[0],
                              "--n-genes", "3"])
    assert res.exit_code == 0 and PointData.from_store(tmp_path / "store").genes == named + top, res.output


def test_cli_seeds_average_fits_of_other_seeds(stack, tmp_path):
    path = tmp_path / "stack.h5ad"
    stack.write_h5ad(path)
    runner = CliRunner()
    tiny = ["--n-genes", "4", "--knn-blend", "off",  # the members' mean alone (test_field_knn_blend: with kNN)
            *[a for k, v in TINY.items() if k != "seed" for a in ("--set", f"{k}={v}")]]
    run = tmp_path / "robust"
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(run), "--settings", "robust", *tiny,
                              "--set", "seed=3", "--seeds", "2"])
    assert res.exit_code == 0 and "member 2/2: robust, seed 4" in res.output, res.output
    record = json.loads((run / "ensemble.json").read_text())
    assert record["members"] == ["members/field", "members/field-seed-4"]
    assert record["names"] == ["robust, seed 3", "robust, seed 4"]
    seeds = [yaml.safe_load((run / m / "config.yaml").read_text())["config"]["seed"] for m in record["members"]]
    assert seeds == [3, 4]
    xyz = np.array([[100, 100, 50], [300, 200, 120]], float)
    members = [FittedField.load(run / m).predict(xyz) for m in record["members"]]
    assert np.abs(members[0] - members[1]).max() > 1e-3  # other seeds, other fits
    np.testing.assert_allclose(FittedField.load(run).predict(xyz), (members[0] + members[1]) / 2, rtol=1e-5)
    # with select: each of the --ensemble best candidates fitted with every seed
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "sel"), *tiny,
                              "--settings", "select", "--select-sections", "1", "--ensemble", "1", "--seeds", "2"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "sel" / "ensemble.json").read_text())
    assert len(record["members"]) == 2 and record["members"][1] == record["members"][0] + "-seed-1"
    assert record["names"][0].endswith("seed 0") and "2 seeds" in record["rule"]
    res = runner.invoke(app, ["reconstruct", "fit", str(path), "--out", str(tmp_path / "bad"), *tiny, "--seeds", "0"])
    assert res.exit_code == 2 and "--seeds 0 must be ≥ 1" in res.output, res.output


def test_fit_members_refuses_a_one_member_ensemble_and_bad_seeds(data, tmp_path):
    from voxelome.train.field_members import MemberSpec, fit_members
    from voxelome.train.field_trainer import make_field_config

    spec = MemberSpec("one", "field", make_field_config("cpu", **TINY))
    with pytest.raises(VoxelomeError, match="≥ 2 members"):
        fit_members(data, tmp_path, [spec], seeds=1, rule="test")
    with pytest.raises(VoxelomeError, match="seeds=0"):
        fit_members(data, tmp_path, [spec], seeds=0, rule="test")
