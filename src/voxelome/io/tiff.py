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

