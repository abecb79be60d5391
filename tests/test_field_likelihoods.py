"""Likelihoods against scipy / torch.distributions on known values."""

import numpy as np
import pytest
import torch
from scipy import stats

from voxelome.errors import VoxelomeError
from voxelome.models.field import likelihoods as lk

Y = torch.tensor([[0.0, 1.0, 5.0], [2.0, 0.0, 40.0]])
MU = torch.tensor([[0.5, 2.0, 4.0], [3.0, 0.1, 30.0]])
THETA = torch.tensor([0.7, 3.0, 20.0])


def test_poisson_matches_scipy():
    got = lk.poisson_log_prob(Y, torch.log(MU)).numpy()
    np.testing.assert_allclose(got, stats.poisson.logpmf(Y.numpy(), MU.numpy()), rtol=1e-5, atol=1e-5)


def test_nb_matches_scipy():
    got = lk.nb_log_prob(Y, torch.log(MU), torch.log(THETA)).numpy()
    theta = THETA.numpy()[None]
    p = theta / (theta + MU.numpy())  # scipy: n successes = θ, success prob θ / (θ + μ)
    np.testing.assert_allclose(got, stats.nbinom.logpmf(Y.numpy(), theta, p), rtol=1e-5, atol=1e-5)


def test_zinb_is_mixture_of_zero_and_nb():
    logit = torch.tensor([-1.0, 0.5, 2.0])
    got = lk.zinb_log_prob(Y, torch.log(MU), torch.log(THETA), logit).numpy()
    pi = 1 / (1 + np.exp(-logit.numpy()))[None]
    theta = THETA.numpy()[None]
    nb = stats.nbinom.pmf(Y.numpy(), theta, theta / (theta + MU.numpy()))
    want = np.log(np.where(Y.numpy() == 0, pi, 0) + (1 - pi) * nb)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gaussian_matches_torch_distributions():
    mean, log_sigma = torch.randn(2, 3), torch.tensor([-1.0, 0.0, 0.7])
    y = torch.randn(2, 3)
    want = torch.distributions.Normal(mean, torch.exp(log_sigma)).log_prob(y)
    torch.testing.assert_close(lk.gaussian_log_prob(y, mean, log_sigma), want)


def test_log_prob_dispatch_uses_library_and_names():
    log_rate = torch.log(MU / 10.0)
    got = lk.log_prob("poisson", Y, log_rate, {}, torch.full((2,), float(np.log(10.0))))
    torch.testing.assert_close(got, lk.poisson_log_prob(Y, torch.log(MU)))
    with pytest.raises(VoxelomeError, match="Did you mean 'zinb'"):
        lk.check_likelihood("zinbb")


def _expected_log1p_by_sum(pmf, lib):
    return float((pmf * np.log1p(1e4 * np.arange(len(pmf)) / lib)).sum())


@pytest.mark.parametrize("name", ["poisson", "nb", "zinb"])
def test_expected_log1p_matches_a_long_sum(name):
    # small means (exact-sum branch) and a large one (Poisson-Gamma quantile branch)
    rate = torch.tensor([[2e-4, 3e-3, 0.02, 0.3]], dtype=torch.float64).repeat(2, 1)
    lib = np.array([2500.0, 700.0])
    theta = np.array([2.0, 5.0, 10.0, 8.0])
    logit = np.array([-1.0, 0.0, -3.0, -2.0])
    params = {"log_theta": torch.tensor(np.log(theta)), "zi_logit": torch.tensor(logit)}
    got = lk.expected_log1p(name, torch.log(rate), params, torch.tensor(np.log(lib))).numpy()
    for i in range(2):
        for j in range(4):
            mu = lib[i] * float(rate[i, j])
            y = np.arange(20000)
            if name == "poisson":
                pmf = stats.poisson.pmf(y, mu)
            else:
                pmf = stats.nbinom.pmf(y, theta[j], theta[j] / (theta[j] + mu))
            want = _expected_log1p_by_sum(pmf, lib[i])
            if name == "zinb":
                want *= 1 - 1 / (1 + np.exp(-logit[j]))
            tol = 1e-6 if mu < 100 else 5e-3
            assert abs(got[i, j] - want) < tol, (name, i, j, got[i, j], want)
    plain = np.log1p(1e4 * rate.numpy())
    assert (got < plain).all()  # Jensen: the expected measured value lies below log1p of the expected rate
