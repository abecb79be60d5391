"""Fit an image → signature model on one placed section; resumable, with early stopping.

The loop is the same for both presets; what differs is how a batch is drawn (crops with spot
footprints for ``dense``, one patch per spot for ``xpression``) and how spots are predicted.
Each epoch's randomness is derived from ``(seed, epoch)``, so a run resumed from ``last.pt``
follows exactly the trajectory of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from voxelome.constants import CHECKPOINT_FILE, CONFIG_FILE, LAST_CHECKPOINT_FILE
from voxelome.io.volume import Volume
from voxelome.models import DenseSignatureNet3D, XPressionCNN
from voxelome.train import ddp
from voxelome.train.checkpoint import load_checkpoint, save_checkpoint
from voxelome.train.config import TrainConfig, config_to_yaml
from voxelome.train.losses import footprint_means, kl_to_targets
from voxelome.train.sampling import (DenseCropSampler, PatchSampler, load_region, multiple_voxels,
                                     odd_voxels)
from voxelome.train.spots import IntensityScaler, SpotTargets

log = logging.getLogger(__name__)

#: Fields that may differ when resuming: extending a run, or moving it to another device.
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "device", "num_threads", "inference_batch"})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_geometry(config: TrainConfig, spacing_um) -> dict:
    """Voxel sizes of crops, windows, patches and grids for a scan of ``spacing_um`` (z, y, x)."""
    spacing = np.asarray(spacing_um, dtype=float)
    geo: dict = {"spacing_um": spacing.tolist()}
    if config.model == "dense":
        pool = 1 if config.input_spacing_um is None else max(int(round(config.input_spacing_um / spacing.min())), 1)
        div = pool * 4
        geo.update(
            input_pool=pool,
            total_stride=pool * config.output_stride,
            crop_shape=[multiple_voxels(c, s, div) for c, s in zip(config.crop_um, spacing)],
            window_shape=[multiple_voxels(w, s, div) for w, s in zip(config.window_um, spacing)],
        )
    else:
        geo.update(
            patch_shape=[odd_voxels(p, s) for p, s in zip(config.patch_um, spacing)],
            grid_step=[max(int(round(g / s)), 1) for g, s in zip(config.grid_step_um, spacing)],
        )
    return geo


def build_model(config: TrainConfig, meta: dict) -> torch.nn.Module:
    """The network described by a config and the run's metadata."""
    k = int(meta["n_signatures"])
    if config.model == "dense":
        return DenseSignatureNet3D(k, width=config.width, input_pool=meta["input_pool"],
                                   output_stride=config.output_stride, norm=config.norm)
    return XPressionCNN(k, patch_shape=tuple(meta["patch_shape"]), dropout=config.dropout)


class SpotPredictor:
    """Predict the proportions of placed spots with a model (used for validation and evaluation)."""

    def __init__(self, model, config: TrainConfig, meta: dict, device):
        self.model, self.config, self.meta, self.device = model, config, meta, device

    def sampler(self, volume: Volume, targets: SpotTargets, region=None):
        scaler = IntensityScaler(*self.meta["scaler"])
        if region is None:
            region, _ = load_region(volume, targets.centres_xyz_um, self.margin_um(), scaler)
        if self.config.model == "dense":
            step = min(volume.spacing_um) * self.meta["total_stride"] / 2.0
            return DenseCropSampler(region, volume, targets, self.meta["crop_shape"], self.meta["total_stride"],
                                    footprint_step_um=step, margin_um=2 * step)
        return PatchSampler(region, volume, targets, self.meta["patch_shape"], self.config.oversample_rare)

    def margin_um(self) -> float:
        shape = self.meta.get("crop_shape") or self.meta["patch_shape"]
        return float(np.max(np.asarray(shape) * np.asarray(self.meta["spacing_um"]))) / 2 + 50.0

    @torch.no_grad()
    def predict(self, sampler, spots: np.ndarray, part: tuple[int, int] = (0, 1)) -> np.ndarray:
        """Proportions ``(len(spots), k)`` in the order of ``spots``.

        ``part=(i, n)`` computes only batches ``i, i + n, ...`` (rows of the others stay 0), so
        ``n`` processes can split the work and sum their results (see :mod:`voxelome.train.ddp`).
        """
        self.model.eval()
        out = np.zeros((len(spots), int(self.meta["n_signatures"])), np.float32)
        pos = {int(s): i for i, s in enumerate(spots)}
        mine, n_parts = part
        if isinstance(sampler, DenseCropSampler):
            for j, (x, spot_lists, grids) in enumerate(sampler.cover(np.asarray(spots), batch_size=2)):
                if j % n_parts != mine:
                    continue
                probs = self.model(x.to(self.device))
                for b, (ids, grid) in enumerate(zip(spot_lists, grids)):
                    vals = footprint_means(probs[b], grid.to(self.device)).cpu().numpy()
                    out[[pos[int(i)] for i in ids]] = vals
        else:
            bs = self.config.inference_batch
            for i in range(0, len(spots), bs):
                if (i // bs) % n_parts != mine:
                    continue
                x = sampler.patches(spots[i:i + bs])
                out[i:i + bs] = torch.exp(self.model(x.to(self.device))).cpu().numpy()
        return out


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Learning rate of an epoch: constant, or a cosine decay to 5 % of ``lr`` at the last epoch."""
    if config.lr_schedule == "constant":
        return config.lr
    floor = 0.05
    return float(config.lr * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * epoch / max(config.epochs - 1, 1)))))


def draw_batch(sampler, rng, config: TrainConfig, isotropic: bool):
    if isinstance(sampler, DenseCropSampler):
        return sampler.batch(rng, config.batch_size, config.augment, rotate_3d=config.rotate_3d and isotropic)
    return sampler.batch(rng, config.batch_size, config.augment)


def _step_loss(model, sampler, batch, device) -> torch.Tensor:
    if isinstance(sampler, DenseCropSampler):
        x, grids, ys = batch
        probs = model(x.to(device))
        losses = []
        for b, (grid, y) in enumerate(zip(grids, ys)):
            if len(y) == 0:
                continue
            pred = footprint_means(probs[b], grid.to(device))
            losses.append(kl_to_targets(torch.log(pred + 1e-6), y.to(device)) * len(y))
        n = sum(len(y) for y in ys)
        return torch.stack(losses).sum() / max(n, 1) if losses else probs.sum() * 0.0
    x, y = batch
    return kl_to_targets(model(x.to(device)), y.to(device))


def train_model(volume: Volume, targets: SpotTargets | None, config: TrainConfig, run_dir, *, resume: bool = True,
                extra_meta: dict | None = None, progress: bool = True) -> Path:
    """Train and write a run folder, on one process or, under ``torchrun``, on several (DDP).

    Launched by ``torchrun --nproc-per-node N``, the N processes train one model together
    (see :mod:`voxelome.train.ddp`): each step's batch is split across them, gradients and losses
    are all-reduced, and only rank 0 writes ``run_dir``; ranks > 0 may pass ``targets=None``
    (rank 0's targets are broadcast).

    Parameters
    ----------
    volume : Volume
        The scan (only the region around the spots is read).
    targets : SpotTargets or None
        Placed spots with proportions and the train/validation split (None only on DDP ranks > 0).
    config : TrainConfig
        Model and optimisation settings.
    run_dir : path
        Output folder: ``config.yaml``, ``checkpoint.pt`` (best), ``last.pt`` (resume point),
        ``history.json``.
    resume : bool
        Continue from ``run_dir/last.pt`` when it exists (same config required).

    Returns
    -------
    Path
        ``run_dir``.
    """
    run_dir = Path(run_dir)
    ctx, device = ddp.setup(config.device)
    try:
        _train(volume, targets, config, run_dir, resume, extra_meta, progress, ctx, device)
    except BaseException:
        ctx.close(wait=False)
        raise
    ctx.close()
    return run_dir


def _train(volume, targets, config, run_dir, resume, extra_meta, progress, ctx, device) -> None:
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    targets = ctx.broadcast_object(targets)
    if targets is None:
        from voxelome.errors import VoxelomeError

        raise VoxelomeError("train_model needs targets (from targets_from_section).")
    ddp.check_batch(config.batch_size, ctx)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    meta = {"n_signatures": targets.n_signatures, "names": list(targets.names),
            "origin_um": list(volume.origin_um), **model_geometry(config, volume.spacing_um), **(extra_meta or {})}
    margin = SpotPredictor(None, config, meta, device).margin_um() if config.model == "dense" else \
        float(np.max(np.asarray(meta["patch_shape"]) * volume.spacing_um)) / 2 + 50.0
    region, scaler = load_region(volume, targets.centres_xyz_um, margin, None)
    meta["scaler"] = [scaler.low, scaler.high]

    torch.manual_seed(config.seed)
    model = build_model(config, meta).to(device)
    net = ddp.wrap(model, ctx, device)  # DDP on several processes, the model itself on one
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    predictor = SpotPredictor(model, config, meta, device)
    sampler = predictor.sampler(volume, targets, region)
    val_spots = np.flatnonzero(~targets.train_mask)
    isotropic = float(np.ptp(volume.spacing_um)) <= 0.1 * float(np.min(volume.spacing_um))

    history: list[dict] = []
    start_epoch, best_val, bad_epochs = 0, float("inf"), 0
    last_path = run_dir / LAST_CHECKPOINT_FILE
    state = ctx.broadcast_object(load_checkpoint(last_path) if ctx.is_main and resume and last_path.exists()
                                 else None)  # rank 0's file is the resume point of every rank
    if state is not None:
        free = RESUMABLE_CHANGES - ({"epochs"} if config.lr_schedule == "cosine" else set())  # cosine spans `epochs`
        old, new = ({k: v for k, v in d.items() if k not in free} for d in (state["config"], config.to_dict()))
        if old != new:
            raise_config_mismatch(last_path, old, new)
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer_state"])
        start_epoch, best_val, bad_epochs = state["epoch"] + 1, state["best_val"], state["bad_epochs"]
        history = list(state["history"])
        log.info("resuming %s at epoch %d", run_dir, start_epoch)
    if ctx.is_main:
        data = {"data": {k: meta[k] for k in ("names", "spacing_um")}}
        (run_dir / CONFIG_FILE).write_text(config_to_yaml(config, data))

    stopped_early = bad_epochs >= config.patience
    bar = tqdm(range(start_epoch, config.epochs), desc=f"train {config.model}", disable=not (progress and ctx.is_main),
               initial=start_epoch, total=config.epochs)
    for epoch in bar:
        if stopped_early:
            break
        t0 = time.perf_counter()
        for group in opt.param_groups:  # a function of the epoch alone, so resuming needs no scheduler state
            group["lr"] = learning_rate(config, epoch)
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch)
        model.train()
        losses = []
        for _ in range(config.steps_per_epoch):
            batch = draw_batch(sampler, rng, config, isotropic)  # the same global batch on every rank
            if ctx.enabled:
                loss, share = ddp.shard_step_loss(net, batch, device, ctx, isinstance(sampler, DenseCropSampler))
            else:
                loss = share = _step_loss(model, sampler, batch, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(share.detach() if ctx.enabled else float(loss.detach()))
        if ctx.enabled:
            losses = [ddp.epoch_mean_loss(losses, ctx)]
        val_pred = ddp.predict_spots(predictor, sampler, val_spots, ctx)
        val_true = torch.from_numpy(targets.proportions[val_spots])
        val_loss = float(kl_to_targets(torch.log(torch.from_numpy(val_pred) + 1e-6), val_true))
        improved = val_loss < best_val - 1e-5
        best_val, bad_epochs = (val_loss, 0) if improved else (best_val, bad_epochs + 1)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                        "seconds": time.perf_counter() - t0})
        bar.set_postfix(train=f"{np.mean(losses):.4f}", val=f"{val_loss:.4f}")
        cfg = config.to_dict()
        if improved and ctx.is_main:
            save_checkpoint(run_dir / CHECKPOINT_FILE, model_state=model.state_dict(), config=cfg, meta=meta,
                            epoch=epoch, val_loss=val_loss)
        if ctx.is_main:
            save_checkpoint(last_path, model_state=model.state_dict(), config=cfg, meta=meta, epoch=epoch,
                            optimizer_state=opt.state_dict(), best_val=best_val, bad_epochs=bad_epochs,
                            history=history)
        stopped_early = bad_epochs >= config.patience
    if ctx.is_main:
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))


def raise_config_mismatch(path, old: dict, new: dict):
    from voxelome.errors import VoxelomeError

    diff = {k: (old.get(k), new.get(k)) for k in new if old.get(k) != new.get(k)}
    why = " (with lr_schedule='cosine' the schedule spans `epochs`, so a run cannot be extended)" \
        if "epochs" in diff and new.get("lr_schedule") == "cosine" else ""
    raise VoxelomeError(
        f"{path} was written with a different config ({diff}){why}; resume with the same settings, "
        "or start a new run folder (or pass resume=False / --no-resume)."
    )
