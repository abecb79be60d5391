"""Benchmark: peak RSS of whole-volume prediction is bounded by the chunk size, not the volume size.

Writes the phantom's scan to OME-Zarr at two sizes (V and 8V: the full phantom and its 1/8 corner),
predicts each with the same dense model in a fresh process, and reports the peak RSS of each.

    python benchmarks/bench_memory.py --run benchmarks/out/xpression/run_dense --out benchmarks/out/memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from voxelome.io import read_volume
from voxelome.infer.predict import predict_volume
vol = read_volume(sys.argv[2])
t = time.perf_counter()
stats = predict_volume(sys.argv[1], vol, sys.argv[3], overwrite=True, progress=False)
print(json.dumps({"voxels": int(vol.data.size), "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "input_voxels_per_s": stats["input_voxels_per_s"]}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a dense run folder")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/memory"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from voxelome.datasets import make_lung_phantom
    from voxelome.io import write_volume_ome_zarr

    ph = make_lung_phantom()
    full = ph.volume.data
    small = full[: full.shape[0] // 2, : full.shape[1] // 2, : full.shape[2] // 2]
    rows = {}
    for label, arr in (("V", small), ("8V", full)):
        src = args.out / f"scan_{label}.ome.zarr"
        write_volume_ome_zarr(src, arr, ph.volume.spacing_um, overwrite=True)
        res = subprocess.run([sys.executable, "-c", CHILD, str(args.run), str(src), str(args.out / f"pred_{label}.ome.zarr")],
                             check=True, capture_output=True, text=True)
        rows[label] = json.loads(res.stdout.strip().splitlines()[-1])
        print(label, rows[label])
    rows["rss_ratio_8V_over_V"] = rows["8V"]["peak_rss_mb"] / rows["V"]["peak_rss_mb"]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
