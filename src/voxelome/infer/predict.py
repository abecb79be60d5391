"""Whole-volume prediction from a trained run folder into a multiscale OME-Zarr ``(c, z, y, x)``."""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr

from voxelome.accel import AccelOptions, autocast, prepare_model, to_device, to_host
from voxelome.constants import CHECKPOINT_FILE
from voxelome.errors import VoxelomeError
from voxelome.infer.blocks import DONE_DIR, all_done, run_blockwise
from voxelome.infer.sliding_window import patch_grid_inference, sliding_window_inference
from voxelome.io.omezarr import build_pyramid, create_ome_zarr
from voxelome.io.volume import Volume
from voxelome.train.checkpoint import load_checkpoint
from voxelome.train.config import TrainConfig, config_from_dict
from voxelome.train.spots import IntensityScaler
from voxelome.train.trainer import SpotPredictor, build_model, resolve_device


@dataclass
class TrainedModel:
    """A model reloaded from its run folder: network, config and the data geometry it was fit on."""

    config: TrainConfig
    meta: dict
    model: torch.nn.Module
    device: torch.device
    fingerprint: str = ""
    accel: AccelOptions = field(default_factory=AccelOptions)
    """GPU fast-path options of the forward pass (see :mod:`voxelome.accel`); default plain fp32."""
    checkpoint: str | None = None
    """The checkpoint file it was loaded from (cluster workers reload the model from it)."""

    @classmethod
    def load(cls, run_dir, device: str | None = None, accel: AccelOptions | None = None) -> "TrainedModel":
        """Load ``run_dir/checkpoint.pt`` (``weights_only=True``; nothing else is needed)."""
        path = Path(run_dir)
        path = path / CHECKPOINT_FILE if path.is_dir() else path
        ckpt = load_checkpoint(path)
        # runs saved before the `norm` option existed were trained with group norm
        config = config_from_dict({"norm": "group", **ckpt["config"]})
        dev = resolve_device(device or config.device)
        model = build_model(config, ckpt["meta"])
        model.load_state_dict(ckpt["model_state"])
        fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        loaded = cls(config, ckpt["meta"], model.to(dev).eval(), dev, fingerprint, accel or AccelOptions(),
                     str(path.resolve()))
        if not loaded.accel.is_default:
            loaded._fast = prepare_model(loaded.model, dev, loaded.accel)
        return loaded

    @property
    def names(self) -> list[str]:
        return list(self.meta["names"])

    @property
    def scaler(self) -> IntensityScaler:
        return IntensityScaler(*self.meta["scaler"])

    def output_step(self) -> np.ndarray:
        """Scan voxels per output voxel, (z, y, x)."""
        if self.config.model == "dense":
            return np.full(3, int(self.meta["total_stride"]))
        return np.asarray(self.meta["grid_step"])

    def output_geometry(self, volume: Volume) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
        """Output grid shape, spacing (µm) and origin (µm, centre of output voxel 0), all (z, y, x)."""
        step = self.output_step()
        shape = tuple(int(-(-s // f)) for s, f in zip(volume.shape, step))
        spacing = tuple(float(d * f) for d, f in zip(volume.spacing_um, step))
        origin = tuple(float(o + (f - 1) / 2 * d) for o, f, d in zip(volume.origin_um, step, volume.spacing_um))
        return shape, spacing, origin

    def check_volume(self, volume: Volume) -> None:
        trained = np.asarray(self.meta["spacing_um"])
        if not np.allclose(trained, volume.spacing_um, rtol=0.05):
            raise VoxelomeError(
                f"volume spacing {volume.spacing_um} µm differs from the training scan's {tuple(trained)} µm; "
                "predict on a scan of the same voxel size (resample it first) or retrain."
            )

    @torch.no_grad()
    def _forward(self, x: np.ndarray) -> np.ndarray:
        if not self.accel.is_default:
            return self._forward_fast(x)
        t = torch.from_numpy(x).to(self.device)
        y = self.model(t)
        return (torch.exp(y) if self.config.model == "xpression" else y).float().cpu().numpy()

    @torch.no_grad()
    def _forward_fast(self, x: np.ndarray) -> np.ndarray:
        """The forward pass with :attr:`accel` (autocast, channels-last-3D, compiled, pinned copies)."""
        net = getattr(self, "_fast", None)
        if net is None:  # (not `or`: a compiled module refuses bool())
            net = self._fast = prepare_model(self.model, self.device, self.accel)
        with autocast(self.device, self.accel.precision):
            y = net(to_device(x, self.device, self.accel))
        y = y.float()
        return to_host(torch.exp(y) if self.config.model == "xpression" else y)

    def predict_region(self, volume: Volume, out_region) -> np.ndarray:
        """Proportions ``(k, *region)`` for one region of the output grid (the per-block function)."""
        k = int(self.meta["n_signatures"])
        if self.config.model == "dense":
            return sliding_window_inference(
                volume.data, self._forward, window=self.meta["window_shape"], stride=int(self.meta["total_stride"]),
                n_channels=k, overlap=self.config.overlap, blend=self.config.blend, out_region=out_region,
                batch_size=1, prepare=self.scaler)
        return patch_grid_inference(
            volume.data, self._forward, patch_shape=self.meta["patch_shape"], step=self.meta["grid_step"],
            n_channels=k, out_region=out_region, batch_size=self.config.inference_batch, prepare=self.scaler)

    def spot_predictor(self) -> SpotPredictor:
        return SpotPredictor(self.model, self.config, self.meta, self.device)


def default_chunks(model: TrainedModel) -> tuple[int, int, int]:
    """Output chunk (z, y, x): two dense windows per axis.

    Each chunk predicts every window that touches it (that is what makes the result independent
    of the chunking), so windows on chunk borders are computed more than once; two windows per
    axis cuts that repeated work from ~2× to ~1.5× per axis, for a few MB more per block.
    """
    if model.config.model == "dense":
        return tuple(int(max(2 * w // model.meta["total_stride"], 8)) for w in model.meta["window_shape"])
    return (16, 32, 32)


def _check_same_job(out_path, identity: dict, overwrite: bool) -> None:
    """Resume only the same model on the same volume; otherwise refuse, or start over with ``overwrite``."""
    out_path = Path(out_path)
    if not out_path.exists():
        return
    try:
        previous = dict(zarr.open_group(str(out_path), mode="r").attrs.get("voxelome", {}))
    except Exception:  # noqa: BLE001 - not a zarr group: create_ome_zarr reports it
        return
    started = (out_path / DONE_DIR).exists()
    if (previous or started) and previous != identity:
        if not overwrite:
            raise VoxelomeError(
                f"{out_path} holds a prediction of another model or volume ({previous}); it cannot be resumed "
                "with this one. Choose another --out, or pass overwrite=True (--overwrite) to replace it."
            )
        shutil.rmtree(out_path)


def predict_volume(model: TrainedModel | str | Path, volume: Volume, out_path, *, chunks=None,
                   overwrite: bool = False, pyramid: bool = True, progress: bool = True) -> dict:
    """Predict signature proportions for the whole volume into OME-Zarr, resumably.

    Parameters
    ----------
    model : TrainedModel or path
        A loaded model or its run folder.
    volume : Volume
        The scan, same voxel size as at training.
    out_path : path
        Output ``.ome.zarr`` folder. If it exists from an interrupted run with the same
        geometry, only unfinished chunks are computed.
    chunks : tuple of int, optional
        Output chunk shape (z, y, x) in output voxels; sets the memory of one block.
    overwrite : bool
        Discard an existing output with a different geometry.

    Returns
    -------
    dict
        Output path, shape, spacing, blocks computed/skipped, seconds, input voxels per second.
    """
    if not isinstance(model, TrainedModel):
        model = TrainedModel.load(model)
    out, shape, spacing, chunks = open_prediction_output(model, volume, out_path, chunks=chunks, overwrite=overwrite)
    t0 = time.perf_counter()
    stats = run_blockwise(lambda region: model.predict_region(volume, region), out, out_path, chunks_zyx=chunks,
                          progress=progress, desc=f"predict {model.config.model}")
    seconds = time.perf_counter() - t0
    if pyramid and all_done(out_path, shape, chunks):
        build_pyramid(out_path)
    return prediction_stats(out_path, volume, out.shape, spacing, chunks, stats, seconds)


def open_prediction_output(model: TrainedModel, volume: Volume, out_path, *, chunks=None, overwrite: bool = False):
    """Check the job, create (or re-open to resume) the output store; shared by every scheduler.

    Returns
    -------
    out : zarr.Array
        Level 0, ``(k, z, y, x)`` float32, opened for writing.
    shape, spacing, chunks : tuple
        Output grid shape, spacing (µm) and chunk shape, (z, y, x).
    """
    model.check_volume(volume)
    shape, spacing, origin = model.output_geometry(volume)
    chunks = tuple(int(c) for c in (chunks or default_chunks(model)))
    k = int(model.meta["n_signatures"])
    identity = {"model": model.fingerprint, "volume": {"name": volume.name, "shape": list(volume.shape),
                                                       "spacing_um": list(volume.spacing_um)}}
    _check_same_job(out_path, identity, overwrite)
    out = create_ome_zarr(out_path, (k, *shape), chunks_czyx=(k, *chunks), dtype="float32",
                          spacing_um_zyx=spacing, origin_um_zyx=origin, channel_names=model.names,
                          overwrite=overwrite)
    zarr.open_group(str(out_path), mode="a").attrs["voxelome"] = identity
    return out, shape, spacing, chunks


def prediction_stats(out_path, volume: Volume, shape_czyx, spacing, chunks, stats: dict, seconds: float) -> dict:
    """The summary :func:`predict_volume` returns (throughputs count only the blocks computed now)."""
    n_in, n_out = int(np.prod(volume.shape)), int(np.prod(shape_czyx[1:]))
    frac = stats["computed"] / max(stats["blocks"], 1)
    return {"path": str(out_path), "shape_czyx": [int(s) for s in shape_czyx], "spacing_um_zyx": list(spacing),
            "chunks": list(chunks), **stats, "seconds": seconds,
            "input_voxels_per_s": n_in * frac / max(seconds, 1e-9),
            "output_voxels_per_s": n_out * frac / max(seconds, 1e-9)}
