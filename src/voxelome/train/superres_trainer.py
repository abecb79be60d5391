"""Train a cross-modal diffusion super-resolution model on low-res / high-res expression pairs.

Each step draws random crops (aligned to the low-res grid, flipped/rotated alike in every input) from the
training pairs, and fits :meth:`GaussianDiffusion.loss` on the measured high-res pixels (or, for the
deterministic baseline, the masked MSE of the clean map). An exponential moving average of the weights is
what samples. Randomness of step ``k`` is a function of ``(seed, k)`` alone and ``last.pt`` is written every
``checkpoint_every`` steps, so an interrupted run started again resumes to the same weights.

Run folder: ``config.yaml``, ``checkpoint.pt`` (EMA weights + genes, scaling, graph; ``weights_only``),
``last.pt`` (resume state), ``metrics.json`` (loss curve), and ``calibration.json`` once calibrated.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from voxelome.constants import CHECKPOINT_FILE, CONFIG_FILE, LAST_CHECKPOINT_FILE, METRICS_FILE
from voxelome.errors import VoxelomeError
from voxelome.models.diffusion.network import SuperResDenoiser, coexpression_graph
from voxelome.models.diffusion.normalise import ExpressionScaling, pair_tensors
from voxelome.models.diffusion.process import GaussianDiffusion
from voxelome.train.checkpoint import _plain as plain
from voxelome.train.checkpoint import load_checkpoint, save_checkpoint
from voxelome.train.superres_config import SuperResConfig, superres_config_to_yaml

_KEYS = ("low_up", "low_mask", "x0", "mask", "image")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def process_of(config: SuperResConfig) -> GaussianDiffusion:
    return GaussianDiffusion(config.num_train_timesteps, config.beta_schedule, config.prediction_type)


def build_superres_model(config: SuperResConfig, n_genes: int, n_image_features: int, adjacency=None):
    """The denoiser a config describes."""
    return SuperResDenoiser(n_genes, n_image_features, width=config.width, levels=config.levels,
                            adjacency=adjacency if config.graph_neighbours else None, tokens=config.tokens,
                            heads=config.heads, deterministic=config.deterministic, dropout=config.dropout,
                            self_condition=config.self_condition)


def check_pairs(pairs, what: str = "pairs") -> None:
    """Same genes, factor and image features across pairs; each pair valid."""
    if not pairs:
        raise VoxelomeError(f"{what} is empty; pass at least one SuperResPair.")
    first = pairs[0]
    for p in pairs:
        if hasattr(p, "validate"):
            p.validate()
        if list(p.genes) != list(first.genes):
            raise VoxelomeError(f"{what}: pair {p.name!r} has other genes than {first.name!r}; use one gene list.")
        if int(p.factor) != int(first.factor):
            raise VoxelomeError(f"{what}: pair {p.name!r} has factor={p.factor}, {first.name!r} has {first.factor}.")
        if (p.image is None) != (first.image is None) or (
                p.image is not None and p.image.shape[0] != first.image.shape[0]):
            raise VoxelomeError(f"{what}: pair {p.name!r} and {first.name!r} differ in their histology features "
                                "(all pairs need the same F channels, or none).")


class CropSampler:
    """Random low-res-aligned crops of the training pairs' tensors, with dihedral augmentation."""

    def __init__(self, items: list[dict], crop: int, factor: int):
        self.crop, self.factor = int(crop), int(factor)
        self.items = [self._pad(it) for it in items]
        weights = np.array([it["mask"].sum() for it in self.items], float)
        if weights.sum() <= 0:
            raise VoxelomeError("no measured high-res pixel in the training pairs (every high_mask is empty).")
        self.p = weights / weights.sum()

    def _pad(self, item: dict) -> dict:
        h, w = item["mask"].shape[-2:]
        ph, pw = max(0, self.crop - h), max(0, self.crop - w)
        if not (ph or pw):
            return item
        return {k: np.pad(v, ((0, 0), (0, ph), (0, pw))) for k, v in item.items()}

    def batch(self, rng: np.random.Generator, size: int, augment: bool) -> dict[str, torch.Tensor]:
        out: dict[str, list] = {}
        c, f = self.crop, self.factor
        for _ in range(size):
            it = self.items[rng.choice(len(self.items), p=self.p)]
            h, w = it["mask"].shape[-2:]
            y0 = f * rng.integers(0, (h - c) // f + 1)
            x0 = f * rng.integers(0, (w - c) // f + 1)
            k, flip = (int(rng.integers(4)), bool(rng.integers(2))) if augment else (0, False)
            for key in _KEYS:
                if key not in it:
                    continue
                v = it[key][:, y0:y0 + c, x0:x0 + c]
                v = np.rot90(v, k, axes=(1, 2))
                out.setdefault(key, []).append(np.ascontiguousarray(v[:, :, ::-1] if flip else v))
        return {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}


def _lr(config: SuperResConfig, step: int) -> float:
    floor = 0.05
    return float(config.lr * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * step / max(config.iterations - 1, 1)))))


def _ema(model, decay: float):
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_superres(pairs, config: SuperResConfig, run_dir, *, progress: bool = False, resume: bool = True,
                   log=None):
    """Fit a super-resolution diffusion model (or its deterministic twin) and write the run folder.

    Parameters
    ----------
    pairs : list of SuperResPair
        Training pairs (same genes, factor and histology features).
    config : SuperResConfig
    run_dir : path
        Output folder (created).
    progress : bool
        Show a progress bar with the running loss.
    resume : bool
        Continue from ``run_dir/last.pt`` when it exists (same config and genes required).
    log : callable, optional
        Receives each checkpoint's record (``step``, ``loss``, ``lr``, ``seconds``) after it is written.

    Returns
    -------
    TrainedSuperRes
    """
    from voxelome.train.superres_model import TrainedSuperRes

    check_pairs(pairs)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    device = resolve_device(config.device)
    genes = [str(g) for g in pairs[0].genes]
    factor = int(pairs[0].factor)
    crop = max(factor, (config.crop_px // factor) * factor)
    n_feat = 0 if pairs[0].image is None else int(pairs[0].image.shape[0])
    scaling = ExpressionScaling.fit(pairs, config.base)
    adjacency = coexpression_graph([p.high for p in pairs], [p.high_mask for p in pairs], config.graph_neighbours)
    torch.manual_seed(config.seed)
    model = build_superres_model(config, len(genes), n_feat, adjacency).to(device)
    ema = _ema(model, config.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    process = process_of(config)
    sched = process.train_scheduler()
    sampler = CropSampler([pair_tensors(p, scaling) for p in pairs], crop, factor)
    meta = {"kind": "superres", "genes": genes, "factor": factor, "n_image_features": n_feat,
            "pixel_size_um": float(pairs[0].pixel_size_um), "scaling": scaling.to_dict(),
            "adjacency": adjacency.tolist(), "train_pairs": [str(p.name) for p in pairs], "crop_px": crop}
    history, start = [], 0
    last_path = run_dir / LAST_CHECKPOINT_FILE
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        if state["config"] != plain(config.to_dict()) or state["meta"]["genes"] != genes:
            raise VoxelomeError(f"{last_path} belongs to a run with another config or other genes; resume with the "
                                "same settings, use a new run folder, or pass resume=False to start over.")
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer_state"])
        if ema is not None:
            ema.load_state_dict(state["ema_state"])
        start, history = int(state["step"]) + 1, list(state["history"])
    (run_dir / CONFIG_FILE).write_text(superres_config_to_yaml(config))
    t0 = time.time() - (history[-1]["seconds"] if history else 0.0)
    steps = range(start, config.iterations)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.iterations, initial=start, desc="superres fit" if not config.deterministic
                   else "deterministic fit")
    window: list[float] = []
    model.train()
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = _lr(config, step)
        rng = np.random.default_rng([config.seed, step])
        gen = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + step)
        torch.manual_seed(config.seed * 100_003 + step)  # dropout
        batch = {k: v.to(device) for k, v in sampler.batch(rng, config.batch_size, config.augment).items()}
        conditions = {"low_up": batch["low_up"], "low_mask": batch["low_mask"], "image": batch.get("image")}
        if config.deterministic:
            out = model(None, None, **conditions)
            loss = ((out - batch["x0"]) ** 2 * batch["mask"]).sum() / (batch["mask"].sum() * out.shape[1]).clamp_min(1)
        else:
            loss = process.loss(model, batch["x0"], batch["mask"], conditions, gen, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        window.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window[-50:]):.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.iterations:
            history.append({"step": step, "loss": float(np.mean(window)) if window else None, "lr": _lr(config, step),
                            "seconds": round(time.time() - t0, 1)})
            window = []
            save_checkpoint(last_path, model_state=model.state_dict(), config=config.to_dict(), meta=meta,
                            optimizer_state=opt.state_dict(), step=step, history=history,
                            ema_state=ema.state_dict() if ema is not None else {})
            if log is not None:
                log(history[-1])
    if bar is not None:
        bar.close()
    final = ema.module if ema is not None else model
    save_checkpoint(run_dir / CHECKPOINT_FILE, model_state=final.state_dict(), config=config.to_dict(), meta=meta)
    (run_dir / METRICS_FILE).write_text(json.dumps({"history": history}, indent=1))
    return TrainedSuperRes(final.eval(), config, meta, device, run_dir=run_dir)
