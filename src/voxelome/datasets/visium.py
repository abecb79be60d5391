"""Simulated Visium sections cut from the lung phantom at a known (optionally oblique) plane.

Spots are 55 µm disks on a 100 µm hexagonal grid laid out in section pixels and mapped into
the volume with :meth:`SectionPlacement.map`. Each spot's ground-truth niche proportions are
the mean of the phantom's truth over its footprint (the disk, through the section thickness);
counts are negative binomial around ``library_size × proportions @ loadings``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from voxelome import constants as C
from voxelome.errors import VoxelomeError, check_positive
from voxelome.io.volume import Volume
from voxelome.register.placement import SectionPlacement
from voxelome.register.sampling import sample_footprints

if TYPE_CHECKING:
    from voxelome.datasets.phantom import LungPhantom

#: ``obsm`` key of the ground-truth per-spot proportions ``(n_spots, c)``, rows on the simplex.
TRUE_SIGNATURES_KEY = "signatures_true"
#: ``varm`` key of the ground-truth signature loadings ``(n_genes, c)`` (not the fitted ones).
TRUE_LOADINGS_KEY = "signature_loadings_true"

# A few recognisable markers per niche (human lung names) so plots read naturally;
# the rest of the genes are named gene_XXXX.
_MARKERS = {
    "alveolar": ["SFTPC", "SFTPB", "SFTPA1", "AGER", "HOPX", "NAPSA", "LAMP3", "EMP2"],
    "airway": ["SCGB1A1", "SCGB3A2", "FOXJ1", "KRT5", "MUC5B", "TP63", "CAPS", "TPPP3"],
    "vascular": ["PECAM1", "CDH5", "VWF", "CLDN5", "ACTA2", "MYH11", "EMCN", "AQP1"],
    "consolidation": ["S100A8", "S100A9", "LCN2", "MMP9", "CXCL8", "IL1B", "SAA1", "FCGR3B"],
    "immune_infiltrate": ["PTPRC", "CD3E", "CD8A", "MS4A1", "CD68", "CD74", "GZMB", "CCL19"],
    "interstitial": ["COL1A1", "COL3A1", "DCN", "LUM", "PDGFRA", "FN1", "POSTN", "TCF21"],
}


def make_expression_model(n_signatures: int, n_genes: int, rng) -> tuple[list[str], np.ndarray]:
    """Gene names and signature loadings.

    Each signature shares a log-normal background profile and up-regulates its own block of
    marker genes (~30 % of genes are markers, 4–20× fold change), plus small random
    perturbations, so signatures are distinct but overlap like real niche profiles.

    Returns
    -------
    gene_names : list of str, length n_genes
    loadings : ndarray, shape (n_signatures, n_genes), float64
        Strictly positive, rows sum to 1.
    """
    from voxelome.datasets.phantom import SIGNATURE_NAMES

    names = SIGNATURE_NAMES[:n_signatures]
    n_mark = max(2, int(0.3 * n_genes) // n_signatures)
    genes: list[str] = []
    for name in names:  # marker blocks first, named markers at the head of each block
        named = _MARKERS[name][:n_mark]
        genes += named + [f"{name}_marker_{k:02d}" for k in range(len(named), n_mark)]
    genes += [f"gene_{k:04d}" for k in range(n_genes - len(genes))]
    log_bg = rng.normal(0.0, 1.0, n_genes)
    logl = log_bg[None, :] + rng.normal(0.0, 0.3, (n_signatures, n_genes))
    for k in range(n_signatures):
        logl[k, k * n_mark:(k + 1) * n_mark] += rng.uniform(np.log(4), np.log(20), n_mark)
    load = np.exp(logl)
    return genes, load / load.sum(axis=1, keepdims=True)


def hex_grid(x_range, y_range, pitch: float):
    """Hexagonal spot grid covering a rectangle (Visium layout).

    Rows are ``pitch·√3/2`` apart; odd rows are shifted by ``pitch/2``.

    Returns
    -------
    xy : ndarray, shape (n, 2)
        Centres ``(x, y)`` in the units of the ranges.
    row, col : ndarray of int, shape (n,)
        ``array_row`` and Visium-style ``array_col`` (even columns on even rows, odd on odd rows).
    """
    dy = pitch * np.sqrt(3) / 2
    n_rows = int(np.floor((y_range[1] - y_range[0]) / dy)) + 1
    n_cols = int(np.floor((x_range[1] - x_range[0]) / pitch)) + 1
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = x_range[0] + (cc + 0.5 * (rr % 2)) * pitch
    y = y_range[0] + rr * dy
    keep = x <= x_range[1]
    return np.column_stack([x[keep], y[keep]]), rr[keep], (2 * cc + rr % 2)[keep]


def axial_placement(phantom: "LungPhantom", z_index: float | None = None,
                    pixel_size_um: float = 1.0) -> SectionPlacement:
    """Axial section at slice ``z_index`` (default: the middle slice ``shape[0] // 2``), 1 µm/px.

    Pixel ``(0, 0)`` is the centre of voxel ``(z_index, 0, 0)``; image x/y follow volume x/y.
    """
    if z_index is None:
        z_index = phantom.volume.shape[0] // 2
    return SectionPlacement.from_slice(phantom.volume, z_index, pixel_size_um)


def oblique_placement(phantom: "LungPhantom", tilt_deg: float = 10.0, seed: int = 0,
                      pixel_size_um: float = 1.0) -> SectionPlacement:
    """A plane through the volume centre, tilted ``tilt_deg`` from axial about a seeded in-plane axis.

    The tilt direction (azimuth) is drawn from ``seed``. Pixel ``(0, 0)`` is placed at the corner of
    the volume's projection onto the plane so that all section pixels inside the volume are ≥ 0.
    With the default 1.12 mm deep volume, tilts up to ~15° keep the plane inside it everywhere.
    """
    check_positive("pixel_size_um", pixel_size_um)
    if not 0 <= tilt_deg < 90:
        raise VoxelomeError(f"tilt_deg={tilt_deg!r} must be in [0, 90); e.g. tilt_deg=10 for a mildly oblique cut.")
    vol = phantom.volume
    az = np.random.default_rng(seed).uniform(0, 2 * np.pi)
    t = np.deg2rad(tilt_deg)
    normal = np.array([np.sin(t) * np.cos(az), np.sin(t) * np.sin(az), np.cos(t)])
    centre = vol.index_to_xyz((np.asarray(vol.shape) - 1) / 2.0)
    base = SectionPlacement.from_origin_normal(centre, normal, 1.0)
    u, v, _ = base.frame
    corners = vol.index_to_xyz(np.array(np.meshgrid(*[[0, n - 1] for n in vol.shape], indexing="ij")).reshape(3, -1).T)
    s, q = (corners - centre) @ u, (corners - centre) @ v
    origin = centre + s.min() * u + q.min() * v
    return SectionPlacement(np.column_stack([u * pixel_size_um, v * pixel_size_um, origin]))


def _pixel_box(placement: SectionPlacement, volume: Volume):
    """Bounding box ``((x0, x1), (y0, y1))`` in section pixels of the volume's projection on the plane."""
    corners = volume.index_to_xyz(np.array(np.meshgrid(*[[0, n - 1] for n in volume.shape],
                                                       indexing="ij")).reshape(3, -1).T)
    px = np.linalg.lstsq(placement.matrix[:, :2], (corners - placement.matrix[:, 2]).T, rcond=None)[0].T
    return (px[:, 0].min(), px[:, 0].max()), (px[:, 1].min(), px[:, 1].max())


def cut_section(phantom: "LungPhantom", placement: SectionPlacement | None = None, *, seed: int = 0,
                spot_diameter_um: float = 55.0, spot_pitch_um: float = 100.0, thickness_um: float = 10.0,
                mean_library_size: float = 3000.0, library_size_sd: float = 0.35, dispersion: float = 5.0,
                min_tissue_fraction: float = 0.5, footprint_step_um: float | None = None) -> ad.AnnData:
    """Simulate a Visium section of ``phantom`` on ``placement``.

    Parameters
    ----------
    phantom : LungPhantom
        The source volume and truth.
    placement : SectionPlacement, optional
        Where the section lies; default :func:`axial_placement` (middle slice, 1 µm/px).
    seed : int
        Seed of the counts (library sizes and negative-binomial draws).
    spot_diameter_um, spot_pitch_um : float
        Spot disk diameter and hexagonal centre-to-centre distance (Visium: 55 and 100 µm).
    thickness_um : float
        Section thickness; the footprint is the disk repeated across it along the plane normal.
    mean_library_size : float
        Mean total counts of a spot fully in tissue; library sizes are log-normal
        (sd ``library_size_sd`` in log space) and scaled by the spot's tissue fraction.
    dispersion : float
        Negative-binomial size θ (variance = μ + μ²/θ); larger is closer to Poisson.
    min_tissue_fraction : float
        Keep spots whose footprint is ≥ this fraction in tissue (and entirely inside the volume).
    footprint_step_um : float, optional
        Sampling pitch inside a footprint; default ``min(5, spacing / 2)`` µm.

    Returns
    -------
    AnnData
        ``X`` int32 counts ``(n_spots, n_genes)``; ``obsm['spatial']`` centres in section pixels
        ``(x, y)``; ``obsm['spatial_3d']`` centres in volume µm ``(x, y, z)``;
        ``obsm['signatures_true']`` footprint-mean truth ``(n_spots, c)`` renormalised over the
        tissue part of the footprint (rows sum to 1); ``obs`` ``array_row``, ``array_col``,
        ``tissue_fraction``, ``library_size``; ``varm['signature_loadings_true']`` ``(n_genes, c)``;
        ``uns['voxelome']`` geometry (pixel size, spot diameter/pitch, thickness, plane, names, source).
    """
    for name, val in (("spot_diameter_um", spot_diameter_um), ("spot_pitch_um", spot_pitch_um),
                      ("mean_library_size", mean_library_size), ("dispersion", dispersion)):
        check_positive(name, val)
    check_positive("thickness_um", thickness_um, allow_zero=True)
    check_positive("library_size_sd", library_size_sd, allow_zero=True)
    if not 0 < min_tissue_fraction <= 1:
        raise VoxelomeError(f"min_tissue_fraction={min_tissue_fraction!r} must be in (0, 1]; e.g. 0.5.")
    placement = axial_placement(phantom) if placement is None else placement
    if not isinstance(placement, SectionPlacement):
        raise VoxelomeError(f"placement must be a SectionPlacement, got {type(placement).__name__}; "
                            "build one with axial_placement(phantom) or oblique_placement(phantom).")
    vol = phantom.volume
    step = footprint_step_um or min(5.0, min(vol.spacing_um) / 2)
    ps = placement.pixel_size_um
    u, v, normal = placement.frame

    x_rng, y_rng = _pixel_box(placement, vol)
    px, rows, cols = hex_grid(x_rng, y_rng, spot_pitch_um / ps)
    xyz = placement.map(px)
    # cheap prefilter: centres must lie inside the volume before sampling whole footprints
    ok = vol.contains(xyz, margin_voxels=0.0)
    px, rows, cols, xyz = px[ok], rows[ok], cols[ok], xyz[ok]
    if len(xyz) == 0:
        raise VoxelomeError("the section holds no spot inside the volume; check the placement "
                            "(does the plane cross the volume?).")

    def footprint_mean(volume, centres):
        return sample_footprints(volume, centres, u, v, spot_diameter_um, step,
                                 thickness_um=thickness_um, normal=normal)

    tissue_vol = Volume.from_array(phantom.tissue.astype(np.float32), vol.spacing_um, vol.origin_um)
    frac = footprint_mean(tissue_vol, xyz)
    ok = np.isfinite(frac) & (frac >= min_tissue_fraction)  # NaN: part of the footprint outside the volume
    px, rows, cols, xyz, frac = px[ok], rows[ok], cols[ok], xyz[ok], frac[ok]
    n, c = len(xyz), len(phantom.signature_names)
    if n == 0:
        raise VoxelomeError(
            "the section holds no spot whose footprint (disk × thickness) lies between the volume's edge voxel "
            f"centres and ≥ {min_tissue_fraction:.0%} in tissue; check the placement (a plane at the first or last "
            "slice needs thickness_um=0) or lower min_tissue_fraction.")
    sig = np.column_stack([footprint_mean(phantom.truth_volume(k), xyz) for k in range(c)]).astype(np.float64)
    sig /= frac[:, None]  # truth is 0 outside tissue: mean over the tissue part of the footprint
    sig /= sig.sum(axis=1, keepdims=True)

    rng = np.random.default_rng(seed)
    lib = mean_library_size * frac * np.exp(rng.normal(-library_size_sd**2 / 2, library_size_sd, n))
    mu = lib[:, None] * (sig @ phantom.loadings)
    # negative binomial as a gamma–Poisson mixture: λ ~ Γ(θ, μ/θ), counts ~ Poisson(λ)
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.int32)

    obs = pd.DataFrame({"array_row": rows.astype(np.int64), "array_col": cols.astype(np.int64),
                        "tissue_fraction": frac.astype(np.float64), "library_size": lib},
                       index=pd.Index([f"spot_{k:05d}" for k in range(n)]))
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(phantom.gene_names)))
    adata.obsm[C.SPATIAL_KEY] = px.astype(np.float64)
    adata.obsm[C.SPATIAL_3D_KEY] = xyz.astype(np.float64)
    adata.obsm[TRUE_SIGNATURES_KEY] = sig
    adata.varm[TRUE_LOADINGS_KEY] = phantom.loadings.T.copy()
    adata.uns[C.UNS_KEY] = {
        C.PIXEL_SIZE_KEY: float(ps), C.SPOT_DIAMETER_KEY: float(spot_diameter_um),
        "spot_pitch_um": float(spot_pitch_um), "thickness_um": float(thickness_um),
        C.PLANE_KEY: placement.to_dict(), "signature_names": list(phantom.signature_names),
        "source": f"lung phantom seed {phantom.config.seed}", "counts_seed": int(seed),
    }
    return adata
