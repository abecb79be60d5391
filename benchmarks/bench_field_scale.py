"""Scale of the neural transcriptomic field on a CPU: synthetic sparse stacks of 10^6–10^8 cells × 500 genes.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 15 python benchmarks/bench_field_scale.py \
        --cells 1000000 --out benchmarks/out/field_scale
    # disk-backed: generated chunk by chunk into a point store (memmapped .npy CSR), fitted from it
    ... bench_field_scale.py --disk --cells 100000000 --out benchmarks/out/field_scale_disk

The stack has spatial structure (so that a held-out loss has something to converge to): 8 gene
programs (Dirichlet(0.05) profiles over the genes) mixed by proportions that are a softmax of smooth
random 3D sinusoids (wavelengths 0.6–2.5 mm); each cell draws 1 + Poisson(11) transcripts (≈ 10
non-zeros per cell, as single-cell data at low depth). 50 training sections 100 µm apart over a
5 × 5 × 5 mm box; a held-out section in the middle (z = 2,500 µm, 16,384 cells) gives the held-out loss:
the NB negative log-likelihood (mean over cells and genes) of 8,192 of its cells, coordinates not jittered,
every ``log_every`` iterations and at iteration 0 (untrained field); its cost is not counted in the
training time. The counts are generated in chunks of 10^6 cells and stay CSR; nothing is densified
beyond a batch.

Time to a converged fit: the training time until the held-out loss first comes within 1 % of its final
value (and, stricter, until 95 % of its total decrease is reached). Peak RSS is the process's high-water
mark, reset (``/proc/self/clear_refs``) after the synthetic data are generated, so it covers preparing
the points and fitting; the peak including generation is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from voxelome.cli_common import parse_sets
from voxelome.train.field_trainer import fit_field, make_field_config
from voxelome.train.point_data import PointData
from voxelome.train.point_store import PointStoreWriter, open_point_store

BOX_UM, GAP_UM, PROGRAMS, CHUNK = 5000.0, 100.0, 8, 1_000_000
#: FieldConfig overrides of every fit (``--set``)
CONFIG_OVERRIDES: dict = {}


class Generator:
    """Seeded synthetic tissue: program profiles ``(k, g)`` and smooth 3D proportion fields."""

    def __init__(self, n_genes: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.profiles = rng.dirichlet(np.full(n_genes, 0.05), PROGRAMS)
        self.cum = np.cumsum(self.profiles, 1)
        self.cum[:, -1] = 1.0
        self.freq = rng.uniform(2 * np.pi / 2500, 2 * np.pi / 600, (PROGRAMS, 3)) * rng.choice([-1, 1], (PROGRAMS, 3))
        self.phase = rng.uniform(0, 2 * np.pi, (PROGRAMS, 3))
        self.n_genes = n_genes

    def proportions(self, xyz):
        logit = 2.0 * np.sin(xyz[:, None, :] * self.freq[None] + self.phase[None]).sum(2)
        p = np.exp(logit - logit.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    def counts(self, xyz, rng) -> sp.csr_matrix:
        n = len(xyz)
        lib = 1 + rng.poisson(11, n)
        cell = np.repeat(np.arange(n), lib)
        cum = np.cumsum(self.proportions(xyz), 1)
        prog = (rng.random(len(cell))[:, None] > cum[cell]).sum(1).clip(0, PROGRAMS - 1)
        gene = np.empty(len(cell), np.int32)
        u = rng.random(len(cell))
        for k in range(PROGRAMS):
            m = prog == k
            gene[m] = np.searchsorted(self.cum[k], u[m]).clip(0, self.n_genes - 1)
        m = sp.csr_matrix((np.ones(len(cell), np.float32), (cell, gene)), shape=(n, self.n_genes))
        m.sum_duplicates()
        return m


def make_stack(gen: Generator, n: int, z_planes, seed: int):
    """AnnData of ``n`` cells on the given z planes (uniform in x, y), counts CSR, generated in chunks."""
    rng = np.random.default_rng(seed)
    xyz = np.empty((n, 3))
    xyz[:, :2] = rng.uniform(0, BOX_UM, (n, 2))
    xyz[:, 2] = rng.choice(np.asarray(z_planes, float), n)
    blocks = [gen.counts(xyz[i:i + CHUNK], np.random.default_rng([seed, i])) for i in range(0, n, CHUNK)]
    m = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
    del blocks
    planes = np.unique(np.asarray(z_planes, float))
    section = pd.Categorical.from_codes(np.searchsorted(planes, xyz[:, 2]), [f"z{z:g}" for z in planes])
    a = ad.AnnData(X=m, obs=pd.DataFrame({"section": section}, index=pd.RangeIndex(n).astype(str)),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(gen.n_genes)]))
    a.obsm["spatial_3d"] = xyz
    return a


def write_stack_store(gen: Generator, n: int, z_planes, seed: int, path: Path) -> Path:
    """The same stack as :func:`make_stack` (same draws; coordinates stored as float32), written chunk by chunk
    to a point store: only one chunk's counts are ever in RAM (plus the ``(n, 2)`` + ``(n,)`` coordinate draws)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, BOX_UM, (n, 2))
    z = rng.choice(np.asarray(z_planes, float), n)
    planes = np.unique(np.asarray(z_planes, float))
    with PointStoreWriter(path, [f"g{i}" for i in range(gen.n_genes)], [f"z{p:g}" for p in planes],
                          overwrite=True) as w:
        for i in range(0, n, CHUNK):
            xyz = np.c_[xy[i:i + CHUNK], z[i:i + CHUNK]]
            w.append(gen.counts(xyz, np.random.default_rng([seed, i])), xyz, np.searchsorted(planes, xyz[:, 2]))
    return path


class _MemoryPeaks(threading.Thread):
    """Samples /proc/self/status every ``every`` s: peak RssAnon (process memory) and RssFile (memmapped pages)."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            for k in self.peak:
                self.peak[k] = max(self.peak[k], _rss_mb(k))
            self.stop.wait(self.every)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def convergence(history, rel: float = 0.01, frac: float = 0.95) -> dict:
    """Training seconds (and iterations) until the held-out loss is within ``rel`` of its final value, and
    until ``frac`` of its total decrease (untrained field at iteration 0 → final) is reached."""
    t = np.cumsum([h["seconds"] for h in history])
    c = np.cumsum([h.get("cpu_seconds", 0.0) for h in history])
    v = np.array([h["val_loss"] for h in history])
    its = [h["iteration"] for h in history]
    final = v[-1]
    i1 = int(np.argmax(v - final <= rel * abs(final)))
    i2 = int(np.argmax(v[0] - v >= frac * (v[0] - final)))
    return {"final_val_loss": float(final), "untrained_val_loss": float(v[0]),
            f"within_{rel:.0%}_of_final": {"iteration": its[i1], "train_s": float(t[i1]), "train_cpu_s": float(c[i1])},
            f"{frac:.0%}_of_decrease": {"iteration": its[i2], "train_s": float(t[i2]), "train_cpu_s": float(c[i2])}}


def scale(out: Path, n=1_000_000, g=500, iterations=1500, batch=4096, log_every=50, seed=0):
    """Generate, prepare and fit; throughput, time to convergence and peak RSS."""
    t0 = time.perf_counter()
    gen = Generator(g, seed)
    z_train = [z for z in np.arange(0, BOX_UM + 1, GAP_UM) if z != 2500.0]
    a = make_stack(gen, n, z_train, seed + 1)
    held = make_stack(gen, 16_384, [2500.0], seed + 2)
    gen_s = time.perf_counter() - t0
    peak_gen = _rss_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    t0 = time.perf_counter()
    data = PointData.from_anndata(a)
    val = PointData.from_anndata(held, min_sections=1)
    prep = time.perf_counter() - t0
    nnz = int(a.X.nnz)
    del a, held  # the points keep the CSR and coordinates; drop the AnnData wrappers (obs names)
    cfg = make_field_config("cpu", iterations=iterations, batch_size=batch, jitter_um=(50.0, 50.0, 75.0),
                            log_every=log_every, checkpoint_every=10**9, seed=seed, **CONFIG_OVERRIDES)
    t0 = time.perf_counter()
    fit_field(data, cfg, out / f"scale_{n}", resume=False, progress=False, validation=val, validation_points=8192)
    wall = time.perf_counter() - t0
    hist = json.loads((out / f"scale_{n}" / "history.json").read_text())
    train_s = float(sum(h["seconds"] for h in hist))
    train_cpu_s = float(sum(h.get("cpu_seconds", 0.0) for h in hist))
    res = {"n_cells": n, "n_genes": g, "nnz": nnz, "nnz_per_cell": nnz / n, "generate_s": gen_s,
           "prepare_s": prep, "iterations": iterations, "batch_size": batch, "fit_wall_s": wall, "train_s": train_s,
           "train_points_per_s": iterations * batch / train_s, "train_cpu_s": train_cpu_s,
           "train_points_per_cpu_s": iterations * batch / train_cpu_s, "load_avg_1min_end": os.getloadavg()[0], "peak_rss_fit_mb": _rss_mb("VmHWM"),
           "peak_rss_with_generation_mb": max(peak_gen, _rss_mb("VmHWM")),
           "csr_mb": sum(x.nbytes for x in (data.values.data, data.values.indices, data.values.indptr)) / 2**20,
           "convergence": convergence(hist), "history": hist}
    print(json.dumps({k: v for k, v in res.items() if k != "history"}), flush=True)
    return res


def scale_disk(out: Path, n=1_000_000, g=500, iterations=1500, batch=4096, log_every=50, seed=0,
               keep_store=False):
    """As :func:`scale`, with the training stack generated straight to a point store on disk and fitted from
    its memmaps (the held-out section stays in RAM). Reports peak anonymous and file-backed RSS apart."""
    store = out / f"store_{n}"
    t0 = time.perf_counter()
    gen = Generator(g, seed)
    z_train = [z for z in np.arange(0, BOX_UM + 1, GAP_UM) if z != 2500.0]
    write_stack_store(gen, n, z_train, seed + 1, store)
    held = make_stack(gen, 16_384, [2500.0], seed + 2)
    gen_s = time.perf_counter() - t0
    disk_mb = sum(f.stat().st_size for f in store.iterdir()) / 2**20
    peak_gen = _rss_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    mon = _MemoryPeaks()
    mon.start()
    t0 = time.perf_counter()
    data = open_point_store(store)
    open_s = time.perf_counter() - t0
    val = PointData.from_anndata(held, min_sections=1)
    prep = time.perf_counter() - t0
    del held
    cfg = make_field_config("cpu", iterations=iterations, batch_size=batch, jitter_um=(50.0, 50.0, 75.0),
                            log_every=log_every, checkpoint_every=10**9, seed=seed, **CONFIG_OVERRIDES)
    flt0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fit_field(data, cfg, out / f"scale_disk_{n}", resume=False, progress=False, validation=val,
              validation_points=8192)
    wall = time.perf_counter() - t0
    flt1 = resource.getrusage(resource.RUSAGE_SELF)
    mon.stop.set()
    mon.join()
    hist = json.loads((out / f"scale_disk_{n}" / "history.json").read_text())
    train_s = float(sum(h["seconds"] for h in hist))
    train_cpu_s = float(sum(h.get("cpu_seconds", 0.0) for h in hist))
    res = {"n_cells": n, "n_genes": g, "nnz": data.values.nnz, "nnz_per_cell": data.values.nnz / n,
           "input": "point store (memmapped .npy CSR)", "generate_and_write_s": gen_s, "store_disk_mb": disk_mb,
           "open_store_with_checks_s": open_s, "prepare_s": prep, "iterations": iterations, "batch_size": batch,
           "fit_wall_s": wall, "fit_setup_s": wall - train_s, "train_s": train_s,
           "train_points_per_s": iterations * batch / train_s, "train_cpu_s": train_cpu_s,
           "train_points_per_cpu_s": iterations * batch / train_cpu_s,
           "fit_major_page_faults": flt1.ru_majflt - flt0.ru_majflt,
           "fit_minor_page_faults": flt1.ru_minflt - flt0.ru_minflt,
           "load_avg_1min_end": os.getloadavg()[0], "peak_rss_fit_mb": _rss_mb("VmHWM"),
           "peak_rss_anon_fit_mb": mon.peak["RssAnon"], "peak_rss_file_fit_mb": mon.peak["RssFile"],
           "peak_rss_with_generation_mb": max(peak_gen, _rss_mb("VmHWM")),
           "convergence": convergence(hist), "history": hist}
    print(json.dumps({k: v for k, v in res.items() if k != "history"}), flush=True)
    del data
    if not keep_store:
        shutil.rmtree(store)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/field_scale"))
    ap.add_argument("--cells", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--disk", action="store_true",
                    help="generate the stack chunk by chunk into a point store and fit from its memmaps")
    ap.add_argument("--keep-store", action="store_true", help="with --disk: keep the store (deleted by default)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="FieldConfig overrides (e.g. model_library=false); the results file name gets a suffix")
    args = ap.parse_args()
    CONFIG_OVERRIDES.update(parse_sets(args.set))
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for n in args.cells:
        run = (scale_disk(args.out, n, args.genes, args.iterations, args.batch_size, keep_store=args.keep_store)
               if args.disk else scale(args.out, n, args.genes, args.iterations, args.batch_size))
        res = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} thread(s), no GPU, {os.cpu_count()} cores, "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
               "config_overrides": CONFIG_OVERRIDES, **run}
        tag = ("_disk" if args.disk else "") + "".join(f"_{k}-{v}" for k, v in CONFIG_OVERRIDES.items())
        (args.out / f"results{tag}_{n}x{args.genes}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
