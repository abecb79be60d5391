"""A trained super-resolution model: sampling, predictive summaries and interval calibration."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from voxelome.constants import CHECKPOINT_FILE
from voxelome.errors import VoxelomeError
from voxelome.io.atomic import atomic_write_json
from voxelome.models.diffusion.calibration import fit_intervals, predictive_interval, sample_interval
from voxelome.models.diffusion.normalise import ExpressionScaling, block_consistency, pair_tensors, to_expression
from voxelome.train.checkpoint import load_checkpoint
from voxelome.train.superres_config import SuperResConfig, superres_config_from_dict
from voxelome.train.superres_trainer import build_superres_model, process_of, resolve_device

CALIBRATION_FILE = "calibration.json"
SAMPLER_FILE = "sampler.json"
STEP_METRICS = ("ssim+pearson", "ssim", "pearson", "rmse")


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


def _target_map(pair, target: str) -> np.ndarray:
    """The map a pair is scored against: ``high`` (measured) or ``truth`` (noiseless, where known)."""
    t = pair.truth if target == "truth" else pair.high
    if t is None:
        raise VoxelomeError(f"pair {pair.name!r} has no truth; use target='high'.")
    return t


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
        #: (steps, samples) the intervals were calibrated for; other samplers give uncalibrated intervals
        self.calibrated_sampler: tuple[int, int] | None = None
        #: DDIM steps and samples per map when a call passes none: the config's, or :meth:`select_steps`' choice
        self.sample_steps, self.n_samples = int(config.sample_steps), int(config.n_samples)
        if self.run_dir is not None and (self.run_dir / SAMPLER_FILE).exists():
            chosen = json.loads((self.run_dir / SAMPLER_FILE).read_text())
            self.sample_steps, self.n_samples = int(chosen["steps"]), int(chosen["n_samples"])
        if self.run_dir is not None and (self.run_dir / CALIBRATION_FILE).exists():
            cal = json.loads((self.run_dir / CALIBRATION_FILE).read_text())
            # intervals fitted with another sampler do not hold for this one (files without "steps" predate it)
            sampler = (int(cal.get("steps", self.sample_steps)), int(cal.get("n_samples", self.n_samples)))
            if float(cal["level"]) == float(config.interval) and sampler == (self.sample_steps, self.n_samples):
                self.multipliers = np.asarray(cal["multipliers"], np.float32)
                # files from before τ existed hold plain ``mean ± q·std`` intervals (τ = 0)
                self.tau = np.asarray(cal.get("tau", np.zeros_like(self.multipliers)), np.float32)
                self.calibrated_sampler = sampler

    @classmethod
    def load(cls, run_dir, device: str | None = None) -> TrainedSuperRes:
        """Rebuild from a run folder (``checkpoint.pt``, loaded with ``weights_only=True``)."""
        run_dir = Path(run_dir)
        if run_dir.is_dir() and not (run_dir / CHECKPOINT_FILE).exists() or not run_dir.exists():
            what = "has no checkpoint.pt (an unfinished fit? rerun it to resume)" if run_dir.exists() else "does not exist"
            raise VoxelomeError(f"super-resolution run '{run_dir}' {what}; train one with `voxelome superres fit "
                                "--section S.h5ad --image HE.jpg --out RUN`.")
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
        n = int(n_samples or self.n_samples)
        arrays = pair_tensors(pair, self.scaling)
        cond = {k: torch.from_numpy(arrays[k])[None].to(self.device) for k in ("low_up", "low_mask")}
        cond["image"] = torch.from_numpy(arrays["image"])[None].to(self.device) if "image" in arrays else None
        if cfg.deterministic:
            residual = self.model(None, None, **cond).cpu().numpy()
        else:
            cond = {k: (v.expand(n, *v.shape[1:]) if v is not None else None) for k, v in cond.items()}
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
            shape = (n, len(self.genes), *pair.high_mask.shape)
            residual = self.process.sample(self.model, shape, cond, steps=int(steps or self.sample_steps),
                                           generator=gen, eta=cfg.eta if eta is None else float(eta)).cpu().numpy()
        out = to_expression(residual, arrays["base"][None], self.scaling)
        if cfg.consistency if consistency is None else consistency:
            out = block_consistency(out, pair.low, pair.low_mask, pair.high_mask, self.factor)
        return out.astype(np.float32)

    def summarise(self, samples: np.ndarray, keep_samples: bool = False, *,
                  calibrated: bool = True) -> SuperResPrediction:
        """Mean, spread and central intervals of ``(S, G, H, W)`` samples (``calibrated=False``: sample quantiles
        even when the run is calibrated, e.g. for samples drawn with another sampler than the calibrated one)."""
        level = float(self.config.interval)
        mean = samples.mean(0)
        std = samples.std(0, ddof=1) if len(samples) > 1 else np.zeros_like(mean)
        if self.multipliers is not None and calibrated:
            lower, upper = predictive_interval(mean, std, self.tau, self.multipliers)
        else:
            lower, upper = sample_interval(samples, level)
        return SuperResPrediction(mean.astype(np.float32), std.astype(np.float32), lower, upper, level,
                                  self.multipliers is not None and calibrated, samples if keep_samples else None)

    def predict(self, pair, n_samples: int | None = None, *, steps: int | None = None, seed: int = 0,
                keep_samples: bool = False) -> SuperResPrediction:
        """Sample and summarise one pair.

        Calibrated intervals hold for the sampler they were fitted with (DDIM steps and samples per map);
        with other ``steps``/``n_samples`` the intervals are the samples' quantiles and
        ``prediction.calibrated`` is False (a warning says so).
        """
        sampler = (int(steps or self.sample_steps), int(n_samples or self.n_samples))
        ok = self.multipliers is None or self.config.deterministic or sampler == self.calibrated_sampler
        if not ok:
            import warnings

            warnings.warn(f"intervals were calibrated for {self.calibrated_sampler[0]} steps × "
                          f"{self.calibrated_sampler[1]} samples, not {sampler[0]} × {sampler[1]}: reporting the "
                          "samples' quantiles (uncalibrated). Leave steps/samples at the run's defaults for "
                          "calibrated intervals.", stacklevel=2)
        return self.summarise(self.sample(pair, n_samples, steps=steps, seed=seed), keep_samples, calibrated=ok)

    def calibrate(self, pairs, *, seed: int = 0, target: str = "high", progress: bool = False) -> np.ndarray:
        """Fit the per-gene interval parameters on held-out pairs (split conformal) and store them.

        Parameters
        ----------
        pairs : list of SuperResPair
            Calibration pairs, not used for training and not the pairs you will score coverage on.
        seed : int
            Sampling seed.
        target : str
            ``high`` (the measured high-res map) or ``truth`` (noiseless truth, where the pairs have it).
        progress : bool
            Show a progress bar over the pairs.

        Returns
        -------
        array, shape (G,)
            The multipliers ``q_g`` (they and ``τ_g`` are also written to ``calibration.json`` in the run folder).
        """
        if self.config.deterministic:
            raise VoxelomeError("the deterministic baseline has no spread to calibrate; calibrate a diffusion run.")
        means, stds, truths, masks = [], [], [], []
        for p in tqdm(pairs, desc="calibrate", unit="section", disable=not progress):
            s = self.sample(p, seed=seed)
            means.append(s.mean(0))
            stds.append(s.std(0, ddof=1))
            truths.append(_target_map(p, target))
            masks.append(p.high_mask)
        fitted = fit_intervals(means, stds, truths, masks, self.config.interval, seed=seed)
        self.multipliers, self.tau = fitted["multipliers"], fitted["tau"]
        self.calibrated_sampler = (self.sample_steps, self.n_samples)
        if self.run_dir is not None:
            atomic_write_json(self.run_dir / CALIBRATION_FILE,
                              {"level": self.config.interval, "multipliers": self.multipliers.tolist(),
                               "tau": self.tau.tolist(), "steps": self.sample_steps,
                               "n_samples": self.n_samples, "pairs": [str(p.name) for p in pairs],
                               "target": target, "seed": int(seed)})
        return self.multipliers

    def select_steps(self, pairs, steps=(2, 5, 10, 20), *, n_samples: int | None = None,
                     metric: str = "ssim+pearson", seed: int = 0, target: str = "high",
                     progress: bool = False) -> dict:
        """Choose the number of DDIM sampling steps on held-out pairs and make it this run's default.

        Few steps (2–5) often give a better sample mean than the 20 of the paper, because each step
        re-uses the network's estimate of the clean map and late steps only add detail the mean averages
        away; how many is best depends on the data, so it is measured here rather than assumed. Each
        candidate draws the run's ``n_samples`` samples per pair and scores their mean.

        Parameters
        ----------
        pairs : list of SuperResPair
            Held-out pairs (not used for training, not the pairs you will report scores on). The
            calibration pairs are a natural choice: call :meth:`calibrate` *after* this method, since
            intervals depend on the sampler (a calibration fitted for other steps is dropped).
        steps : sequence of int
            Candidate step counts, each in ``[1, num_train_timesteps]``.
        n_samples : int, optional
            Samples per map for the comparison and, from now on, for every call that passes none (default:
            the current ``n_samples``). More samples always give a steadier mean; this is the compute budget.
        metric : str
            ``ssim+pearson`` (sum of the mean per-gene SSIM and Pearson r), ``ssim``, ``pearson`` or
            ``rmse`` (lower is better); masked, as in :func:`voxelome.evaluate.superres_metrics.superres_scores`.
        seed : int
            Sampling seed (the same noise for every candidate).
        target : str
            ``high`` (the measured high-res map) or ``truth`` (noiseless truth, where the pairs have it).
        progress : bool
            Show a progress bar over candidates × pairs.

        Returns
        -------
        dict
            ``steps`` (the choice) and ``scores`` (per candidate: mean ``rmse``/``ssim``/``pearson`` over
            the pairs and the ``score`` compared); also written to ``sampler.json`` in the run folder.
        """
        from voxelome.errors import check_choice
        from voxelome.evaluate.superres_metrics import mean_scores, superres_scores

        if self.config.deterministic:
            raise VoxelomeError("the deterministic baseline has no sampler; select steps for a diffusion run.")
        check_choice("metric", metric, STEP_METRICS)
        candidates = sorted({int(k) for k in steps})
        bad = [k for k in candidates if not 1 <= k <= self.config.num_train_timesteps]
        if not candidates or bad:
            raise VoxelomeError(f"steps={list(steps)!r}: every candidate must lie in [1, "
                                f"{self.config.num_train_timesteps}] (e.g. steps=(2, 5, 10, 20)).")
        if not pairs:
            raise VoxelomeError("select_steps needs at least one held-out pair (e.g. the calibration pairs).")
        n = self.n_samples if n_samples is None else int(n_samples)
        if n < 2:
            raise VoxelomeError(f"n_samples={n_samples!r} must be ≥ 2 (a mean and a spread need several samples).")
        table = {}
        bar = tqdm(total=len(candidates) * len(pairs), desc="select steps", unit="map", disable=not progress)
        for k in candidates:
            rows = []
            for i, p in enumerate(pairs):
                bar.set_postfix(steps=k)
                truth = _target_map(p, target)
                sc = superres_scores(self.sample(p, n, steps=k, seed=seed + i).mean(0), truth, p.high_mask)
                sc.pop("per_gene", None)
                rows.append(sc)
                bar.update(1)
            m = mean_scores(rows)
            score = {"ssim+pearson": m["ssim"] + m["pearson"], "ssim": m["ssim"], "pearson": m["pearson"],
                     "rmse": -m["rmse"]}[metric]
            table[k] = {"rmse": m["rmse"], "ssim": m["ssim"], "pearson": m["pearson"], "score": float(score)}
        bar.close()
        best = max(candidates, key=lambda k: (table[k]["score"], -k))  # ties → fewer steps (cheaper)
        if (best, n) != (self.sample_steps, self.n_samples) and self.multipliers is not None:
            self.multipliers, self.tau = None, None  # fitted for the old sampler; recalibrate
            self.calibrated_sampler = None
        self.sample_steps, self.n_samples = best, n
        result = {"steps": best, "metric": metric, "n_samples": n, "target": target,
                  "seed": int(seed), "pairs": [str(p.name) for p in pairs],
                  "scores": {str(k): v for k, v in table.items()}}
        if self.run_dir is not None:
            atomic_write_json(self.run_dir / SAMPLER_FILE, result)
        return result

