"""Benchmark: does the sections' expression support their given cutting order? (``register order``, issue 3)

Real stacks in their numeric order (the breast layers of Ståhl 2016; her2st patients A–H): the mean per-gene
similarity of neighbours in the given order and in the order the expression suggests, the gain, the verdict at
the default threshold, time per stack. Phantom: axial sections of the lung phantom (``--phantom-sections`` of
them, 40 µm apart), each turned (±60°) and shifted (±200 µm) on its slide, shuffled ``--trials`` times: how often
the depth order (or its reverse) is recovered exactly, and the gain the check reports for the shuffled order and
for the true one.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_section_order.py \\
        --out benchmarks/out/section_order
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from voxelome.constants import SPATIAL_KEY
from voxelome.datasets import axial_placement, make_lung_phantom
from voxelome.io.legacy_st import read_legacy_st
from voxelome.register.section_order import check_section_order
from voxelome.register.stack_data import read_st_csv_layer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_stacks():
    d = DATA / "paste_breast_st2016"
    names = [f"slice{k}" for k in range(1, 5)]
    yield "breast_st2016", [read_st_csv_layer(d / f"{s}.csv.gz", d / f"{s}_coor.csv") for s in names], names
    her = DATA / "her2st"
    for pat in "ABCDEFGH":
        names = sorted(p.name.split(".")[0] for p in (her / "ST-cnts").glob(f"{pat}*.tsv.gz"))
        yield f"her2st_{pat}", [read_legacy_st(her / "ST-cnts" / f"{s}.tsv.gz", her / "ST-spotfiles" /
                                               f"{s}_selection.tsv", library_id=s) for s in names], names


def moved(adata, rng):
    b = adata.copy()
    px = float(b.uns["voxelome"]["pixel_size_um"])
    xy = np.asarray(b.obsm[SPATIAL_KEY], float) * px
    a = np.deg2rad(rng.uniform(-60, 60))
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    b.obsm[SPATIAL_KEY] = ((xy - xy.mean(0)) @ r.T + xy.mean(0) + rng.uniform(-200, 200, 2)) / px
    return b


def phantom_trials(n_sections: int, trials: int) -> dict:
    ph = make_lung_phantom("small", seed=0, n_genes=60)
    zs = np.round(np.linspace(4, 44, n_sections)).astype(int)
    rows, rng = [], np.random.default_rng(0)
    for t in range(trials):
        secs = [moved(ph.cut_section(axial_placement(ph, z), seed=100 * t + k), rng) for k, z in enumerate(zs)]
        names = [f"z{z}" for z in zs]
        perm = rng.permutation(n_sections)
        t0 = time.perf_counter()
        shuffled = check_section_order([secs[i] for i in perm], [names[i] for i in perm], warn=False)
        seconds = time.perf_counter() - t0
        true = check_section_order(secs, names, warn=False)
        rows.append({"perm": perm.tolist(), "recovered": shuffled.suggested in (names, names[::-1]),
                     "gain_shuffled": shuffled.gain, "flagged_shuffled": not shuffled.consistent,
                     "gain_true": true.gain, "flagged_true": not true.consistent, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return {"sections": n_sections, "z_slices": zs.tolist(), "trials": rows,
            "recovered": sum(r["recovered"] for r in rows), "flagged_shuffled": sum(r["flagged_shuffled"] for r in rows),
            "flagged_true": sum(r["flagged_true"] for r in rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/section_order"))
    ap.add_argument("--phantom-sections", type=int, default=8)
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message="gene sets differ")
    res = {"real": {}}
    for name, ads, names in real_stacks():
        t0 = time.perf_counter()
        c = check_section_order(ads, names, warn=False)
        res["real"][name] = {**c.to_dict(), "seconds": time.perf_counter() - t0}
        print(name, json.dumps({k: v for k, v in res["real"][name].items() if k not in ("similarity", "sections")}),
              flush=True)
    res["phantom"] = phantom_trials(args.phantom_sections, args.trials)
    print(json.dumps({k: v for k, v in res["phantom"].items() if k != "trials"}), flush=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
