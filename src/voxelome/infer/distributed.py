"""Whole-volume block jobs mapped over a Dask cluster (``LocalCluster`` or any scheduler address).

The unit of work is the public per-block function :func:`~voxelome.infer.blocks.process_block`
(read block + halo → compute → write the output chunk → mark it done). A :class:`BlockJob` is
that function's two ingredients: a *compute factory* (a small picklable object whose ``build()``
returns ``compute(out_region) -> (c, *region)`` on the worker) and the output *geometry* (store,
shape, chunks). :func:`run_block_job` maps :func:`run_block` over the blocks not yet marked;
nothing but the task graph (paths, block indices, tiny status records) passes through the client:

* each worker builds its compute once and caches it (for prediction: the model, loaded from the
  run folder and checked against the checkpoint's fingerprint, and the input volume, opened
  lazily from its OME-Zarr/zarr/TIFF file), keyed by the factory, so a worker process loads the
  model once however many blocks it runs;
* a block reads only its input window (with halo) from the input file, writes its output chunk
  straight into the output zarr, then touches its done-marker;
* a block whose marker exists is never recomputed: the client skips marked blocks at start, and
  a task re-run by Dask after a lost worker (or a concurrent run) checks the marker first.

So a run restarted after a crash, or one that loses workers, redoes only unmarked blocks, and the
output equals the serial :func:`~voxelome.infer.predict.predict_volume` bit for bit (with the same
torch thread count per block: float reductions in the convolutions depend on it).

:class:`ModelPrediction` is the compute factory of ``dense`` and ``xpression`` prediction; any
other whole-volume producer (a neural-field export, super-resolution) plugs in as another factory
with the same ``build()`` and runs on the same scheduler unchanged.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from voxelome.accel import AccelOptions
from voxelome.errors import VoxelomeError
from voxelome.infer.blocks import all_done, append_run_record, is_done, iter_blocks, process_block
from voxelome.io.volume import Volume

#: In-memory volumes larger than this are refused (workers read blocks from files instead).
INLINE_VOLUME_LIMIT_BYTES = 16 * 2**20

_CACHE: dict[Any, Any] = {}
#: How many times each cache key was built in this process (a worker loads each model once).
BUILD_COUNTS: dict[Any, int] = {}
_CACHE_LOCK = threading.RLock()  # re-entrant: a factory may cache its parts


def worker_cached(key, build: Callable[[], Any]):
    """The per-process cache of models, volumes and open stores (built once per worker process)."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
            BUILD_COUNTS[key] = BUILD_COUNTS.get(key, 0) + 1
        return _CACHE[key]


def worker_build_counts() -> dict[str, int]:
    """``{repr(key): builds}`` of this process's cache (``client.run(worker_build_counts)`` audits workers)."""
    return {repr(k): n for k, n in BUILD_COUNTS.items()}


# --- inputs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeRef:
    """A volume on storage every worker can read (what travels in the task graph: the path).

    Parameters mirror :func:`voxelome.io.read_volume`.
    """

    path: str
    spacing_um: tuple[float, float, float] | None = None
    key: str | int | None = None

    @property
    def cache_key(self):
        return ("volume", str(Path(self.path).resolve()), self.spacing_um, self.key)

    def open(self) -> Volume:
        from voxelome.io.volumes import read_volume

        return read_volume(self.path, spacing_um=self.spacing_um, key=self.key)


@dataclass(frozen=True, eq=False)
class InlineVolume:
    """A small in-memory (or lazily file-backed) :class:`Volume` shipped inside the task graph."""

    volume: Volume
    token: str = ""

    @property
    def cache_key(self):
        return ("inline-volume", self.token)

    def open(self) -> Volume:
        return self.volume

    def __hash__(self):
        return hash(self.cache_key)

    def __eq__(self, other):
        return isinstance(other, InlineVolume) and other.token == self.token


def pickled_nbytes(obj) -> int:
    """Bytes ``obj`` takes in a task graph (out-of-band buffers counted without copying them)."""
    buffers: list = []
    payload = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return len(payload) + sum(b.raw().nbytes for b in buffers)


def volume_source(volume) -> VolumeRef | InlineVolume:
    """What the workers open: a path/:class:`VolumeRef` as is; a :class:`Volume` only if it is small
    in the task graph (file-backed, or a small array), since the client must not ship a scan."""
    if isinstance(volume, (VolumeRef, InlineVolume)):
        return volume
    if isinstance(volume, (str, os.PathLike)):
        return VolumeRef(str(volume))
    if not isinstance(volume, Volume):
        raise VoxelomeError(f"volume={type(volume).__name__} must be a path, a VolumeRef or a voxelome Volume.")
    size = pickled_nbytes(volume)
    if size > INLINE_VOLUME_LIMIT_BYTES:
        raise VoxelomeError(
            f"the volume is held in memory ({size / 2**20:.0f} MiB in the task graph); cluster workers read "
            "their blocks from a file instead. Write it once with voxelome.io.write_volume_ome_zarr(path, volume) "
            "and pass the path (or VolumeRef(path)).")
    return InlineVolume(volume, token=f"{volume.data.name}-{uuid.uuid4().hex}")


# --- block jobs -----------------------------------------------------------------------
class ComputeFactory(Protocol):
    """Builds, on a worker, ``compute(out_region) -> ndarray (c, *region)``; hashable (cache key)."""

    def build(self) -> Callable[[tuple[slice, slice, slice]], np.ndarray]: ...


@dataclass(frozen=True)
class BlockJob:
    """One whole-volume job: a compute factory and the output geometry it fills.

    Attributes
    ----------
    compute : ComputeFactory
        Picklable, hashable; ``compute.build()`` runs once per worker process.
    store_path : str
        Output zarr store (holding the done-markers); must be on storage every worker can write.
    array_path : str
        Array inside the store (``"0"``: level 0 of an OME-Zarr).
    out_shape_zyx, chunks_zyx : tuple of int
        Output grid and chunk shape; one block = one chunk.
    """

    compute: Any
    store_path: str
    out_shape_zyx: tuple[int, int, int]
    chunks_zyx: tuple[int, int, int]
    array_path: str = "0"

    def blocks(self):
        return iter_blocks(self.out_shape_zyx, self.chunks_zyx)


def run_block(job: BlockJob, idx, region) -> dict:
    """The task each worker runs: compute, write and mark one block unless it is marked already.

    Returns a small record ``{"idx", "status": "computed" | "found_done", "seconds", "worker"}``.
    """
    import dask
    import zarr

    idx = tuple(int(i) for i in idx)
    if is_done(job.store_path, idx):  # done by an earlier attempt whose result the scheduler lost
        return {"idx": list(idx), "status": "found_done", "seconds": 0.0, "worker": _worker_id()}
    t0 = time.perf_counter()
    compute = worker_cached(("compute", job.compute), job.compute.build)
    out = worker_cached(("out", str(Path(job.store_path).resolve()), job.array_path, job.out_shape_zyx, job.chunks_zyx),
                        lambda: zarr.open_array(str(Path(job.store_path) / job.array_path), mode="r+"))
    # Lazy input reads inside a task run in this thread, not as a nested job on the cluster.
    with dask.config.set(scheduler="synchronous"):
        process_block(compute, out, job.store_path, idx, region)
    return {"idx": list(idx), "status": "computed", "seconds": time.perf_counter() - t0, "worker": _worker_id()}


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_block_job(job: BlockJob, client, *, progress: bool = True, desc: str = "predict",
                  max_in_flight: int | None = None, retries: int = 2) -> dict:
    """Map :func:`run_block` over the job's unmarked blocks on a ``distributed.Client``.

    At most ``max_in_flight`` tasks (default 2 per worker thread) are submitted at a time, so the
    client holds a bounded number of futures for any volume size. Tasks lost with a worker are
    rescheduled by Dask (``retries`` more times for errors raised inside a task).

    Returns
    -------
    dict
        ``{"blocks", "computed", "skipped", "found_done"}``: blocks in the job, computed now,
        marked before this run started, and found marked when their task ran (a task repeated
        after a lost worker, or a concurrent run); the same record, with the computed block
        indices, is appended to ``runs.jsonl``.
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    blocks = list(job.blocks())
    todo = [(i, r) for i, r in blocks if not is_done(job.store_path, i)]
    run_id = uuid.uuid4().hex[:12]
    window = max_in_flight or max(2 * sum(client.nthreads().values()), 4)
    pending = iter(todo)

    def submit(idx, region):
        return client.submit(run_block, job, idx, region, key=f"voxelome-block-{run_id}-{'_'.join(map(str, idx))}",
                             retries=retries, pure=False)

    first = [submit(*item) for _, item in zip(range(window), pending)]
    bar = tqdm(total=len(blocks), initial=len(blocks) - len(todo), desc=desc, unit="chunk", disable=not progress)
    records = []
    if first:
        ac = as_completed(first, loop=client.loop)
        for future in ac:
            records.append(future.result())
            future.release()
            bar.update()
            item = next(pending, None)
            if item is not None:
                ac.add(submit(*item))
    bar.close()
    computed = [r["idx"] for r in records if r["status"] == "computed"]
    stats = {"blocks": len(blocks), "computed": len(computed), "skipped": len(blocks) - len(todo),
             "found_done": len(records) - len(computed)}
    workers = sorted({r["worker"] for r in records})
    append_run_record(job.store_path, {**stats, "pid": os.getpid(), "scheduler": str(client.scheduler.address),
                                       "workers": workers, "computed_blocks": computed})
    return stats


@contextlib.contextmanager
def connect(scheduler="local", *, n_workers: int | None = None, threads_per_worker: int = 1,
            processes: bool = True):
    """A ``distributed.Client``: ``"local"`` starts a LocalCluster on this machine (closed on exit),
    an address (``tcp://host:8786``) joins a running scheduler, a Client is used as is."""
    from distributed import Client, LocalCluster

    if not isinstance(scheduler, str):
        yield scheduler
        return
    if scheduler == "local":
        n = n_workers or max((os.cpu_count() or 1) // max(threads_per_worker, 1), 1)
        with LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=processes,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            yield client
        return
    if "://" not in scheduler and ":" not in scheduler:
        raise VoxelomeError(f"scheduler={scheduler!r} must be 'local' or a dask scheduler address such as "
                            "tcp://10.0.0.5:8786 (what `dask scheduler` prints).")
    try:
        client = Client(scheduler, timeout=60)
    except OSError as exc:
        raise VoxelomeError(f"could not reach the dask scheduler at {scheduler!r} ({exc}); start one with "
                            "`dask scheduler` and workers with `dask worker <address>`, or use --scheduler local.") \
            from exc
    with client:
        yield client


# --- prediction -----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelPrediction:
    """Compute factory of ``dense`` / ``xpression`` whole-volume prediction.

    Attributes
    ----------
    checkpoint : str
        The run's ``checkpoint.pt`` (on storage the workers can read).
    fingerprint : str
        Its fingerprint when the job was planned; a worker refuses a checkpoint that changed since.
    volume : VolumeRef or InlineVolume
        The input scan.
    device : str or None
        Worker device (``None``: the run's config, i.e. CUDA when present).
    accel : AccelOptions
        GPU fast-path options.
    torch_threads : int
        torch CPU threads per worker process (0: leave torch's default). Outputs are bit-identical
        to a serial run using the same number of threads.
    """

    checkpoint: str
    fingerprint: str
    volume: Any
    device: str | None = None
    accel: AccelOptions = field(default_factory=AccelOptions)
    torch_threads: int = 1

    def build(self):
        import torch

        from voxelome.infer.predict import TrainedModel

        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)

        def load():
            model = TrainedModel.load(self.checkpoint, device=self.device, accel=self.accel)
            if model.fingerprint != self.fingerprint:
                raise VoxelomeError(f"{self.checkpoint} changed after the prediction was planned (fingerprint "
                                    f"{model.fingerprint} != {self.fingerprint}); restart the prediction.")
            return model

        model = worker_cached(("model", self.checkpoint, self.fingerprint, self.device, self.accel), load)
        volume = worker_cached(self.volume.cache_key, self.volume.open)
        return lambda region: model.predict_region(volume, region)


def predict_volume_distributed(model, volume, out_path, *, scheduler="local", n_workers: int | None = None,
                               threads_per_worker: int = 1, processes: bool = True, chunks=None,
                               overwrite: bool = False, pyramid: bool = True, progress: bool = True,
                               device: str | None = None, accel: AccelOptions | None = None,
                               torch_threads: int = 1, max_in_flight: int | None = None) -> dict:
    """Predict a whole volume on a Dask cluster into the same OME-Zarr :func:`predict_volume` writes.

    Parameters
    ----------
    model : TrainedModel or path
        A loaded model or its run folder / checkpoint (workers reload it from that file).
    volume : path, VolumeRef or Volume
        The scan. A path (OME-Zarr, zarr, TIFF, ...) is opened by each worker; an in-memory
        :class:`Volume` is accepted only when small (see :func:`volume_source`).
    out_path : path
        Output ``.ome.zarr`` on storage shared by all workers; resumes if it exists.
    scheduler : str or distributed.Client
        ``"local"`` (a LocalCluster of ``n_workers`` × ``threads_per_worker`` on this machine),
        a scheduler address (``tcp://host:8786``), or a Client.
    n_workers, threads_per_worker, processes : LocalCluster settings (``"local"`` only).
    chunks : tuple of int, optional
        Output chunk (z, y, x) in output voxels = one task.
    overwrite, pyramid, progress : as :func:`~voxelome.infer.predict.predict_volume`.
    device, accel : worker device and GPU fast-path options.
    torch_threads : int
        torch threads per worker (1 suits one worker per core).
    max_in_flight : int, optional
        Tasks submitted at a time (default 2 per worker thread).

    Returns
    -------
    dict
        As :func:`predict_volume`, plus ``found_done`` and ``scheduler``.
    """
    from voxelome.infer.predict import TrainedModel, open_prediction_output, prediction_stats

    if not isinstance(model, TrainedModel):
        model = TrainedModel.load(model, device="cpu")  # the client only needs the geometry
    if not model.checkpoint:
        raise VoxelomeError("the model has no checkpoint file; load it with TrainedModel.load(run_dir).")
    source = volume_source(volume)
    vol = source.open()
    out, shape, spacing, chunks = open_prediction_output(model, vol, out_path, chunks=chunks, overwrite=overwrite)
    factory = ModelPrediction(model.checkpoint, model.fingerprint, source, device, accel or AccelOptions(),
                              torch_threads)
    job = BlockJob(factory, str(Path(out_path).resolve()), tuple(shape), tuple(chunks))
    with connect(scheduler, n_workers=n_workers, threads_per_worker=threads_per_worker,
                 processes=processes) as client:
        t0 = time.perf_counter()
        stats = run_block_job(job, client, progress=progress, desc=f"predict {model.config.model} (dask)",
                              max_in_flight=max_in_flight)
        seconds = time.perf_counter() - t0
        address = str(client.scheduler.address)
        if pyramid and all_done(out_path, shape, chunks):
            from voxelome.io.omezarr import build_pyramid

            build_pyramid(out_path)  # dask graph: runs on the cluster too (this client is the default)
    result = prediction_stats(out_path, vol, out.shape, spacing, chunks, stats, seconds)
    return {**result, "scheduler": address}


# --- field export ---------------------------------------------------------------------
@dataclass(frozen=True)
class FieldVolume:
    """Compute factory of a neural-field volume export (:meth:`FittedField.write_volume` on a cluster).

    A block is the field evaluated at the centres of its output voxels; nothing is read but the
    field's checkpoint (once per worker).
    """

    checkpoint: str
    fingerprint: str
    genes: tuple[str, ...]
    origin_um_zyx: tuple[float, float, float]
    spacing_um_zyx: tuple[float, float, float]
    device: str | None = None
    batch_size: int = 65536
    torch_threads: int = 1

    def build(self):
        import torch

        from voxelome.infer.field_export import FittedField

        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)

        def load():
            field = FittedField.load(self.checkpoint, device=self.device)
            if field.fingerprint != self.fingerprint:
                raise VoxelomeError(f"{self.checkpoint} changed after the export was planned; restart the export.")
            return field

        field = worker_cached(("field", self.checkpoint, self.fingerprint, self.device), load)
        org, sp, names = np.asarray(self.origin_um_zyx), np.asarray(self.spacing_um_zyx), list(self.genes)

        def compute(region):  # the same computation as FittedField.write_volume's
            axes = [org[a] + sp[a] * np.arange(r.start, r.stop) for a, r in enumerate(region)]
            zz, yy, xx = np.meshgrid(*axes, indexing="ij")
            pts = np.stack([xx, yy, zz], axis=-1)
            return np.moveaxis(field.predict(pts, names, batch_size=self.batch_size), -1, 0)

        return compute


def write_field_volume_distributed(field, out_path, spacing_um, *, scheduler="local", bbox_um=None, genes=None,
                                   chunks=(16, 64, 64), overwrite: bool = False, pyramid: bool = True,
                                   progress: bool = True, n_workers: int | None = None, threads_per_worker: int = 1,
                                   device: str | None = None, batch_size: int = 65536, torch_threads: int = 1) -> dict:
    """:meth:`FittedField.write_volume` with its blocks mapped over a Dask cluster (same store, same markers).

    Parameters are those of :meth:`~voxelome.infer.field_export.FittedField.write_volume` plus the
    scheduler settings of :func:`predict_volume_distributed`; ``field`` is the field's run folder
    (or checkpoint file), on storage the workers can read.
    """
    from voxelome.constants import CHECKPOINT_FILE
    from voxelome.infer.field_ensemble import is_ensemble_run
    from voxelome.infer.field_export import FittedField

    if isinstance(field, FittedField):
        raise VoxelomeError("pass the field's run folder, not a loaded field: workers load it from its checkpoint.")
    run = Path(field)
    field = FittedField.load(run, device="cpu")
    # an ensemble's folder is loaded as a folder (its members' checkpoints), a single field by its checkpoint
    checkpoint = str((run / CHECKPOINT_FILE if run.is_dir() and not is_ensemble_run(run) else run).resolve())
    # the same store, identity and layout as FittedField.write_volume, so either can resume the other's output
    _, grid = field.open_volume_output(out_path, spacing_um, bbox_um=bbox_um, genes=genes, chunks=chunks,
                                       overwrite=overwrite)
    names, shape, spacing, origin, chunks = list(grid.names), grid.shape, grid.spacing, grid.origin, grid.chunks
    factory = FieldVolume(checkpoint, field.fingerprint, tuple(names), tuple(origin), tuple(spacing), device,
                          batch_size, torch_threads)
    job = BlockJob(factory, str(Path(out_path).resolve()), tuple(shape), chunks)
    with connect(scheduler, n_workers=n_workers, threads_per_worker=threads_per_worker) as client:
        t0 = time.perf_counter()
        stats = run_block_job(job, client, progress=progress, desc="field volume (dask)")
        seconds = time.perf_counter() - t0
        if pyramid and all_done(out_path, shape, chunks):
            from voxelome.io.omezarr import build_pyramid

            build_pyramid(out_path)
    return grid.summary(out_path, stats, seconds)
