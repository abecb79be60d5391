"""Benchmark: expression stacking of large (single-cell-like) sections — point-by-point vs pooled bins (issue 3).

Two adjacent "sections" of the same tissue: the lung phantom's spot section split into cells twice
(:func:`voxelome.datasets.cells.cells_from_spots`, seeds 0 and 1: different cells, same tissue), the second
rotated by 35° and shifted by (300, −200) µm. Error = RMS µm distance of the second section's cells from their
true positions after stacking; the trivial baseline is no alignment. ``icp`` aligns the sections point by point
(``max_points`` above the section size) or as pooled grid bins (the default: at most ~5,000 bins per section);
``fgw`` as bins (default cap 1,500). Time: wall and CPU of the whole ``stack_sections`` call; memory: peak of
numpy/Python allocations during the call (``tracemalloc``).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_register_cells.py \\
        --out benchmarks/out/register_cells
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

from voxelome.constants import SPATIAL_3D_KEY, SPATIAL_KEY
from voxelome.datasets import make_lung_phantom
from voxelome.datasets.cells import cells_from_spots
from voxelome.register.stack_expression import section_xy_um, stack_sections


def moved(cells, angle_deg=35.0, shift_um=(300.0, -200.0)):
    """A copy rotated about its centre and shifted (µm; pixel size 1)."""
    b = cells.copy()
    xy = section_xy_um(b)
    c, a = xy.mean(0), np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    b.obsm[SPATIAL_KEY] = (xy - c) @ r.T + c + np.asarray(shift_um)
    return b


def run(fixed, mv, truth, **kw) -> dict:
    tracemalloc.start()
    t, c = time.perf_counter(), time.process_time()
    st = stack_sections([fixed, mv], [0.0, 10.0], names=["fixed", "moved"], **kw)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    got = st.obsm[SPATIAL_3D_KEY][(st.obs["section"] == "moved").to_numpy(), :2]
    info = st.uns["voxelome"]["stack"]
    return {**kw, "bin_um": info["bin_um"], "rms_um": float(np.sqrt(((got - truth) ** 2).sum(1).mean())),
            "wall_s": wall, "cpu_s": cpu, "peak_mib": peak / 2 ** 20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/register_cells"))
    ap.add_argument("--per-spot", type=int, nargs="+", default=[20, 40, 70])
    ap.add_argument("--points-up-to", type=int, default=12000,
                    help="run the point-by-point icp only up to this many cells per section (its memory grows as n²)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    spots = make_lung_phantom("small", seed=0).cut_section(seed=0)
    rows = []
    for per in a.per_spot:
        fixed, other = cells_from_spots(spots, per, seed=0), cells_from_spots(spots, per, seed=1)
        truth = section_xy_um(other)
        mv = moved(other)
        base = {"cells_per_section": fixed.n_obs, "spots": spots.n_obs,
                "none_rms_um": float(np.sqrt(((section_xy_um(mv) - truth) ** 2).sum(1).mean()))}
        configs = [{"method": "icp"}, {"method": "fgw"}]
        if fixed.n_obs <= a.points_up_to:
            configs.insert(1, {"method": "icp", "max_points": 10 * fixed.n_obs})
        for kw in configs:
            row = {**base, **run(fixed, mv, truth, **kw)}
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
