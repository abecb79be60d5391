"""MetaImage (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``) volumes through SimpleITK, read lazily by z-slabs.

CT and micro-CT tools (3D Slicer, ITK-SNAP, Amira/Avizo exports) write these. SimpleITK reads the header alone
(``ReadImageInformation``) and any box of voxels (``SetExtractIndex``/``SetExtractSize``; MetaImage and raw NRRD
stream it from disk), so the volume is never loaded whole. Spacing: ITK stores no unit; NRRD may state one
(``space units``, read from its header), otherwise millimetres are assumed (ITK's medical convention) with a warning. The direction
matrix and origin are not applied (origin ``(0, 0, 0)``), as for NIfTI.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.io.guarded import GuardedArray, corrupt_file_error, unit_to_um

ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_SLAB_BYTES = 64 * 2**20  #: dask chunk size: whole (y, x) planes, as many as fit


class _ItkBoxes:
    """Array-like ``(z, y, x)`` view of an ITK image file: each ``[...]`` read decodes only its bounding box."""

    def __init__(self, path: Path, shape, dtype, extra_axes: int = 0):
        self.path, self.shape, self.dtype, self.ndim = str(path), tuple(shape), np.dtype(dtype), 3
        self.extra_axes = int(extra_axes)  # trailing singleton ITK axes (e.g. t of a one-volume 4D file)

    def __getitem__(self, index):
        import SimpleITK as sitk

        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (3 - len(index))
        # (start, stop, step) per axis; an integer is a one-plane box whose axis is dropped at the end
        bounds = [s.indices(n) if isinstance(s, slice) else (int(s) % n, int(s) % n + 1, 1)
                  for s, n in zip(index, self.shape)]
        if any(b[2] < 1 for b in bounds):
            raise ValueError(f"negative steps are not supported: {index!r}")
        start = [b[0] for b in bounds]
        size = [max(b[1] - b[0], 0) for b in bounds]
        if 0 in size:
            return np.empty(tuple(len(range(*b)) for s, b in zip(index, bounds) if isinstance(s, slice)), self.dtype)
        reader = sitk.ImageFileReader()
        reader.SetFileName(self.path)
        reader.SetExtractIndex(start[::-1] + [0] * self.extra_axes)  # ITK orders (x, y, z[, t])
        reader.SetExtractSize(size[::-1] + [1] * self.extra_axes)
        box = sitk.GetArrayFromImage(reader.Execute())
        box = box.reshape(box.shape[self.extra_axes:]) if self.extra_axes else box
        local = tuple(slice(None, None, b[2]) if isinstance(s, slice) else 0 for s, b in zip(index, bounds))
        return box[local]


def _nrrd_space_unit(path: Path) -> str | None:
    """The first ``space units`` entry of an NRRD header (ITK reads the field but does not report it)."""
    with open(path, "rb") as fh:
        head = fh.read(65536).split(b"\n\n", 1)[0].decode("latin-1")
    for line in head.splitlines():
        if line.lower().startswith("space units:"):
            units = [u for u in line.split(":", 1)[1].split('"') if u.strip()]
            return units[0].strip() if units else None
    return None


def read_itk(path: Path, key, chunks, spacing_um):
    """``(data (z, y, x) dask, spacing [dz, dy, dx] µm or None, origin, source)`` of a MetaImage/NRRD file."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size, spacing = reader.GetSize(), reader.GetSpacing()
        components = reader.GetNumberOfComponents()
    except RuntimeError as exc:
        raise corrupt_file_error(path, "ITK image (MetaImage/NRRD)", exc) from exc
    extra = 0
    if len(size) == 4 and size[3] == 1:
        size, spacing, extra = size[:3], spacing[:3], 1
    if len(size) != 3:
        raise VoxelomeError(f"'{path}' has {len(size)} axes of sizes {tuple(size)}; expected a 3D volume (x, y, z).")
    if components != 1:
        raise VoxelomeError(f"'{path}' has {components} components per voxel (e.g. RGB); voxelome reads grey-level "
                            "volumes. Export one channel.")
    shape = tuple(int(s) for s in size[::-1])
    probe = _ItkBoxes(path, shape, np.float64, extra)
    try:  # decode the first and the last voxel now: a truncated file fails here, not in the middle of a run
        first = probe[0:1, 0:1, 0:1]
        probe[-1:, -1:, -1:]
    except RuntimeError as exc:
        raise corrupt_file_error(path, "ITK image (MetaImage/NRRD)", exc) from exc
    guarded = GuardedArray(_ItkBoxes(path, shape, first.dtype, extra), path, "ITK image (MetaImage/NRRD)")
    plane = shape[1] * shape[2] * first.dtype.itemsize
    data = guarded.to_dask(chunks or (int(max(1, min(shape[0], _SLAB_BYTES // max(plane, 1)))), shape[1], shape[2]))
    unit = _nrrd_space_unit(path) if path.suffix.lower() in (".nrrd", ".nhdr") else None
    factor = unit_to_um(unit)
    source = "ITK header (spacing; direction and origin not applied)"
    if factor is None:
        if spacing_um is not None:  # unit unknown: the header's numbers are no evidence to compare against
            return data, None, (0.0, 0.0, 0.0), source + ", unit unknown"
        factor = 1e3
        warnings.warn(f"'{path}' does not state its length unit; assuming millimetres (ITK's convention), i.e. "
                      f"spacing {tuple(float(s) * 1e3 for s in spacing[::-1])} µm (z, y, x). Pass spacing_um=(dz, dy, dx) "
                      "if that is wrong (micro-CT exports are often in µm).", UserWarning, stacklevel=3)
    return data, [float(s) * factor for s in spacing[::-1]], (0.0, 0.0, 0.0), source
