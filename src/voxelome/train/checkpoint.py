"""Checkpoints that reload from their run folder alone, with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import voxelome
from voxelome.errors import VoxelomeError

FORMAT = "voxelome.checkpoint/1"


def save_checkpoint(path, *, model_state: dict, config: dict, meta: dict, **extra) -> None:
    """Write a checkpoint atomically (temp file + rename, so a kill never leaves half a file)."""
    payload = {"format": FORMAT, "voxelome_version": voxelome.__version__, "config": config, "meta": meta,
               "model_state": model_state, **extra}
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
