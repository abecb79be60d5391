"""The library field: count-likelihood fields also learn the spots' log library size, so expected *measured*
values away from the measured spots follow the local sequencing depth (seeded synthetic stack of shallow spots whose
depth varies 8-fold across x)."""

import numpy as np
import pytest
import torch

from voxelome.errors import VoxelomeError
from voxelome.evaluate.field_baselines import per_gene_scores
from voxelome.infer.field_ensemble import FieldEnsemble
from voxelome.infer.field_export import FittedField
from voxelome.models.field import TranscriptomicField
from voxelome.models.field.encoding import HashGridConfig
from voxelome.train.checkpoint import load_checkpoint, save_checkpoint
from voxelome.train.field_trainer import build_field_model, fit_field, make_field_config, suggest_jitter
from voxelome.train.point_data import PointData
from test_field_fit import GENES, HELD_OUT, log_norm, synthetic_stack


def depth(xyz):
    """Sequencing depth ×0.35 at x = 0 µm to ×2.8 at x = 1,000 µm."""
    return np.exp(np.log(8.0) * (xyz[:, 0] / 1000.0 - 0.5))


@pytest.fixture(scope="module")
def split():
    stack = synthetic_stack(seed=3, depth=depth, library=40.0)  # libraries of ~14 to 110 counts
    held = (stack.obs["section"] == HELD_OUT).to_numpy()
    return stack[~held].copy(), stack[held].copy()


@pytest.fixture(scope="module")
def runs(split, tmp_path_factory):
    """The same NB fit with and without the library field."""
    data = PointData.from_anndata(split[0], genes=GENES)
    out = {}
    for with_library in (True, False):
        config = make_field_config("cpu", iterations=500, batch_size=1024, n_levels=8, log2_table_size=14,
                                   jitter_um=suggest_jitter(data), seed=0, num_threads=2, model_library=with_library)
        out[with_library] = fit_field(data, config, tmp_path_factory.mktemp("lib") / "run", progress=False)
    return out


def test_library_field_predicts_held_out_measured_spots_better(runs, split):
    _, test = split
    xyz, measured = test.obsm["spatial_3d"], log_norm(test)
    with_lib, without = FittedField.load(runs[True]), FittedField.load(runs[False])
    assert with_lib.model.library_head and not without.model.library_head
    r_lib = per_gene_scores(with_lib.predict(xyz, value="measured"), measured)["mean_r"]
    r_median = per_gene_scores(without.predict(xyz, value="measured"), measured)["mean_r"]
    assert r_lib > r_median + 0.05, (r_lib, r_median)
    # the predicted library follows the true depth of the held-out section's spots
    library = with_lib.library(xyz)
    assert library.shape == (len(xyz),) and (library > 0).all()
    assert np.corrcoef(np.log(library), np.log(depth(xyz)))[0, 1] > 0.9
    with pytest.raises(VoxelomeError, match="no library field"):
        without.library(xyz)
    # an ensemble's library: the members' with a library field (here only one)
    ensemble = FieldEnsemble.from_members([runs[True], runs[False]])
    np.testing.assert_allclose(ensemble.library(xyz[:10]), library[:10], rtol=1e-6)
    # the denoised expression (rate) does not depend on depth: both fits agree with the truth about as well
    truth = test.obsm["truth"]
    r_rate = [per_gene_scores(f.predict(xyz), truth)["mean_r"] for f in (with_lib, without)]
    assert abs(r_rate[0] - r_rate[1]) < 0.03, r_rate
    # an explicit library still wins over the field's own
    own = np.asarray(test.X).sum(1)
    lo, hi = with_lib.box_um
    with torch.no_grad():
        direct = with_lib.model.expected_measurement(torch.tensor((xyz[:20] - lo) / (hi - lo), dtype=torch.float32),
                                                     torch.tensor(np.log(own[:20]), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(with_lib.predict(xyz[:20], value="measured", library=own[:20]), direct, rtol=1e-5)


def test_runs_without_the_setting_load_as_before(runs, tmp_path):
    """A checkpoint written before the library field existed (no ``model_library`` in its config) loads without
    a head and predicts measured values at the training median library."""
    ckpt = load_checkpoint(runs[False] / "checkpoint.pt")
    del ckpt["config"]["model_library"]
    run = tmp_path / "old"
    run.mkdir()
    save_checkpoint(run / "checkpoint.pt", **{k: ckpt[k] for k in ("model_state", "config", "meta", "iteration")})
    old, new = FittedField.load(run), FittedField.load(runs[False])
    assert not old.model.library_head and old.config.model_library is False
    pts = np.random.default_rng(0).uniform(0, 1000, (30, 3))
    np.testing.assert_array_equal(old.predict(pts, value="measured"), new.predict(pts, value="measured"))


def test_library_head_needs_a_count_likelihood():
    with pytest.raises(VoxelomeError, match="count likelihood"):
        TranscriptomicField(4, "gaussian", encoding=HashGridConfig(4, 2, 10), library_head=True)
    # the config's default (model_library=True) builds a head for count likelihoods only
    meta = {"genes": list("abcd"), "section_names": ["s0", "s1"], "backend": "torch", "table_dtype": "float32"}
    small = {"n_levels": 4, "log2_table_size": 10}
    assert build_field_model(make_field_config("cpu", likelihood="nb", **small), meta).library_head
    assert not build_field_model(make_field_config("cpu", likelihood="gaussian", **small), meta).library_head
    model = TranscriptomicField(4, "nb", encoding=HashGridConfig(4, 2, 10))
    with pytest.raises(VoxelomeError, match="no library head"):
        model.log_library(torch.rand(5, 3))


def test_objective_without_head_is_the_mean_negative_log_likelihood():
    torch.manual_seed(0)
    model = TranscriptomicField(4, "nb", n_sections=3, encoding=HashGridConfig(4, 2, 10))
    x, y = torch.rand(16, 3), torch.poisson(torch.full((16, 4), 3.0))
    log_lib, sec = torch.full((16,), 3.0), torch.randint(0, 3, (16,))
    torch.testing.assert_close(model.objective(x, y, log_lib, sec), -model.log_prob(x, y, log_lib, sec).mean())
    head = TranscriptomicField(4, "nb", n_sections=3, encoding=HashGridConfig(4, 2, 10), library_head=True)
    loc, pred = head.heads(x, sec)
    assert loc.shape == (16, 4) and pred.shape == (16,)
    expected = -(head.log_prob(x, y, log_lib, sec).sum(1)
                 + torch.distributions.Normal(pred, head.library_log_sigma.exp()).log_prob(log_lib)).mean() / 5
    torch.testing.assert_close(head.objective(x, y, log_lib, sec), expected)


def test_cli_predict_measured_values(runs, split, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from voxelome.cli import app

    _, test = split
    xyz = test.obsm["spatial_3d"][:15]
    field = FittedField.load(runs[True])
    table = pd.DataFrame(xyz, columns=["x", "y", "z"])
    table.to_csv(tmp_path / "pts.csv", index=False)
    runner = CliRunner()
    args = ["reconstruct", "predict", str(runs[True]), "--points", str(tmp_path / "pts.csv")]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "m.csv"), "--value", "measured"])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(pd.read_csv(tmp_path / "m.csv")[GENES].to_numpy(),
                               field.predict(xyz, value="measured"), rtol=1e-5, atol=1e-6)
    table["library"] = np.asarray(test.X).sum(1)[:15]
    table.to_csv(tmp_path / "pts_lib.csv", index=False)
    res = runner.invoke(app, [*args[:-1], str(tmp_path / "pts_lib.csv"), "--out", str(tmp_path / "l.csv"),
                              "--value", "measured"])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(pd.read_csv(tmp_path / "l.csv")[GENES].to_numpy(),
                               field.predict(xyz, value="measured", library=table["library"].to_numpy()),
                               rtol=1e-5, atol=1e-6)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "x.csv"), "--value", "mean"])
    assert res.exit_code == 2 and "--value 'mean'" in res.output


def test_config_checks_the_library_settings():
    with pytest.raises(VoxelomeError, match="model_library='yes'"):
        make_field_config("cpu", model_library="yes")
    with pytest.raises(VoxelomeError, match="library_weight"):
        make_field_config("cpu", library_weight=-1.0)
