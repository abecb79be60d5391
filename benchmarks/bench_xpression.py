"""Benchmark: dense vs X-Pression vs the trivial baseline on the lung phantom, one run, one machine.

Measures (recorded in BENCHMARKS.md):
- held-out accuracy: spot-level r on held-out spots of the training section; voxel-level r on
  tissue ≥ 200 µm from the section (dense: whole volume; xpression: a random sample of output
  cells, because one patch per cell over the whole volume takes hours on a CPU); spot-level r on a
  second, oblique section 250 µm away;
- whole-volume prediction time per output voxel, dense vs xpression (xpression timed on a block);
- all beside "smoothed intensity + ridge" trained on the same spots.

    python benchmarks/bench_xpression.py --out benchmarks/out/xpression [--epochs-dense 60] [--epochs-xpression 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from voxelome.datasets import axial_placement, make_lung_phantom
from voxelome.demo import second_placement
from voxelome.evaluate.baseline import RidgeBaseline
from voxelome.evaluate.metrics import pearson_per_channel, summarise
from voxelome.evaluate.phantom import block_mean, score_volume
from voxelome.infer.predict import TrainedModel, predict_volume
from voxelome.io.omezarr import read_ome_zarr
from voxelome.pipeline import predict_section_spots, spot_metrics
from voxelome.register import place_section
from voxelome.train.config import make_config
from voxelome.train.spots import targets_from_section
from voxelome.train.trainer import train_model


def held_out_cells(model, phantom, placement, n, seed):
    """A random sample of output cells on tissue ≥ 200 µm from the section."""
    from voxelome.evaluate.metrics import distance_to_plane_mask

    shape, spacing, origin = model.output_geometry(phantom.volume)
    step = model.output_step()
    tissue = block_mean(phantom.tissue[None].astype(np.float32), step)[0] > 0.5
    _, _, normal = placement.frame
    held = distance_to_plane_mask(shape, spacing, origin, placement.matrix[:, 2], normal, 200.0) & tissue
    idx = np.flatnonzero(held.ravel())
    pick = np.sort(np.random.default_rng(seed).choice(idx, size=min(n, len(idx)), replace=False))
    return np.stack(np.unravel_index(pick, shape), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/xpression"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs-dense", type=int, default=60)
    ap.add_argument("--epochs-xpression", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--xpression-cells", type=int, default=3000, help="held-out output cells scored for xpression")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="take the trained models from OUT/run_* (finished training is resumed, i.e. loaded) and "
                         "their training times from OUT/results.json; re-measures everything else")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((args.out / "results.json").read_text()) if args.reuse_runs else {}
    if args.threads:
        torch.set_num_threads(args.threads)

    phantom = make_lung_phantom(seed=args.seed)
    placement = axial_placement(phantom)
    section = place_section(phantom.cut_section(placement, seed=args.seed), placement, phantom.volume)
    section.obsm["signatures"] = section.obsm["signatures_true"]  # isolate the image → signature model
    cfg = {"dense": make_config("dense", seed=args.seed, epochs=args.epochs_dense),
           "xpression": make_config("xpression", seed=args.seed, epochs=args.epochs_xpression)}
    targets = targets_from_section(section, phantom.volume, val_fraction=0.2, block_um=400.0, seed=args.seed)
    held = ~targets.train_mask
    other = phantom.cut_section(second_placement(phantom, args.seed), seed=args.seed + 1)
    other_true = np.asarray(other.obsm["signatures_true"])
    names = list(phantom.signature_names)
    truth = {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"commit": commit, "reused_runs": bool(args.reuse_runs), "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch threads "
                          f"{torch.get_num_threads()}", "spots": int(section.n_obs), "held_out_spots": int(held.sum())}

    t0 = time.perf_counter()
    base = RidgeBaseline.fit(phantom.volume, targets)
    base_grid = base.predict_grid(2)
    results["ridge_baseline"] = {
        "fit_seconds": time.perf_counter() - t0,
        "held_out_spots": spot_metrics(base.predict_spots(targets.centres_xyz_um[held]), targets.proportions[held], names),
        "second_section": spot_metrics(base.predict_spots(np.asarray(other.obsm["spatial_3d"])), other_true, names),
    }

    for name in ("dense", "xpression"):
        t0 = time.perf_counter()
        run = train_model(phantom.volume, targets, cfg[name], args.out / f"run_{name}", resume=args.reuse_runs)
        model = TrainedModel.load(run)
        train_s = previous[name]["train_seconds"] if args.reuse_runs else time.perf_counter() - t0
        predictor = model.spot_predictor()
        spot_pred = predictor.predict(predictor.sampler(phantom.volume, targets), np.flatnonzero(held))
        res = {"train_seconds": train_s, "epochs": len(json.loads((run / "history.json").read_text())),
               "held_out_spots": spot_metrics(spot_pred, targets.proportions[held], names),
               "second_section": spot_metrics(predict_section_spots(model, phantom.volume, other), other_true, names)}
        step = model.output_step()
        if step.tolist() not in [v["step"] for v in truth.values()]:
            truth[name] = {"step": step.tolist(), "grid": block_mean(phantom.truth, step)}
        tgrid = next(v["grid"] for v in truth.values() if v["step"] == step.tolist())
        _, spacing, origin = model.output_geometry(phantom.volume)
        if name == "dense":
            stats = predict_volume(model, phantom.volume, args.out / "dense.ome.zarr", overwrite=True, progress=True)
            pred = np.asarray(read_ome_zarr(args.out / "dense.ome.zarr")[0])
            tissue = block_mean(phantom.tissue[None].astype(np.float32), step)[0] > 0.5
            _, _, normal = placement.frame
            geo = dict(spacing_um_zyx=spacing, origin_um_zyx=origin, plane_point_xyz=placement.matrix[:, 2],
                       plane_normal_xyz=normal, names=names)
            res["volume_held_out"] = score_volume(pred, tgrid, tissue, **geo)
            results["ridge_baseline"]["volume_held_out"] = score_volume(base_grid, block_mean(phantom.truth, 2),
                                                                        tissue, **geo)
            res["seconds_per_output_voxel"] = stats["seconds"] / np.prod(stats["shape_czyx"][1:])
            res["input_voxels_per_s"] = stats["input_voxels_per_s"]
            res["output_spacing_um"] = stats["spacing_um_zyx"]
            # the same sample of held-out cells the xpression model is scored on, for a like-for-like view
            cells = held_out_cells(model, phantom, placement, args.xpression_cells, args.seed)
            r = pearson_per_channel(pred[:, cells[:, 0], cells[:, 1], cells[:, 2]],
                                    tgrid[:, cells[:, 0], cells[:, 1], cells[:, 2]])
            res["volume_held_out_sample"] = summarise(dict(zip(names, r.tolist())), names)
        else:
            cells = held_out_cells(model, phantom, placement, args.xpression_cells, args.seed)
            t1 = time.perf_counter()
            vals = np.stack([model.predict_region(phantom.volume, tuple(slice(c, c + 1) for c in cell))[:, 0, 0, 0]
                             for cell in cells], 1)
            r = pearson_per_channel(vals, tgrid[:, cells[:, 0], cells[:, 1], cells[:, 2]])
            res["volume_held_out_sample"] = summarise(dict(zip(names, r.tolist())), names)
            block = (slice(10, 18), slice(40, 56), slice(40, 56))  # a block of the output grid, timed
            t1 = time.perf_counter()
            model.predict_region(phantom.volume, block)
            sec = time.perf_counter() - t1
            res["seconds_per_output_voxel"] = sec / (8 * 16 * 16)
            res["input_voxels_per_s"] = (8 * 16 * 16) * float(np.prod(step)) / sec
            res["output_spacing_um"] = list(spacing)
        results[name] = res
        print(name, json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
    results["speed_ratio_dense_vs_xpression_per_output_voxel"] = (
        results["xpression"]["seconds_per_output_voxel"] / results["dense"]["seconds_per_output_voxel"])
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results[k] for k in ("speed_ratio_dense_vs_xpression_per_output_voxel",)}, indent=1))
    for name in ("ridge_baseline", "dense", "xpression"):
        r = results[name]
        print(f"{name:15s} held-out spots r={r['held_out_spots']['mean']:.3f}  second section r="
              f"{r['second_section']['mean']:.3f}  volume r={r.get('volume_held_out', r.get('volume_held_out_sample', {})).get('mean')}")


if __name__ == "__main__":
    main()
