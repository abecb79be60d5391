"""A seeded micro-CT-like lung phantom with ground-truth 3D niche proportions.

The phantom is the project's embedded benchmark: a lung lobe made of alveolar foam, a
branching airway tree, vessel trees and dense infection foci with an immune rim, imaged
with scanner-like blur, noise and intensity drift. Every niche signature is a smooth
function of *local structure* at the 50–300 µm scale (distances to airway walls and vessels,
position relative to a focus, septal thickening), and the same latent fields shape the
image, so a 3D CNN with ~100–300 µm of context can recover them while smoothed intensity
alone cannot (several niches share a mean intensity and differ only by texture or context).

Coordinates follow the project conventions: volumes ``(z, y, x)``, points ``(x, y, z)`` µm,
voxel ``(0, 0, 0)`` centred at the world origin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.special import expit

from voxelome.datasets._geometry import (
    axis_um, distance_outside, focus_distance, grow_tree, Lobe, place_foci, render_tubes, smooth_noise,
)
from voxelome.errors import VoxelomeError, did_you_mean
from voxelome.io.volume import Volume

#: All niche signatures the phantom defines, in channel order; ``n_signatures`` keeps the first n.
SIGNATURE_NAMES = ("alveolar", "airway", "vascular", "consolidation", "immune_infiltrate", "interstitial")



@dataclass(frozen=True)
class PhantomConfig:
    """Parameters of :func:`make_lung_phantom`; lengths in µm, intensities in [0, 1]."""

    seed: int = 0  #: seed of every random step; same seed → bit-identical phantom
    shape: tuple[int, int, int] = (112, 352, 352)  #: (z, y, x) voxels; the default axial section holds > 1,000 spots
    spacing_um: float = 10.0  #: isotropic voxel size (µm)
    n_signatures: int = 6  #: number of niche signatures (5 or 6, first of SIGNATURE_NAMES)
    n_genes: int = 240  #: genes in the expression model (≥ 20)
    lobe_fill: float = 0.94  #: lobe semi-axes as a fraction of the half xy extent
    alveolus_um: float = 90.0  #: mean alveolar air-space size of the foam
    septum_um: float = 10.0  #: normal alveolar wall thickness
    n_airway_generations: int = 4  #: branching generations of the airway tree (1 = trunk only)
    airway_radius_um: float = 130.0  #: lumen radius of the airway trunk (tapers ×0.78 per generation)
    n_vessel_trees: int = 2  #: independent vessel trees
    n_vessel_generations: int = 4  #: branching generations of each vessel tree
    vessel_radius_um: float = 80.0  #: radius of a vessel trunk (tapers ×0.8 per generation)
    n_foci: int = 3  #: dense infection foci (consolidation) with an immune rim
    focus_radius_um: tuple[float, float] = (220.0, 300.0)  #: range of focus radii in xy
    focus_elongation: float = 1.5  #: z semi-axis / xy radius of a focus (so most axial planes cut one)
    immune_rim_um: float = 150.0  #: distance outside the focus surface where the immune infiltrate peaks
    immune_rim_width_um: float = 90.0  #: 1/e half-width of the immune rim
    interstitial_fraction: float = 0.18  #: share of the lobe with thickened septa (interstitial niche)
    interstitial_scale_um: float = 120.0  #: correlation length of the interstitial patches
    airway_decay_um: float = 90.0  #: decay length of the airway score outside the airway wall
    vessel_decay_um: float = 70.0  #: decay length of the vascular score outside the vessel
    alveolar_score: float = 0.45  #: constant score of the default (alveolar) niche
    temperature: float = 0.2  #: softmax temperature turning scores into proportions (lower = purer)
    blur_sigma_um: float = 8.0  #: Gaussian point-spread sigma of the scanner
    noise_sd: float = 0.05  #: additive Gaussian noise (intensity units)
    drift: float = 0.1  #: amplitude of the slow multiplicative intensity drift along z and x

    def __post_init__(self):
        _validate(self)
        # canonical tuples, so configs read back from YAML (lists) compare and hash equal
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "focus_radius_um", tuple(float(r) for r in self.focus_radius_um))


_POSITIVE = ("spacing_um", "alveolus_um", "septum_um", "airway_radius_um", "vessel_radius_um", "focus_elongation",
             "immune_rim_um", "immune_rim_width_um", "interstitial_scale_um", "airway_decay_um", "vessel_decay_um",
             "temperature")
_NON_NEGATIVE = ("blur_sigma_um", "noise_sd", "drift", "alveolar_score")
_INT_RANGES = {"seed": (0, 2**63 - 1), "n_signatures": (5, len(SIGNATURE_NAMES)), "n_genes": (20, 10**6),
               "n_airway_generations": (1, 7), "n_vessel_generations": (1, 7), "n_vessel_trees": (0, 10),
               "n_foci": (0, 10)}
_RANGES = {"lobe_fill": (0.3, 1.0), "interstitial_fraction": (0.01, 0.6)}


def _validate(c: PhantomConfig) -> None:
    """Raise :class:`VoxelomeError` naming the parameter, its bad value, what is allowed and a fix."""
    def bad(name, allowed, fix=None):
        fix = fix or f"E.g. the default {name}={getattr(PhantomConfig, name)!r}."
        raise VoxelomeError(f"PhantomConfig.{name}={getattr(c, name)!r} is invalid: {allowed}. {fix}")

    def is_num(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)

    shape = c.shape
    if (np.ndim(shape) != 1 or len(shape) != 3
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape)):
        bad("shape", "it must be three integers (z, y, x)")
    if shape[0] < 16 or shape[1] < 32 or shape[2] < 32:
        bad("shape", "it needs ≥ 16 z slices and ≥ 32 voxels along y and x",
            "Use e.g. shape=(48, 176, 176) (the 'small' preset) for a quick phantom.")
    for name in _POSITIVE + _NON_NEGATIVE:
        v = getattr(c, name)
        if not is_num(v) or v < 0 or (v == 0 and name in _POSITIVE):
            bad(name, "it must be a finite number " + ("> 0" if name in _POSITIVE else "≥ 0"))
    for name, (lo, hi) in _INT_RANGES.items():
        v = getattr(c, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
            extra = f" The phantom defines {list(SIGNATURE_NAMES)} and keeps the first n." if name == "n_signatures" else ""
            bad(name, f"it must be an integer in [{lo}, {hi}]", f"E.g. the default {name}="
                f"{getattr(PhantomConfig, name)!r}.{extra}")
    for name, (lo, hi) in _RANGES.items():
        if not is_num(getattr(c, name)) or not lo <= getattr(c, name) <= hi:
            bad(name, f"it must be in [{lo}, {hi}]")
    r = c.focus_radius_um
    if np.ndim(r) != 1 or len(r) != 2 or not all(is_num(v) for v in r) or not 0 < r[0] <= r[1]:
        bad("focus_radius_um", "it must be (min, max) µm with 0 < min ≤ max")


def _render_image(cfg, rng, tissue, depth_um, fields) -> np.ndarray:
    """CT-like intensities ``(z, y, x)`` float32 from the structure fields, then scanner effects.

    Niches that share a mean intensity differ by texture: interstitial = smoothly thickened
    septa; immune rim = thickened septa *plus* clustered bright cells; consolidation ≈ vessel
    density but blob-shaped with residual air pockets.
    """
    shape, sp = cfg.shape, cfg.spacing_um
    sig_f = cfg.alveolus_um / (4.44 * sp)  # zero-crossing spacing of smoothed noise ≈ 4.44 σ
    foam = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sig_f)
    foam /= foam[::3, ::3, ::3].std() + 1e-12
    cells = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
    # ~12 % of voxels in clusters of 2–3 voxels (20–30 µm): immune cell aggregates
    cells = (cells > 1.2 * cells[::3, ::3, ::3].std()).astype(np.float32)
    w0 = float((cfg.septum_um / sp) / (2.0 * np.sqrt(2.0) * sig_f))  # |∇foam| ≈ 1/(√2 σ) → wall of septum_um
    thick = 1.0 + 2.5 * fields["interstitial"] + 1.4 * fields["immune"]
    img = np.exp(-((foam / (w0 * thick)) ** 2))  # septa: the zero set of the foam field
    img *= 0.58
    img += 0.04
    img += fields["immune"] * (0.08 + 0.32 * cells)  # infiltrating cells partly fill the air spaces
    con = fields["consolidation"]  # flooded alveoli, dense like vessels, with residual air pockets
    flooded = 0.62 + 0.1 * np.exp(-((foam / 0.5) ** 2)) - np.where(foam > 1.9, np.float32(0.5), np.float32(0))
    img += con * (flooded - img)
    del flooded, cells
    vf = np.clip(0.5 - fields["vessel_sd"] / sp, 0, 1)  # antialiased (partial-volume) tube edges
    img += vf * (0.66 - img)
    wf = np.clip(0.5 - fields["airway_sd_out"] / sp, 0, 1)
    img += wf * (0.8 - img)
    lf = np.clip(0.5 - fields["airway_sd_in"] / sp, 0, 1)
    img += lf * (0.03 - img)
    del vf, wf, lf, foam
    np.maximum(img, 0.7 * np.clip(1 - depth_um / 15.0, 0, 1), out=img)  # pleura: ~15 µm bright shell
    img[~tissue] = 0.02
    if cfg.blur_sigma_um > 0:
        img = ndimage.gaussian_filter(img, cfg.blur_sigma_um / sp)
    # slow multiplicative drift (beam hardening / source decay) along z and x
    z = np.linspace(0, 1, shape[0], dtype=np.float32)
    x = np.linspace(-0.5, 0.5, shape[2], dtype=np.float32)
    ph = rng.uniform(0, 2 * np.pi, 2)
    img *= (1 + cfg.drift * np.sin(2 * np.pi * 0.7 * z + ph[0]))[:, None, None]
    img *= (1 + cfg.drift * (0.8 * x + 0.3 * np.sin(2 * np.pi * x + ph[1])))[None, None, :]
    img += cfg.noise_sd * rng.standard_normal(shape, dtype=np.float32)
    return img


def _truth(cfg, tissue, fields) -> np.ndarray:
    """Proportions ``(c, z, y, x)`` = softmax(scores / temperature) in tissue, 0 outside."""
    scores = {
        "alveolar": lambda: np.full(cfg.shape, cfg.alveolar_score, np.float32),
        "airway": lambda: np.exp(-fields["airway_dist"] / cfg.airway_decay_um),
        "vascular": lambda: np.exp(-fields["vessel_dist"] / cfg.vessel_decay_um),
        "consolidation": lambda: fields["consolidation"],
        "immune_infiltrate": lambda: fields["immune"],
        "interstitial": lambda: fields["interstitial"],
    }
    names = SIGNATURE_NAMES[: cfg.n_signatures]
    truth = np.empty((len(names),) + tuple(cfg.shape), np.float32)
    for k, name in enumerate(names):
        truth[k] = scores[name]()
    truth *= 1.0 / cfg.temperature
    truth -= truth.max(axis=0)
    np.exp(truth, out=truth)
    truth /= truth.sum(axis=0)
    truth *= tissue
    return truth


@dataclass
class LungPhantom:
    """A synthetic lung volume with ground-truth niche proportions.

    Attributes
    ----------
    config : PhantomConfig
        The parameters it was generated from.
    volume : Volume
        CT-like intensities, float32, ``(z, y, x)``, numpy-backed, spacing ``config.spacing_um``.
    truth : ndarray, shape (c, z, y, x), float32
        Ground-truth proportions: non-negative, summing to 1 over ``c`` at every tissue voxel, 0 outside.
    tissue : ndarray, shape (z, y, x), bool
        Inside the organ (alveolar and airway air spaces count as tissue; outside air does not).
    signature_names : list of str
        Names of the ``c`` channels of ``truth``.
    gene_names : list of str
        Names of the ``n_genes`` genes.
    loadings : ndarray, shape (c, n_genes)
        Mean expression profile per signature; non-negative, rows sum to 1.
    """

    config: PhantomConfig
    volume: Volume
    truth: np.ndarray
    tissue: np.ndarray
    signature_names: list[str]
    gene_names: list[str]
    loadings: np.ndarray
    structures: dict = field(default_factory=dict, repr=False)  #: geometry (airway/vessel segments, foci) in µm

    def truth_volume(self, i) -> Volume:
        """Ground-truth proportion of signature ``i`` (index or name) as a :class:`Volume`."""
        if isinstance(i, str):
            if i not in self.signature_names:
                raise VoxelomeError(f"signature {i!r} is not one of {self.signature_names}."
                                    f"{did_you_mean(i, self.signature_names)}")
            i = self.signature_names.index(i)
        if not -len(self.signature_names) <= int(i) < len(self.signature_names):
            raise VoxelomeError(f"signature index {i} is out of range 0 … {len(self.signature_names) - 1}.")
        return Volume.from_array(self.truth[int(i)], self.volume.spacing_um, self.volume.origin_um,
                                 name=self.signature_names[int(i)])

    def cut_section(self, placement=None, *, seed: int = 0, spot_diameter_um: float = 55.0,
                    spot_pitch_um: float = 100.0, thickness_um: float = 10.0,
                    mean_library_size: float = 3000.0, **kwargs):
        """Simulate a Visium section on ``placement``; see :func:`voxelome.datasets.visium.cut_section`."""
        from voxelome.datasets.visium import cut_section

        return cut_section(self, placement, seed=seed, spot_diameter_um=spot_diameter_um,
                           spot_pitch_um=spot_pitch_um, thickness_um=thickness_um,
                           mean_library_size=mean_library_size, **kwargs)


PRESETS = {
    "default": PhantomConfig(),
    #: ~1/8 of the default volume: fast enough for unit tests and smoke runs
    "small": PhantomConfig(shape=(48, 176, 176)),
}


def make_lung_phantom(config: PhantomConfig | str | None = None, **overrides) -> LungPhantom:
    """Generate the lung phantom.

    Parameters
    ----------
    config : PhantomConfig or str, optional
        Parameters, or a preset name (``"default"``, ``"small"``). Default: ``PhantomConfig()``.
    **overrides
        Fields of :class:`PhantomConfig` to replace, e.g. ``seed=3, shape=(48, 176, 176)``.

    Returns
    -------
    LungPhantom
        Volume ``(z, y, x)`` float32 in ~[0, 1], truth ``(c, z, y, x)``, tissue mask, expression model.

    Notes
    -----
    Bit-identical for the same config. The image and geometry do not depend on
    ``n_signatures`` or ``n_genes`` (independent random streams), so phantoms that differ
    only in those share the same volume. Default size: ~10 s and < 1.5 GB on 2 CPU cores.
    """
    from voxelome.datasets.visium import make_expression_model

    if config is None:
        config = PhantomConfig()
    elif isinstance(config, str):
        if config not in PRESETS:
            raise VoxelomeError(f"preset {config!r} is not one of {sorted(PRESETS)}.{did_you_mean(config, PRESETS)}")
        config = PRESETS[config]
    elif not isinstance(config, PhantomConfig):
        raise VoxelomeError(f"config must be a PhantomConfig or a preset name, got {type(config).__name__}.")
    names = [f.name for f in dataclasses.fields(PhantomConfig)]
    for key in overrides:
        if key not in names:
            raise VoxelomeError(f"make_lung_phantom got unknown parameter {key!r}.{did_you_mean(key, names)}")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    cfg, shape, sp = config, tuple(int(s) for s in config.shape), float(config.spacing_um)
    geo_rng, img_rng, expr_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(3))

    # organ outline; depth_um ≈ distance inside the pleura (the margin is in semi-axis units)
    lobe = Lobe(cfg, geo_rng)
    margin = lobe.margin(axis_um(shape[2], sp, 2), axis_um(shape[1], sp, 1), axis_um(shape[0], sp, 0))
    tissue = margin > 0
    depth_um = (margin * float(lobe.axes.min())).astype(np.float32)
    del margin

    # airway tree from a hilum on the lobe edge, vessel trees from other sides
    zlim = (0.15 * lobe.ext[2], 0.85 * lobe.ext[2])
    phi0 = geo_rng.uniform(0, 2 * np.pi)
    trunk_len = 0.55 * float(lobe.axes.min())

    def root(phi):
        direction = np.array([np.cos(phi), np.sin(phi), 0.0])
        p = lobe.centre + np.array([0.0, 0.0, geo_rng.uniform(-0.1, 0.1) * lobe.ext[2]])
        while lobe.margin(*(p + 20 * direction)) > 0.08:  # walk out to just inside the pleura
            p += 20 * direction
        return p, -direction

    p, d = root(phi0)
    airway = grow_tree(geo_rng, lobe, p, d, trunk_len, cfg.airway_radius_um, cfg.n_airway_generations, 0.78, zlim)
    vessels = []
    for k in range(cfg.n_vessel_trees):
        p, d = root(phi0 + 2 * np.pi * (k + 1) / (cfg.n_vessel_trees + 1) + geo_rng.uniform(-0.3, 0.3))
        vessels += grow_tree(geo_rng, lobe, p, d, trunk_len, cfg.vessel_radius_um, cfg.n_vessel_generations, 0.8, zlim)
    foci = place_foci(geo_rng, cfg, lobe)
    wobble, _ = smooth_noise(geo_rng, shape, sp, 80.0)
    f_int, f_int_coarse = smooth_noise(geo_rng, shape, sp, cfg.interstitial_scale_um)

    fields = {}
    fields["airway_sd_out"], fields["airway_sd_in"] = render_tubes(
        airway, shape, sp, wall_fn=lambda r: 0.25 * r + 10.0)
    fields["vessel_sd"], _ = render_tubes(vessels, shape, sp)
    sd_f = focus_distance(foci, shape, sp, wobble, cfg.focus_elongation)
    del wobble
    fields["consolidation"] = expit(-sd_f / 30.0)
    fields["immune"] = np.exp(-(((sd_f - cfg.immune_rim_um) / cfg.immune_rim_width_um) ** 2))
    del sd_f
    # interstitial patches: threshold chosen so that ≈ interstitial_fraction of the field is above it
    thr = float(np.quantile(f_int_coarse, 1 - cfg.interstitial_fraction))
    fields["interstitial"] = expit((f_int - thr) / np.float32(0.25))
    del f_int

    image = _render_image(cfg, img_rng, tissue, depth_um, fields)
    del depth_um
    fields["airway_dist"] = distance_outside(fields.pop("airway_sd_out"), shape, sp)
    del fields["airway_sd_in"]
    fields["vessel_dist"] = distance_outside(fields.pop("vessel_sd"), shape, sp)
    truth = _truth(cfg, tissue, fields)
    del fields

    gene_names, loadings = make_expression_model(cfg.n_signatures, cfg.n_genes, expr_rng)
    volume = Volume.from_array(image, (sp, sp, sp), name=f"lung phantom seed {cfg.seed}")
    structures = {"airway_segments": airway, "vessel_segments": vessels,
                  "foci": [(c.tolist(), float(r)) for c, r in foci]}
    return LungPhantom(cfg, volume, truth, tissue, list(SIGNATURE_NAMES[: cfg.n_signatures]),
                       gene_names, loadings, structures)
