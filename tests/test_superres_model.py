"""Cross-modal diffusion super-resolution: network, process, sampler, trainer, calibration, outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage

from voxelome.datasets.superres import SuperResPair
from voxelome.errors import VoxelomeError
from voxelome.models.diffusion.calibration import (
    conformal_multipliers, coverage, fit_intervals, gaussian_interval, predictive_interval, sample_crps,
    sample_interval,
)
from voxelome.models.diffusion.network import SuperResDenoiser, coexpression_graph
from voxelome.models.diffusion.normalise import block_consistency, upsample_low
from voxelome.models.diffusion.process import GaussianDiffusion
from voxelome.train.superres_config import make_superres_config
from voxelome.train.superres_model import TrainedSuperRes
from voxelome.train.superres_trainer import train_superres
from ngff import assert_ngff_image

F = 4  # factor


def _pair(seed: int, size: int = 32, genes: int = 4, image: bool = True) -> SuperResPair:
    """Sub-spot detail that the image predicts: ``high = softplus(a·img0 + b·img1)``, low = block means."""
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.normal(size=(2, size, size)), (0, 1.2, 1.2))
    img = ((img - img.mean((1, 2), keepdims=True)) / img.std((1, 2), keepdims=True)).astype(np.float32)
    coef = [(1.0, 0.0), (0.0, 1.0), (0.7, -0.7), (0.5, 0.5)][:genes]
    high = np.stack([np.log1p(np.exp(a * img[0] + b * img[1])) for a, b in coef]).astype(np.float32)
    mask = np.ones((size, size), bool)
    low = high.reshape(genes, size // F, F, size // F, F).mean((2, 4)).astype(np.float32)
    return SuperResPair(f"synthetic{seed}", [f"g{i}" for i in range(genes)], F, 20.0, high, mask, low,
                        np.ones((size // F, size // F), bool), img if image else None, truth=high.copy())


def _rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _train(tmp_path_factory, prediction_type):
    cfg = make_superres_config("superres-tiny", iterations=300, prediction_type=prediction_type, ema_decay=0.98,
                               lr=2e-3)
    run = tmp_path_factory.mktemp("superres") / "run"
    return train_superres([_pair(s) for s in range(4)], cfg, run), run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default parameterisation: the network predicts the clean map."""
    return _train(tmp_path_factory, "sample")


@pytest.fixture(scope="module")
def trained_epsilon(tmp_path_factory):
    """A noise-predicting model: its samples depend most on the number of steps."""
    return _train(tmp_path_factory, "epsilon")


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("n_feat", [0, 3])
def test_denoiser_shapes_on_odd_grids(deterministic, n_feat):
    g = 5
    adj = coexpression_graph([np.random.default_rng(0).random((g, 9, 7))], [np.ones((9, 7), bool)], k=2)
    net = SuperResDenoiser(g, n_feat, width=16, levels=3, adjacency=adj, tokens=3, heads=2,
                           deterministic=deterministic)
    b, h, w = 2, 13, 11
    x = None if deterministic else torch.randn(b, g, h, w)
    out = net(x, torch.tensor([3, 900]), torch.randn(b, g, h, w), torch.ones(b, 1, h, w),
              torch.randn(b, n_feat, h, w) if n_feat else None)
    assert out.shape == (b, g, h, w)
    assert torch.isfinite(out).all()


def test_gene_graph_links_correlated_genes_only():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, 50))
    maps = np.stack([base[0], base[0] + 0.1 * rng.normal(size=50), base[1], -base[1]])[:, None, :]
    adj = coexpression_graph([maps], [np.ones((1, 50), bool)], k=1)
    assert adj[0, 1] > 0.9 and adj[1, 0] == adj[0, 1]
    assert adj[2, 3] == 0 and np.all(np.diag(adj) == 0)  # anti-correlated genes are not linked


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_is_the_mean_over_measured_pixels_of_the_right_target(prediction_type):
    torch.manual_seed(0)
    net = SuperResDenoiser(3, 0, width=16, levels=2, tokens=0)
    proc = GaussianDiffusion(prediction_type=prediction_type)
    x0 = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4, :] = 1
    cond = {"low_up": torch.randn(2, 3, 8, 8), "low_mask": torch.ones(2, 1, 8, 8), "image": None}
    loss = proc.loss(net, x0, mask, cond, torch.Generator().manual_seed(1))
    # the same draws, by hand
    gen = torch.Generator().manual_seed(1)
    sched = proc.train_scheduler()
    t = torch.randint(0, 1000, (2,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}[prediction_type]
    err = (net(x_t, t, **cond) - target) ** 2
    assert loss.ndim == 0
    assert torch.allclose(loss, err[..., :4, :].mean(), rtol=1e-5)


def test_sampling_is_seeded_and_reproducible(trained):
    model, _ = trained
    p = _pair(10)
    a = model.sample(p, 3, seed=5)
    b = model.sample(p, 3, seed=5)
    c = model.sample(p, 3, seed=6)
    assert a.shape == (3, 4, 32, 32)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_trained_model_beats_bicubic_on_held_out_pair(trained):
    model, _ = trained
    p = _pair(11)
    pred = model.predict(p, 4, seed=0)
    bicubic = upsample_low(p.low, p.low_mask, F)
    assert _rmse(pred.mean, p.truth) < 0.8 * _rmse(bicubic, p.truth)


def test_more_steps_do_not_make_samples_worse(trained_epsilon):
    model, _ = trained_epsilon
    p = _pair(12)
    crps = [sample_crps(model.sample(p, 4, steps=k, seed=0), p.truth, p.high_mask) for k in (2, 5, 10, 20)]
    assert all(b <= a * 1.02 for a, b in zip(crps, crps[1:])), crps


def test_run_folder_reloads_to_the_same_samples(trained):
    model, run = trained
    again = TrainedSuperRes.load(run)
    p = _pair(13)
    assert np.array_equal(model.sample(p, 2, seed=1), again.sample(p, 2, seed=1))


def test_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path):
    cfg = make_superres_config("superres-tiny", iterations=40, checkpoint_every=10)
    pairs = [_pair(s, size=16) for s in range(2)]
    whole = train_superres(pairs, cfg, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop(rec):
        if rec["step"] == 19:
            raise Stop

    with pytest.raises(Stop):
        train_superres(pairs, cfg, tmp_path / "cut", log=stop)
    seen = []
    resumed = train_superres(pairs, cfg, tmp_path / "cut", log=lambda rec: seen.append(rec["step"]))
    assert seen == [29, 39]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(VoxelomeError, match="another config"):
        train_superres(pairs, make_superres_config("superres-tiny", iterations=40, checkpoint_every=10, lr=3e-3),
                       tmp_path / "cut")


def test_conformal_multipliers_on_a_known_answer():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 40, 40))
    std = np.exp(rng.normal(size=(3, 40, 40)) * 0.3)
    mask = np.ones((40, 40), bool)
    truth = mean + std * rng.normal(size=mean.shape)
    q = conformal_multipliers([mean], [std], [truth], [mask], level=0.9)
    assert np.allclose(q, 1.645, atol=0.06)  # the Gaussian 95 % quantile
    new_truth = mean + std * rng.normal(size=mean.shape)
    lo, hi = gaussian_interval(mean, std, q)
    assert 0.88 <= coverage(lo, hi, new_truth, mask) <= 0.92
    too_narrow = gaussian_interval(mean, std, 0.5)
    assert coverage(*too_narrow, new_truth, mask) < 0.45
    # sample quantile intervals of draws from the right distribution cover ~90 % as well
    samples = mean[None] + std[None] * rng.normal(size=(400, *mean.shape))
    assert 0.87 <= coverage(*sample_interval(samples, 0.9), new_truth, mask) <= 0.93
    with pytest.raises(VoxelomeError, match="level"):
        conformal_multipliers([mean], [std], [truth], [mask], level=1.5)


def test_fitted_intervals_cover_when_the_spread_is_informative_or_useless():
    rng = np.random.default_rng(2)
    mask = np.ones((50, 50), bool)
    mean = rng.normal(size=(2, 50, 50))
    std = np.exp(rng.normal(size=(2, 50, 50)) * 0.5)
    cal_truth = mean + std * rng.normal(size=mean.shape)
    new_truth = mean + std * rng.normal(size=mean.shape)
    for spread in (std, np.zeros_like(std)):  # the samples' spread right, or collapsed to zero
        fit = fit_intervals([mean], [spread], [cal_truth], [mask], level=0.9, seed=0)
        lo, hi = predictive_interval(mean, spread, fit["tau"], fit["multipliers"])
        assert 0.87 <= coverage(lo, hi, new_truth, mask) <= 0.93
    # with an informative spread, intervals are narrower where std is small
    fit = fit_intervals([mean], [std], [cal_truth], [mask])
    lo, hi = predictive_interval(mean, std, fit["tau"], fit["multipliers"])
    small = std < np.quantile(std, 0.25)
    assert (hi - lo)[small].mean() < 0.6 * (hi - lo)[~small].mean()


def test_crps_prefers_the_right_spread():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(1, 30, 30))
    mask = np.ones((30, 30), bool)
    right = rng.normal(size=(16, 1, 30, 30))
    collapsed = np.zeros((16, 1, 30, 30))
    assert sample_crps(right, truth, mask) < sample_crps(collapsed, truth, mask)
    assert np.isclose(sample_crps(collapsed[:1], truth, mask), np.abs(truth).mean())


def test_block_consistency_reproduces_the_observed_blocks():
    p = _pair(3)
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(2, *p.high.shape)).astype(np.float32)
    fixed = block_consistency(samples, p.low, p.low_mask, p.high_mask, F)
    means = fixed.reshape(2, 4, 8, F, 8, F).mean((3, 5))
    assert np.allclose(means, p.low[None], atol=1e-5)
    # within-block detail is untouched
    assert np.allclose(fixed - fixed.reshape(2, 4, 8, F, 8, F).mean((3, 5), keepdims=True).repeat(F, 3).repeat(F, 5)
                       .reshape(fixed.shape),
                       samples - samples.reshape(2, 4, 8, F, 8, F).mean((3, 5), keepdims=True).repeat(F, 3)
                       .repeat(F, 5).reshape(samples.shape), atol=1e-5)


def test_bad_pairs_are_refused_with_the_reason(trained, tmp_path):
    model, _ = trained
    with pytest.raises(VoxelomeError, match="histology"):
        model.sample(_pair(1, image=False), 1)
    p = _pair(1)
    p.genes = ["x", "y", "z", "w"]
    with pytest.raises(VoxelomeError, match="other genes"):
        model.sample(p, 1)
    with pytest.raises(VoxelomeError, match="empty"):
        train_superres([], make_superres_config("superres-tiny"), tmp_path / "r")
    with pytest.raises(VoxelomeError, match="prediction_type"):
        make_superres_config("superres", prediction_type="noise")
    with pytest.raises(VoxelomeError, match="base"):
        make_superres_config("superres", base="lanczos")
    with pytest.raises(VoxelomeError, match="calibrate a diffusion run"):
        det = train_superres([_pair(0, size=16)], make_superres_config("superres-tiny", iterations=2,
                                                                       deterministic=True), tmp_path / "det")
        det.calibrate([_pair(1, size=16)])


def test_outputs_open_as_ome_zarr_and_aggregate_to_labels(trained, tmp_path):
    from voxelome.infer.slide import read_slide_map
    from voxelome.infer.superres import aggregate_to_labels, write_superres
    from voxelome.io.omezarr import read_ome_zarr

    model, _ = trained
    p = _pair(14)
    pred = model.predict(p, 3, seed=0, keep_samples=True)
    out = write_superres(tmp_path / "sr.zarr", pred, p.genes, 20.0, masks=p.high_mask)
    data, px, names = read_slide_map(out / "mean.ome.zarr")
    assert names == p.genes and px == (20.0, 20.0)
    assert np.allclose(np.asarray(data), pred.mean)
    assert np.all(np.asarray(read_slide_map(out / "upper.ome.zarr")[0]) >= np.asarray(
        read_slide_map(out / "lower.ome.zarr")[0]))
    assert json.loads((out / "summary.json").read_text())["axes"] == "cyx"
    with pytest.raises(VoxelomeError, match="exists"):
        write_superres(tmp_path / "sr.zarr", pred, p.genes, 20.0)
    with pytest.raises(Exception):  # a write that fails midway (a 4D mask) keeps the old output, leaves no debris
        write_superres(tmp_path / "sr.zarr", pred, p.genes, 20.0, masks=np.ones((2, 2, 2, 2)), overwrite=True)
    assert np.allclose(np.asarray(read_slide_map(out / "mean.ome.zarr")[0]), pred.mean)
    for name in ("mean", "std", "lower", "upper"):
        assert_ngff_image(out / f"{name}.ome.zarr", "cyx")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["sr.zarr"]
    vol = write_superres(tmp_path / "vol.zarr", [pred, pred], p.genes, 20.0, section_spacing_um=16.0)
    arr, spacing, _ = read_ome_zarr(vol / "std.ome.zarr")
    assert_ngff_image(vol / "std.ome.zarr", "czyx")
    assert arr.shape == (4, 2, 32, 32) and tuple(spacing) == (16.0, 20.0, 20.0)
    # cells: 2×2-pixel labels; the per-label mean of the samples' mean equals the mean map's label mean
    labels = (np.arange(32)[:, None] // 2 * 16 + np.arange(32)[None] // 2 + 1).astype(int)
    cells = aggregate_to_labels(pred, labels, p.genes)
    assert cells.shape == (256, 4) and set(cells.layers) == {"std", "lower", "upper"}
    assert np.allclose(cells.X[0], pred.mean[:, :2, :2].mean((1, 2)), atol=1e-5)
    assert np.all(cells.layers["upper"] >= cells.layers["lower"])


def test_selected_steps_are_the_best_on_held_out_pairs_and_persist(trained, tmp_path):
    from voxelome.evaluate.superres_metrics import superres_scores

    shutil.copytree(trained[1], tmp_path / "run")  # the module's run folder stays untouched
    model = TrainedSuperRes.load(tmp_path / "run")
    held = [_pair(20), _pair(21)]
    model.calibrate(held)  # fitted for the config's 10 steps
    res = model.select_steps(held, steps=(4, 1, 2), metric="rmse")
    scores = {int(k): v for k, v in res["scores"].items()}
    assert sorted(scores) == [1, 2, 4]
    for k in scores:  # each candidate scored on the mean of the run's samples, the same noise per pair
        rmse = np.mean([superres_scores(model.sample(p, steps=k, seed=i).mean(0), p.high, p.high_mask)["rmse"]
                        for i, p in enumerate(held)])
        assert scores[k]["rmse"] == pytest.approx(rmse, rel=1e-6)
    assert res["steps"] == min(scores, key=lambda k: scores[k]["rmse"]) == model.sample_steps
    assert model.multipliers is None  # intervals fitted for 10 steps no longer hold
    again = TrainedSuperRes.load(tmp_path / "run")
    assert again.sample_steps == res["steps"] and again.multipliers is None
    model.calibrate(held)
    again = TrainedSuperRes.load(tmp_path / "run")
    assert again.multipliers is not None
    assert np.array_equal(again.sample(held[0], 2, seed=3), model.sample(held[0], 2, steps=res["steps"], seed=3))
    for kwargs, match in (({"metric": "mae"}, "metric"), ({"steps": (0, 5)}, "steps"),
                          ({"steps": (5000,)}, "steps")):
        with pytest.raises(VoxelomeError, match=match):
            model.select_steps(held, **kwargs)
    with pytest.raises(VoxelomeError, match="at least one held-out pair"):
        model.select_steps([])
