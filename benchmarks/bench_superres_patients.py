"""What `voxelome superres` gives a user on patients it was never tuned on (issue 6): expression only.

The `superres-spots` preset was chosen on her2st patient C with its H&E. Here every other her2st patient (A, B, D,
E–H: count tables only, no image) is run through the CLI exactly as the README says — `superres fit` with its
defaults (preset `superres-spots`, all block phases), a calibration section and `--select-steps`, then
`superres predict --mode restore` on the held-out sections — and, beside it, the same command with
`--set deterministic=True` (the twin: the same network trained with MSE for the same steps). `restore` degrades each held-out
section into 2×2 pseudo-spots, super-resolves it back and scores it against its real spots beside block
replication (`nearest`) and `bicubic`, and reports the coverage of the calibrated 90 % intervals there.

Split per patient (sections in name order): the last two are held out for scoring (the last one for three-section
patients), the one before them calibrates, the rest train. Patient C (expression only, C1–C6) is included and
marked: its sections were used to choose the preset (with the H&E).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_superres_patients.py --out benchmarks/out/superres_patients

Writes ``<out>/results.json`` (every report, per seed) and prints a per-patient table of seed means.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"
PATIENTS = ("A", "B", "D", "E", "F", "G", "H", "C")
SEEN = {"C"}  #: patients whose sections chose the preset
METHODS = ("diffusion", "deterministic", "nearest", "bicubic")


def split(patient: str) -> dict:
    """Train / calibration / test sections of one patient (names in order)."""
    names = sorted(p.name.split(".")[0] for p in (DATA / "ST-cnts").glob(f"{patient}*.tsv.gz"))
    n_test = 1 if len(names) <= 3 else 2
    return {"train": names[:-n_test - 1], "calibration": names[-n_test - 1], "test": names[-n_test:]}


def voxelome(*args) -> str:
    """Run the CLI as a user would (the venv's entry point); its stdout, or a loud failure."""
    exe = Path(sys.executable).with_name("voxelome")
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode:
        raise SystemExit(f"voxelome {' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout


def counts(name: str) -> Path:
    return DATA / "ST-cnts" / f"{name}.tsv.gz"


def run_patient(patient: str, seed: int, out: Path, n_genes: int) -> dict:
    """Fit both runs of one patient and seed, restore its test sections; the reports, per test section."""
    sp = split(patient)
    runs = {}
    for method, extra in (("diffusion", ["--calibration-section", counts(sp["calibration"]),
                                         "--select-steps", "1,2,5,10,20"]),
                          ("deterministic", ["--set", "deterministic=True"])):
        run = out / f"{patient}_s{seed}_{method}"
        fit_s = None  # a finished run of an earlier call is reused: no fit time
        if not (run / "checkpoint.pt").exists():
            t = time.perf_counter()
            sections = [a for s in sp["train"] for a in ("--section", counts(s))]
            voxelome("superres", "fit", *sections, *extra, "--n-genes", n_genes, "--set", f"seed={seed}",
                     "--out", run)
            fit_s = time.perf_counter() - t
        runs[method] = (run, fit_s)
    rows = {}
    for test in sp["test"]:
        row = {}
        for method, (run, fit_s) in runs.items():
            dst = out / f"{patient}_s{seed}_{method}_{test}.zarr"
            if not (dst / "report.json").exists():
                voxelome("superres", "predict", run, "--section", counts(test), "--mode", "restore", "--out", dst,
                         "--seed", seed)
            rep = json.loads((dst / "report.json").read_text())["sections"][test]
            row[method] = rep["scores"]
            row[f"{method}_fit_seconds"] = fit_s
            if method == "diffusion":
                row.update(rep["baseline_scores"], interval=rep["interval"])
        rows[test] = row
    return {"split": sp, "sections": rows}


def summarise(results: dict) -> list[dict]:
    """Per patient: seed means of each method's mean r / SSIM over the test sections, and the coverage."""
    table = []
    for patient, by_seed in results.items():
        r = {m: [] for m in METHODS}
        s = {m: [] for m in METHODS}
        cov = []
        for res in by_seed.values():
            secs = res["sections"].values()
            for m in METHODS:
                r[m].append(np.mean([x[m]["pearson"] for x in secs]))
                s[m].append(np.mean([x[m]["ssim"] for x in secs]))
            cov.append(np.mean([x["interval"]["coverage"] for x in secs]))
        row = {"patient": patient + (" (seen)" if patient in SEEN else ""), "seeds": len(by_seed),
               **{f"r_{m}": float(np.mean(v)) for m, v in r.items()},
               **{f"ssim_{m}": float(np.mean(v)) for m, v in s.items()},
               "diffusion_minus_twin_r_per_seed": [float(a - b) for a, b in zip(r["diffusion"], r["deterministic"])],
               "coverage": float(np.mean(cov))}
        table.append(row)
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "superres_patients")
    ap.add_argument("--patients", nargs="+", default=list(PATIENTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n-genes", type=int, default=50)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    t0 = time.perf_counter()
    for patient in args.patients:
        for seed in args.seeds:
            if str(seed) in results.get(patient, {}):
                continue
            results.setdefault(patient, {})[str(seed)] = run_patient(patient, seed, args.out, args.n_genes)
            path.write_text(json.dumps(results, indent=1))
            print(f"{patient} seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = summarise({p: results[p] for p in args.patients if p in results})
    (args.out / "summary.json").write_text(json.dumps(table, indent=1))
    print("| patient | nearest r / SSIM | bicubic | twin | diffusion | diffusion − twin r (per seed) | coverage |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        cells = [f"{t['r_' + m]:.3f} / {t['ssim_' + m]:.3f}" for m in ("nearest", "bicubic", "deterministic",
                                                                        "diffusion")]
        dr = ", ".join(f"{x:+.4f}" for x in t["diffusion_minus_twin_r_per_seed"])
        print(f"| {t['patient']} | {' | '.join(cells)} | {dr} | {t['coverage']:.3f} |")


if __name__ == "__main__":
    main()
