"""Super-resolution pairs from real public data: her2st C2–C6 (2×2 pseudo-spots → spots, H&E features) and
STARmap 3D cells (100 µm pseudo-spots → 20 µm pixels, expression only).

See :mod:`voxelome.datasets.superres` for :class:`SuperResPair` and the grid conventions. Every builder takes the
dataset's folder as ``data_dir`` (the package itself ships no data). Nothing here runs at import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voxelome.datasets.superres import TARGET_SUM, SuperResPair, _key, _load, _save, block_mean
from voxelome.errors import VoxelomeError, check_positive

# --- her2st ---------------------------------------------------------------------------------------------------
#: her2st sections with an H&E image (patient C): section → image path under ST-imgs/C/
HER2ST_IMAGES = {"C2": "C2/5714_HE_BT_C2.jpg", "C3": "C3/5714_HE_BT_D1.jpg", "C4": "C4/5714_HE_BT_D2.jpg",
                 "C5": "C5/5714_HE_BT_E1.jpg", "C6": "C6/5714_HE_BT_E2.jpg"}


_READ: dict = {}  #: her2st sections read in this process (read-only use)


def _data_dir(data_dir, name: str) -> Path:
    if data_dir is None:
        raise VoxelomeError(f"data_dir=None: pass the folder of your {name} copy (data_dir=...).")
    d = Path(data_dir)
    if not d.is_dir():
        raise VoxelomeError(f"data_dir='{d}' is not a folder; pass the folder of your {name} copy.")
    return d


def grid_features(rgb: np.ndarray, centres_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """Handcrafted colour/texture features ``(n, 2·17)`` at points of an RGB image ``(y, x, 3)`` uint8.

    For a disk of ``radius_px`` and a context disk of twice that around each centre (working pixels,
    pixel ``(i, j)`` covering ``[j, j+1) × [i, i+1)``): means and standard deviations of RGB, H, E, D
    (skimage ``rgb2hed``), and means of the grey-level Gaussian gradient magnitude and Laplacian at
    σ = 1, 2, 4 px and of the background fraction (grey > 0.85). Parts of a disk beyond the image
    count as white background. In the spirit of the handcrafted features of ``bench_pixnet_her2st``.
    """
    from scipy import ndimage
    from skimage.color import rgb2hed

    R = int(np.ceil(2 * radius_px)) + 1
    pad = np.pad(rgb, ((R, R), (R, R), (0, 0)), constant_values=255).astype(np.float32) / 255.0
    hed = rgb2hed(np.clip(pad, 1 / 255.0, 1))
    grey = pad.mean(-1)
    chans = [pad[..., k] for k in range(3)] + [hed[..., k] for k in range(3)]
    n_stat = len(chans)
    for s in (1.0, 2.0, 4.0):
        chans += [ndimage.gaussian_gradient_magnitude(grey, s), ndimage.gaussian_laplace(grey, s)]
    chans.append((grey > 0.85).astype(np.float32))
    stack = np.stack(chans, -1)
    yy, xx = np.mgrid[-R:R + 1, -R:R + 1]
    out = []
    h, w = rgb.shape[:2]
    for cx, cy in np.asarray(centres_xy, float):
        cx, cy = min(max(cx, 0.0), w - 1e-6), min(max(cy, 0.0), h - 1e-6)  # far outside: the edge (background)
        ix, iy = int(np.floor(cx)) + R, int(np.floor(cy)) + R
        win = stack[iy - R:iy + R + 1, ix - R:ix + R + 1]
        d2 = (xx + ix - R + 0.5 - cx) ** 2 + (yy + iy - R + 0.5 - cy) ** 2
        row = []
        for rad in (radius_px, 2 * radius_px):
            v = win[d2 <= rad * rad]
            row += list(v.mean(0)) + list(v[:, :n_stat].std(0))
        out.append(row)
    return np.asarray(out, np.float64)


def her2st_pairs(test_section: str = "C2", *, sections=tuple(HER2ST_IMAGES), n_genes: int = 50,
                 n_features: int = 8, min_spots: int = 1, input_um: float = 4.0, data_dir=None,
                 cache_dir=None) -> dict[str, list[SuperResPair]]:
    """her2st C2–C6 degraded on purpose: 2×2 pseudo-spots → the real spots, with H&E features.

    Parameters
    ----------
    test_section : str
        Held-out section; the others in ``sections`` are training sections (genes, feature PCA fitted there).
    sections : sequence of str
        Sections with an image (C2–C6).
    n_genes : int
        Top genes by variance of log1p-normalised counts on the training sections
        (:func:`voxelome.train.dense2d_data.select_target_genes`, as in ``bench_pixnet_her2st``).
    n_features : int
        Image channels: PCA components of the standardised :func:`grid_features`, scaler and PCA fitted on
        every grid position of the training sections; components divided by their training sd.
    min_spots : int
        A 2×2 block is an observed pseudo-spot when ≥ ``min_spots`` of its 4 positions are measured spots;
        its value is the mean of the measured spots' log1p values (the rule of ``bench_pixnet_her2st``'s
        pseudo-spots, which use complete blocks only = ``min_spots=4``). Incomplete blocks lie at the tissue edge.
    input_um : float
        Working µm/px the H&E is resampled to for the features.
    data_dir : path
        The her2st folder (``ST-cnts``, ``ST-spotfiles``, ``ST-imgs``).
    cache_dir : path, optional
        Cache of the built pairs.

    Returns
    -------
    dict
        ``{"train": [4 pairs], "test": [1 pair]}`` named ``her2st_C3``. Grid: one high-res pixel per ST
        array position (pixel ``(i, j)`` = array ``(x0 + j, y0 + i)``, ``x0, y0`` the section's minimum
        array coordinates, so blocks match ``bench_pixnet_her2st.pseudo_spots``), ``pixel_size_um`` = 200
        (the array pitch; spots are 100 µm disks), ``factor`` = 2. ``high`` = log1p(counts / library × 1e4)
        at measured spots, ``truth`` None. ``extra``: ``array_origin`` (x0, y0), ``grid_to_px`` (2×3 affine:
        array (x, y, 1) → full-resolution image pixel (x, y), least squares over the spots), ``image_path``,
        ``image_pixel_size_um``, ``spot_diameter_um``, ``low_count`` (spots per block), ``feature_names``.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from voxelome.io.legacy_st import read_legacy_st
    from voxelome.train.dense2d_data import (
        gene_targets,
        load_he_image,
        section_geometry,
        select_target_genes,
    )

    sections = list(sections)
    if test_section not in sections:
        raise VoxelomeError(f"test_section={test_section!r} is not one of {sections}.")
    unknown = [s for s in sections if s not in HER2ST_IMAGES]
    if unknown:
        raise VoxelomeError(f"sections {unknown} have no H&E image; use some of {list(HER2ST_IMAGES)}.")
    args = dict(test=test_section, sections=sections, n_genes=n_genes, n_features=n_features, min_spots=min_spots,
                input_um=input_um, data_dir=str(data_dir), v=1)
    path = Path(cache_dir) / f"her2st_pairs_{_key(**args)}.npz" if cache_dir else None
    if path is not None and (hit := _load(path)) is not None:
        return hit
    d = _data_dir(data_dir, "her2st")
    train_names = [s for s in sections if s != test_section]
    ads = {}
    for s in sections:  # the count tables take seconds each: read once per process (folds share them)
        files = (d / "ST-cnts" / f"{s}.tsv.gz", d / "ST-spotfiles" / f"{s}_selection.tsv")
        key = tuple(str(f.resolve()) for f in files)
        if key not in _READ:
            _READ[key] = read_legacy_st(*files)
        ads[s] = _READ[key]
    genes = select_target_genes([ads[s] for s in train_names], int(n_genes), "variance")
    raw = {}
    for s in sections:
        ad = ads[s]
        px_um, diam = section_geometry(ad)
        ax, ay = ad.obs["array_x"].to_numpy(int), ad.obs["array_y"].to_numpy(int)
        x0, y0 = int(ax.min()), int(ay.min())
        H, W = -(-(int(ay.max()) - y0 + 1) // 2) * 2, -(-(int(ax.max()) - x0 + 1) // 2) * 2
        vals = gene_targets(ad, genes)
        high = np.zeros((len(genes), H, W), np.float32)
        mask = np.zeros((H, W), bool)
        high[:, ay - y0, ax - x0] = vals.T
        mask[ay - y0, ax - x0] = True
        low, cnt = block_mean(high, mask, 2)
        low_mask = cnt >= int(min_spots)
        low *= low_mask
        A = np.column_stack([ax, ay, np.ones(len(ax))])
        aff = np.linalg.lstsq(A, np.asarray(ad.obsm["spatial"], float)[:, :2], rcond=None)[0].T  # (2, 3)
        img_path = d / "ST-imgs" / "C" / HER2ST_IMAGES[s]
        fkey = (str(img_path.resolve()), float(input_um), "features")
        if fkey not in _READ:  # image features do not depend on the fold either
            rgb, (sx, sy) = load_he_image(img_path, px_um, input_um)
            gy, gx = np.mgrid[0:H, 0:W]
            full = np.column_stack([gx.ravel() + x0, gy.ravel() + y0, np.ones(H * W)]) @ aff.T
            centres = np.column_stack([(full[:, 0] + 0.5) * sx, (full[:, 1] + 0.5) * sy])
            _READ[fkey] = grid_features(rgb, centres, diam / 2 / (px_um / ((sx + sy) / 2)))
        feats = _READ[fkey]
        raw[s] = dict(high=high, mask=mask, low=low.astype(np.float32), low_mask=low_mask, cnt=cnt, feats=feats,
                      extra={"array_origin": (x0, y0), "grid_to_px": aff, "image_path": str(img_path),
                             "image_pixel_size_um": float(px_um), "spot_diameter_um": float(diam),
                             "low_count": cnt, "section": s})
    scaler = StandardScaler().fit(np.vstack([raw[s]["feats"] for s in train_names]))
    pca = PCA(n_components=int(n_features), random_state=0).fit(
        scaler.transform(np.vstack([raw[s]["feats"] for s in train_names])))
    sd = np.sqrt(pca.explained_variance_)
    out = {"train": [], "test": []}
    for s in sections:
        r = raw[s]
        H, W = r["mask"].shape
        img = (pca.transform(scaler.transform(r["feats"])) / sd).T.reshape(-1, H, W).astype(np.float32)
        extra = r["extra"] | {"feature_names": [f"he_pc{k}" for k in range(img.shape[0])],
                              "split": "test" if s == test_section else "train"}
        pair = SuperResPair(f"her2st_{s}", list(genes), 2, 200.0, r["high"], r["mask"], r["low"], r["low_mask"],
                            img, None, extra).validate()
        out["test" if s == test_section else "train"].append(pair)
    if path is not None:
        _save(path, out)
    return out


# --- STARmap --------------------------------------------------------------------------------------------------
#: default split of the STARmap grid by low-res block rows (y): cortical layers run along x, so every
#: strip holds all layers; one-block gaps separate the parts.
STARMAP_SPLIT = {"test": (0, 4), "val": (5, 7), "train": (8, 16)}


def starmap_pairs(*, pixel_um: float = 20.0, factor: int = 5, split: dict | None = None, min_cells: int = 1,
                  data_dir=None) -> dict[str, list[SuperResPair]]:
    """STARmap 3D cells (Wang et al. 2018) → cell-scale maps and 100 µm pseudo-spots, expression only.

    Cells with no signal (85 of 4,000) are dropped; each cell's 28 values are log1p-normalised
    (``log1p(x / library × 1e4)``, library over the 28 genes). Cell centroids are projected to
    (x, y) — the block is thin in z (6–94 units) — and taken as µm (the source does not state units;
    nearest-neighbour spacing ≈ 11 units fits cells in µm).

    Parameters
    ----------
    pixel_um : float
        High-res pixel: value = mean of the cells whose centroid falls in it; mask = ≥ ``min_cells`` cells.
        At 20 µm about 42 % of the pixels hold a cell (1.4 cells on average).
    factor : int
        Pseudo-spot = ``factor`` pixels (100 µm): mean of the *cells* in the block (not of the pixels),
        observed when it holds ≥ ``min_cells`` cells.
    split : dict, optional
        ``{"train"|"val"|"test": (first, stop) low-res block rows}``; default :data:`STARMAP_SPLIT`
        (test y 0–400 µm, val 500–700 µm, train 800–1600 µm).
    data_dir : path
        The STARmap folder (``starmap_cell_loc.txt``, ``starmap_expr.txt.gz``).

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}``, one pair per part (``starmap_strip0`` …, in
        y order), ``image`` None, ``truth`` None; ``extra``: ``y0_um`` (top edge), ``n_cells``
        ``(H, W)`` cells per pixel, ``split``. The grid starts at (x, y) = (0, 0) µm.
    """
    import pandas as pd

    check_positive("pixel_um", pixel_um)
    d = _data_dir(data_dir, "starmap3d_mini_giotto")
    loc = np.loadtxt(d / "starmap_cell_loc.txt")
    expr = pd.read_csv(d / "starmap_expr.txt.gz", sep=" ", index_col=0)
    x = expr.to_numpy().T.astype(np.float64)
    lib = x.sum(1)
    ok = lib > 0
    vals = np.log1p(TARGET_SUM * x[ok] / lib[ok, None]).astype(np.float64)
    xy = loc[ok, :2]
    f = int(factor)
    block = pixel_um * f
    h, w = int(np.ceil(xy[:, 1].max() / block + 1e-9)), int(np.ceil(xy[:, 0].max() / block + 1e-9))
    H, W = h * f, w * f
    iy, ix = np.minimum((xy[:, 1] // pixel_um).astype(int), H - 1), np.minimum((xy[:, 0] // pixel_um).astype(int), W - 1)
    G = vals.shape[1]
    ncell = np.zeros((H, W))
    np.add.at(ncell, (iy, ix), 1)
    s = np.zeros((G, H, W))
    for g in range(G):
        np.add.at(s[g], (iy, ix), vals[:, g])
    mask = ncell >= min_cells
    high = (np.divide(s, ncell, out=np.zeros_like(s), where=ncell > 0) * mask).astype(np.float32)
    bc = ncell.reshape(h, f, w, f).sum((1, 3))
    bs = s.reshape(G, h, f, w, f).sum((2, 4))
    low_mask = bc >= min_cells
    low = (np.divide(bs, bc, out=np.zeros_like(bs), where=bc > 0) * low_mask).astype(np.float32)
    split = dict(STARMAP_SPLIT if split is None else split)
    out = {"train": [], "val": [], "test": []}
    genes = list(map(str, expr.index))
    for k, (part, (a, b)) in enumerate(sorted(split.items(), key=lambda kv: kv[1][0])):
        if part not in out or not 0 <= a < b <= h:
            raise VoxelomeError(f"split[{part!r}]={(a, b)!r}: parts are train/val/test with block rows 0 ≤ a < b ≤ {h}.")
        hs = slice(a * f, b * f)
        out[part].append(SuperResPair(
            f"starmap_strip{k}", genes, f, float(pixel_um), high[:, hs].copy(), mask[hs].copy(),
            low[:, a:b].copy(), low_mask[a:b].copy(), None, None,
            {"y0_um": float(a * block), "n_cells": ncell[hs].astype(int), "split": part}).validate())
    return out
