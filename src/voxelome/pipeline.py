"""The X-Pression workflow end to end, as one API call per stage and one for the lot.

volume + one section + its placement → niche signatures → trained model → whole-volume
OME-Zarr prediction → held-out metrics, figures and a single-file HTML report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxelome.constants import (HELD_OUT_KEY, METRICS_FILE, PREDICTED_SIGNATURES_KEY, REPORT_FILE,
                                SIGNATURES_FILE, SIGNATURES_KEY, SPATIAL_KEY)
from voxelome.errors import VoxelomeError
from voxelome.evaluate.metrics import kl_divergence_rows, pearson_per_column, summarise
from voxelome.infer.predict import TrainedModel, predict_volume
from voxelome.io.atomic import atomic_write_h5ad, atomic_write_json
from voxelome.io.omezarr import read_ome_zarr
from voxelome.io.volume import Volume
from voxelome.register.placement import SectionPlacement
from voxelome.register.section import place_section
from voxelome.signatures import SignatureConfig, fit_signatures, project_signatures
from voxelome.train.config import TrainConfig
from voxelome.train.spots import SpotTargets, targets_from_section
from voxelome.train.trainer import train_model


@dataclass
class PipelineResult:
    """Where everything went, and the headline numbers."""

    out_dir: Path
    run_dir: Path
    prediction: Path | None
    section: object
    targets: SpotTargets
    model: TrainedModel
    metrics: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)


def spot_metrics(pred: np.ndarray, true: np.ndarray, names) -> dict:
    """Pearson r per signature and mean KL between measured and predicted spot proportions."""
    out = summarise(dict(zip(names, pearson_per_column(pred, true).tolist())), names)
    out["kl_mean"] = float(np.mean(kl_divergence_rows(true, pred)))
    out["n_spots"] = int(len(pred))
    return out


def predict_section_spots(model: TrainedModel, volume: Volume, section) -> np.ndarray:
    """Predicted proportions ``(n_spots, k)`` for every spot of a placed section (any plane)."""
    tmp = section.copy()
    # Targets are only needed for their geometry here; the proportions are placeholders.
    tmp.obsm[SIGNATURES_KEY] = np.full((tmp.n_obs, len(model.names)), 1.0 / len(model.names), np.float32)
    tmp.obs[HELD_OUT_KEY] = False
    targets = targets_from_section(tmp, volume, val_fraction=0.2, block_um=1e9, seed=0)
    predictor = model.spot_predictor()
    return predictor.predict(predictor.sampler(volume, targets), np.arange(tmp.n_obs))


def run_pipeline(volume: Volume, section, placement: SectionPlacement, out_dir, *, train_config: TrainConfig,
                 signature_config: SignatureConfig | None = None, signatures_key: str | None = None,
                 predict: bool = True, chunks=None, resume: bool = True, progress: bool = True) -> PipelineResult:
    """Run X-Pression on one section and one volume.

    Parameters
    ----------
    volume : Volume
        The scan.
    section : AnnData
        One ST section (counts, ``obsm['spatial']`` in pixels, ``uns['voxelome']['pixel_size_um']``).
    placement : SectionPlacement
        Where the section lies in the volume.
    out_dir : path
        Output folder: ``section.h5ad``, ``signatures.npz``, ``run/``, ``prediction.ome.zarr``,
        ``metrics.json``.
    train_config : TrainConfig
        Model preset and settings.
    signature_config : SignatureConfig, optional
        How to derive signatures from the counts (archetypes by default).
    signatures_key : str, optional
        Use proportions already in ``section.obsm[signatures_key]`` instead of fitting signatures.
    predict : bool
        Also predict the whole volume.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    section = place_section(section.copy(), placement, volume)
    if signatures_key is not None:
        section.obsm[SIGNATURES_KEY] = np.asarray(section.obsm[signatures_key], dtype=np.float32)
        k = section.obsm[SIGNATURES_KEY].shape[1]
        names = dict(section.uns.get(SIGNATURES_KEY, {})).get("names")
        if names is None or len(names) != k:
            names = section.uns.get("voxelome", {}).get("signature_names")
        if names is None or len(names) != k:
            names = [f"S{i}" for i in range(k)]
        section.uns[SIGNATURES_KEY] = {"names": list(names), "method": f"given ({signatures_key})"}
    else:
        sig_model = fit_signatures(section, signature_config or SignatureConfig())
        sig_model.save(out_dir / SIGNATURES_FILE)
        project_signatures(sig_model, section)

    targets = targets_from_section(section, volume, val_fraction=train_config.val_fraction,
                                   block_um=train_config.split_block_um, seed=train_config.seed)
    section.obs[HELD_OUT_KEY] = ~targets.train_mask
    run_dir = train_model(volume, targets, train_config, out_dir / "run", resume=resume, progress=progress)
    model = TrainedModel.load(run_dir)

    predictor = model.spot_predictor()
    all_spots = np.arange(len(targets.proportions))
    spot_pred = predictor.predict(predictor.sampler(volume, targets), all_spots)
    section.obsm[PREDICTED_SIGNATURES_KEY] = spot_pred
    held = ~targets.train_mask
    metrics = {
        "model": train_config.model,
        "held_out_spots": spot_metrics(spot_pred[held], targets.proportions[held], targets.names),
        "training_spots": spot_metrics(spot_pred[~held], targets.proportions[~held], targets.names),
    }
    history = json.loads((run_dir / "history.json").read_text())
    metrics["epochs_trained"] = len(history)
    prediction = None
    if predict:
        prediction = out_dir / "prediction.ome.zarr"
        metrics["prediction"] = predict_volume(model, volume, prediction, chunks=chunks, progress=progress)
    atomic_write_h5ad(section, out_dir / "section.h5ad")
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    return PipelineResult(out_dir, run_dir, prediction, section, targets, model, metrics)


def load_prediction_for_figure(path, max_voxels: int = 16_000_000):
    """The finest pyramid level of a prediction small enough to plot: (array, spacing, origin, names)."""
    level = 0
    while True:
        try:
            arr, spacing, names = read_ome_zarr(path, level=level)
        except VoxelomeError:  # no such level: use the last one that opened
            arr, spacing, names = read_ome_zarr(path, level=max(level - 1, 0))
            break
        if np.prod(arr.shape[1:]) <= max_voxels:
            break
        level += 1
    return np.asarray(arr), spacing, names


def write_figures(result: PipelineResult, volume: Volume, fig_dir) -> list[tuple[str, Path]]:
    """Section overlay, training curves and orthogonal views of the prediction over the scan."""
    from voxelome.plot.figures import orthogonal_views, section_overlay, training_curves

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    sec, t = result.section, result.targets
    figs = [("Measured (top) vs predicted (bottom) signatures on the section; outlined spots were held out.",
             section_overlay(sec.obsm[SPATIAL_KEY], t.proportions, sec.obsm[PREDICTED_SIGNATURES_KEY], t.names,
                             fig_dir / "section_overlay.png", held_out=~t.train_mask,
                             pixel_size_um=sec.uns["voxelome"].get("pixel_size_um")))]
    history = json.loads((result.run_dir / "history.json").read_text())
    figs.append(("Training and validation loss (KL divergence) per epoch.",
                 training_curves(history, fig_dir / "training_curves.png")))
    if result.prediction is not None:
        pred, spacing, names = load_prediction_for_figure(result.prediction)
        step = np.maximum(np.round(np.asarray(spacing) / np.asarray(volume.spacing_um)).astype(int), 1)
        ct = np.asarray(volume.data[::step[0], ::step[1], ::step[2]]) if np.prod(volume.shape) > 64e6 else np.asarray(volume.data)
        ct_spacing = tuple(np.asarray(volume.spacing_um) * (step if np.prod(volume.shape) > 64e6 else 1))
        _, _, origin = result.model.output_geometry(volume)
        figs.append(("Predicted signatures over the scan: axial, coronal and sagittal slices through the centre.",
                     orthogonal_views(ct, pred, names, ct_spacing, fig_dir / "orthogonal_views.png",
                                      pred_spacing_um_zyx=spacing, origin_um_zyx=volume.origin_um,
                                      pred_origin_um_zyx=origin)))
    return figs


def write_report(result: PipelineResult, volume: Volume, *, title: str, summary: str, extra_metrics=None,
                 extra_figures=(), tables=None, notes=None) -> Path:
    """Figures + metrics + config into ``out_dir/report.html`` (one self-contained file)."""
    from voxelome.plot.report import write_html_report

    figs = write_figures(result, volume, result.out_dir / "figures") + list(extra_figures)
    metrics = {**result.metrics, **(extra_metrics or {})}
    return write_html_report(result.out_dir / REPORT_FILE, title=title, summary=summary, metrics=metrics,
                             figures=figs, config=result.model.config.to_dict(), tables=tables, notes=notes)
