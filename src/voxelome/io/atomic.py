"""Atomic file writes: a reader never sees a half-written file.

Every writer here writes to a temporary sibling ``<name>.tmp-<pid>-<thread>`` in the *same*
folder (so the final :func:`os.replace` is a rename within one file system, which POSIX and
Windows make atomic), flushes and ``fsync``-s it, then replaces the target. If anything fails
the temporary file is removed and the old target, if any, is left untouched. This is what makes
resumable runs safe: a crash mid-write leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_h5ad",
    "atomic_torch_save",
    "atomic_path",
    "atomic_dir",
]


def _tmp_name(path: Path) -> Path:
    # pid keeps processes apart, the thread id keeps threads of one process apart.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def _fsync_dir(folder: Path) -> None:
    # Persist the rename itself; not supported on Windows, where os.replace is enough.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. certain network mounts) refuse; not fatal
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and move it over ``path``.

    Use it for writers that insist on a file name (h5py, anndata, torch).

    Parameters
    ----------
    path : str or path-like
        Final destination. Its folder is created if missing.

    Yields
    ------
    pathlib.Path
        The temporary file to write to. Deleted if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (an existing folder is removed
    first), so a reader sees the old folder or the whole new one. For folder formats (OME-Zarr stores).

    Yields
    ------
    pathlib.Path
        The temporary folder to write into (not created: writers such as zarr create it). Deleted if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_with(path, write: Callable[[Any], None], mode: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
            write(fh)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    return _write_with(path, lambda fh: fh.write(bytes(data)), "wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return the path."""
    return _write_with(path, lambda fh: fh.write(str(text)), "w")


def _json_default(obj):
    # NumPy scalars and arrays appear everywhere in metadata (spacings, metrics).
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (NumPy scalars/arrays converted) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent, default=_json_default)
    return atomic_write_text(path, text + "\n")


def atomic_write_h5ad(adata, path: str | os.PathLike, **kwargs) -> Path:
    """Write an AnnData to ``path`` (``.h5ad``) atomically; extra kwargs go to ``write_h5ad``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, **kwargs)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically, so a crash never leaves a truncated checkpoint."""
    import torch  # imported lazily: io must not require torch to read data

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
    return path
