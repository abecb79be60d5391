"""A folder of 2D image slices, one per z (how micro-CT reconstructions are written) → a lazy ``(z, y, x)`` array.

TIFF slices are read with tifffile (their resolution tags give the in-plane spacing); PNG and BMP slices (8/16-bit
grey, as some reconstruction software writes them) with Pillow. Every file's header is read first, so a slice of
another size or type is refused before any work; each slice is one dask chunk, decoded when computed. The slice
distance is never stored in a series: the caller passes it (``spacing_um``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.io.guarded import corrupt_file_error

SLICE_SUFFIXES = (".tif", ".tiff", ".png", ".bmp")
#: Pillow modes of grey-level slices → numpy dtype ("P": a palette, accepted when the palette is a grey ramp)
_PIL_GREY = {"L": np.uint8, "P": np.uint8, "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16,
             "I": np.int32, "F": np.float32}


def slice_files(folder: Path) -> list[Path]:
    """Image slices of ``folder`` in natural name order (``rec_2`` before ``rec_10``); hidden files skipped.

    TIFF files win when a folder also holds PNG/BMP files (previews, thumbnails); PNG/BMP alone must be one kind.
    """
    def natural(p: Path):
        return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]

    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLICE_SUFFIXES
             and not p.name.startswith(".")]
    tiffs = [p for p in files if p.suffix.lower() in (".tif", ".tiff")]
    if tiffs:
        files = tiffs
    elif len({p.suffix.lower() for p in files}) > 1:
        raise VoxelomeError(f"folder '{folder}' mixes {sorted({p.suffix.lower() for p in files})} slices; a volume "
                            "from slices needs one image per z of one format. Move the others out.")
    return sorted(files, key=natural)


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def _header(path: Path):
    """``(shape, dtype, spacing [dz, dy, dx] µm or None entries, source)`` of one slice (singleton axes dropped)."""
    try:
        if _is_tiff(path):
            import tifffile

            from voxelome.io.tiff import _tiff_spacing

            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                shape = tuple(s for s, a in zip(series.shape, series.axes) if s > 1 or a in "YX")
                spacing, source = _tiff_spacing(tf)
                return shape, np.dtype(series.dtype), spacing, source
        from PIL import Image

        with Image.open(path) as im:  # reads the header only
            mode, (w, h) = im.mode, im.size
            if mode == "P" and not _grey_palette(im):
                mode = "P (colour palette)"
    except Exception as exc:  # noqa: BLE001 - the image libraries raise many types on bad files
        raise corrupt_file_error(path, "image slice", exc) from exc
    if mode not in _PIL_GREY:
        raise VoxelomeError(f"'{path}' is a {mode} image; a slice series needs grey-level slices (8/16-bit, or "
                            "float). Convert the slices to one channel first.")
    return (h, w), np.dtype(_PIL_GREY[mode]), [None, None, None], "no spacing stored in PNG/BMP slices"


def _grey_palette(im) -> bool:
    pal = np.asarray(im.getpalette() or [], np.int64).reshape(-1, 3)
    return len(pal) > 0 and bool((pal == pal[:, :1]).all() and (pal[:, 0] == np.arange(len(pal))).all())


def _read_slice(path: Path, shape, dtype) -> np.ndarray:
    try:
        if _is_tiff(path):
            import tifffile

            image = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                image = np.asarray(im)
    except Exception as exc:  # noqa: BLE001
        raise corrupt_file_error(path, "image slice", exc) from exc
    image = image.reshape(shape) if image.size == int(np.prod(shape)) else image
    if image.dtype != dtype and image.dtype.kind == dtype.kind and image.dtype.itemsize == dtype.itemsize:
        image = image.astype(dtype)  # byte order only (Pillow's "I;16B" decodes big-endian)
    if image.shape != tuple(shape) or image.dtype != dtype:
        raise VoxelomeError(f"'{path}' decodes to {image.dtype} {image.shape}; the series' slices are {dtype} "
                            f"{tuple(shape)}.")
    return image


def read_slice_folder(folder: Path):
    """The slices of ``folder`` (:func:`slice_files`) stacked along z as a lazy dask array, one chunk per slice.

    Returns
    -------
    data : dask.array (z, y, x)
    spacing : list [None, dy, dx]
        µm from the first TIFF slice's tags (``None`` when unknown; dz is never stored in a series).
    origin : tuple, source : str
    """
    import dask
    import dask.array as da

    files = slice_files(folder)
    if len(files) < 2:
        raise VoxelomeError(f"folder '{folder}' holds {len(files)} image slice(s) and no zarr store; a volume from "
                            f"slices needs one 2D image per z (≥ 2; {', '.join(SLICE_SUFFIXES)}), e.g. rec_0000.tif, "
                            "rec_0001.tif, …")
    shape, dtype, spacing, source = _header(files[0])
    if len(shape) != 2:
        raise VoxelomeError(f"'{files[0]}' has shape {shape}; a slice series needs 2D grey-level slices (y, x). "
                            "Convert colour slices to one channel first.")
    for f in files[1:]:
        s, d = _header(f)[:2]
        if (s, d) != (shape, dtype):
            raise VoxelomeError(f"'{f}' is a {d} image of shape {s}, but '{files[0].name}' (the first of the "
                                f"{len(files)} slices in natural name order) is {dtype} {shape}; every slice of a "
                                "series must have the same size and type. Move other files out of the folder.")
    data = da.stack([da.from_delayed(dask.delayed(_read_slice)(f, shape, dtype), shape, dtype=dtype) for f in files])
    return (data, [None, spacing[1], spacing[2]], (0.0, 0.0, 0.0),
            f"{source} of the first slice; the slice distance (dz) is not stored in a slice series")
