"""Volume readers: TIFF/BigTIFF, OME-Zarr/zarr, NIfTI, NPY/NPZ → :class:`~voxelome.io.volume.Volume`.

Every reader returns the canonical lazy ``(z, y, x)`` dask array with spacing in µm. Spacing
comes from the file when it is stored there; otherwise the caller passes ``spacing_um``. When
both exist and disagree, the argument wins with a warning (the user knows their scanner).
Read errors (corrupt/truncated files) are turned into :class:`~voxelome.errors.VoxelomeError`
naming the file, at open where a cheap check exists and otherwise when the block is read.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError, did_you_mean
from voxelome.io.guarded import GuardedArray, corrupt_file_error, missing_path_error, native_chunks
from voxelome.io.itk import ITK_SUFFIXES, read_itk
from voxelome.io.slices import read_slice_folder, slice_files
from voxelome.io.tiff import read_tiff
from voxelome.io.volume import Volume, _as_triplet

__all__ = ["read_volume", "SUPPORTED_VOLUME_FORMATS"]

SUPPORTED_VOLUME_FORMATS = (
    ".tif/.tiff (ImageJ, OME-TIFF, BigTIFF)", ".nii/.nii.gz", ".npy", ".npz",
    "OME-Zarr folder (NGFF multiscales)", "zarr array folder (.zarr)",
    "folder of 2D slices (.tif/.png/.bmp, one per z, natural name order)", "MetaImage .mha/.mhd", "NRRD .nrrd/.nhdr",
)
_ZARR_MARKERS = (".zattrs", ".zgroup", ".zarray", "zarr.json")
_NIFTI_CHUNK_BYTES = 64 * 2**20


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for double in (".nii.gz", ".ome.tiff", ".ome.tif"):
        if name.endswith(double):
            return {".ome.tiff": ".tif", ".ome.tif": ".tif"}.get(double, double)
    return {".tiff": ".tif", ".btf": ".tif", ".tf8": ".tif"}.get(path.suffix.lower(), path.suffix.lower())


def _resolve_spacing(path: Path, found, spacing_um, source: str):
    """Combine spacing stored in the file (``found``: 3 entries, ``None`` where unknown) and the argument."""
    found = [None if f is None else float(f) for f in (found if found is not None else (None,) * 3)]
    if spacing_um is not None:
        arg = _as_triplet("spacing_um", spacing_um, positive=True)
        clash = [(a, f) for a, f in zip(arg, found) if f is not None and not np.isclose(a, f, rtol=1e-3)]
        if clash:
            warnings.warn(f"spacing_um={arg} overrides the spacing stored in '{path}' "
                          f"({tuple(found)} µm from {source}).", UserWarning, stacklevel=3)
        return arg
    if any(f is None for f in found) or not all(np.isfinite(f) and f > 0 for f in found):
        known = ", ".join(f"d{a}={f:g} µm" for a, f in zip("zyx", found) if f is not None) or "nothing"
        raise VoxelomeError(
            f"'{path}' does not store a complete voxel spacing (found {known} from {source}). "
            "Pass spacing_um=(dz, dy, dx) in micrometres, e.g. read_volume(path, spacing_um=(2.0, 0.65, 0.65))."
        )
    return tuple(found)


# --- zarr / OME-Zarr -------------------------------------------------------------------
def _read_zarr(path: Path, key, chunks):
    import zarr

    from voxelome.io.omezarr import _open_level

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - bad JSON, unknown codec, missing metadata
        raise corrupt_file_error(path, "zarr store (metadata)", exc) from exc
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        if "multiscales" in attrs or "multiscales" in attrs.get("ome", {}):
            data, spacing, origin, names = _open_level(node, path, 0, chunks)
            if data.shape[0] > 1:
                if key is None:
                    raise VoxelomeError(f"OME-Zarr '{path}' has {data.shape[0]} channels {names}; pick one with "
                                        f"key=<index or name>, e.g. key={names[0]!r}.")
                idx = names.index(key) if key in names else key
                if not isinstance(idx, (int, np.integer)) or not 0 <= idx < data.shape[0]:
                    raise VoxelomeError(f"key={key!r} is not a channel of '{path}'; channels: {names}."
                                        f"{did_you_mean(str(key), names)}")
                data = data[idx:idx + 1]
            return data[0], spacing, origin, "OME-Zarr multiscales"
        arrays = sorted(name for name, _ in node.arrays())
        if key is None or key not in arrays:
            hint = did_you_mean(str(key), arrays) if key is not None else ""
            raise VoxelomeError(f"zarr group '{path}' has no 'multiscales' metadata; pick an array with key=..., "
                                f"one of {arrays}.{hint}")
        node = node[key]
    guarded = GuardedArray(node, path, "zarr array")
    guarded[(0,) * guarded.ndim]  # decode one chunk now: a broken codec fails at open
    return guarded.to_dask(native_chunks(node, chunks)), None, (0.0, 0.0, 0.0), "zarr array (no spacing stored)"


# --- NIfTI -----------------------------------------------------------------------------
def _read_nifti(path: Path, key, chunks, spacing_um):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
        space_unit = img.header.get_xyzt_units()[0]
    except Exception as exc:  # noqa: BLE001
        raise corrupt_file_error(path, "NIfTI image", exc) from exc
    if len(shape) == 4 and shape[3] > 1 and not isinstance(key, (int, np.integer)):
        raise VoxelomeError(f"'{path}' is 4D with {shape[3]} volumes; pick one with key=<index>, e.g. key=0.")
    if len(shape) not in (3, 4) or any(s > 1 for s in shape[4:]):
        raise VoxelomeError(f"'{path}' has shape {shape}; expected a 3D NIfTI volume (x, y, z).")
    if not str(path).lower().endswith(".gz") and hasattr(img.dataobj, "offset"):
        need = img.dataobj.offset + int(np.prod(shape)) * img.get_data_dtype().itemsize
        if need > path.stat().st_size:
            raise corrupt_file_error(path, "NIfTI image", f"data needs {need} bytes, file has {path.stat().st_size}")
    pick = (int(key) if len(shape) == 4 and shape[3] > 1 else 0,) if len(shape) == 4 else ()
    guarded = GuardedArray(img.dataobj, path, "NIfTI image")
    dtype = guarded[(0, 0, 0) + pick].dtype  # scl_slope/inter may turn ints into floats
    guarded.dtype = np.dtype(dtype)
    # Data are Fortran-ordered (x fastest): slabs along z are contiguous, so chunk along z only.
    plane = shape[0] * shape[1] * guarded.dtype.itemsize
    kz = int(max(1, min(shape[2], _NIFTI_CHUNK_BYTES // max(plane, 1))))
    data = guarded.to_dask((shape[0], shape[1], kz) + (1,) * (len(shape) - 3))
    data = data[(slice(None),) * 3 + pick].transpose(2, 1, 0)  # (x, y, z) → (z, y, x)
    factor = {"mm": 1e3, "micron": 1.0, "meter": 1e6}.get(space_unit)
    if factor is None:
        if spacing_um is not None:  # unit unknown: the pixdims are no evidence to compare against
            return data, None, (0.0, 0.0, 0.0), "NIfTI header (unit unknown)"
        factor = 1e3
        warnings.warn(f"'{path}' does not state its spatial unit ({space_unit!r}); assuming millimetres "
                      f"(NIfTI's default), i.e. spacing {tuple(z * 1e3 for z in zooms[::-1])} µm. "
                      "Pass spacing_um=(dz, dy, dx) if that is wrong.", UserWarning, stacklevel=3)
    spacing = [z * factor if z > 0 else None for z in zooms[::-1]]
    return data, spacing, (0.0, 0.0, 0.0), f"NIfTI header (pixdim, unit {space_unit!r})"


# --- NumPy -----------------------------------------------------------------------------
def _npz_member_memmap(path: Path, member: str):
    """Memory-map an *uncompressed* ``.npz`` member (``np.savez``); ``None`` if it is compressed."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(30)
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len  # zip local header, then the .npy bytes
            fh.seek(start)
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                return None
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def _read_numpy(path: Path, key, chunks, suffix: str):
    if suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise corrupt_file_error(path, ".npy array", exc) from exc
        # Wrapped: dask slices plain ndarrays (memmaps included) eagerly at graph construction.
        data = GuardedArray(arr, path, ".npy array").to_dask(chunks or "auto")
        return data, None, (0.0, 0.0, 0.0), ".npy (no spacing stored)"
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
            meta = {k: np.asarray(npz[k], dtype=float) for k in ("spacing_um", "spacing", "origin_um") if k in files}
            arrays = [k for k in files if k not in meta]
            if key is not None and key not in files:
                raise VoxelomeError(f"key={key!r} is not in '{path}'; arrays: {files}.{did_you_mean(str(key), files)}")
            if key is None and len(arrays) != 1:
                raise VoxelomeError(f"'{path}' holds {len(arrays)} arrays {arrays}; choose one with key=..., "
                                    f"e.g. read_volume(path, key={arrays[0] if arrays else 'arr_0'!r}).")
            key = key if key is not None else arrays[0]
            arr = _npz_member_memmap(path, key)
            if arr is None:  # compressed members cannot be mapped: read this one array (only)
                arr = npz[key]
    except VoxelomeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise corrupt_file_error(path, ".npz archive", exc) from exc
    spacing = meta.get("spacing_um", meta.get("spacing"))
    spacing = list(np.broadcast_to(spacing, (3,))) if spacing is not None else None
    origin = tuple(np.broadcast_to(meta["origin_um"], (3,))) if "origin_um" in meta else (0.0, 0.0, 0.0)
    return GuardedArray(arr, path, ".npz array").to_dask(chunks or "auto"), spacing, origin, ".npz 'spacing_um' entry"


# --- entry point -----------------------------------------------------------------------
def read_volume(path, spacing_um=None, *, chunks=None, key=None, name: str | None = None) -> Volume:
    """Read a 3D image lazily into the canonical :class:`Volume` ``(z, y, x)`` with spacing in µm.

    Parameters
    ----------
    path : str or path-like
        ``.tif``/``.tiff`` (ImageJ hyperstack, OME-TIFF, BigTIFF; a multi-page stack is read as z),
        ``.nii``/``.nii.gz``, ``.npy``, ``.npz``, a zarr folder (OME-Zarr with ``multiscales``,
        or a plain zarr array), MetaImage ``.mha``/``.mhd`` or NRRD ``.nrrd``/``.nhdr`` (SimpleITK, read by
        z-slabs), or a folder of 2D slices (TIFF, PNG or BMP), one per z in natural file-name order (a micro-CT
        reconstruction; the slice distance is not stored there: pass ``spacing_um``).
    spacing_um : float or (dz, dy, dx), optional
        Voxel size in µm. Required when the file stores none (NPY, plain zarr, uncalibrated TIFF);
        overrides (with a warning) a stored spacing that disagrees.
    chunks : tuple of int, optional
        dask chunks of the result ``(z, y, x)``; default: the file's own chunks (pages, zarr chunks).
    key : str or int, optional
        NPZ: the array name. Zarr group: the array path. OME-Zarr/TIFF with several channels, or a
        4D NIfTI: the channel (index or OME-Zarr channel label) / volume index.
    name : str, optional
        Label of the volume (default: the file name).

    Returns
    -------
    Volume
        ``data`` a dask array ``(z, y, x)`` (nothing read but a header and one chunk), spacing and
        origin in µm. NIfTI voxel axes are transposed from ``(x, y, z)``; the affine's rotation and
        origin are not applied (origin ``(0, 0, 0)``). OME-Zarr origin is its ``translation``.

    Raises
    ------
    VoxelomeError
        Missing file, unsupported format, corrupt/truncated file, unknown spacing, or not 3D.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise missing_path_error(path, "volume file")
    suffix = _suffix(path)
    if path.is_dir():
        if any((path / m).exists() for m in _ZARR_MARKERS):
            data, found, origin, source = _read_zarr(path, key, chunks)
        elif slice_files(path):
            data, found, origin, source = read_slice_folder(path)
        else:
            raise VoxelomeError(f"folder '{path}' is neither a zarr store (none of {list(_ZARR_MARKERS)} inside) "
                                f"nor a folder of image slices. Supported volumes: {', '.join(SUPPORTED_VOLUME_FORMATS)}.")
    elif suffix == ".tif":
        data, found, origin, source = read_tiff(path, key)
    elif suffix in (".nii", ".nii.gz"):
        data, found, origin, source = _read_nifti(path, key, chunks, spacing_um)
    elif suffix in (".npy", ".npz"):
        data, found, origin, source = _read_numpy(path, key, chunks, suffix)
    elif suffix in ITK_SUFFIXES:
        data, found, origin, source = read_itk(path, key, chunks, spacing_um)
    else:
        raise VoxelomeError(f"'{path}': unsupported volume format {suffix or '(no suffix)'!r}. "
                            f"Supported: {', '.join(SUPPORTED_VOLUME_FORMATS)}. Convert it, e.g. to OME-TIFF or NPY.")
    if data.ndim != 3:
        raise VoxelomeError(f"'{path}' holds an array of shape {tuple(data.shape)}; expected 3 axes (z, y, x). "
                            "Pass a single-channel 3D volume (for channels use key=<index>).")
    spacing = _resolve_spacing(path, found, spacing_um, source)
    if chunks is not None and tuple(data.chunksize) != tuple(chunks):
        data = data.rechunk(chunks)
    try:
        return Volume.from_array(data, spacing, origin, name=name or path.name)
    except VoxelomeError as exc:
        raise VoxelomeError(f"'{path}': {exc}") from exc
