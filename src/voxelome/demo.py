"""``voxelome demo``: the whole X-Pression pipeline on the synthetic lung phantom, scored on its truth.

1. generate the phantom (micro-CT-like volume + 3D ground-truth niche proportions);
2. cut a simulated Visium section at a known plane;
3. derive niche signatures from the section's counts (archetypes, as chrysalis);
4. train the image → signature model (``dense`` preset by default) on the section's spots;
5. predict the whole volume into OME-Zarr;
6. score held-out voxels (≥ 200 µm from the section) against the truth, beside the trivial
   baseline (smoothed intensity + ridge on the same spots), and a second section cut at
   another, oblique plane; write figures, ``metrics.json`` and ``report.html``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from voxelome.constants import SPATIAL_3D_KEY
from voxelome.datasets import axial_placement, make_lung_phantom, oblique_placement
from voxelome.evaluate.baseline import RidgeBaseline
from voxelome.evaluate.metrics import pearson_per_column, summarise
from voxelome.evaluate.phantom import block_mean, match_signatures, score_volume
from voxelome.io.atomic import atomic_write_json
from voxelome.io.omezarr import read_ome_zarr
from voxelome.pipeline import predict_section_spots, run_pipeline, spot_metrics, write_report
from voxelome.register.placement import SectionPlacement
from voxelome.signatures import SignatureConfig, SignatureModel
from voxelome.train.config import make_config

QUICK_TRAIN = dict(epochs=4, steps_per_epoch=4, batch_size=4, patience=4, window_um=(320.0, 640.0, 640.0))
#: The demo's training budget: a few minutes on 2 CPU cores. The benchmark trains longer (BENCHMARKS.md).
DEMO_EPOCHS = 12


def second_placement(phantom, seed: int, depth_offset_um: float = -250.0) -> SectionPlacement:
    """An oblique plane 250 µm below the centre: the out-of-sample section."""
    p = oblique_placement(phantom, tilt_deg=8.0, seed=seed + 1)
    m = p.matrix.copy()
    m[2, 2] += depth_offset_um
    return SectionPlacement(m)


def matched_spot_r(pred: np.ndarray, truth: np.ndarray, order: np.ndarray, names) -> dict:
    return summarise(dict(zip(names, pearson_per_column(pred[:, order], truth).tolist())), names)


def run_demo(out, *, preset: str = "dense", seed: int = 0, quick: bool = False, oblique: bool = False,
             epochs: int | None = None, progress: bool = True) -> Path:
    """Run the demo; returns the report path.

    Parameters
    ----------
    out : path
        Output folder.
    preset : str
        ``dense`` or ``xpression``.
    epochs : int, optional
        Training epochs (default :data:`DEMO_EPOCHS`; early stopping may end sooner).
    quick : bool
        Small phantom and a few training steps (smoke tests; metrics are not meaningful).
    oblique : bool
        Train on an oblique section instead of the axial mid-plane.
    """
    t_start = time.perf_counter()
    out = Path(out)
    phantom = make_lung_phantom("small" if quick else "default", seed=seed)
    placement = oblique_placement(phantom, seed=seed) if oblique else axial_placement(phantom)
    section = phantom.cut_section(placement, seed=seed)
    budget = QUICK_TRAIN if quick else {"epochs": DEMO_EPOCHS}
    if epochs is not None:
        budget = {**budget, "epochs": epochs}
    train_cfg = make_config(preset, seed=seed, **budget)
    sig_cfg = SignatureConfig(n_signatures=phantom.config.n_signatures, seed=seed)
    result = run_pipeline(phantom.volume, section, placement, out, train_config=train_cfg, signature_config=sig_cfg,
                          progress=progress)

    # --- ground truth: held-out voxels of the whole volume -------------------------------------
    model, names_true = result.model, list(phantom.signature_names)
    step = model.output_step()
    _, out_spacing, out_origin = model.output_geometry(phantom.volume)
    truth_grid = block_mean(phantom.truth, step)
    tissue_grid = block_mean(phantom.tissue[None].astype(np.float32), step)[0] > 0.5
    pred = np.asarray(read_ome_zarr(result.prediction)[0])
    _, _, normal = placement.frame
    geo = dict(spacing_um_zyx=out_spacing, origin_um_zyx=out_origin, plane_point_xyz=placement.matrix[:, 2],
               plane_normal_xyz=normal, names=names_true, match=True)
    volume_model = score_volume(pred, truth_grid, tissue_grid, **geo)
    baseline = RidgeBaseline.fit(phantom.volume, result.targets)
    volume_baseline = score_volume(baseline.predict_grid(step), truth_grid, tissue_grid, **geo)

    # --- a second section at another plane, never seen in training ------------------------------
    sig_model = SignatureModel.load(out / "signatures.npz")
    other = phantom.cut_section(second_placement(phantom, seed), seed=seed + 1)
    other_measured = sig_model.project(other)
    other_pred = predict_section_spots(model, phantom.volume, other)
    other_base = baseline.predict_spots(np.asarray(other.obsm[SPATIAL_3D_KEY]))
    order = np.asarray(volume_model["matched_order"])
    second = {
        "n_spots": int(other.n_obs),
        "model_vs_measured": spot_metrics(other_pred, other_measured, model.names),
        "baseline_vs_measured": spot_metrics(other_base, other_measured, model.names),
        "model_vs_truth": matched_spot_r(other_pred, other.obsm["signatures_true"], order, names_true),
    }
    phantom_metrics = {
        "volume_held_out_r": {"model": volume_model, "ridge_baseline": volume_baseline},
        "second_section": second,
        "signature_recovery_r": matched_spot_r(result.section.obsm["signatures"], section.obsm["signatures_true"],
                                               match_signatures(result.section.obsm["signatures"].T,
                                                                section.obsm["signatures_true"].T,
                                                                np.ones(section.n_obs, bool)), names_true),
        "seconds_total": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "metrics_phantom.json", phantom_metrics)
    headline = (f"Held-out voxels (≥ 200 µm from the section): mean r = {volume_model['mean']:.3f} "
                f"({preset}) vs {volume_baseline['mean']:.3f} (smoothed intensity + ridge). "
                f"Second, oblique section: spot r = {second['model_vs_measured']['mean']:.3f} "
                f"vs {second['baseline_vs_measured']['mean']:.3f}.")
    rows = [{"signature (truth)": n, "matched": model.names[order[i]],
             "model r": volume_model["per_channel"][n], "baseline r": volume_baseline["per_channel"][n]}
            for i, n in enumerate(names_true)]
    return write_report(
        result, phantom.volume, title=f"voxelome demo — lung phantom, {preset} model",
        summary=("One simulated Visium section of a synthetic micro-CT lung, niche signatures by archetypal analysis, "
                 f"an image → signature network, and the whole volume predicted.\n\n{headline}"),
        extra_metrics={"phantom": phantom_metrics},
        tables={"Held-out voxel Pearson r per signature": rows},
        notes=[f"Phantom seed {seed}, shape {phantom.volume.shape}, {phantom.config.spacing_um} µm voxels; "
               f"section of {section.n_obs} spots.",
               "Learned signatures are matched to the true ones by the Hungarian assignment on held-out voxel r.",
               "Prediction: prediction.ome.zarr (open in napari with napari-ome-zarr); section with predictions: "
               "section.h5ad (scanpy: obsm['signatures'], obsm['signatures_pred'])."] +
              (["QUICK mode: tiny phantom and a few training steps; numbers are not meaningful."] if quick else []))
