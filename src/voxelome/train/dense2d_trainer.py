"""Train a dense 2D expression model (PixNet, arXiv 2503.01347) on H&E sections with measured spots.

Each step draws tiles around training spots (flips/90° rotations, colour jitter), predicts the dense
map, sums it over the exact disk of every spot inside the tile and fits the spots' targets with
``MSE + pearson_weight × (1 − mean per-gene Pearson r)`` — measured spots only. Randomness comes from
``(seed, epoch)``; the run folder holds ``config.yaml``, ``checkpoint.pt`` (loaded ``weights_only``),
``metrics.json``; :meth:`TrainedDense2D.load` rebuilds the model from the folder alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from voxelome.constants import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LAST_CHECKPOINT_FILE,
    METRICS_FILE,
)
from voxelome.errors import VoxelomeError
from voxelome.infer.slide import predict_slide
from voxelome.models.dense2d import DenseExpressionNet2D
from voxelome.models.spot_aggregation import aggregate_disks
from voxelome.train.checkpoint import _plain as plain
from voxelome.train.checkpoint import load_checkpoint, save_checkpoint
from voxelome.train.dense2d_config import (
    Dense2DConfig,
    dense2d_config_from_dict,
    dense2d_config_to_yaml,
)
from voxelome.train.dense2d_data import SlideData, TileSampler
from voxelome.train.dense2d_validation import (
    BEST_CHECKPOINT_FILE,
    validation_scores,
    validation_split,
)


def pearson_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 − mean_g r_g`` over genes with variance in the batch; ``pred``/``target`` are ``(n, G)``."""
    pc, tc = pred - pred.mean(0), target - target.mean(0)
    num = (pc * tc).sum(0)
    den = torch.sqrt((pc * pc).sum(0) * (tc * tc).sum(0) + eps)
    ok = (tc * tc).sum(0) > eps
    if not bool(ok.any()):
        return pred.sum() * 0.0
    return 1.0 - (num / den)[ok].mean()


def dense2d_loss(pred: torch.Tensor, target: torch.Tensor, pearson_weight: float = 0.5) -> torch.Tensor:
    """PixNet's loss: MSE + ``pearson_weight`` × Pearson loss, both over the batch's spots."""
    loss = torch.mean((pred - target) ** 2)
    if pearson_weight > 0 and len(pred) > 2:
        loss = loss + pearson_weight * pearson_loss(pred, target)
    return loss


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_dense2d_model(config: Dense2DConfig, n_genes: int, output_scale=None, *, load_weights: bool = True):
    """The network a config describes (encoder weights read from ``config.encoder_weights`` if set)."""
    return DenseExpressionNet2D(n_genes, encoder=config.encoder, output_stride=config.output_stride,
                                decoder_width=config.decoder_width, width=config.width,
                                encoder_weights=config.encoder_weights if load_weights else None,
                                output_scale=output_scale)


class TrainedDense2D:
    """A trained dense 2D model with what is needed to use it: genes, geometry, config.

    Attributes
    ----------
    model : DenseExpressionNet2D
    config : Dense2DConfig
    genes : list of str
        Output channel names.
    input_um : float
        Working µm per input pixel the model was trained at.
    """

    def __init__(self, model, config: Dense2DConfig, genes, input_um: float, device="cpu", tta: bool = False):
        self.model, self.config, self.genes = model.eval(), config, [str(g) for g in genes]
        self.input_um, self.device = float(input_um), torch.device(device)
        #: Test-time augmentation: average the map over the 8 flips/90° rotations of every tile (8× the compute).
        self.tta = bool(tta)

    @property
    def stride(self) -> int:
        return int(self.config.output_stride)

    @property
    def map_um(self) -> float:
        """µm per map pixel."""
        return self.input_um * self.stride

    @classmethod
    def load(cls, run_dir, device: str | None = None) -> TrainedDense2D:
        """Rebuild from a run folder (``checkpoint.pt``, loaded with ``weights_only=True``)."""
        run_dir = Path(run_dir)
        path = run_dir / CHECKPOINT_FILE if run_dir.is_dir() else run_dir
        ck = load_checkpoint(path)
        if ck.get("meta", {}).get("kind") != "dense2d":
            raise VoxelomeError(f"{path} is not a dense2d checkpoint (train it with `voxelome dense2d train`).")
        config = dense2d_config_from_dict(ck["config"])
        meta = ck["meta"]
        model = build_dense2d_model(config, len(meta["genes"]), load_weights=False)
        model.load_state_dict(ck["model_state"])
        dev = _device(device or config.device)
        return cls(model.to(dev), config, meta["genes"], meta["input_um"], dev)

    @torch.no_grad()
    def predictor(self, x: np.ndarray) -> np.ndarray:
        """``(B, 3, t, t)`` RGB in [0, 1] → ``(B, G, t/s, t/s)`` (the callable :func:`predict_slide` needs)."""
        self.model.eval()
        x = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if not self.tta:
            return self.model(x).float().cpu().numpy()
        out = 0.0
        for flip in (False, True):
            xf = torch.flip(x, (-1,)) if flip else x
            for k in range(4):
                y = torch.rot90(self.model(torch.rot90(xf, k, (-2, -1))), -k, (-2, -1))
                out = out + (torch.flip(y, (-1,)) if flip else y)
        return (out / 8).float().cpu().numpy()

    def predict_map(self, image, out_region=None, tile: int | None = None) -> np.ndarray:
        """Dense map ``(G, ceil(y/s), ceil(x/s))`` of an image at the working resolution (blended tiles)."""
        return predict_slide(image, self.predictor, tile=tile or self.config.predict_tile_px, stride=self.stride,
                             n_channels=len(self.genes), overlap=self.config.overlap, blend=self.config.blend,
                             out_region=out_region)

    def write_stack(self, path, stack, section_spacing_um: float | None = None, *, genes=None, **kwargs):
        """Registered RGB sections → ``(G, z, y, x)`` OME-Zarr volume in µm, one dense map per section.

        Parameters
        ----------
        stack : array-like ``(z, y, x, 3)`` at the working resolution, or :class:`voxelome.infer.slide.RGBStack`
            (opened with ``pixel_size_um=self.input_um``; its z spacing and origin are used).
        section_spacing_um : float, optional
            z spacing (µm); default the stack's ``section_spacing_um``.
        genes : list of str, optional
            Write only these output channels (default all).
        **kwargs
            Passed to :func:`voxelome.infer.slide.write_stack_map` (``overwrite``, ``chunk``, ``extra_attrs``…).
        """
        from voxelome.errors import did_you_mean
        from voxelome.infer.slide import write_stack_map

        if section_spacing_um is None:
            section_spacing_um = getattr(stack, "section_spacing_um", None)
            if section_spacing_um is None:
                raise VoxelomeError("section_spacing_um is needed (µm between consecutive sections).")
        px = float(getattr(stack, "pixel_size_um", self.input_um))
        if abs(px / self.input_um - 1) > 0.02:
            raise VoxelomeError(f"the stack is at {px:.4g} µm/px but the model works at {self.input_um:.4g} µm/px; open it "
                                f"with RGBStack(path, pixel_size_um={self.input_um:g}).")
        kwargs.setdefault("origin_um_zyx", getattr(stack, "origin_um_zyx", (0.0, 0.0, 0.0)))
        names, predictor = self.genes, self.predictor
        if genes is not None:
            for g in genes:
                if g not in self.genes:
                    raise VoxelomeError(f"gene {g!r} is not an output of this model.{did_you_mean(g, self.genes)}")
            idx = [self.genes.index(g) for g in genes]
            names = [self.genes[i] for i in idx]

            def predictor(x):
                return self.predictor(x)[:, idx]

        return write_stack_map(path, stack, predictor, tile=self.config.predict_tile_px, stride=self.stride,
                               channel_names=names, pixel_size_um=px, section_spacing_um=section_spacing_um,
                               overlap=self.config.overlap, blend=self.config.blend, **kwargs)

    def predict_spots(self, slide: SlideData, centres_xy=None, radius_px=None, *, reduce: str = "sum",
                      return_map: bool = False):
        """Spot values: the map summed over disks (any centres / radius, in working pixels).

        Only the bounding box of the disks (plus a margin) is predicted. Returns ``(n, G)``
        (and the map with its output-pixel offset ``(oy, ox)`` when ``return_map``).
        """
        c = slide.centres_xy if centres_xy is None else np.asarray(centres_xy, float).reshape(-1, 2)
        r = np.broadcast_to(np.asarray(slide.radius_px if radius_px is None else radius_px, float), (len(c),))
        s = self.stride
        lo = np.floor((c - r[:, None]).min(0) / s).astype(int) - 1
        hi = np.ceil((c + r[:, None]).max(0) / s).astype(int) + 1
        region = (slice(max(lo[1], 0), hi[1]), slice(max(lo[0], 0), hi[0]))
        dense = self.predict_map(slide.image, out_region=region)
        off = np.array([region[1].start, region[0].start], float)
        vals = aggregate_disks(dense, c / s - off, r / s, reduce=reduce, check_inside=True)
        return (vals, dense, (region[0].start, region[1].start)) if return_map else vals


def _learning_rate(config: Dense2DConfig, epoch: int) -> float:
    floor = 0.05
    return float(config.lr * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * epoch / max(config.epochs - 1, 1)))))


def train_dense2d(slides: list[SlideData], config: Dense2DConfig, run_dir, genes, *, progress: bool = False,
                  log=None, resume: bool = True) -> TrainedDense2D:
    """Fit a dense model on the training spots of ``slides`` and write the run folder.

    After every epoch the run's state (weights, optimiser, history) is written to ``last.pt``; a
    run interrupted at any point and started again with the same arguments resumes there and ends
    with exactly the weights of an uninterrupted run (each epoch's randomness and learning rate
    are functions of ``(seed, epoch)`` alone).

    Parameters
    ----------
    slides : list of SlideData
        Sections at ``config.input_um`` with targets ``(n, G)`` and training masks.
    config : Dense2DConfig
    run_dir : path
        Output folder (created).
    genes : list of str
        Names of the ``G`` target channels.
    progress : bool
        Print one line per epoch.
    log : callable, optional
        Receives the per-epoch record dicts.
    resume : bool
        Continue from ``run_dir/last.pt`` when it exists (it must come from the same config);
        ``False`` starts over.

    Notes
    -----
    With validation (``config.val_fraction`` or ``config.val_sections``, see :func:`validation_split`)
    every epoch ends by scoring the validation spots (``val_pcc``, ``val_loss`` in the history); the
    best epoch's weights are kept in ``best.pt`` and become ``checkpoint.pt``; with ``config.patience``
    training stops after that many epochs without an improvement of more than ``config.min_delta``.
    Validation draws no random numbers, so resuming stays exact.
    """
    if not slides:
        raise VoxelomeError("no slides to train on.")
    n_genes = slides[0].targets.shape[1]
    if len(genes) != n_genes or any(s.targets.shape[1] != n_genes for s in slides):
        raise VoxelomeError(f"all slides need targets with {len(genes)} columns (one per gene name).")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    torch.manual_seed(config.seed)
    device = _device(config.device)
    slides, val_masks = validation_split(slides, config)
    train_y = np.vstack([s.targets[s.train] for s in slides])
    stride = config.output_stride
    radius_out = float(np.median([s.radius_px for s in slides])) / stride
    scale = np.maximum(train_y.mean(0), 1e-4) / (np.pi * radius_out ** 2)
    model = build_dense2d_model(config, n_genes, output_scale=scale).to(device)
    if config.tile_px % model.divisor:
        raise VoxelomeError(f"tile_px={config.tile_px} must be a multiple of {model.divisor} for encoder "
                            f"{config.encoder!r}.")
    margin = max(4.0, config.tile_px / 16)
    sampler = TileSampler(slides, config.tile_px, stride, margin_px=margin)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    meta = {"kind": "dense2d", "genes": list(map(str, genes)), "input_um": float(np.mean([s.pixel_size_um for s in slides])),
            "map_um": float(np.mean([s.pixel_size_um for s in slides])) * stride,
            "map_unit": "target units (e.g. log1p-normalised counts) per map pixel; a region's value is the sum",
            "n_train_spots": int(len(train_y)), "sections": [s.name for s in slides],
            "train_mean": train_y.mean(0).tolist()}
    if config.validates:
        meta.update(n_val_spots=int(sum(m.sum() for m in val_masks)), val_metric=config.val_metric)
    history, start_epoch = [], 0
    last_path = run_dir / LAST_CHECKPOINT_FILE
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        same = plain(dense2d_config_from_dict(state["config"]).to_dict()) == plain(config.to_dict())
        if not same or state["meta"]["genes"] != meta["genes"]:
            raise VoxelomeError(f"{last_path} belongs to a run with another config or other genes; resume with the "
                                "same settings, use a new run folder, or pass resume=False to start over.")
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer_state"])
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
    (run_dir / CONFIG_FILE).write_text(dense2d_config_to_yaml(config))
    t0 = time.time() - (history[-1]["seconds"] if history else 0.0)
    best_path = run_dir / BEST_CHECKPOINT_FILE
    best_epoch = history[-1].get("best_epoch") if history else None
    best_score = history[-1].get("best_score") if history else None
    if config.patience and best_epoch is not None and history[-1]["epoch"] - best_epoch >= config.patience:
        start_epoch = config.epochs  # the interrupted run had already stopped early
    for epoch in range(start_epoch, config.epochs):
        for group in opt.param_groups:
            group["lr"] = _learning_rate(config, epoch)
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch)  # any torch randomness, resumable too
        model.train()
        losses = []
        for _ in range(config.steps_per_epoch):
            x, ws, ys = sampler.batch(rng, config.batch_size, config.augment, config.color_jitter)
            maps = model(x.to(device))
            flat = maps.flatten(2)  # (B, G, h·w)
            pred = torch.cat([w.to(device) @ m.T for w, m in zip(ws, flat)])
            loss = dense2d_loss(pred, torch.cat(ys).to(device), config.pearson_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        rec = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": _learning_rate(config, epoch)}
        if config.validates:
            rec.update(validation_scores(TrainedDense2D(model, config, genes, meta["input_um"], device), slides,
                                         val_masks))
            score = rec["val_pcc"] if config.val_metric == "pcc" else -rec["val_loss"]
            if best_score is None or score > best_score + config.min_delta:
                best_epoch, best_score = epoch, float(score)
                save_checkpoint(best_path, model_state=model.state_dict(), config=config.to_dict(), meta=meta,
                                epoch=epoch)  # before last.pt: a crash in between redoes this epoch
            rec.update(best_epoch=best_epoch, best_score=best_score)
        rec["seconds"] = round(time.time() - t0, 1)
        history.append(rec)
        save_checkpoint(last_path, model_state=model.state_dict(), config=config.to_dict(), meta=meta,
                        optimizer_state=opt.state_dict(), epoch=epoch, history=history)
        if log is not None:
            log(rec)
        if progress:
            print(json.dumps(rec), flush=True)
        if config.patience and epoch - best_epoch >= config.patience:
            break
    metrics = {"history": history}
    if config.validates:
        model.load_state_dict(load_checkpoint(best_path)["model_state"])
        meta.update(best_epoch=int(best_epoch), best_score=float(best_score))
        metrics["validation"] = {"metric": config.val_metric, "best_epoch": int(best_epoch),
                                 "best_score": float(best_score), "epochs_run": len(history),
                                 "stopped_early": len(history) < config.epochs, "n_val_spots": meta["n_val_spots"]}
    save_checkpoint(run_dir / CHECKPOINT_FILE, model_state=model.state_dict(), config=config.to_dict(), meta=meta)
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    return TrainedDense2D(model, config, genes, meta["input_um"], device)


def expression_scores(pred, true) -> dict:
    """PixNet's summary of per-gene Pearson r (PCC@M mean, @S median, @F first quartile), MSE and MAE.

    A gene whose prediction is constant (e.g. the training-mean baseline) counts as r = 0; genes constant
    in ``true`` are not scored. ``pred``, ``true`` are ``(n_spots, n_genes)``.
    """
    from voxelome.evaluate.metrics import pearson_per_column

    pred, true = np.asarray(pred, float), np.asarray(true, float)
    r = pearson_per_column(pred, true)
    r = np.where(np.ptp(pred, axis=0) > 0, r, 0.0)[np.ptp(true, axis=0) > 0]
    if r.size == 0:
        raise VoxelomeError("no gene varies across these spots; nothing to score.")
    return {"pcc_mean": float(np.mean(r)), "pcc_median": float(np.median(r)), "pcc_q1": float(np.percentile(r, 25)),
            "mse": float(np.mean((pred - true) ** 2)), "mae": float(np.mean(np.abs(pred - true))),
            "n_genes_scored": int(r.size), "n_spots": int(len(true))}


def train_dense2d_sections(sections, images, config: Dense2DConfig, run_dir, *, pixel_size_um=None,
                           progress: bool = False) -> TrainedDense2D:
    """Select targets on the sections, pair each with its image and train (what ``voxelome train --preset dense2d`` runs).

    Parameters
    ----------
    sections : list of AnnData
        Sections with counts (``targets='genes'``) or ``obsm['signatures']``, spot centres in image pixels.
    images : list of path or ndarray
        One H&E image per section.
    config : Dense2DConfig
    run_dir : path
    pixel_size_um : float, optional
        µm per image pixel when the sections do not record it.
    """
    from voxelome.train.dense2d_data import (
        gene_targets,
        select_target_genes,
        signature_targets,
        slide_from_section,
    )

    if len(sections) != len(images) or not sections:
        raise VoxelomeError(f"give one image per section (got {len(sections)} sections and {len(images)} images).")
    names = [str(next(iter(a.uns.get("spatial", {})), i)) for i, a in enumerate(sections)]
    if config.targets == "genes":  # validation sections take no part in choosing the targets
        fit_sections = [a for a, n in zip(sections, names) if n not in config.val_sections] or sections
        genes = select_target_genes(fit_sections, config.n_genes, config.gene_selection)
        targets = [gene_targets(a, genes) for a in sections]
    else:
        targets = [signature_targets(a) for a in sections]
        k = targets[0].shape[1]
        genes = [f"signature_{i}" for i in range(k)]
    slides = [slide_from_section(img, a, t, input_um=config.input_um, pixel_size_um=pixel_size_um, name=n)
              for a, img, t, n in zip(sections, images, targets, names)]
    return train_dense2d(slides, config, run_dir, genes, progress=progress)
