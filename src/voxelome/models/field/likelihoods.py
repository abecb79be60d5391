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

import numpy as np
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


def expected_log1p(name: str, location: torch.Tensor, params: dict, log_library: torch.Tensor,
                   target_sum: float = 1e4, max_count: int = 512, max_elements: int = 2**22) -> torch.Tensor:
    """``E[log1p(target_sum · Y / L)]`` ``(n, g)`` for counts ``Y`` of a spot of library ``L`` under the model.

    This is the best prediction (under squared error) of a *measured* log-normalised value, which is
    lower than ``log1p(target_sum · rate)`` (Jensen's inequality: log1p is concave) — most at low
    counts, where a spot often reads 0. The expectation is an exact sum over ``y = 0 … max_count``
    of the Poisson / NB / ZINB probabilities; where the mean is too large for that range
    (``μ + 8 sd > max_count``) the NB is written as a Poisson–Gamma mixture, the Gamma integrated
    over 64 quantile midpoints and the Poisson by its second-order (delta-method) expansion, which
    is accurate at such counts.

    Parameters
    ----------
    name : {"poisson", "nb", "zinb"}
    location : Tensor, shape (n, g)
        Log rate (:meth:`TranscriptomicField.location`).
    params : dict of Tensor
        Per-gene parameters of the model.
    log_library : Tensor, shape (n,)
        Log library size of the spot the value is predicted for.
    """
    name = check_likelihood(name)
    if not LIKELIHOODS[name]["counts"]:
        raise ValueError(f"expected_log1p needs a count likelihood, got {name!r}")
    out = torch.empty_like(location)
    gq = None  # quantile midpoints (g, 64) of the NB's Gamma(θ, 1/θ) mixing distribution (mean 1)
    if name != "poisson":
        from scipy.stats import gamma

        theta = torch.exp(params["log_theta"]).detach().cpu().double().numpy()
        u = (np.arange(64) + 0.5) / 64
        gq = torch.as_tensor(gamma.ppf(u[None], theta[:, None], scale=1 / theta[:, None]), dtype=location.dtype,
                             device=location.device)
        gq = gq / gq.mean(-1, keepdim=True)
    ys = torch.arange(max_count + 1, dtype=location.dtype, device=location.device)
    chunk = max(1, max_elements // (location.shape[1] * (max_count + 1)))
    for i in range(0, len(location), chunk):
        loc, llib = location[i:i + chunk], log_library[i:i + chunk]
        log_mu = loc + llib[:, None]
        mu = torch.exp(log_mu)
        var = mu if name == "poisson" else mu + mu**2 * torch.exp(-params["log_theta"])
        c = target_sum * torch.exp(-llib)[:, None]
        small = mu + 8 * var.sqrt() <= max_count
        top = int(torch.ceil((mu + 8 * var.sqrt())[small].max()).item()) if bool(small.any()) else 0
        yv = ys[:top + 1].view(1, 1, -1)
        if name == "poisson":
            lp = poisson_log_prob(yv, log_mu[..., None])
        else:
            lp = nb_log_prob(yv, log_mu[..., None], params["log_theta"][None, :, None])
        exact = (torch.exp(lp) * torch.log1p(c[..., None] * yv)).sum(-1)
        # large counts: Y | λ ~ Poisson(λ), E f(Y) | λ ≈ f(λ) + f''(λ) λ / 2 (f = log1p(c y)), λ = μ · G
        lam = mu[..., None] if gq is None else mu[..., None] * gq[None]
        cl = c[..., None] * lam
        approx = (torch.log1p(cl) - 0.5 * c[..., None] * cl / (1 + cl) ** 2).mean(-1)
        val = torch.where(small, exact, approx)
        if name == "zinb":
            val = val * torch.sigmoid(-params["zi_logit"])
        out[i:i + chunk] = val
    return out


def init_params(name: str, n_genes: int) -> dict[str, torch.Tensor]:
    """Initial per-gene parameters: θ = 10 (mild over-dispersion), π ≈ 0.05, σ = 0.5."""
    out = {}
    for p in LIKELIHOODS[check_likelihood(name)]["params"]:
        value = {"log_theta": math.log(10.0), "zi_logit": -3.0, "log_sigma": math.log(0.5)}[p]
        out[p] = torch.full((n_genes,), value)
    return out


__all__ = ["LIKELIHOODS", "check_likelihood", "expected_log1p", "gaussian_log_prob", "init_params", "is_count_model", "log_prob",
           "nb_log_prob", "poisson_log_prob", "zinb_log_prob"]
