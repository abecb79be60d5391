"""A trained super-resolution model: sampling, predictive summaries and interval calibration."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxelome.constants import CHECKPOINT_FILE
from voxelome.errors import VoxelomeError
from voxelome.io.atomic import atomic_write_json
from voxelome.models.diffusion.calibration import fit_intervals, predictive_interval, sample_interval
from voxelome.models.diffusion.normalise import ExpressionScaling, block_consistency, pair_tensors, to_expression
from voxelome.train.checkpoint import load_checkpoint
from voxelome.train.superres_config import SuperResConfig, superres_config_from_dict
from voxelome.train.superres_trainer import build_superres_model, process_of, resolve_device

CALIBRATION_FILE = "calibration.json"


@dataclass
class SuperResPrediction:
    """Predictive summaries of one map; every array is ``(G, H, W)`` on the targets' scale.

    ``lower``/``upper`` bound the central ``level`` interval: calibrated ``mean ∓ q_g · √(std² + τ_g²)`` when the
    model was calibrated (:func:`voxelome.models.diffusion.calibration.fit_intervals`), otherwise the sample
    quantiles (``calibrated`` says which).
    """

    mean: np.ndarray
    std: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    level: float
    calibrated: bool
    samples: np.ndarray | None = None  #: (S, G, H, W) when asked for


class TrainedSuperRes:
    """A trained denoiser (EMA weights) with its genes, scaling and process."""

    def __init__(self, model, config: SuperResConfig, meta: dict, device="cpu", run_dir=None):
        self.model, self.config, self.meta = model.eval(), config, dict(meta)
        self.device = torch.device(device)
        self.genes = list(meta["genes"])
        self.factor = int(meta["factor"])
        self.scaling = ExpressionScaling.from_dict(meta["scaling"])
        self.process = process_of(config)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.multipliers: np.ndarray | None = None  #: per-gene q_g of the calibrated intervals
        self.tau: np.ndarray | None = None  #: per-gene τ_g of the calibrated intervals
        if self.run_dir is not None and (self.run_dir / CALIBRATION_FILE).exists():
            cal = json.loads((self.run_dir / CALIBRATION_FILE).read_text())
            if float(cal["level"]) == float(config.interval):
                self.multipliers = np.asarray(cal["multipliers"], np.float32)
                # files from before τ existed hold plain ``mean ± q·std`` intervals (τ = 0)
                self.tau = np.asarray(cal.get("tau", np.zeros_like(self.multipliers)), np.float32)

    @classmethod
    def load(cls, run_dir, device: str | None = None) -> "TrainedSuperRes":
        """Rebuild from a run folder (``checkpoint.pt``, loaded with ``weights_only=True``)."""
        run_dir = Path(run_dir)
        ck = load_checkpoint(run_dir / CHECKPOINT_FILE if run_dir.is_dir() else run_dir)
        meta = ck.get("meta", {})
        if meta.get("kind") != "superres":
            raise VoxelomeError(f"{run_dir} is not a super-resolution run (train one with `voxelome superres fit`).")
        config = superres_config_from_dict(ck["config"])
        model = build_superres_model(config, len(meta["genes"]), int(meta["n_image_features"]),
                                     np.asarray(meta["adjacency"], np.float32))
        model.load_state_dict(ck["model_state"])
        dev = resolve_device(device or config.device)
        return cls(model.to(dev), config, meta, dev, run_dir=run_dir if run_dir.is_dir() else run_dir.parent)

    def _check(self, pair) -> None:
        if hasattr(pair, "validate"):
            pair.validate()
        if list(pair.genes) != self.genes:
            raise VoxelomeError(f"pair {pair.name!r} has other genes than the model ({len(self.genes)} genes, first "
                                f"{self.genes[:3]}); build the pair with the model's genes.")
        if int(pair.factor) != self.factor:
            raise VoxelomeError(f"pair {pair.name!r} has factor={pair.factor}; the model was trained for "
                                f"factor={self.factor}.")
        n_feat = int(self.meta["n_image_features"])
        got = 0 if pair.image is None else pair.image.shape[0]
        if got != n_feat:
            raise VoxelomeError(f"pair {pair.name!r} has {got} histology feature channels; the model needs {n_feat}"
                                " (build the features exactly as for training).")

    @torch.no_grad()
    def sample(self, pair, n_samples: int | None = None, *, steps: int | None = None, seed: int = 0,
               eta: float | None = None, consistency: bool | None = None) -> np.ndarray:
        """Draw samples of the high-res map: ``(S, G, H, W)`` on the targets' scale.

        The deterministic baseline returns its single prediction (S = 1) whatever ``n_samples`` is.
        """
        self._check(pair)
        cfg = self.config
        n = int(n_samples or cfg.n_samples)
        arrays = pair_tensors(pair, self.scaling)
        cond = {k: torch.from_numpy(arrays[k])[None].to(self.device) for k in ("low_up", "low_mask")}
        cond["image"] = torch.from_numpy(arrays["image"])[None].to(self.device) if "image" in arrays else None
        if cfg.deterministic:
            residual = self.model(None, None, **cond).cpu().numpy()
        else:
            cond = {k: (v.expand(n, *v.shape[1:]) if v is not None else None) for k, v in cond.items()}
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
            shape = (n, len(self.genes), *pair.high_mask.shape)
            residual = self.process.sample(self.model, shape, cond, steps=int(steps or cfg.sample_steps),
                                           generator=gen, eta=cfg.eta if eta is None else float(eta)).cpu().numpy()
        out = to_expression(residual, arrays["base"][None], self.scaling)
        if cfg.consistency if consistency is None else consistency:
            out = block_consistency(out, pair.low, pair.low_mask, pair.high_mask, self.factor)
        return out.astype(np.float32)

    def summarise(self, samples: np.ndarray, keep_samples: bool = False) -> SuperResPrediction:
        """Mean, spread and central intervals of ``(S, G, H, W)`` samples."""
        level = float(self.config.interval)
        mean = samples.mean(0)
        std = samples.std(0, ddof=1) if len(samples) > 1 else np.zeros_like(mean)
        if self.multipliers is not None:
            lower, upper = predictive_interval(mean, std, self.tau, self.multipliers)
        else:
            lower, upper = sample_interval(samples, level)
        return SuperResPrediction(mean.astype(np.float32), std.astype(np.float32), lower, upper, level,
                                  self.multipliers is not None, samples if keep_samples else None)

    def predict(self, pair, n_samples: int | None = None, *, steps: int | None = None, seed: int = 0,
                keep_samples: bool = False) -> SuperResPrediction:
        """Sample and summarise one pair."""
        return self.summarise(self.sample(pair, n_samples, steps=steps, seed=seed), keep_samples)

    def calibrate(self, pairs, *, seed: int = 0, target: str = "high") -> np.ndarray:
        """Fit the per-gene interval parameters on held-out pairs (split conformal) and store them.

        Parameters
        ----------
        pairs : list of SuperResPair
            Calibration pairs, not used for training and not the pairs you will score coverage on.
        seed : int
            Sampling seed.
        target : str
            ``high`` (the measured high-res map) or ``truth`` (noiseless truth, where the pairs have it).

        Returns
        -------
        array, shape (G,)
            The multipliers ``q_g`` (they and ``τ_g`` are also written to ``calibration.json`` in the run folder).
        """
        if self.config.deterministic:
            raise VoxelomeError("the deterministic baseline has no spread to calibrate; calibrate a diffusion run.")
        means, stds, truths, masks = [], [], [], []
        for p in pairs:
            s = self.sample(p, seed=seed)
            means.append(s.mean(0))
            stds.append(s.std(0, ddof=1))
            t = p.truth if target == "truth" else p.high
            if t is None:
                raise VoxelomeError(f"pair {p.name!r} has no truth; use target='high'.")
            truths.append(t)
            masks.append(p.high_mask)
        fitted = fit_intervals(means, stds, truths, masks, self.config.interval, seed=seed)
        self.multipliers, self.tau = fitted["multipliers"], fitted["tau"]
        if self.run_dir is not None:
            atomic_write_json(self.run_dir / CALIBRATION_FILE,
                              {"level": self.config.interval, "multipliers": self.multipliers.tolist(),
                               "tau": self.tau.tolist(),
                               "pairs": [str(p.name) for p in pairs], "target": target, "seed": int(seed)})
        return self.multipliers
