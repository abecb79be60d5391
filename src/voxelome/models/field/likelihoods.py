"""Per-gene observation models of the field: counts (Poisson, NB, ZINB) and normalised values (Gaussian).

Every likelihood is written in closed form on tensors of shape ``(n, g)`` and broadcasts per-gene
parameters of shape ``(g,)``. For count models the field gives the log *rate* of a gene (its
expected fraction of the spot's library) and the mean is ``μ = library · exp(log_rate)``; the
Gaussian models a normalised value (e.g. log1p of counts per 10k, or signature proportions) with a
learned per-gene standard deviation. Parameterisations follow scVI (Lopez et al., Nat. Methods 2018):
NB with mean ``μ`` and inverse dispersion ``θ`` (variance ``μ + μ²/θ``); ZINB mixes a point mass at
0 of weight ``π = sigmoid(logit)`` with that NB.
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import logsigmoid

from voxelome.errors import check_choice

#: name → whether it models counts (needs library sizes) and which per-gene parameters it learns.
LIKELIHOODS = {
    "poisson": {"counts": True, "params": ()},
    "nb": {"counts": True, "params": ("log_theta",)},
    "zinb": {"counts": True, "params": ("log_theta", "zi_logit")},
    "gaussian": {"counts": False, "params": ("log_sigma",)},
}
_EPS = 1e-8


def check_likelihood(name: str) -> str:
    """Validate a likelihood name (``poisson``, ``nb``, ``zinb``, ``gaussian``) with a did-you-mean."""
    return check_choice("likelihood", name, LIKELIHOODS)


def is_count_model(name: str) -> bool:
    return LIKELIHOODS[check_likelihood(name)]["counts"]


def poisson_log_prob(y: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """``log P(y | Poisson(μ))`` elementwise, ``μ = exp(log_mu)``."""
    return y * log_mu - torch.exp(log_mu) - torch.lgamma(y + 1)


def nb_log_prob(y: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """``log NB(y | μ, θ)`` elementwise (mean ``μ = exp(log_mu)``, inverse dispersion ``θ = exp(log_theta)``)."""
    theta = torch.exp(log_theta)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)  # log(θ + μ), stable
    return (torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1)
            + theta * (log_theta - log_theta_mu) + y * (log_mu - log_theta_mu))


def zinb_log_prob(y: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor,
                  zi_logit: torch.Tensor) -> torch.Tensor:
    """``log ZINB(y | μ, θ, π)`` with ``π = sigmoid(zi_logit)`` the weight of the extra zeros."""
    theta = torch.exp(log_theta)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    nb = nb_log_prob(y, log_mu, log_theta)
    nb_zero = theta * (log_theta - log_theta_mu)  # log NB(0)
    log_pi, log_not_pi = logsigmoid(zi_logit), logsigmoid(-zi_logit)
    zero = torch.logaddexp(log_pi.expand_as(nb_zero), log_not_pi + nb_zero)
    return torch.where(y < 0.5, zero, log_not_pi + nb)


def gaussian_log_prob(y: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """``log N(y | mean, σ²)`` elementwise, ``σ = exp(log_sigma)``."""
    return -0.5 * ((y - mean) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)


def log_prob(name: str, y: torch.Tensor, location: torch.Tensor, params: dict,
             log_library: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise log-likelihood ``(n, g)`` of observations ``y`` under the named model.

    Parameters
    ----------
    name : {"poisson", "nb", "zinb", "gaussian"}
    y : Tensor, shape (n, g)
        Counts (count models) or normalised values (gaussian).
    location : Tensor, shape (n, g)
        Log rate (count models; the mean is ``library · exp(location)``) or the mean (gaussian).
    params : dict of Tensor
        Per-gene parameters ``(g,)``: ``log_theta``, ``zi_logit``, ``log_sigma`` as the model needs.
    log_library : Tensor, shape (n,), optional
        Log library size of each row (count models).
    """
    name = check_likelihood(name)
    if name == "gaussian":
        return gaussian_log_prob(y, location, params["log_sigma"])
    log_mu = location + log_library[:, None]
    if name == "poisson":
        return poisson_log_prob(y, log_mu)
    if name == "nb":
        return nb_log_prob(y, log_mu, params["log_theta"])
    return zinb_log_prob(y, log_mu, params["log_theta"], params["zi_logit"])


def init_params(name: str, n_genes: int) -> dict[str, torch.Tensor]:
    """Initial per-gene parameters: θ = 10 (mild over-dispersion), π ≈ 0.05, σ = 0.5."""
    out = {}
    for p in LIKELIHOODS[check_likelihood(name)]["params"]:
        value = {"log_theta": math.log(10.0), "zi_logit": -3.0, "log_sigma": math.log(0.5)}[p]
        out[p] = torch.full((n_genes,), value)
    return out


__all__ = ["LIKELIHOODS", "check_likelihood", "gaussian_log_prob", "init_params", "is_count_model", "log_prob",
           "nb_log_prob", "poisson_log_prob", "zinb_log_prob"]
