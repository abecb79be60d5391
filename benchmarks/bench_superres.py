"""Benchmark: cross-modal diffusion super-resolution vs baselines, with calibration and sampling cost.

Datasets (``--only``; each writes ``<out>/results_<name>.json``):

- ``phantom``: lung-phantom axial slices, noiseless truth at 20 µm, simulated 100 µm spots (Poisson counts),
  rendered H&E features (:func:`voxelome.datasets.superres.phantom_pairs`; train / val / test slices split by z
  with gaps). Scored against the truth.
- ``her2st``: her2st C2–C6, real spots aggregated into 2×2 pseudo-spots and super-resolved back to the real
  spot grid with H&E features, leave-one-section-out: per fold the diffusion model and its deterministic twin
  train on 3 of the 4 other sections and the 4th calibrates the intervals; scored on the held-out section's
  real spots.
- ``starmap``: STARmap cells rasterised to 20 µm, 100 µm pseudo-spots, expression only; train / val / test strips.
- ``steps``: the phantom model re-sampled with 1–50 DDIM steps (quality, CRPS, coverage, time).
- ``phantom_visium``: the hexagonal-lattice path — lung-phantom Visium sections, 2×2 blocks of the offset grid →
  the spots, expression only (5 train / 1 calibration / 2 test sections by depth).

Methods, same pairs: ``nearest`` (block replication of the low-res map), ``bicubic`` (upsampled low-res map), ``dense`` (the dense model of the dense-prediction
issue: her2st = the issue-5 fold runs in ``benchmarks/out/pixnet_her2st``; phantom = a DenseExpressionNet2D
trained on the training slices' H&E with the spot targets, ``benchmarks/superres_dense_baseline.py``),
``deterministic`` (the same network trained with MSE on the clean map), ``diffusion`` (mean of ``S`` samples),
and ``diffusion+consistency`` (the same samples shifted to reproduce the observed low-res blocks).
Metrics: per-gene RMSE, SSIM and Pearson r over measured high-res pixels (means over genes, then over maps);
90 % interval coverage (raw sample quantiles and conformal-calibrated on the validation data); CRPS.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/bench_superres.py \\
        --out benchmarks/out/superres --only phantom
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from voxelome.evaluate.superres_baselines import bicubic_upsample, nearest_upsample
from voxelome.evaluate.superres_metrics import mean_scores, superres_scores
from voxelome.models.diffusion.calibration import coverage, predictive_interval, sample_crps
from voxelome.models.diffusion.normalise import block_consistency
from voxelome.train.superres_config import make_superres_config
from voxelome.train.superres_model import TrainedSuperRes
from voxelome.train.superres_trainer import train_superres

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
SECTIONS = ("C2", "C3", "C4", "C5", "C6")


def _target(pair):
    return pair.truth if pair.truth is not None else pair.high


REUSE = False  # --reuse-runs: load finished runs instead of training (re-scoring after a code change)


def _fit(pairs, run_dir: Path, overrides: dict, deterministic: bool):
    if REUSE and (run_dir / "checkpoint.pt").exists():
        return TrainedSuperRes.load(run_dir, device="cpu"), float("nan")
    cfg = make_superres_config("superres", deterministic=deterministic, **overrides)
    t = time.time()
    model = train_superres(pairs, cfg, run_dir, progress=sys.stderr.isatty())
    return model, time.time() - t


def _fit_both(train, out: Path, name: str, overrides: dict, phases: str | None):
    """The diffusion model and its deterministic twin on the same pairs; ``phases`` (a weights key, "" for
    none) trains on every block phase of the training pairs (datasets.superres_augment)."""
    fit_pairs = train
    if phases is not None:
        from voxelome.datasets.superres_augment import all_phases

        fit_pairs = all_phases(train, weights_key=phases or None)
    model, t_fit = _fit(fit_pairs, out / f"{name}_diffusion", overrides, False)
    det, t_det = _fit(fit_pairs, out / f"{name}_deterministic", overrides, True)
    return model, det, t_fit, t_det


def score_pairs(model, det, pairs, *, seed: int, dense=None, n_samples: int | None = None, steps: int | None = None):
    """Every method on every pair → {method: mean scores}, plus per-pair timings and coverage."""
    rows: dict[str, list] = {}
    extra = {"sample_seconds": [], "crps": [], "crps_consistency": [], "coverage_raw": [], "coverage_calibrated": [],
             "coverage_calibrated_consistency": [], "width_calibrated": [], "per_pair": []}
    for k, p in enumerate(pairs):
        truth, mask = _target(p), p.high_mask
        preds = {"nearest": nearest_upsample(p.low, p.low_mask, p.factor),
                 "bicubic": bicubic_upsample(p.low, p.low_mask, p.factor)}
        if dense is not None:
            preds["dense"] = dense[p.name]
        preds["deterministic"] = det.sample(p, 1)[0]
        t = time.time()
        samples = model.sample(p, n_samples, steps=steps, seed=seed + k)
        extra["sample_seconds"].append(time.time() - t)
        cons = block_consistency(samples, p.low, p.low_mask, p.high_mask, p.factor)
        preds["diffusion"] = samples.mean(0)
        preds["diffusion+consistency"] = cons.mean(0)
        pair_scores = {}
        for name, pred in preds.items():
            s = superres_scores(pred, truth, mask, samples=samples if name == "diffusion" else None)
            s.pop("per_gene")
            rows.setdefault(name, []).append(s)
            pair_scores[name] = {k2: s[k2] for k2 in ("rmse", "ssim", "pearson")}
        extra["per_pair"].append({"pair": p.name, **pair_scores})
        extra["crps"].append(sample_crps(samples, truth, mask))
        extra["crps_consistency"].append(sample_crps(cons, truth, mask))
        extra["coverage_raw"].append(rows["diffusion"][-1]["coverage"])
        if model.multipliers is not None:
            for key, ss in (("coverage_calibrated", samples), ("coverage_calibrated_consistency", cons)):
                lo, hi = predictive_interval(ss.mean(0), ss.std(0, ddof=1), model.tau, model.multipliers)
                extra[key].append(coverage(lo, hi, truth, mask))
                if key == "coverage_calibrated":
                    extra["width_calibrated"].append(float((hi - lo)[:, mask].mean()))
    summary = {name: mean_scores(v) for name, v in rows.items()}
    for key in ("sample_seconds", "crps", "crps_consistency", "coverage_raw", "coverage_calibrated",
                "coverage_calibrated_consistency", "width_calibrated"):
        extra[key + "_mean"] = float(np.mean(extra[key])) if extra[key] else None
    return summary, extra


SELECT_STEPS: list[int] = []  # --select-steps: DDIM step candidates chosen on the calibration pairs


def run_split(name: str, train, val, test, out: Path, overrides: dict, *, dense=None, seed: int = 0,
              calibrate_on=None, phases: str | None = None, score_val: bool = False) -> dict:
    model, det, t_fit, t_det = _fit_both(train, out, name, overrides, phases)
    cal = calibrate_on if calibrate_on is not None else val
    selection, n_samples = None, overrides.get("n_samples")  # --set n_samples also applies to reused runs
    if SELECT_STEPS:  # chosen on the held-out calibration pairs only, before calibrating (intervals follow it)
        t = time.time()
        selection = model.select_steps(cal, SELECT_STEPS, n_samples=n_samples, seed=seed + 3000)
        selection["seconds"] = time.time() - t
        print(json.dumps({name: {"selected_steps": selection["steps"], "scores": selection["scores"]}}), flush=True)
    else:  # a reused run folder may hold an earlier selection (sampler.json): use the config's sampler
        model.sample_steps, model.n_samples = model.config.sample_steps, int(n_samples or model.config.n_samples)
    t = time.time()
    model.calibrate(cal, seed=seed + 1000)
    t_cal = time.time() - t
    val_summary = None
    if val and score_val:
        val_summary, _ = score_pairs(model, det, val, seed=seed + 2000, dense=None)
    summary, extra = score_pairs(model, det, test, seed=seed, dense=dense)
    return {"test": summary, "val": val_summary, "extra": extra, "fit_seconds": t_fit, "fit_seconds_deterministic": t_det,
            "calibrate_seconds": t_cal, "step_selection": selection, "sample_steps": model.sample_steps,
            "n_samples": model.n_samples, "multipliers": model.multipliers.tolist(), "tau": model.tau.tolist(),
            "n_params": int(sum(p.numel() for p in model.model.parameters())),
            "n_params_deterministic": int(sum(p.numel() for p in det.model.parameters())),
            "train": [p.name for p in train], "calibration": [p.name for p in cal], "test_pairs": [p.name for p in test]}


def _dense_maps(args, pairs) -> dict:
    """The dense-model maps written by ``benchmarks/superres_dense_baseline.py`` (same pairs, same names)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from superres_dense_baseline import attach_dense

    if attach_dense(pairs, args.dense_dir) != len(pairs):
        raise SystemExit(f"dense maps missing in {args.dense_dir}: run benchmarks/superres_dense_baseline.py first "
                         "(or pass --no-dense).")
    return {p.name: p.extra["dense"] for p in pairs}


def bench_phantom(args, out: Path) -> dict:
    from voxelome.datasets.superres import phantom_pairs

    t = time.time()
    pairs = phantom_pairs(args.phantom, cache_dir=out / "cache")
    t_data = time.time() - t
    dense = None if args.no_dense else _dense_maps(args, pairs["test"])
    res = run_split("phantom", pairs["train"], pairs["val"], pairs["test"], out, args.overrides, dense=dense)
    res["data_seconds"] = t_data
    return res


def bench_her2st(args, out: Path) -> dict:
    from voxelome.datasets.superres import her2st_pairs

    folds = {}
    for test in args.sections:
        pairs = her2st_pairs(test, cache_dir=out / "cache", data_dir=DATA / "her2st")
        train = pairs["train"]
        cal_name = SECTIONS[(SECTIONS.index(test) + 1) % len(SECTIONS)]  # the next section calibrates
        cal = [p for p in train if p.name.endswith(cal_name)]
        fit = [p for p in train if not p.name.endswith(cal_name)]
        dense = None if args.no_dense else _dense_maps(args, pairs["test"])
        folds[test] = run_split(f"her2st_{test}", fit, [], pairs["test"], out, args.overrides, dense=dense,
                                calibrate_on=cal, phases="" if args.phases else None)
        print(json.dumps({test: {k: v for k, v in folds[test]["test"].items()}}, default=float), flush=True)
    methods = folds[next(iter(folds))]["test"].keys()
    mean = {m: {k: float(np.mean([f["test"][m][k] for f in folds.values()])) for k in ("rmse", "ssim", "pearson")}
            for m in methods}
    cov = {k: float(np.mean([f["extra"][k + "_mean"] for f in folds.values()]))
           for k in ("coverage_raw", "coverage_calibrated", "coverage_calibrated_consistency", "crps",
                     "sample_seconds")}
    return {"folds": folds, "mean_over_folds": mean, "extra_mean_over_folds": cov}


def bench_her2st_inner(args, out: Path) -> dict:
    """Model selection without the test folds: C3 left out entirely, train C2, C4, C5 → score C6 (accuracy only)."""
    from voxelome.datasets.superres import her2st_pairs

    pairs = her2st_pairs("C6", sections=("C2", "C4", "C5", "C6"), cache_dir=out / "cache", data_dir=DATA / "her2st")
    model, det, t_fit, t_det = _fit_both(pairs["train"], out, "her2st_inner", args.overrides,
                                         "" if args.phases else None)
    model.n_samples = int(args.overrides.get("n_samples", model.n_samples))  # also for reused runs
    summary, extra = score_pairs(model, det, pairs["test"], seed=0)
    print(json.dumps({m: {k: round(v[k], 4) for k in ("rmse", "ssim", "pearson")} for m, v in summary.items()}),
          flush=True)
    return {"test": summary, "fit_seconds": t_fit, "fit_seconds_deterministic": t_det,
            "sample_seconds": extra["sample_seconds_mean"]}


def bench_starmap(args, out: Path) -> dict:
    from voxelome.datasets.superres import starmap_pairs

    pairs = starmap_pairs(data_dir=DATA / "starmap3d_mini_giotto")
    return run_split("starmap", pairs["train"], pairs["val"], pairs["test"], out, args.overrides,
                     phases="n_cells" if args.phases else None, score_val=True)


VISIUM_Z = {"train": (16, 28, 40, 52, 64), "calibration": (76,), "test": (88, 100)}  # phantom slice indices


def bench_phantom_visium(args, out: Path) -> dict:
    """Hexagonal Visium lattices (offset coordinates): lung-phantom Visium sections (55 µm spots, 100 µm hexagonal
    pitch, NB counts) at the slices of ``VISIUM_Z``, 2×2 offset-grid blocks → the spots, expression only; the 32
    genes of highest variance (log1p) over the training sections; scored on the test sections' measured spots."""
    from voxelome.datasets import axial_placement, make_lung_phantom
    from voxelome.datasets.superres_sections import restore_pair, section_targets

    ph = make_lung_phantom(args.phantom, seed=0)
    secs = {split: [ph.cut_section(axial_placement(ph, z), seed=int(z)) for z in zs] for split, zs in VISIUM_Z.items()}
    genes_all = list(secs["train"][0].var_names)
    y = np.vstack([section_targets(a, genes_all) for a in secs["train"]])
    genes = [genes_all[i] for i in np.argsort(-y.var(0), kind="stable")[:32]]
    pairs = {split: [restore_pair(a, genes, name=f"visium_z{z}") for a, z in zip(v, VISIUM_Z[split])]
             for split, v in secs.items()}
    res = run_split("phantom_visium", pairs["train"], [], pairs["test"], out, args.overrides,
                    calibrate_on=pairs["calibration"], phases="" if args.phases else None)
    res["pixel_size_yx_um"] = pairs["test"][0].extra.get("pixel_size_yx_um")
    res["n_spots"] = {split: [a.n_obs for a in v] for split, v in secs.items()}
    return res


def bench_steps(args, out: Path) -> dict:
    from voxelome.datasets.superres import phantom_pairs

    pairs = phantom_pairs(args.phantom, cache_dir=out / "cache")
    run = out / "phantom_diffusion"
    if not (run / "checkpoint.pt").exists():
        raise SystemExit(f"{run} missing: run --only phantom first.")
    model = TrainedSuperRes.load(run, device="cpu")
    rows = []
    for steps in args.steps:
        t = time.time()
        res = []
        for k, p in enumerate(pairs["test"][: args.steps_pairs]):
            s = model.sample(p, 8, steps=steps, seed=k)
            sc = superres_scores(s.mean(0), _target(p), p.high_mask, samples=s)
            lo, hi = predictive_interval(s.mean(0), s.std(0, ddof=1), model.tau, model.multipliers)
            sc.update(crps=sample_crps(s, _target(p), p.high_mask),
                      coverage_calibrated=coverage(lo, hi, _target(p), p.high_mask))
            sc.pop("per_gene")
            res.append(sc)
        row = {"steps": steps, "seconds_per_slide": (time.time() - t) / len(res), **mean_scores(res)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "n_samples": 8}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "superres")
    ap.add_argument("--only", choices=("phantom", "her2st", "her2st_inner", "starmap", "steps", "phantom_visium"),
                    required=True)
    ap.add_argument("--phantom", default="default", help="phantom preset")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), help="her2st held-out sections")
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 2, 5, 10, 20, 50])
    ap.add_argument("--steps-pairs", type=int, default=4, help="test slices used by --only steps")
    ap.add_argument("--reuse-runs", action="store_true", help="load finished run folders instead of training "
                                                               "(fit times then read NaN)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (e.g. iterations=800)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense-model baseline")
    ap.add_argument("--dense-dir", type=Path, default=ROOT / "benchmarks" / "out" / "superres_dense",
                    help="output folder of benchmarks/superres_dense_baseline.py")
    ap.add_argument("--phases", action="store_true", help="train on every block phase of the training pairs "
                                                          "(her2st, starmap: low = block mean of high)")
    ap.add_argument("--select-steps", nargs="+", type=int, default=[],
                    help="DDIM step candidates chosen on the calibration pairs before calibrating (e.g. 2 5 10 20)")
    ap.add_argument("--tag", default="", help="suffix of the results file (results_<only><tag>.json)")
    args = ap.parse_args()
    args.overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        default = getattr(make_superres_config("superres"), k)
        args.overrides[k] = v == "True" if v in ("True", "False") else (float if default is None else type(default))(v)
    global REUSE, SELECT_STEPS
    REUSE, SELECT_STEPS = args.reuse_runs, list(args.select_steps)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    res = globals()[f"bench_{args.only}"](args, args.out)
    res["meta"] = {"command": " ".join(sys.argv), "wall_seconds": time.time() - t, "machine": platform.platform(),
                   "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                   "overrides": args.overrides}
    path = args.out / f"results_{args.only}{args.tag}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    print(json.dumps({k: v for k, v in res.items() if k in ("test", "mean_over_folds", "extra_mean_over_folds")},
                     indent=1, default=float))
    if "extra" in res:
        print(json.dumps({k: v for k, v in res["extra"].items() if k.endswith("_mean")}, indent=1))


if __name__ == "__main__":
    main()
