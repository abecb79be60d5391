"""The transcriptomic field model: field + per-gene likelihood heads + per-section batch effects.

``location(x, s) = out(field(x)) + b(s)`` is the log rate of every gene (count likelihoods: the
expected fraction of the spot's library) or its mean (Gaussian), at points ``x`` in the unit cube.

- ``out`` is the identity (one field output per gene) or, in the low-rank model, fixed gene
  loadings ``W`` ``(k, g)`` applied to ``k`` latent factors: ``mixture`` (factors → softmax
  proportions → ``p @ W``; rate space for counts, e.g. niche-signature profiles from
  :mod:`voxelome.signatures`) or ``linear`` (``z @ W + bias``). Thousands of genes then cost ``k``
  field outputs, not ``g``.
- ``b(s)`` is a per-section effect for batch effects: a learned embedding of the section mapped
  linearly to the genes and centred over sections, so ``b = 0`` (what queries without a section
  use) is the average section.
- Per-gene likelihood parameters (NB inverse dispersion, ZINB zero-inflation, Gaussian σ) are
  learned with the field (:mod:`voxelome.models.field.likelihoods`).
- Optionally (count likelihoods) a **library field**: one more field output is the log library size
  (total counts) of a spot at ``x``, Gaussian with a learned σ and a centred per-section offset. The
  expected *measured* value at a point away from every measured spot then uses the local depth, not
  one typical library: sequencing depth varies across a tissue (cellularity, RNA quality), and a
  log-normalised spot value depends on it (BENCHMARKS.md, "library field").

Method: Neural Transcriptomic Field (Gong et al., bioRxiv 2026).
"""

from __future__ import annotations

import torch
from torch import nn

from voxelome.errors import VoxelomeError, check_choice
from voxelome.models.field import likelihoods as lk
from voxelome.models.field.encoding import HashGridConfig, make_encoding
from voxelome.models.field.field import NeuralField

LOW_RANK_MODES = ("mixture", "linear")


class TranscriptomicField(nn.Module):
    """Neural transcriptomic field over ``n_genes`` outputs.

    Parameters
    ----------
    n_genes : int
        Number of modelled genes (or signatures) ``g``.
    likelihood : {"nb", "zinb", "poisson", "gaussian"}
        Observation model.
    n_sections : int
        Sections in the training stack (one batch-effect embedding each).
    encoding : HashGridConfig
        Hash-grid settings.
    hidden, n_hidden_layers : int
        MLP width and depth.
    section_dim : int
        Size of the section embedding; 0 (or one section) disables batch effects.
    loadings : Tensor, shape (k, g), optional
        Fixed gene loadings of a low-rank output; the field then has ``k`` outputs.
    low_rank : {"mixture", "linear"}
        How latent factors become genes (see the module docstring); ``mixture`` needs
        non-negative loadings.
    backend, table_dtype : str
        Encoding backend (``torch`` or ``tcnn``) and table storage dtype.
    library_head : bool
        Count likelihoods only: also model the log library size as a field (see the module docstring).
    """

    def __init__(self, n_genes: int, likelihood: str = "nb", n_sections: int = 1,
                 encoding: HashGridConfig = HashGridConfig(), hidden: int = 64, n_hidden_layers: int = 1,
                 section_dim: int = 8, loadings: torch.Tensor | None = None, low_rank: str = "mixture",
                 backend: str = "torch", table_dtype: str = "float32", library_head: bool = False):
        super().__init__()
        self.likelihood = lk.check_likelihood(likelihood)
        if library_head and not self.counts:
            raise VoxelomeError(f"library_head=True needs a count likelihood (got {likelihood!r}): a Gaussian field "
                                "models normalised values, which carry no library size.")
        self.library_head = bool(library_head)
        self.low_rank = check_choice("low_rank", low_rank, LOW_RANK_MODES)
        self.n_genes = int(n_genes)
        if loadings is not None:
            loadings = torch.as_tensor(loadings, dtype=torch.float32)
            if loadings.ndim != 2 or loadings.shape[1] != n_genes:
                raise VoxelomeError(f"loadings have shape {tuple(loadings.shape)}; expected (k, {n_genes}) "
                                    "(latent factors × the modelled genes, in the same gene order).")
            if low_rank == "mixture" and bool((loadings < 0).any()):
                raise VoxelomeError("low_rank='mixture' needs non-negative loadings (expression profiles); "
                                    "use low_rank='linear' for signed loadings such as PCA axes.")
            self.register_buffer("loadings", loadings)
        else:
            self.loadings = None
        n_out = (n_genes if loadings is None else loadings.shape[0]) + int(self.library_head)
        self.field = NeuralField(make_encoding(encoding, backend, table_dtype), n_out, hidden, n_hidden_layers)
        self.bias = nn.Parameter(torch.zeros(n_genes))
        self.gene_params = nn.ParameterDict({k: nn.Parameter(v) for k, v in lk.init_params(likelihood, n_genes).items()})
        self.n_sections = int(n_sections)
        if section_dim > 0 and n_sections > 1:
            self.section_embedding = nn.Embedding(n_sections, section_dim)
            nn.init.normal_(self.section_embedding.weight, std=0.1)
            self.section_out = nn.Linear(section_dim, n_genes, bias=False)
            nn.init.zeros_(self.section_out.weight)
        else:
            self.section_embedding = self.section_out = None
        if self.library_head:
            self.library_bias = nn.Parameter(torch.zeros(()))
            self.library_log_sigma = nn.Parameter(torch.zeros(()))
            self.library_section = nn.Parameter(torch.zeros(max(self.n_sections, 1)))

    @property
    def counts(self) -> bool:
        return lk.is_count_model(self.likelihood)

    def section_effect(self, section: torch.Tensor) -> torch.Tensor:
        """Centred batch effect ``(n, g)`` of sections ``(n,)`` (zeros without embeddings)."""
        if self.section_embedding is None:
            return torch.zeros(len(section), self.n_genes, device=section.device)
        w = self.section_embedding.weight
        return self.section_out(self.section_embedding(section) - w.mean(0))

    def heads(self, x01: torch.Tensor, section: torch.Tensor | None = None):
        """:meth:`location` ``(n, g)`` and the predicted log library ``(n,)`` (``None`` without a library head)
        from one pass of the field."""
        h = self.field(x01).float()
        if not self.library_head:
            return self._genes(h, section), None
        log_lib = h[:, -1] + self.library_bias
        if section is not None:
            log_lib = log_lib + (self.library_section - self.library_section.mean())[section]
        return self._genes(h[:, :-1], section), log_lib

    def location(self, x01: torch.Tensor, section: torch.Tensor | None = None) -> torch.Tensor:
        """Log rate (count models) or mean (gaussian) ``(n, g)`` float32 at points ``(n, 3)`` in ``[0, 1]^3``.

        ``section`` ``(n,)`` adds each row's section effect; ``None`` gives the average section.
        """
        return self.heads(x01, section)[0]

    def log_library(self, x01: torch.Tensor, section: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted log library size ``(n,)`` (natural log of total counts) of a spot at each point; ``section``
        as in :meth:`location`. Needs ``library_head``."""
        if not self.library_head:
            raise VoxelomeError("this field has no library head (fit with model_library=True and a count "
                                "likelihood); pass the spots' library sizes instead.")
        return self.heads(x01, section)[1]

    def _genes(self, h: torch.Tensor, section: torch.Tensor | None) -> torch.Tensor:
        if self.loadings is None:
            loc = h + self.bias
        elif self.low_rank == "linear":
            loc = h @ self.loadings + self.bias
        else:
            mix = torch.softmax(h, dim=-1) @ self.loadings
            loc = torch.log(mix + 1e-8) if self.counts else mix
        if section is not None:
            loc = loc + self.section_effect(section)
        return loc

    def log_prob(self, x01, y, log_library=None, section=None) -> torch.Tensor:
        """Elementwise log-likelihood ``(n, g)`` of observations ``y`` at points ``x01``."""
        return lk.log_prob(self.likelihood, y, self.location(x01, section), dict(self.gene_params), log_library)

    def objective(self, x01, y, log_library=None, section=None, library_weight: float = 1.0) -> torch.Tensor:
        """Training loss: the negative log-likelihood per modelled value (mean over points and genes; with a
        library head the log library counts as ``library_weight`` more values of each point)."""
        loc, log_lib = self.heads(x01, section)
        ll = lk.log_prob(self.likelihood, y, loc, dict(self.gene_params), log_library)
        if log_lib is None:
            return -ll.mean()
        lib_ll = lk.gaussian_log_prob(log_library, log_lib, self.library_log_sigma)
        return -(ll.sum(1) + library_weight * lib_ll).mean() / (ll.shape[1] + library_weight)

    def expression(self, x01: torch.Tensor, section: torch.Tensor | None = None, *,
                   target_sum: float = 1e4) -> torch.Tensor:
        """Denoised expression ``(n, g)``: ``log1p(target_sum · rate)`` for count models, the mean for gaussian.

        Count models report the NB/Poisson mean (the zero-inflation of ZINB is treated as technical
        dropout and left out), on the scale of log1p counts per ``target_sum``.
        """
        loc = self.location(x01, section)
        if self.counts:
            return torch.log1p(target_sum * torch.exp(loc))
        return loc

    def expected_measurement(self, x01: torch.Tensor, log_library: torch.Tensor, section: torch.Tensor | None = None,
                             *, target_sum: float = 1e4) -> torch.Tensor:
        """Expected *measured* value ``E[log1p(target_sum · Y / L)]`` ``(n, g)`` of a spot of library ``L``.

        The best squared-error prediction of a noisy measured spot on the log1p scale (it includes
        the ZINB zero-inflation); :meth:`expression` (log1p of the expected rate) is the denoised
        value and lies above it (Jensen). For the Gaussian likelihood both are the modelled mean.
        ``log_library`` ``(n,)``; ``None`` uses the library head's prediction at each point.
        """
        loc, predicted = self.heads(x01, section)
        if not self.counts:
            return loc
        if log_library is None:
            if predicted is None:
                raise VoxelomeError("pass log_library: this field has no library head to predict it.")
            log_library = predicted
        return lk.expected_log1p(self.likelihood, loc.double(), {k: v.double() for k, v in self.gene_params.items()},
                                 log_library.double(), target_sum).float()
