"""The dense-prediction baseline (issue 5's PixNet-style model) for the super-resolution benchmark (issue 6).

What a dense image model would get in practice, on the same pairs as the diffusion model:

- **phantom**: a :class:`voxelome.models.dense2d.DenseExpressionNet2D` trained on the *training* slices'
  rendered H&E (5 µm/px) with the simulated low-res spots as targets — each 100 µm square spot taken as
  the disk of equal area (radius 56.4 µm), the dense trainer's spot model — then run on the val/test
  slices' H&E. With ``output_stride=4`` its map has 20 µm pixels, exactly the high-res grid, and a map
  pixel's value × (spot area / pixel area = factor²) is the spot-scale value the model predicts for
  that pixel (the trainer fits a spot as the *sum* of the map over its disk).
- **her2st**: the issue-5 leave-one-section-out runs (``benchmarks/out/pixnet_her2st/run_C2..C6``, each
  trained on the other four sections, 250 genes of which the first 50 are the top-50), queried with the
  100 µm spot disk at every ST array position (:func:`voxelome.evaluate.superres_baselines.her2st_dense_baseline`).

In the same run: nearest (block replication) and bicubic upsampling of the low-res map; metrics of
:mod:`voxelome.evaluate.superres_metrics` over the masked pixels of the held-out maps.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/superres_dense_baseline.py \\
        --out benchmarks/out/superres_dense

Outputs under ``--out``: ``phantom_dense/<pair name>.npy`` (G, H, W) float32 for the val and test slices,
``her2st_dense/her2st_<sec>.npy`` (G, H, W) on the array grid, ``run_phantom/`` (the dense run),
``results.json``. :func:`attach_dense` puts the saved maps into ``pair.extra["dense"]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from voxelome.datasets.superres import her2st_pairs, phantom_pairs
from voxelome.evaluate.superres_baselines import (
    bicubic_upsample,
    her2st_dense_baseline,
    nearest_upsample,
)
from voxelome.evaluate.superres_metrics import mean_scores, superres_scores
from voxelome.train.dense2d_config import make_dense2d_config
from voxelome.train.dense2d_data import SlideData
from voxelome.train.dense2d_trainer import TrainedDense2D, train_dense2d

HERE = Path(__file__).resolve().parent


def phantom_slide(pair) -> SlideData:
    """A pair's H&E with its observed low-res spots as equal-area disks (working px = ``he_um``)."""
    r = pair.extra["he_rgb"].shape[0] // pair.shape[0]  # H&E px per high-res px
    block = pair.factor * r  # H&E px per spot side
    iy, ix = np.nonzero(pair.low_mask)
    centres = np.column_stack([(ix + 0.5) * block, (iy + 0.5) * block])
    return SlideData(pair.extra["he_rgb"], pair.extra["he_um"], centres, block / np.sqrt(np.pi),
                     pair.low[:, iy, ix].T.copy(), name=pair.name)


def phantom_dense_map(trained: TrainedDense2D, pair) -> np.ndarray:
    """``(G, H, W)`` spot-scale prediction per high-res pixel: the 20 µm map × factor²."""
    m = trained.predict_map(pair.extra["he_rgb"])
    H, W = pair.shape
    if m.shape[1:] != (H, W):
        raise SystemExit(f"map {m.shape} does not match the grid {(H, W)}: use he_um × output_stride = pixel_um")
    idx = [trained.genes.index(g) for g in pair.genes]
    return (m[idx] * pair.factor ** 2).astype(np.float32)


def _scores(pred, pair):
    return superres_scores(pred, pair.high, pair.high_mask)


def _short(s):
    return {k: round(v, 4) for k, v in s.items() if isinstance(v, float)}


def run_phantom(args, results):
    t = time.time()
    pairs = phantom_pairs(args.config, seed=args.seed, cache_dir=args.out / "cache")
    results["phantom_build_s"] = round(time.time() - t, 1)
    train = [phantom_slide(p) for p in pairs["train"]]
    cfg = make_dense2d_config("dense2d", n_genes=len(pairs["train"][0].genes), input_um=pairs["train"][0].extra["he_um"],
                              output_stride=4, tile_px=args.tile_px, epochs=args.epochs,
                              steps_per_epoch=args.steps_per_epoch, seed=args.seed, device="cpu")
    t = time.time()
    trained = train_dense2d(train, cfg, args.out / "run_phantom", pairs["train"][0].genes)
    results["phantom_train_s"] = round(time.time() - t, 1)
    (args.out / "phantom_dense").mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("val", "test"):
        per = {"dense": [], "bicubic": [], "nearest": []}
        t = time.time()
        for p in pairs[split]:
            d = phantom_dense_map(trained, p)
            np.save(args.out / "phantom_dense" / f"{p.name}.npy", d)
            per["dense"].append(_scores(d, p))
            per["bicubic"].append(_scores(bicubic_upsample(p.low, p.low_mask, p.factor), p))
            per["nearest"].append(_scores(nearest_upsample(p.low, p.low_mask, p.factor), p))
        out[split] = {m: mean_scores(v) for m, v in per.items()}
        out[split]["predict_s"] = round(time.time() - t, 1)
        print("phantom", split, {m: _short(v) for m, v in out[split].items() if isinstance(v, dict)}, flush=True)
    results["phantom"] = out


def run_her2st(args, results):
    runs = Path(args.her2st_runs)
    per = {"dense": [], "bicubic": [], "nearest": []}
    folds = {}
    for sec in args.folds.split(","):
        t = time.time()
        p = her2st_pairs(sec, min_spots=args.min_spots, cache_dir=args.out / "cache",
                         data_dir=Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st")["test"][0]
        d = her2st_dense_baseline(p, runs / f"run_{sec}", image_cache=runs / "cache" / f"{sec}_4um.npz")
        (args.out / "her2st_dense").mkdir(parents=True, exist_ok=True)
        np.save(args.out / "her2st_dense" / f"{p.name}.npy", d)
        f = {"dense": _scores(d, p), "bicubic": _scores(bicubic_upsample(p.low, p.low_mask, 2), p),
             "nearest": _scores(nearest_upsample(p.low, p.low_mask, 2), p)}
        for m, lst in per.items():
            lst.append(f[m])
        folds[sec] = {m: _short(v) for m, v in f.items()} | {"seconds": round(time.time() - t, 1),
                                                             "n_spots": int(p.high_mask.sum()),
                                                             "n_pseudo_spots": int(p.low_mask.sum()),
                                                             "n_complete_blocks": int((p.extra["low_count"] == 4).sum())}
        print("her2st", sec, folds[sec], flush=True)
    results[f"her2st_min{args.min_spots}"] = {"folds": folds, "mean": {m: mean_scores(v) for m, v in per.items()}}


def attach_dense(pairs, out: Path) -> int:
    """Load saved dense maps into ``pair.extra['dense']`` (phantom and her2st); returns how many were found."""
    n = 0
    for p in pairs:
        for sub in ("phantom_dense", "her2st_dense"):
            f = Path(out) / sub / f"{p.name}.npy"
            if f.exists():
                p.extra["dense"] = np.load(f)
                n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "superres_dense")
    ap.add_argument("--config", default="default", help="phantom preset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps-per-epoch", type=int, default=10)
    ap.add_argument("--tile-px", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=["phantom", "her2st"])
    ap.add_argument("--her2st-runs", default=str(HERE / "out" / "pixnet_her2st"))
    ap.add_argument("--folds", default="C2,C3,C4,C5,C6")
    ap.add_argument("--min-spots", type=int, default=1, help="her2st: measured spots for a 2×2 pseudo-spot (1–4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{args.threads} thread(s)", "args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.time()
    if "phantom" in args.only:
        run_phantom(args, results)
    if "her2st" in args.only:
        run_her2st(args, results)
    results["total_s"] = round(time.time() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("total", results["total_s"], "s")


if __name__ == "__main__":
    main()
