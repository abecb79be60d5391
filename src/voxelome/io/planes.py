"""Write a 2D multichannel plane ``(c, y, x)`` (a virtual section) in the format its file name asks for.

``.ome.zarr`` (napari), an ImageJ ``.tif`` hyperstack (Fiji) or ``.npz``; each records the channel names, the µm pixel
size and, when given, the plane's placement (``xyz_um = placement @ (col, row, 1)``). Writes are atomic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.io.atomic import atomic_dir, atomic_path

PLANE_FORMATS = {".ome.zarr": "ome-zarr", ".zarr": "ome-zarr", ".tif": "tiff", ".tiff": "tiff", ".npz": "npz"}
PLACEMENT_DOC = "xyz_um = placement @ (col, row, 1)"


def plane_format(path: Path) -> str:
    """The format of ``path`` by its suffix (:data:`PLANE_FORMATS`); a clear error for any other."""
    name = Path(path).name.lower()
    kind = next((k for suffix, k in PLANE_FORMATS.items() if name.endswith(suffix)), None)
    if kind is None:
        raise VoxelomeError(f"--out {path}: write a virtual section as .ome.zarr (napari), .tif (Fiji) or .npz.")
    return kind


def write_plane(path, values, names, pixel_size_um: float, placement=None, *, kind: str | None = None) -> Path:
    """Write ``values`` ``(c, rows, cols)`` with channel ``names`` and square pixels of ``pixel_size_um``.

    Parameters
    ----------
    path : path
        Output file (``.tif``, ``.npz``) or folder (``.ome.zarr``), replaced if it exists.
    values : ndarray, shape (c, rows, cols)
    names : list of str, length c
    pixel_size_um : float
    placement : ndarray (3, 3), optional
        The plane in the volume frame (µm), recorded with the values.
    kind : str, optional
        ``"ome-zarr"``, ``"tiff"`` or ``"npz"``; default from the suffix (:func:`plane_format`).
    """
    path = Path(path)
    kind = kind or plane_format(path)
    m = None if placement is None else np.asarray(placement, float).tolist()
    if kind == "ome-zarr":
        from voxelome.io.omezarr import write_image_ome_zarr

        with atomic_dir(path) as tmp:
            write_image_ome_zarr(tmp, values, names, (pixel_size_um, pixel_size_um))
            if m is not None:
                attrs = json.loads((tmp / ".zattrs").read_text())
                attrs["voxelome"] = {"placement": m, "doc": PLACEMENT_DOC}
                (tmp / ".zattrs").write_text(json.dumps(attrs))
        return path
    with atomic_path(path) as tmp:
        if kind == "tiff":
            import tifffile

            tifffile.imwrite(tmp, np.asarray(values, np.float32), imagej=True, resolution=(1 / pixel_size_um,) * 2,
                             metadata={"axes": "CYX", "unit": "um", "Labels": list(names),
                                       "Info": json.dumps({"placement": m, "doc": PLACEMENT_DOC})})
        else:
            with open(tmp, "wb") as fh:
                np.savez(fh, values=values, genes=np.array(names), pixel_size_um=pixel_size_um,
                         **({} if m is None else {"placement": np.asarray(m)}))
    return path
