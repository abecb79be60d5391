"""Niche signatures from one ST section, projectable onto any other.

Archetypal analysis as in chrysalis (Demeter et al. 2025: spatially variable genes by
Moran's I → PCA → archetypes, per-spot proportions on the simplex; PCHA of Mørup & Hansen
2012) or NMF programmes. Gene loadings are kept so that signature maps turn back into
gene maps.

>>> model = fit_signatures(adata, n_signatures=6)                 # doctest: +SKIP
>>> project_signatures(model, other_section)  # obsm['signatures']  # doctest: +SKIP
>>> genes_zyx = model.to_genes(volume_kzyx)  # (g, z, y, x)        # doctest: +SKIP
"""

from voxelome.signatures.model import (
    SignatureConfig,
    SignatureModel,
    fit_signatures,
    project_signatures,
)
from voxelome.signatures.svg import morans_i, normalize_log1p, select_genes, spatial_weights

__all__ = [
    "SignatureConfig",
    "SignatureModel",
    "fit_signatures",
    "project_signatures",
    "morans_i",
    "normalize_log1p",
    "select_genes",
    "spatial_weights",
]
