"""Dask scaling of whole-volume prediction: blocks/s with 1 vs 2 local worker processes.

    OMP_WAIT_POLICY=PASSIVE nice -n 15 .venv/bin/python benchmarks/bench_dask_scaling.py \
        [--shape 512,1024,1024] [--dir /tmp/voxelome-bench-dask] [--workers 1,2]

What is timed, honestly:

* The input is a synthetic float32 OME-Zarr written once to ``--dir`` (default 512 × 1024 × 1024
  voxels = 2.1 GB uncompressed, 10 µm voxels, chunks 64 × 128 × 128, Blosc-zstd).
* The model is a deliberately cheap ``dense`` net (width 4, 80 µm working voxels, 1,280 µm windows
  without overlap, trained for one step on the phantom: its weights do not matter for time), so
  the run measures the *pipeline*: per-block reads of the input store with their halo,
  decompression, scaling, the forward passes, zarr writes of the output chunk, done-markers and
  Dask scheduling. Output chunks are 16 × 32 × 32 output voxels (128 × 256 × 256 input voxels);
  the sliding windows reach a quarter window beyond the volume (mirrored margin), so they are not
  aligned with the blocks and each block reads and predicts 2 × 3 × 3 windows: ~4.5× the input
  voxels of the block (the halo cost of the current window layout, timed as it is).
* Every block of the volume is predicted (no subsampling), once with each worker count, each in a
  fresh LocalCluster (1 thread and 1 torch thread per worker process).
* Baseline in the same run, on the same cluster: every chunk of the input store read and
  decompressed once (the raw I/O limit of this store on this machine), through Dask tasks.
* Peak RSS per worker process (``ru_maxrss``) after each run, and of the client.

The two CPU cores are shared with other jobs, so the ratios are noisy; the JSON records the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _read_block(path: str, region) -> float:
    import zarr

    arr = zarr.open_array(str(Path(path) / "0"), mode="r")
    return float(np.asarray(arr[(0, *region)], dtype=np.float32).mean())


def _synthetic_block(block: np.ndarray, block_info=None) -> np.ndarray:
    (z0, _), (y0, _), (x0, _) = block_info[None]["array-location"]
    z, y, x = np.meshgrid(*[np.arange(a, a + n, dtype=np.float32) for a, n in zip((z0, y0, x0), block.shape)],
                          indexing="ij", sparse=True)
    rng = np.random.default_rng([z0, y0, x0])
    smooth = np.sin(z / 37.0) * np.cos(y / 53.0) + np.sin((x + y) / 71.0)
    return (100.0 + 40.0 * smooth + rng.normal(0, 4.0, block.shape)).astype(np.float32)


def make_volume(path: Path, shape) -> float:
    """Write the synthetic scan (once); returns the seconds it took (0 if it existed)."""
    import dask.array as da

    from voxelome.io.omezarr import create_ome_zarr

    if (path / "0" / ".zarray").exists():
        return 0.0
    t0 = time.perf_counter()
    chunks = (64, 128, 128)
    arr = create_ome_zarr(path, (1, *shape), chunks_czyx=(1, *chunks), dtype="float32", spacing_um_zyx=10.0,
                          overwrite=True)
    x = da.zeros(shape, chunks=chunks, dtype=np.float32).map_blocks(_synthetic_block, dtype=np.float32)
    da.store(x[None], arr, lock=False, scheduler="threads", num_workers=2)
    return time.perf_counter() - t0


def cheap_model(run_dir: Path) -> Path:
    import torch

    from voxelome.datasets import axial_placement, make_lung_phantom
    from voxelome.register import place_section
    from voxelome.train import make_config, targets_from_section, train_model

    if (run_dir / "checkpoint.pt").exists():
        return run_dir
    torch.set_num_threads(1)
    ph = make_lung_phantom("small", seed=0, shape=(48, 192, 192))
    pl = axial_placement(ph)
    sec = place_section(ph.cut_section(pl, seed=0), pl, ph.volume)
    sec.obsm["signatures"] = np.asarray(sec.obsm["signatures_true"], np.float32)
    cfg = make_config("dense", width=4, input_spacing_um=80.0, output_stride=1, window_um=(1280.0,) * 3,
                      crop_um=(320.0, 1280.0, 1280.0), overlap=0.0, epochs=1, steps_per_epoch=1, batch_size=1)
    t = targets_from_section(sec, ph.volume, val_fraction=cfg.val_fraction, block_um=cfg.split_block_um, seed=0)
    return train_model(ph.volume, t, cfg, run_dir, progress=False)


OUT_CHUNKS = (16, 32, 32)


def run_one(n_workers: int, run: Path, scan: Path, out: Path) -> dict:
    from voxelome.infer.blocks import iter_blocks
    from voxelome.infer.distributed import connect, predict_volume_distributed
    from voxelome.infer.predict import TrainedModel
    from voxelome.io import read_volume

    shutil.rmtree(out, ignore_errors=True)
    model = TrainedModel.load(run, device="cpu")
    in_shape = read_volume(scan).shape
    with connect("local", n_workers=n_workers, threads_per_worker=1) as client:
        client.run(lambda: __import__("voxelome.infer.distributed"))  # imports are not timed
        load = os.getloadavg()[0]
        stats = predict_volume_distributed(model, scan, out, scheduler=client, chunks=OUT_CHUNKS, torch_threads=1,
                                           pyramid=False, progress=False)
        rss_model = sorted(client.run(_peak_rss_mb).values())
        # Baseline: read + decompress every input chunk once, as Dask tasks on the same cluster.
        regions = [r for _, r in iter_blocks(in_shape, (128, 256, 256))]
        t0 = time.perf_counter()
        futures = client.map(_read_block, [str(scan)] * len(regions), regions, pure=False)
        client.gather(futures)
        read_s = time.perf_counter() - t0
    n_in = int(np.prod(in_shape))
    return {"workers": n_workers, "blocks": stats["blocks"], "seconds": round(stats["seconds"], 2),
            "blocks_per_s": round(stats["blocks"] / stats["seconds"], 3),
            "input_voxels_per_s": round(stats["input_voxels_per_s"]),
            "read_only_seconds": round(read_s, 2), "read_only_voxels_per_s": round(n_in / read_s),
            "model_over_read_only": round(stats["input_voxels_per_s"] / (n_in / read_s), 3),
            "peak_rss_mb_per_worker": [round(r) for r in rss_model], "load_avg_1min_at_start": round(load, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="512,1024,1024")
    ap.add_argument("--dir", default="/tmp/voxelome-bench-dask")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "dask_scaling.json"))
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    scan = base / "scan.ome.zarr"
    write_s = make_volume(scan, shape)
    run = cheap_model(base / "cheap_run")
    results = [run_one(int(n), run, scan, base / f"pred_{n}.ome.zarr") for n in args.workers.split(",")]
    from voxelome.io import read_ome_zarr

    outs = [np.asarray(read_ome_zarr(base / f"pred_{r['workers']}.ome.zarr")[0]) for r in results]
    identical = all(np.array_equal(outs[0], o) for o in outs[1:])
    lung = 9000 * 9000 * 6000
    summary = {
        "machine": f"{os.cpu_count()} CPU cores (shared), {sys.platform}",
        "volume": {"shape_zyx": list(shape), "voxels": int(np.prod(shape)), "gb_float32": np.prod(shape) * 4 / 1e9,
                   "chunks": [64, 128, 128], "write_seconds": round(write_s, 1)},
        "runs": results,
        "outputs_identical_across_worker_counts": identical,
        "speedup_2_vs_1": (round(results[1]["blocks_per_s"] / results[0]["blocks_per_s"], 2)
                           if len(results) > 1 else None),
        "client_peak_rss_mb": round(_peak_rss_mb()),
        "projection_5e11_voxels_hours_cheap_model": {
            str(r["workers"]): round(lung / r["input_voxels_per_s"] / 3600, 1) for r in results},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
