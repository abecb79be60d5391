"""Helpers shared by the readers: unit conversion, missing-path and corrupt-file errors, guarded lazy arrays."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np

from voxelome.errors import VoxelomeError, did_you_mean

#: Length units → µm. Keys are lower-case spellings used by ImageJ, OME-XML, NGFF and NIfTI.
UNIT_TO_UM = {
    "micrometer": 1.0, "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0,
    "nanometer": 1e-3, "nm": 1e-3, "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "cm": 1e4,
    "meter": 1e6, "m": 1e6, "angstrom": 1e-4, "å": 1e-4, "inch": 25400.0,
}

def missing_path_error(path: Path, what: str = "file") -> VoxelomeError:
    """A :class:`VoxelomeError` for a missing ``path`` with a "did you mean" among its siblings."""
    parent = path.parent
    if not parent.is_dir():
        return VoxelomeError(f"no such {what}: '{path}' (its folder '{parent}' does not exist either). Check the path.")
    siblings = sorted(p.name for p in parent.iterdir())
    listing = ", ".join(siblings[:12]) + (", …" if len(siblings) > 12 else "") if siblings else "(empty)"
    return VoxelomeError(f"no such {what}: '{path}'.{did_you_mean(path.name, siblings)} "
                         f"The folder '{parent}' holds: {listing}.")


def unit_to_um(unit: str | None) -> float | None:
    """Factor turning a length in ``unit`` into µm, or ``None`` when the unit is unknown/absent."""
    if unit is None:
        return None
    u = str(unit).strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").lower()
    return UNIT_TO_UM.get(u)


class GuardedArray:
    """Array-like wrapper that turns any read/decode failure into a :class:`VoxelomeError`.

    dask calls ``__getitem__`` lazily, so a corrupt chunk only surfaces at compute time; the
    wrapper makes that error name the file and the fix instead of a codec traceback. With an
    ``opener`` (a picklable callable returning the array) the open handle is dropped on pickling
    and re-opened on first use, so graphs can travel to dask worker processes.
    """

    def __init__(self, array, path, what: str = "file", opener=None):
        self._array, self._path, self._what, self._opener = array, Path(path), what, opener
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._opener is not None:
            state["_array"] = None  # file handles do not pickle; re-open where it is used
        return state

    def __getitem__(self, index):
        try:
            if self._array is None:
                self._array = self._opener()
            return np.asarray(self._array[index])
        except VoxelomeError:
            raise
        except Exception as exc:  # noqa: BLE001 - any codec/IO error means a damaged file
            raise VoxelomeError(
                f"could not read block {index!r} of {self._what} '{self._path}': {type(exc).__name__}: {exc}. "
                "The file is corrupt or truncated; re-export or re-download it."
            ) from exc

    def to_dask(self, chunks) -> da.Array:
        """Wrap as dask with ``chunks`` (native chunking when the source has one)."""
        # name=False: a random graph name. Hashing the default way would pickle the wrapped
        # array, i.e. read the whole file, just to name the graph.
        return da.from_array(self, chunks=chunks, name=False, meta=np.empty((0,) * self.ndim, self.dtype))


def corrupt_file_error(path: Path, what: str, exc: BaseException | str) -> VoxelomeError:
    detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else exc
    return VoxelomeError(f"'{path}' is not a readable {what}; it looks corrupt or truncated ({detail}). "
                         "Re-export or re-download the file.")


def native_chunks(array, chunks):
    if chunks is not None:
        return chunks
    native = getattr(array, "chunks", None)
    return tuple(native) if native is not None else "auto"
