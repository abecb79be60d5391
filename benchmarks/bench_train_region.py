"""Benchmark: training memory when the scan around the section is read crop by crop instead of loaded.

A fine micro-CT makes the region around a section (its spots' box plus the crops' margin) too large to hold as
float32 (a 5 mm section at 1.6 µm: ~40 GB). Above ``voxelome.train.sampling.REGION_MEMORY_BYTES`` (2 GiB) training
reads each crop from the scan as it needs it. This measures both ways on the lung phantom's scan upsampled ``--factor``
times per axis (10 µm → 10 / factor µm voxels, written to OME-Zarr on disk as a user's scan would be), the same
section and a short dense run, each in a fresh process: peak RSS and wall time, with the region loaded (no
budget) and lazy (``--budget-mb``). The two runs train on the same crops (bit-identical models,
``tests/test_train.py``), so only memory and time differ.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_train_region.py --out benchmarks/out/train_region
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, warnings
import torch
import numpy as np
from voxelome.datasets import axial_placement, make_lung_phantom
from voxelome.io import read_volume
from voxelome.register import place_section
from voxelome.train import make_config, targets_from_section, train_model
from voxelome.train import sampling
scan, run, budget, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
sampling.REGION_MEMORY_BYTES = budget
torch.set_num_threads(2)
ph = make_lung_phantom("small", seed=0, **({"shape": tuple(shape)} if shape else {}))
vol = read_volume(scan)
placement = axial_placement(ph)  # the section in µm: the same on the finer scan
section = place_section(ph.cut_section(placement, seed=0), placement, vol)
section.obsm["signatures"] = np.asarray(section.obsm["signatures_true"], dtype=np.float32)
cfg = make_config("dense", epochs=2, steps_per_epoch=4, batch_size=2)
targets = targets_from_section(section, vol, val_fraction=cfg.val_fraction, block_um=cfg.split_block_um, seed=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # phantom, section, targets (not a user's cost)
del ph
t = time.perf_counter()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train_model(vol, targets, cfg, run, progress=False, resume=False)
print(json.dumps({"scan_voxels": int(vol.data.size), "spacing_um": list(vol.spacing_um),
                  "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_rss_before_training_mb": before,
                  "lazy": any("reads its crops" in str(w.message) for w in caught)}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/train_region"))
    ap.add_argument("--factor", type=int, default=2, help="upsampling of the phantom's 10 µm scan per axis")
    ap.add_argument("--budget-mb", type=float, default=64.0, help="REGION_MEMORY_BYTES of the lazy run (MiB)")
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="phantom shape (z, y, x) at 10 µm (default: "
                    "the 'small' phantom's); a larger section area makes a larger region")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import dask.array as da

    from voxelome.datasets import make_lung_phantom
    from voxelome.io import write_volume_ome_zarr

    ph = make_lung_phantom("small", seed=0, **({"shape": tuple(args.shape)} if args.shape else {}))
    fine = da.asarray(ph.volume.data)
    for axis in range(3):
        fine = da.repeat(fine, args.factor, axis=axis)
    tag = f"x{args.factor}" + ("" if not args.shape else "_" + "x".join(map(str, args.shape)))
    scan = args.out / f"scan_{tag}.ome.zarr"
    spacing = tuple(s / args.factor for s in ph.volume.spacing_um)
    write_volume_ome_zarr(scan, fine, spacing, overwrite=True)
    rows = {"machine": {"platform": platform.platform()}, "factor": args.factor, "budget_mb": args.budget_mb}
    for label, budget in (("loaded", 2**62), ("lazy", int(args.budget_mb * 2**20))):
        res = subprocess.run([sys.executable, "-c", CHILD, str(scan), str(args.out / f"run_{label}"), str(budget),
                              json.dumps(args.shape)],
                             check=True, capture_output=True, text=True)
        rows[label] = json.loads(res.stdout.strip().splitlines()[-1])
        print(label, rows[label], flush=True)
    rows["rss_ratio_lazy_over_loaded"] = rows["lazy"]["peak_rss_mb"] / rows["loaded"]["peak_rss_mb"]
    rows["time_ratio_lazy_over_loaded"] = rows["lazy"]["seconds"] / rows["loaded"]["seconds"]
    rows["shape"] = args.shape
    (args.out / f"results_{tag}.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps({k: v for k, v in rows.items() if "ratio" in k}, indent=1))


if __name__ == "__main__":
    main()
