"""OME-Zarr (NGFF 0.4, zarr format 2) writer and reader for ``(c, z, y, x)`` volumes in µm.

Layout written here (readable by napari-ome-zarr and any NGFF 0.4 reader)::

    out.zarr/
      .zgroup  .zattrs          # multiscales (axes c,z,y,x; units micrometer) + omero channels
      0/  1/  2/ ...            # level 0 = full resolution, each next level 2× coarser in z/y/x

Level ``k`` of axis ``a`` has scale ``spacing_a * f_a`` and translation
``origin_a + (f_a - 1) / 2 * spacing_a`` (``f_a`` the cumulative factor), so voxel centres of
every level sit at the right place in µm. Group metadata is written atomically (temp + rename)
so a crash cannot leave a store napari refuses to open.
"""

from __future__ import annotations

import json

import math
import shutil
import warnings
from pathlib import Path

import dask.array as da
import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.io.atomic import atomic_write_json
from voxelome.io.volume import DEFAULT_CHUNKS, Volume, _as_triplet
from voxelome.io.guarded import GuardedArray, missing_path_error, unit_to_um

__all__ = ["create_ome_zarr", "build_pyramid", "read_ome_zarr", "write_volume_ome_zarr"]

NGFF_VERSION = "0.4"
_AXES = [{"name": "c", "type": "channel"}] + [
    {"name": a, "type": "space", "unit": "micrometer"} for a in ("z", "y", "x")
]


def _compressor():
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)


def _level_transforms(spacing, origin, factors=(1, 1, 1)):
    scale = [s * f for s, f in zip(spacing, factors)]
    # mean of f voxels is centred half-way between the first and the f-th voxel centre
    trans = [o + (f - 1) / 2 * s for o, s, f in zip(origin, spacing, factors)]
    return [{"type": "scale", "scale": [1.0] + scale}, {"type": "translation", "translation": [0.0] + trans}]


def _attrs(name, spacing, origin, channel_names, level_factors, windows=None):
    datasets = [{"path": str(k), "coordinateTransformations": _level_transforms(spacing, origin, f)}
                for k, f in enumerate(level_factors)]
    channels = []
    for i, label in enumerate(channel_names):
        lo, hi = windows[i] if windows is not None else (0.0, 1.0)
        channels.append({"label": str(label), "color": "FFFFFF", "active": True,
                         "window": {"start": lo, "end": hi, "min": lo, "max": hi}})
    return {
        "multiscales": [{"version": NGFF_VERSION, "name": name, "axes": _AXES, "datasets": datasets,
                         "type": "mean", "metadata": {"method": "voxelome.io.omezarr.build_pyramid"}}],
        "omero": {"version": NGFF_VERSION, "name": name, "channels": channels, "rdefs": {"model": "greyscale"}},
    }


def _open_group(path: Path, mode: str = "r"):
    import zarr

    if not path.exists():
        raise missing_path_error(path, "OME-Zarr store")
    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # noqa: BLE001 - unreadable JSON, missing .zgroup, …
        raise VoxelomeError(f"'{path}' is not a readable zarr group ({type(exc).__name__}: {exc}); its metadata "
                            "is missing or corrupt. Re-create the store (overwrite=True) or check the path.") from exc


def _parse_multiscales(group, path: Path) -> dict:
    """Axes, dataset paths and per-level scale/translation (space axes in µm) of an NGFF group."""
    attrs = dict(group.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")  # 0.4 / 0.5
    if not ms or not isinstance(ms, list) or not ms[0].get("datasets"):
        raise VoxelomeError(f"'{path}' is a zarr group without NGFF 'multiscales' metadata; it is not OME-Zarr. "
                            "Read one of its arrays with read_volume(path, key='<array>', spacing_um=...).")
    m = ms[0]
    raw_axes = m.get("axes") or ["t", "c", "z", "y", "x"]  # NGFF ≤ 0.2 had no axes: always tczyx
    axes = [a if isinstance(a, str) else a.get("name") for a in raw_axes]
    factors = []
    for a in raw_axes:
        is_space = (a in "zyx") if isinstance(a, str) else a.get("type") == "space" or a.get("name") in "zyx"
        unit = None if isinstance(a, str) else a.get("unit")
        f = unit_to_um(unit) if is_space else 1.0
        if is_space and f is None:
            warnings.warn(f"'{path}': axis {a!r} has no known length unit ({unit!r}); assuming micrometres.",
                          UserWarning, stacklevel=3)
            f = 1.0
        factors.append(f)
    g_scale, g_trans = _transforms(m.get("coordinateTransformations"), len(axes))
    scales, translations = [], []
    for ds in m["datasets"]:
        s, t = _transforms(ds.get("coordinateTransformations"), len(axes))
        scales.append([gs * v * f for gs, v, f in zip(g_scale, s, factors)])
        translations.append([(gs * v + gt) * f for gs, v, gt, f in zip(g_scale, t, g_trans, factors)])
    channels = attrs.get("omero", {}).get("channels") or []
    names = [str(c.get("label", f"c{i}")) for i, c in enumerate(channels)]
    return {"axes": axes, "paths": [str(ds["path"]) for ds in m["datasets"]], "scales": scales,
            "translations": translations, "channel_names": names, "name": m.get("name")}


def _transforms(items, n):
    scale, trans = [1.0] * n, [0.0] * n
    for t in items or []:
        if t.get("type") == "scale" and "scale" in t:
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation" and "translation" in t:
            trans = [float(v) for v in t["translation"]]
    return scale, trans


def _open_level(group, path: Path, level: int, chunks=None):
    """Level ``level`` as dask ``(c, z, y, x)`` + spacing/origin ``(z, y, x)`` in µm + channel names."""
    meta = _parse_multiscales(group, path)
    if not 0 <= level < len(meta["paths"]):
        raise VoxelomeError(f"level={level} is not in '{path}'; it has levels 0…{len(meta['paths']) - 1}.")
    try:
        arr = group[meta["paths"][level]]
    except Exception as exc:  # noqa: BLE001
        raise VoxelomeError(f"level {level} ('{meta['paths'][level]}') of '{path}' is missing or its metadata is "
                            f"corrupt ({type(exc).__name__}: {exc}). Re-create the store.") from exc
    axes = meta["axes"]
    if len(axes) != arr.ndim or not {"z", "y", "x"} <= set(axes) or set(axes) - {"t", "c", "z", "y", "x"}:
        raise VoxelomeError(f"'{path}' has axes {axes} for an array of shape {arr.shape}; "
                            "expected a 3D volume with axes among (t, c, z, y, x).")
    guarded = GuardedArray(arr, path, f"OME-Zarr level {level}")
    guarded[(0,) * arr.ndim]  # decode one chunk now so a broken codec fails at open
    data = guarded.to_dask(tuple(arr.chunks))
    if "t" in axes:
        i = axes.index("t")
        if data.shape[i] != 1:
            raise VoxelomeError(f"'{path}' has {data.shape[i]} time points; voxelome reads one 3D volume.")
        data, axes = data[(slice(None),) * i + (0,)], axes[:i] + axes[i + 1:]
    if "c" not in axes:
        data, axes = data[None], ["c"] + axes
    order = [axes.index(a) for a in ("c", "z", "y", "x")]
    data = data.transpose(order)
    if chunks is not None:
        data = data.rechunk((data.chunksize[0],) + tuple(chunks) if len(chunks) == 3 else chunks)
    idx = [meta["axes"].index(a) for a in ("z", "y", "x")]
    spacing = tuple(meta["scales"][level][i] for i in idx)
    origin = tuple(meta["translations"][level][i] for i in idx)
    names = meta["channel_names"]
    if len(names) != data.shape[0]:
        names = [f"c{i}" for i in range(data.shape[0])]
    return data, spacing, origin, names


def read_ome_zarr(path, level: int = 0, *, chunks=None) -> tuple[da.Array, tuple[float, float, float], list[str]]:
    """Open one level of an OME-Zarr store lazily.

    Parameters
    ----------
    path : str or path-like
        The store folder (NGFF 0.1–0.5; units millimetre/nanometre are converted to µm).
    level : int
        Pyramid level, 0 = full resolution.
    chunks : tuple of int, optional
        Rechunk to these ``(z, y, x)`` or ``(c, z, y, x)`` chunks; default the store's chunks.

    Returns
    -------
    data : dask.array.Array, shape (c, z, y, x)
        A singleton ``c`` is added when the store has no channel axis; a singleton ``t`` is dropped.
    spacing_um : tuple of 3 float
        Voxel size ``(dz, dy, dx)`` of that level in µm.
    channel_names : list of str
        ``omero`` channel labels (``'c0', 'c1', …`` when absent).
    """
    path = Path(path)
    data, spacing, _, names = _open_level(_open_group(path), path, level, chunks)
    return data, spacing, names


def create_ome_zarr(path, shape_czyx, *, chunks_czyx, dtype="float32", spacing_um_zyx,
                    origin_um_zyx=(0.0, 0.0, 0.0), channel_names=None, overwrite: bool = False,
                    fill_value=0, name: str | None = None):
    """Create (or re-open, for resumable runs) an empty OME-Zarr store and return its level-0 array.

    Parameters
    ----------
    path : str or path-like
        Folder of the store (local file system).
    shape_czyx : tuple of 4 int
        Shape ``(c, z, y, x)`` of level 0.
    chunks_czyx : tuple of 4 int
        Chunk shape; clipped to ``shape_czyx``. Writers should write whole chunks.
    dtype : str or numpy dtype
        Stored dtype.
    spacing_um_zyx, origin_um_zyx : float or tuple of 3 float
        Voxel size and centre of voxel ``(0, 0, 0)``, in µm.
    channel_names : list of str, optional
        One label per channel (``omero`` metadata); default ``c0, c1, …``.
    overwrite : bool
        Replace an existing store with different parameters (only folders that look like zarr).
    fill_value : number
        Value of never-written chunks (0; unwritten chunks cost no disk).
    name : str, optional
        Name stored in the metadata (default: folder name).

    Returns
    -------
    zarr.Array
        Level ``"0"``, opened for writing. An existing store with the same shape, chunks, dtype,
        spacing, origin and channel names is re-opened as is (its data kept).
    """
    import zarr

    path = Path(path)
    shape = tuple(int(s) for s in shape_czyx)
    if len(shape) != 4 or min(shape) < 1:
        raise VoxelomeError(f"shape_czyx={shape_czyx!r} must be 4 positive ints (c, z, y, x).")
    if len(tuple(chunks_czyx)) != 4 or min(int(c) for c in chunks_czyx) < 1:
        raise VoxelomeError(f"chunks_czyx={chunks_czyx!r} must be 4 positive ints (c, z, y, x).")
    chunks = tuple(min(int(c), s) for c, s in zip(chunks_czyx, shape))
    dtype = np.dtype(dtype)
    spacing = _as_triplet("spacing_um_zyx", spacing_um_zyx, positive=True)
    origin = _as_triplet("origin_um_zyx", origin_um_zyx, positive=False)
    names = [str(n) for n in channel_names] if channel_names is not None else [f"c{i}" for i in range(shape[0])]
    if len(names) != shape[0]:
        raise VoxelomeError(f"channel_names has {len(names)} names for {shape[0]} channels; give one per channel.")
    if path.exists() and not overwrite:
        return _reopen(path, shape, chunks, dtype, spacing, origin, names)
    if path.exists():
        looks_zarr = path.is_dir() and (any((path / m).exists() for m in (".zgroup", ".zattrs", "zarr.json"))
                                        or not any(path.iterdir()))
        if not looks_zarr:
            raise VoxelomeError(f"'{path}' exists and is not a zarr store; refusing to delete it with overwrite=True. "
                                "Choose another output path.")
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    arr = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
                             compressors=_compressor(), chunk_key_encoding={"name": "v2", "separator": "/"})
    atomic_write_json(path / ".zattrs", _attrs(name or path.name, spacing, origin, names, [(1, 1, 1)]))
    return arr


def _reopen(path, shape, chunks, dtype, spacing, origin, names):
    import zarr

    group = _open_group(path, "r+")
    meta = _parse_multiscales(group, path)
    try:
        arr = zarr.open_array(str(path / meta["paths"][0]), mode="r+")
    except Exception as exc:  # noqa: BLE001
        raise VoxelomeError(f"'{path}' exists but its level 0 is unreadable ({exc}); pass overwrite=True.") from exc
    have = {"shape": tuple(arr.shape), "chunks": tuple(arr.chunks), "dtype": np.dtype(arr.dtype),
            "spacing_um": tuple(meta["scales"][0][-3:]), "origin_um": tuple(meta["translations"][0][-3:]),
            "channel_names": meta["channel_names"]}
    want = {"shape": shape, "chunks": chunks, "dtype": dtype, "spacing_um": spacing, "origin_um": origin,
            "channel_names": names}
    diff = [f"{k}: store {have[k]} vs requested {want[k]}" for k in want
            if (not np.allclose(have[k], want[k], rtol=1e-9, atol=1e-12) if k in ("spacing_um", "origin_um")
                else list(have[k]) != list(want[k]) if k == "channel_names" else have[k] != want[k])]
    if diff:
        raise VoxelomeError(f"OME-Zarr store '{path}' already exists with different parameters ({'; '.join(diff)}). "
                            "Pass overwrite=True to replace it, or choose another path.")
    return arr


def _downsample_block(block: np.ndarray, factors: tuple[int, ...], out_dtype) -> np.ndarray:
    """Mean over ``factors`` (per axis) of one block; a partial edge group averages what exists."""
    pad = [(0, (-s) % f) for s, f in zip(block.shape, factors)]
    total = np.pad(block.astype(np.float64), pad)
    split = [d for s, f in zip(total.shape, factors) for d in (s // f, f)]
    total = total.reshape(split).sum(axis=tuple(range(1, 2 * block.ndim, 2)))
    count = np.ones((1,) * block.ndim)
    for ax, (s, f) in enumerate(zip(block.shape, factors)):
        n = np.pad(np.ones(s), (0, (-s) % f)).reshape(-1, f).sum(1)
        count = count * n.reshape([-1 if i == ax else 1 for i in range(block.ndim)])
    mean = total / count
    if np.issubdtype(out_dtype, np.integer):
        info = np.iinfo(out_dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(out_dtype)


def build_pyramid(path, n_levels: int | None = None, *, min_size: int = 32) -> list[tuple[int, ...]]:
    """Compute 2× mean-downsampled levels ``1…n`` of level 0, block-wise with dask, and update the metadata.

    An axis among z, y, x is halved at a level only while it is ≥ ``2 * min_size`` voxels, so a thin
    stack keeps its z while y/x shrink; ``c`` is never reduced. Each output chunk is computed from
    exactly one input block (input chunks = 2 × output chunks), so memory stays ~8 chunks per
    worker and the volume is never loaded whole. Existing levels ≥ 1 are replaced.

    Parameters
    ----------
    path : str or path-like
        Store created by :func:`create_ome_zarr` with level 0 written.
    n_levels : int, optional
        Maximum number of downsampled levels to add; default: until no axis can be halved.
    min_size : int
        Smallest axis length the pyramid keeps halving towards (see above).

    Returns
    -------
    list of tuple
        Shapes ``(c, z, y, x)`` of all levels, level 0 first.
    """
    path = Path(path)
    group = _open_group(path, "r+")
    meta = _parse_multiscales(group, path)
    if meta["axes"] != ["c", "z", "y", "x"]:
        raise VoxelomeError(f"build_pyramid needs a (c, z, y, x) store as written by create_ome_zarr; "
                            f"'{path}' has axes {meta['axes']}.")
    for old in meta["paths"][1:]:
        if (path / old).is_dir():
            shutil.rmtree(path / old)
    src = group[meta["paths"][0]]
    spacing, origin = meta["scales"][0][1:], meta["translations"][0][1:]
    cum, level_factors, shapes = [1, 1, 1], [(1, 1, 1)], [tuple(src.shape)]
    target_chunks = tuple(src.chunks)
    while n_levels is None or len(level_factors) <= n_levels:
        f = tuple([1] + [2 if s >= 2 * min_size else 1 for s in src.shape[1:]])
        if f == (1, 1, 1, 1):
            if n_levels is not None:
                warnings.warn(f"build_pyramid stopped after {len(level_factors) - 1} levels: every axis is below "
                              f"2 * min_size = {2 * min_size}.", UserWarning, stacklevel=2)
            break
        shape = tuple(math.ceil(s / k) for s, k in zip(src.shape, f))
        chunks = tuple(min(c, s) for c, s in zip(target_chunks, shape))
        dst = group.create_array(str(len(level_factors)), shape=shape, chunks=chunks, dtype=src.dtype,
                                 fill_value=src.fill_value, compressors=_compressor(),
                                 chunk_key_encoding={"name": "v2", "separator": "/"}, overwrite=True)
        x = da.from_array(src, chunks=tuple(c * k for c, k in zip(chunks, f)))
        out_chunks = tuple(tuple(math.ceil(c / k) for c in cs) for cs, k in zip(x.chunks, f))
        y = x.map_blocks(_downsample_block, factors=f, out_dtype=src.dtype, dtype=src.dtype, chunks=out_chunks,
                         meta=np.empty((0,) * 4, src.dtype))
        da.store(y, dst, lock=False)
        cum = [c * k for c, k in zip(cum, f[1:])]
        level_factors.append(tuple(cum))
        shapes.append(shape)
        src = dst
    smallest = da.from_array(src, chunks=src.chunks)
    lo, hi = da.compute(da.nanmin(smallest, axis=(1, 2, 3)), da.nanmax(smallest, axis=(1, 2, 3)))
    windows = [(float(a), float(b)) for a, b in zip(lo, hi)]
    attrs = _attrs(meta["name"] or path.name, spacing, origin, meta["channel_names"], level_factors, windows)
    # keep attributes other writers added (e.g. which model and volume produced the data)
    old = json.loads((path / ".zattrs").read_text()) if (path / ".zattrs").exists() else {}
    attrs = {**{k: v for k, v in old.items() if k not in attrs}, **attrs}
    atomic_write_json(path / ".zattrs", attrs)
    return shapes


def write_volume_ome_zarr(path, data, spacing_um_zyx=None, *, origin_um_zyx=None, channel_names=None,
                          chunks_czyx=None, dtype=None, overwrite: bool = False, n_levels: int | None = None,
                          min_size: int = 32) -> Path:
    """Write a whole volume (NumPy, dask or :class:`Volume`) as a multiscale OME-Zarr.

    Parameters
    ----------
    path : str or path-like
        Output folder.
    data : array-like ``(z, y, x)`` or ``(c, z, y, x)``, or Volume
        Written block-wise (dask), never converted to one NumPy array.
    spacing_um_zyx, origin_um_zyx : tuple of 3 float
        Voxel size / origin in µm; taken from ``data`` when it is a :class:`Volume`.
    channel_names : list of str, optional
        Channel labels.
    chunks_czyx : tuple of 4 int, optional
        Storage chunks; default ``(1, 32, 256, 256)`` clipped to the shape.
    dtype : dtype, optional
        Stored dtype (default: that of ``data``).
    overwrite : bool
        Replace an existing store.
    n_levels, min_size : see :func:`build_pyramid`.

    Returns
    -------
    pathlib.Path
        The store path.
    """
    if isinstance(data, Volume):
        spacing_um_zyx = data.spacing_um if spacing_um_zyx is None else spacing_um_zyx
        origin_um_zyx = data.origin_um if origin_um_zyx is None else origin_um_zyx
        data = data.data
    if spacing_um_zyx is None:
        raise VoxelomeError("spacing_um_zyx is required (voxel size (dz, dy, dx) in µm) unless data is a Volume.")
    x = data if isinstance(data, da.Array) else da.asarray(data)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise VoxelomeError(f"data has shape {tuple(x.shape)}; expected (z, y, x) or (c, z, y, x).")
    chunks = tuple(min(c, s) for c, s in zip(chunks_czyx or (1,) + DEFAULT_CHUNKS, x.shape))
    arr = create_ome_zarr(path, x.shape, chunks_czyx=chunks, dtype=dtype if dtype is not None else x.dtype,
                          spacing_um_zyx=spacing_um_zyx, channel_names=channel_names,
                          origin_um_zyx=(0.0, 0.0, 0.0) if origin_um_zyx is None else origin_um_zyx,
                          overwrite=overwrite)
    da.store(x.astype(arr.dtype).rechunk(arr.chunks), arr, lock=False)
    build_pyramid(path, n_levels, min_size=min_size)
    return Path(path)


# --- 2D images (c, y, x) --------------------------------------------------------------------------------------
def attrs_2d(name, spacing_yx, names, factors, windows=None, origin_yx=(0.0, 0.0)) -> dict:
    """NGFF 0.4 ``.zattrs`` of a 2D multichannel image ``(c, y, x)``: one dataset per downsampling factor (scale
    and the half-pixel shift of coarser levels, µm), channel labels and display windows (omero)."""
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, spacing_yx[0] * f, spacing_yx[1] * f]},
        {"type": "translation", "translation": [0.0, origin_yx[0] + (f - 1) / 2 * spacing_yx[0],
                                                origin_yx[1] + (f - 1) / 2 * spacing_yx[1]]}]}
        for k, f in enumerate(factors)]
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    channels = [{"label": str(n), "color": "FFFFFF", "active": i < 3,
                 "window": {"start": lo, "end": hi, "min": lo, "max": hi}}
                for i, (n, (lo, hi)) in enumerate(zip(names, windows or [(0.0, 1.0)] * len(names)))]
    return {"multiscales": [{"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets,
                             "type": "mean"}],
            "omero": {"version": NGFF_VERSION, "name": name, "channels": channels, "rdefs": {"model": "greyscale"}}}


def write_image_ome_zarr(path, data, channel_names, pixel_size_yx_um) -> Path:
    """A small 2D multichannel image ``(c, y, x)`` (float32, one level, held in memory) as an OME-Zarr with µm
    scale, channel names and display windows from each channel's finite range (napari, Fiji/BigDataViewer).

    Parameters
    ----------
    path : path
        Output folder (written in place: callers that need atomicity write into a temporary folder).
    data : ndarray, shape (c, y, x)
    channel_names : list of str, length c
    pixel_size_yx_um : (float, float)
        Pixel size along y and x in µm.
    """
    import zarr
    from numcodecs import Blosc

    path = Path(path)
    data = np.asarray(data)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    comp = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)
    chunks = (min(len(channel_names), 16), min(256, data.shape[1]), min(256, data.shape[2]))
    arr = group.create_array("0", shape=data.shape, chunks=chunks, dtype="float32", fill_value=0.0,
                             compressors=comp, chunk_key_encoding={"name": "v2", "separator": "/"})
    arr[:] = data.astype(np.float32)
    finite = np.where(np.isfinite(data), data, np.nan)
    windows = [(float(np.nanmin(c)), float(np.nanmax(c))) if np.isfinite(c).any() else (0.0, 1.0) for c in finite]
    (path / ".zattrs").write_text(json.dumps(attrs_2d(path.name, pixel_size_yx_um, channel_names, [1], windows)))
    return path
