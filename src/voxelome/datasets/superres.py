"""Paired low-res / high-res expression maps for super-resolved ST (cross-modal diffusion, Wang et al., MICCAI 2024).

A :class:`SuperResPair` holds one 2D section on two aligned grids: the high-resolution target
``(G, H, W)`` and the low-resolution spot map ``(G, h, w)`` with ``H = h·factor``, ``W = w·factor``
(low-res pixel ``(i, j)`` covers high-res pixels ``[i·f, (i+1)·f) × [j·f, (j+1)·f)``), plus optional
histology features on the high-res grid. Values are on the log1p-normalised scale
``log1p(counts / library × 1e4)`` (library over all genes of the spot), the scale of
:func:`voxelome.signatures.svg.normalize_log1p`.

Builders (each seeded; cached under ``cache_dir`` where slow):

- :func:`phantom_pairs` — axial slices of the lung phantom, noiseless truth at 20 µm, simulated
  100 µm spots (Poisson counts), rendered H&E features; train/val/test split by z with gaps;
- :func:`her2st_pairs` — her2st C2–C6: the real spots on the ST array grid (200 µm pitch) as
  target, 2×2 pseudo-spots as input, H&E features per grid position (PCA fitted on training sections);
- :func:`starmap_pairs` — STARmap 3D cells rasterised to 20 µm pixels, 100 µm pseudo-spots, no image;
  train/val/test = strips along x.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError, check_positive

#: library-size normalisation target (counts per spot after scaling), as in scanpy's normalize_total
TARGET_SUM = 1e4


@dataclass
class SuperResPair:
    """One 2D low-res / high-res expression pair on aligned grids.

    Attributes
    ----------
    name : str
        E.g. ``"phantom_z040"``, ``"her2st_C3"``, ``"starmap_strip2"``.
    genes : list of str
        The ``G`` channel names.
    factor : int
        High-res pixels per low-res pixel along y and x.
    pixel_size_um : float
        High-res pixel size (µm); a low-res pixel is ``factor · pixel_size_um`` wide.
    high : ndarray, shape (G, H, W), float32
        Target on the log1p-normalised scale; 0 where ``~high_mask``.
    high_mask : ndarray, shape (H, W), bool
        Where ``high`` is measured (tissue / spots / cells).
    low : ndarray, shape (G, h, w), float32
        Low-res spot map, ``H = h·factor``, ``W = w·factor``; 0 where ``~low_mask``.
    low_mask : ndarray, shape (h, w), bool
        Low-res pixel observed.
    image : ndarray, shape (F, H, W), float32, or None
        Standardised histology features on the high-res grid; None = expression-only.
    truth : ndarray, shape (G, H, W), float32, or None
        Noiseless truth when known (phantom), else None.
    extra : dict
        Optional extras, e.g. ``{"dense": (G, H, W) dense-model prediction}``; see each builder.
    """

    name: str
    genes: list[str]
    factor: int
    pixel_size_um: float
    high: np.ndarray
    high_mask: np.ndarray
    low: np.ndarray
    low_mask: np.ndarray
    image: np.ndarray | None
    truth: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """High-res grid ``(H, W)``."""
        return tuple(self.high.shape[1:])

    def validate(self) -> SuperResPair:
        """Check shapes, dtypes and finiteness; raise :class:`VoxelomeError` naming the field and the fix."""
        def bad(what, value, fix):
            raise VoxelomeError(f"SuperResPair {self.name!r}: {what} (got {value}). {fix}")

        if not isinstance(self.factor, (int, np.integer)) or isinstance(self.factor, bool) or self.factor < 1:
            bad("factor must be an integer ≥ 1", repr(self.factor), "Use e.g. factor=5 (high-res pixels per spot).")
        if not np.isfinite(self.pixel_size_um) or self.pixel_size_um <= 0:
            bad("pixel_size_um must be a finite number > 0", repr(self.pixel_size_um), "Give the µm per high-res pixel.")
        for key, nd in (("high", 3), ("low", 3), ("high_mask", 2), ("low_mask", 2)):
            arr = getattr(self, key)
            if not isinstance(arr, np.ndarray) or arr.ndim != nd:
                bad(f"{key} must be a {nd}D numpy array", getattr(arr, "shape", type(arr).__name__),
                    f"Pass {key} as {'(G, y, x)' if nd == 3 else '(y, x)'}.")
        for key in ("high", "low"):
            if getattr(self, key).dtype != np.float32:
                bad(f"{key}.dtype must be float32", getattr(self, key).dtype, f"Use {key}.astype(np.float32).")
        for key in ("high_mask", "low_mask"):
            if getattr(self, key).dtype != bool:
                bad(f"{key}.dtype must be bool", getattr(self, key).dtype, f"Use {key}.astype(bool).")
        G, H, W = self.high.shape
        if len(self.genes) != G:
            bad("len(genes) must equal high.shape[0]", f"{len(self.genes)} names vs {G} channels", "One name per gene.")
        if self.high_mask.shape != (H, W):
            bad("high_mask.shape must equal high.shape[1:]", f"{self.high_mask.shape} vs {(H, W)}", "Align the grids.")
        f = int(self.factor)
        if H % f or W % f or self.low.shape != (G, H // f, W // f):
            bad(f"low.shape must be (G, H/factor, W/factor) = {(G, H / f, W / f)}", self.low.shape,
                "Crop the high-res grid to a multiple of factor and aggregate factor×factor blocks.")
        if self.low_mask.shape != self.low.shape[1:]:
            bad("low_mask.shape must equal low.shape[1:]", f"{self.low_mask.shape} vs {self.low.shape[1:]}",
                "Align the grids.")
        for key in ("image", "truth"):
            arr = getattr(self, key)
            if arr is None:
                continue
            if not isinstance(arr, np.ndarray) or arr.ndim != 3 or arr.shape[1:] != (H, W) or arr.dtype != np.float32:
                bad(f"{key} must be a float32 array (·, {H}, {W})", f"{getattr(arr, 'shape', arr)}, "
                    f"{getattr(arr, 'dtype', '')}", f"Resample {key} to the high-res grid, or pass None.")
            if key == "truth" and arr.shape[0] != G:
                bad("truth must have one channel per gene", arr.shape, "Give truth as (G, H, W).")
        for key in ("high", "low", "image", "truth"):
            arr = getattr(self, key)
            if arr is not None and not np.isfinite(arr).all():
                bad(f"{key} holds NaN/inf", f"{int((~np.isfinite(arr)).sum())} values",
                    f"Fill unmeasured pixels of {key} with 0 and mark them in the mask.")
        if (self.high[:, ~self.high_mask] != 0).any() or (self.low[:, ~self.low_mask] != 0).any():
            bad("high/low must be 0 outside their masks", "non-zero values", "Multiply by the mask.")
        return self

    def crop(self, y0: int, x0: int, H: int, W: int) -> SuperResPair:
        """Sub-pair of high-res pixels ``[y0, y0+H) × [x0, x0+W)``; all four must be multiples of ``factor``."""
        f = int(self.factor)
        if any(v % f for v in (y0, x0, H, W)) or H <= 0 or W <= 0:
            raise VoxelomeError(f"crop(y0={y0}, x0={x0}, H={H}, W={W}) must use positive multiples of factor={f} "
                                "so the low-res grid stays aligned.")
        if y0 < 0 or x0 < 0 or y0 + H > self.shape[0] or x0 + W > self.shape[1]:
            raise VoxelomeError(f"crop [{y0}:{y0 + H}, {x0}:{x0 + W}] leaves the {self.shape} grid.")
        hs, ls = (slice(y0, y0 + H), slice(x0, x0 + W)), (slice(y0 // f, (y0 + H) // f), slice(x0 // f, (x0 + W) // f))
        ex = {k: (v[(..., *hs)] if isinstance(v, np.ndarray) and v.shape[-2:] == self.shape else v)
              for k, v in self.extra.items()}
        return dataclasses.replace(
            self, name=f"{self.name}_y{y0}x{x0}", high=self.high[(slice(None), *hs)], high_mask=self.high_mask[hs],
            low=self.low[(slice(None), *ls)], low_mask=self.low_mask[ls],
            image=None if self.image is None else self.image[(slice(None), *hs)],
            truth=None if self.truth is None else self.truth[(slice(None), *hs)], extra=ex)


def block_mean(values: np.ndarray, mask: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values (G, H, W)`` over the masked pixels of each ``factor×factor`` block.

    Returns ``(mean (G, H/f, W/f) float32, 0 where no pixel is masked; count (H/f, W/f) int)``.
    """
    G, H, W = values.shape
    f = int(factor)
    m = mask.astype(np.float64)
    cnt = m.reshape(H // f, f, W // f, f).sum((1, 3))
    s = (values * m).reshape(G, H // f, f, W // f, f).sum((2, 4))
    mean = np.divide(s, cnt, out=np.zeros_like(s), where=cnt > 0)
    return mean.astype(np.float32), cnt.astype(int)


def _key(**kw) -> str:
    return hashlib.sha1(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:12]


_FIELDS = ("high", "high_mask", "low", "low_mask", "image", "truth")


def _save(path: Path, pairs: dict) -> None:
    """Cache ``{split: [SuperResPair]}`` as one ``.npz`` (arrays, no pickle) with a JSON header; atomic."""
    arrays, index = {}, {}
    for split, items in pairs.items():
        index[split] = []
        for k, p in enumerate(items):
            tag = f"{split}{k}"
            meta = {"name": p.name, "genes": list(p.genes), "factor": int(p.factor),
                    "pixel_size_um": float(p.pixel_size_um), "extra": {}, "extra_arrays": []}
            for f in _FIELDS:
                if getattr(p, f) is not None:
                    arrays[f"{tag}/{f}"] = getattr(p, f)
            for key, v in p.extra.items():
                if isinstance(v, np.ndarray):
                    arrays[f"{tag}/extra/{key}"] = v
                    meta["extra_arrays"].append(key)
                else:
                    meta["extra"][key] = v
            index[split].append(meta)
    arrays["index.json"] = np.frombuffer(json.dumps(index).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load(path: Path):
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        index = json.loads(bytes(z["index.json"]).decode())
        out = {}
        for split, metas in index.items():
            out[split] = []
            for k, m in enumerate(metas):
                tag = f"{split}{k}"
                arr = {f: (z[f"{tag}/{f}"] if f"{tag}/{f}" in z.files else None) for f in _FIELDS}
                extra = dict(m["extra"]) | {key: z[f"{tag}/extra/{key}"] for key in m["extra_arrays"]}
                out[split].append(SuperResPair(m["name"], m["genes"], m["factor"], m["pixel_size_um"], extra=extra,
                                               **arr))
    return out


# --- phantom --------------------------------------------------------------------------------------------------
def he_features(rgb: np.ndarray, r: int) -> tuple[np.ndarray, list[str]]:
    """Raw features ``(F, y/r, x/r)`` of an RGB H&E image ``(y, x, 3)`` uint8 pooled over ``r×r`` pixel blocks.

    Channels: optical density (OD) R, G, B means; haematoxylin and eosin (skimage ``rgb2hed``) means;
    within-block OD standard deviation (texture); mean OD gradient magnitude (σ = 1 px); OD smoothed at
    σ = 2 output pixels (context).
    """
    from scipy import ndimage
    from skimage.color import rgb2hed

    Y, X = (rgb.shape[0] // r) * r, (rgb.shape[1] // r) * r
    x = np.clip(rgb[:Y, :X].astype(np.float32) / 255.0, 1 / 255.0, 1.0)
    od = -np.log(x)
    hed = rgb2hed(x).astype(np.float32)
    tot = od.mean(-1)
    grad = ndimage.gaussian_gradient_magnitude(tot, 1.0)

    def pool(a):
        return a.reshape(Y // r, r, X // r, r).mean((1, 3))

    chans = [pool(od[..., k]) for k in range(3)] + [pool(hed[..., 0]), pool(hed[..., 1])]
    chans.append(np.sqrt(np.maximum(pool(tot**2) - pool(tot) ** 2, 0)))
    chans.append(pool(grad))
    chans.append(ndimage.gaussian_filter(pool(tot), 2.0))
    names = ["od_r", "od_g", "od_b", "haematoxylin", "eosin", "od_std", "od_gradient", "od_context"]
    return np.stack(chans).astype(np.float32), names


def _phantom_slice(ph, z: int, sel, pix: int, factor: int, he_um: float, seed: int, noise: bool,
                   library_size: float, he: bool):
    """One axial slice → dict of arrays (high-res grid cropped to a multiple of ``factor``)."""
    from voxelome.datasets.histology import render_he
    from voxelome.register.placement import SectionPlacement

    sp = float(ph.config.spacing_um)
    _, Y, X = ph.tissue.shape
    H, W = (Y // pix) // factor * factor, (X // pix) // factor * factor
    tis = ph.tissue[z, :H * pix, :W * pix].astype(np.float64)
    prop = ph.truth[:, z, :H * pix, :W * pix].astype(np.float64)  # 0 outside tissue
    c = prop.shape[0]
    frac = tis.reshape(H, pix, W, pix).mean((1, 3))
    psum = prop.reshape(c, H, pix, W, pix).sum((2, 4))
    mask = frac >= 0.5
    rate = np.einsum("chw,cg->ghw", psum / np.maximum(frac * pix * pix, 1e-12), ph.loadings[:, sel])
    high = (np.log1p(TARGET_SUM * rate) * mask).astype(np.float32)
    f2 = pix * factor
    bfrac = tis.reshape(H // factor, f2, W // factor, f2).mean((1, 3))
    low_mask = bfrac >= 0.5
    if noise:
        rng = np.random.default_rng([seed, 7, z])
        bprop = prop.reshape(c, H // factor, f2, W // factor, f2).sum((2, 4)) / np.maximum(bfrac * f2 * f2, 1e-12)
        brate = np.einsum("chw,cg->hwg", bprop, ph.loadings)  # all genes: the library is over all of them
        counts = rng.poisson(library_size * bfrac[..., None] * brate)
        lib = counts.sum(-1, keepdims=True)
        norm = np.log1p(TARGET_SUM * counts / np.maximum(lib, 1))[..., sel]
        low = np.moveaxis(norm, -1, 0).astype(np.float32)
        low_mask &= lib[..., 0] > 0
        low *= low_mask
    else:
        low, cnt = block_mean(high, mask, factor)
        low_mask &= cnt > 0
        low *= low_mask
    out = {"high": high, "mask": mask, "low": low.astype(np.float32), "low_mask": low_mask}
    if he:
        r = round(pix * sp / he_um)
        # a slab around z keeps render_he cheap (it smooths its whole volume); pixel (0,0) covers voxel corner
        z0, z1 = max(z - 6, 0), min(z + 7, ph.tissue.shape[0])
        vol = ph.volume
        origin = (vol.origin_um[0] + z0 * vol.spacing_um[0],) + tuple(vol.origin_um[1:])
        sub_vol = type(vol).from_array(np.asarray(vol.data[z0:z1]), vol.spacing_um, origin, name=vol.name)
        sub = dataclasses.replace(ph, volume=sub_vol, truth=ph.truth[:, z0:z1], tissue=ph.tissue[z0:z1])
        off = -sp / 2 + he_um / 2
        place = SectionPlacement.from_slice(sub_vol, z - z0, he_um, offset_um=(off, off))
        rgb, _ = render_he(sub, place, shape=(H * r, W * r), seed=int(np.random.SeedSequence([seed, 11, z])
                                                                      .generate_state(1)[0]), crop=False)
        out["he_rgb"] = rgb
        out["he_r"] = r
    return out


def phantom_pairs(config: str = "default", *, seed: int = 0, n_genes: int = 32, pixel_um: float = 20.0,
                  factor: int = 5, z_step: int | None = None, z_margin: int = 6, splits=(0.6, 0.2, 0.2),
                  gap_um: float = 40.0,
                  noise: bool = True, library_size: float = 12000.0, he: bool = True, he_um: float = 5.0,
                  phantom=None, cache_dir=None) -> dict[str, list[SuperResPair]]:
    """Low/high-res pairs from axial slices of the lung phantom (the case with high-res ground truth).

    Parameters
    ----------
    config : str
        Phantom preset (``"default"``: 352×352 voxels of 10 µm per slice, 112 slices; ``"small"``: 176×176, 48).
    seed : int
        Phantom seed; counts and H&E draw from ``(seed, z)``.
    n_genes : int
        Genes kept: the most variable of ``log1p(1e4 · rate)`` over the tissue pixels of the training slices.
    pixel_um : float
        High-res pixel (an integer multiple of the 10 µm voxel); the expression rate of a pixel is the mean
        over its tissue voxels, ``high = log1p(1e4 · rate)``, mask = pixel ≥ 50 % tissue.
    factor : int
        High-res pixels per spot side (20 µm × 5 = 100 µm square spots). The grid is cropped to a multiple.
    z_step, z_margin : int
        Use every ``z_step``-th slice (default ``round(n_slices / 28)``: 4 for "default", 2 for "small"),
        skipping ``z_margin`` slices at both ends.
    splits : (float, float, float)
        Train / val / test shares of the used z range, in this order along z.
    gap_um : float
        The first slices of the val and test bands are dropped up to ``gap_um`` past the band's start, so a
        held-out slice is more than ``gap_um`` (plus one step) from any slice of the split before it.
    noise : bool
        True: spot = Poisson(library · block tissue fraction · block-mean rate) counts over *all* genes,
        then ``log1p(1e4 · counts / library)``. False: ``low`` = mean of ``high`` over the block's masked
        pixels exactly (the degradation operator of the real-data pairs). Spots are kept (``low_mask``)
        when ≥ 50 % of the block is tissue. Note ``E[low]`` with noise is ≈ log1p of the block-mean rate,
        which exceeds the block mean of log1p (Jensen) where expression varies inside the block.
    library_size : float
        Counts of a spot fully in tissue: 12,000 for a 100 µm square ≈ the 3,000 of the phantom's simulated
        55 µm Visium disk (:func:`voxelome.datasets.visium.cut_section`) scaled by area (×4.2).
    he, he_um : bool, float
        Render H&E (:func:`voxelome.datasets.histology.render_he`) at ``he_um`` µm/px and pool
        :func:`he_features` onto the high-res grid, standardised with the training slices' mean/sd
        (over masked pixels). ``he=False`` gives ``image=None``.
    phantom : LungPhantom, optional
        Use this phantom instead of ``make_lung_phantom(config, seed=seed)`` (``config`` is then ignored).
    cache_dir : path, optional
        Cache of the built pairs (keyed by every argument and the phantom's config).

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}`` of :class:`SuperResPair` named ``phantom_z040``;
        ``truth`` = ``high`` (noiseless); ``extra``: ``z_index``, ``z_um``, ``he_rgb`` (``(H·r, W·r, 3)`` uint8,
        pixel ``(0, 0)`` aligned with high-res pixel ``(0, 0)``), ``he_um``, ``feature_names``, ``split``.
    """
    from voxelome.datasets.phantom import make_lung_phantom

    check_positive("pixel_um", pixel_um)
    check_positive("library_size", library_size)
    if len(splits) != 3 or min(splits) <= 0:
        raise VoxelomeError(f"splits={splits!r} must be three positive shares (train, val, test), e.g. (0.6, 0.2, 0.2).")
    args = dict(config=config, seed=seed, n_genes=n_genes, pixel_um=pixel_um, factor=factor, z_step=z_step,
                z_margin=z_margin, splits=list(splits), gap_um=gap_um, noise=noise, library_size=library_size, he=he,
                he_um=he_um, v=1, phantom=None if phantom is None else dataclasses.asdict(phantom.config))
    path = Path(cache_dir) / f"phantom_pairs_{_key(**args)}.npz" if cache_dir else None
    if path is not None and (hit := _load(path)) is not None:
        return hit
    ph = make_lung_phantom(config, seed=seed) if phantom is None else phantom
    sp = float(ph.config.spacing_um)
    pix = round(pixel_um / sp)
    if pix < 1 or abs(pix * sp - pixel_um) > 1e-6:
        raise VoxelomeError(f"pixel_um={pixel_um} must be an integer multiple of the {sp:g} µm voxel, e.g. 20.")
    nz = ph.tissue.shape[0]
    z_step = max(1, round(nz / 28)) if z_step is None else int(z_step)
    zs = np.arange(z_margin, nz - z_margin, max(z_step, 1))
    edges = np.cumsum(np.asarray(splits, float) / sum(splits))[:-1] * (zs[-1] - zs[0] + 1) + zs[0]
    lab = np.digitize(zs, edges)
    gap = gap_um / sp
    keep = np.array([lab[i] == 0 or z - edges[lab[i] - 1] >= gap for i, z in enumerate(zs)])
    zsplit = {name: zs[(lab == k) & keep].tolist() for k, name in enumerate(("train", "val", "test"))}
    if any(not v for v in zsplit.values()):
        raise VoxelomeError(f"the split {zsplit} leaves a part empty; lower z_step or gap_um.")
    # genes: most variable of the high-res truth over the training slices' tissue pixels
    acc = np.zeros((3, ph.loadings.shape[1]))  # n, Σ, Σ² per gene, one slice at a time (memory)
    for z in zsplit["train"]:
        lg = np.log1p(TARGET_SUM * (ph.truth[:, z][:, ph.tissue[z]].T.astype(np.float64) @ ph.loadings))
        acc += [np.full(lg.shape[1], len(lg)), lg.sum(0), (lg ** 2).sum(0)]
    var = acc[2] / acc[0] - (acc[1] / acc[0]) ** 2
    sel = np.sort(np.argsort(-var, kind="stable")[:int(n_genes)])
    genes = [ph.gene_names[i] for i in sel]
    raw = {s: [(z, _phantom_slice(ph, z, sel, pix, factor, he_um, seed, noise, library_size, he)) for z in v]
           for s, v in zsplit.items()}
    feats, names, stats = {}, None, None
    if he:
        for s, items in raw.items():
            for z, d in items:
                feats[z], names = he_features(d["he_rgb"], d["he_r"])
        allf = np.concatenate([feats[z][:, d["mask"]] for z, d in raw["train"]], axis=1)
        stats = (allf.mean(1)[:, None, None], allf.std(1)[:, None, None] + 1e-6)
    out = {}
    for s, items in raw.items():
        out[s] = []
        for z, d in items:
            img = ((feats[z] - stats[0]) / stats[1]).astype(np.float32) if he else None
            extra = {"z_index": int(z), "z_um": float(z * sp), "split": s}
            if he:
                extra.update(he_rgb=d["he_rgb"], he_um=float(he_um), feature_names=names)
            out[s].append(SuperResPair(f"phantom_z{z:03d}", genes, int(factor), float(pix * sp), d["high"], d["mask"],
                                       d["low"], d["low_mask"], img, d["high"].copy(), extra).validate())
    if path is not None:
        _save(path, out)
    return out


# Real-data builders live in their own module (they read public data folders); re-exported for callers.
from voxelome.datasets.superres_real import (  # noqa: E402
    HER2ST_IMAGES, STARMAP_SPLIT, grid_features, her2st_pairs, starmap_pairs,
)

__all__ = ["HER2ST_IMAGES", "STARMAP_SPLIT", "SuperResPair", "TARGET_SUM", "block_mean", "grid_features",
           "he_features", "her2st_pairs", "phantom_pairs", "starmap_pairs"]
