"""Checkpoints that reload from their run folder alone, with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

import voxelome
from voxelome.errors import VoxelomeError

FORMAT = "voxelome.checkpoint/1"


def _plain(obj):
    """Numpy scalars/arrays → Python numbers/lists, so ``weights_only=True`` can load the file."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    return obj


def save_checkpoint(path, *, model_state: dict, config: dict, meta: dict, optimizer_state: dict | None = None,
                    **extra) -> None:
    """Write a checkpoint atomically (temp file + rename, so a kill never leaves half a file)."""
    payload = {"format": FORMAT, "voxelome_version": voxelome.__version__, "config": _plain(config),
               "meta": _plain(meta), "model_state": model_state, **_plain(extra)}
    if optimizer_state is not None:
        payload["optimizer_state"] = optimizer_state
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """Load a checkpoint safely (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise VoxelomeError(f"no checkpoint at {path}; train first (voxelome train) or point at a run folder.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
        raise VoxelomeError(f"checkpoint {path} is corrupt or not a voxelome checkpoint ({exc}).") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise VoxelomeError(f"{path} is not a voxelome checkpoint (format {FORMAT}).")
    return payload
