"""TIFF / BigTIFF / OME-TIFF / ImageJ hyperstacks → a lazy ``(z, y, x)`` dask array with spacing in µm."""

from __future__ import annotations

import contextlib
import logging
import re
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.io.guarded import GuardedArray, corrupt_file_error, unit_to_um


@contextlib.contextmanager
def _tifffile_log():
    """Capture tifffile's logged warnings (it logs, rather than raises, on many truncations)."""
    records: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger, handler = logging.getLogger("tifffile"), _Handler(logging.WARNING)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _tiff_spacing(tf) -> tuple[list, str]:
    """Spacing ``[dz, dy, dx]`` in µm (``None`` entries when unknown) from OME-XML or ImageJ/TIFF tags."""
    if tf.is_ome and tf.ome_metadata:
        root = ET.fromstring(tf.ome_metadata)
        pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
        if pixels is not None:
            out = []
            for ax in "ZYX":
                size = pixels.get(f"PhysicalSize{ax}")
                factor = unit_to_um(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
                out.append(float(size) * factor if size is not None and factor else None)
            if any(v is not None for v in out):
                return out, "OME-XML PhysicalSize"
    page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
    tags = page.tags

    def _res(name):
        tag = tags.get(name)
        if tag is None:
            return None
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        return den / num if num else None  # tag is pixels per unit → size of one pixel

    if tf.is_imagej and tf.imagej_metadata:
        ij = tf.imagej_metadata
        factor = unit_to_um(ij.get("unit"))
        if factor is None:  # no unit (or 'pixel'): ImageJ's defaults are not a calibration
            return [None, None, None], "ImageJ metadata (no length unit)"
        dy, dx = _res("YResolution"), _res("XResolution")
        dz = ij.get("spacing")
        return [None if v is None else float(v) * factor for v in (dz, dy, dx)], "ImageJ metadata"
    unit_tag = tags.get("ResolutionUnit")
    # inch, cm (baseline TIFF); mm, µm (the extension values tifffile and some scanners write)
    factor = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(int(unit_tag.value) if unit_tag is not None else 1)
    if factor is None:
        return [None, None, None], "TIFF tags (no resolution unit)"
    dy, dx = _res("YResolution"), _res("XResolution")
    return [None, None if dy is None else dy * factor, None if dx is None else dx * factor], "TIFF resolution tags"


def _tiff_truncation(path: Path, tf, series) -> str | None:
    """Cheap checks that the pixel data the headers promise is really in the file."""
    size = path.stat().st_size
    if tf.is_imagej and tf.imagej_metadata:
        promised = int(tf.imagej_metadata.get("images", 0) or 0)
        have = int(np.prod([s for s, a in zip(series.shape, series.axes) if a not in "YXS"]))
        if promised > have:
            return f"ImageJ header promises {promised} images, only {have} found"
    if series.dataoffset is not None:
        if series.dataoffset + series.nbytes > size:
            return f"pixel data needs {series.dataoffset + series.nbytes} bytes, file has {size}"
        return None
    last = series.pages[-1] if len(series.pages) else None
    offsets = getattr(last, "dataoffsets", None)
    counts = getattr(last, "databytecounts", None)
    if offsets and counts and max(o + c for o, c in zip(offsets, counts)) > size:
        return f"last page data ends beyond the end of the file ({size} bytes)"
    return None


def _tiff_as_zarr(path: Path, store=None):
    """Level 0 of the first series of a TIFF as a read-only zarr array (pages/tiles are its chunks)."""
    import tifffile
    import zarr

    store = store if store is not None else tifffile.TiffFile(path).series[0].aszarr(level=0)
    return zarr.open_array(store, mode="r")


def read_tiff(path: Path, key):
    import tifffile

    with _tifffile_log() as log:
        try:
            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                problem = _tiff_truncation(path, tf, series)
                spacing, source = _tiff_spacing(tf)
                if not problem:
                    guarded = GuardedArray(_tiff_as_zarr(path, series.aszarr(level=0)), path, "TIFF",
                                           opener=partial(_tiff_as_zarr, path))
                    guarded[(-1,) * guarded.ndim]  # decode the last chunk now: a truncated tail fails at open
        except VoxelomeError:
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on bad files
            raise corrupt_file_error(path, "TIFF", exc) from exc
    bad_log = [m for m in log if re.search(r"corrupt|invalid|truncat|incomplete", m, re.I)]
    if problem or bad_log:
        raise corrupt_file_error(path, "TIFF", problem or "; ".join(bad_log[:2]))
    native = tuple(guarded._array.chunks)
    guarded._array = None  # that handle is closed; the first read re-opens the file
    data = guarded.to_dask(native)
    axes = series.axes
    # Drop singleton axes except Y/X; a >1 channel/sample axis needs the user to pick one.
    for ax in "SCT" + "".join(a for a in axes if a not in "SCTYX"):
        i = axes.find(ax)
        if i < 0:
            continue
        if data.shape[i] == 1:
            data, axes = data[(slice(None),) * i + (0,)], axes[:i] + axes[i + 1:]
        elif ax in "SC":
            if not isinstance(key, (int, np.integer)) or not 0 <= key < data.shape[i]:
                raise VoxelomeError(f"'{path}' has {data.shape[i]} channels (axes {series.axes}, shape "
                                    f"{series.shape}); pick one with key=<channel index 0…{data.shape[i] - 1}>.")
            data, axes = data[(slice(None),) * i + (int(key),)], axes[:i] + axes[i + 1:]
    if data.ndim == 3 and axes[-2:] != "YX":
        raise VoxelomeError(f"'{path}' has axes {series.axes}; expected a z-stack of 2D images (…YX).")
    return data, spacing, (0.0, 0.0, 0.0), source


# --- a folder of 2D TIFF slices (micro-CT reconstructions) -------------------------------------------------
TIFF_SUFFIXES = (".tif", ".tiff")


def tiff_slice_files(folder: Path) -> list[Path]:
    """The TIFF files of ``folder`` in natural order (``rec_2`` before ``rec_10``), hidden files skipped."""
    def natural(p: Path):
        return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]

    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES
             and not p.name.startswith(".")]
    return sorted(files, key=natural)


def _slice_header(path: Path):
    """``(shape, dtype, spacing [dz, dy, dx], source)`` of one 2D TIFF slice (singleton axes dropped)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            shape = tuple(s for s, a in zip(series.shape, series.axes) if s > 1 or a in "YX")
            spacing, source = _tiff_spacing(tf)
            return shape, np.dtype(series.dtype), spacing, source
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on bad files
        raise corrupt_file_error(path, "TIFF slice", exc) from exc


def _read_slice(path: Path, shape, dtype) -> np.ndarray:
    import tifffile

    try:
        image = tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001
        raise corrupt_file_error(path, "TIFF slice", exc) from exc
    image = np.asarray(image).reshape(shape)  # the header's shape: singleton axes dropped
    if image.dtype != dtype:
        raise VoxelomeError(f"'{path}' holds {image.dtype} pixels; the first slice of the series holds {dtype}.")
    return image


def read_tiff_series(folder: Path):
    """A folder of 2D TIFF slices, one per z in natural file-name order, as a lazy ``(z, y, x)`` dask array.

    Micro-CT reconstructions are commonly written this way (one file per slice). Every file's header is read
    first, so a slice of another size or type is refused before any work; each slice is one dask chunk, read
    when computed. Spacing: in-plane from the first slice's tags when they hold it; the slice distance is
    never stored in a series (pass ``spacing_um``).

    Returns
    -------
    data : dask.array (z, y, x), spacing : [None, dy, dx] (µm, ``None`` when unknown), origin, source
    """
    import dask
    import dask.array as da

    files = tiff_slice_files(folder)
    if len(files) < 2:
        raise VoxelomeError(f"folder '{folder}' holds {len(files)} TIFF slice(s) and no zarr store; a volume from "
                            "slices needs one 2D TIFF per z (≥ 2), e.g. rec_0000.tif, rec_0001.tif, …")
    shape, dtype, spacing, source = _slice_header(files[0])
    if len(shape) != 2:
        raise VoxelomeError(f"'{files[0]}' has shape {shape}; a slice series needs 2D grey-level slices (y, x). "
                            "Convert colour slices to one channel first.")
    for f in files[1:]:
        s, d = _slice_header(f)[:2]
        if (s, d) != (shape, dtype):
            raise VoxelomeError(f"'{f}' is a {d} image of shape {s}, but '{files[0].name}' (the first of the "
                                f"{len(files)} slices in natural name order) is {dtype} {shape}; every slice of a "
                                "series must have the same size and type. Move other files out of the folder.")
    slices = [da.from_delayed(dask.delayed(_read_slice)(f, shape, dtype), shape, dtype=dtype) for f in files]
    data = da.stack(slices)
    return (data, [None, spacing[1], spacing[2]], (0.0, 0.0, 0.0),
            f"{source} of the first slice; the slice distance (dz) is not stored in a slice series")
