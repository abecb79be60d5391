"""Whole-volume prediction on a real Dask cluster (LocalCluster, 2 worker processes).

Equal to the serial run bit for bit (dense and xpression); a worker SIGKILLed mid-run loses
nothing that was finished; a client killed mid-run is resumed by a second run that computes only
the unmarked blocks. "Not recomputed" is checked on disk: ``process_block`` re-touches a block's
marker, so an unchanged marker mtime (ns) proves the block was not written again.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from conftest import TINY_XPRESSION

from voxelome.errors import VoxelomeError
from voxelome.infer.blocks import DONE_DIR, iter_blocks
from voxelome.infer.distributed import connect, predict_volume_distributed, volume_source, worker_build_counts
from voxelome.infer.predict import TrainedModel, predict_volume
from voxelome.io import read_ome_zarr, read_volume, write_volume_ome_zarr
from voxelome.io.volume import Volume
from voxelome.train import make_config, train_model

distributed = pytest.importorskip("distributed")

CHUNKS = (8, 16, 16)  # 2 × 5 × 5 = 50 blocks on the 16 × 72 × 72 output grid of the tiny dense run
TORCH_THREADS = 2  # = the test process's torch threads (conftest), so serial and cluster outputs agree bit for bit


@pytest.fixture(scope="module")
def client():
    """A real LocalCluster: 2 worker processes (each with a nanny that restarts it if killed)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster, distributed.Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture(scope="module")
def scan_zarr(phantom, tmp_path_factory):
    """The phantom scan as OME-Zarr on disk: what workers read their blocks from."""
    return write_volume_ome_zarr(tmp_path_factory.mktemp("scan") / "scan.ome.zarr", phantom.volume,
                                 chunks_czyx=(1, 16, 64, 64))


@pytest.fixture(scope="module")
def xpression_run(phantom, targets, tmp_path_factory):
    run = tmp_path_factory.mktemp("xpr") / "run"
    cfg = make_config("xpression", **{**TINY_XPRESSION, "epochs": 1, "grid_step_um": (80.0, 80.0, 80.0)})
    return train_model(phantom.volume, targets, cfg, run, progress=False)


def _markers(out) -> dict[str, int]:
    """Done-markers and their modification times (ns)."""
    folder = out / DONE_DIR
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "runs.jsonl"}


def _executing(dask_worker) -> int:
    """Tasks a worker is running, including those the scheduler cancelled (they still finish)."""
    return dask_worker.state.executing_count


def _runs(out) -> list[dict]:
    path = out / DONE_DIR / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _serial(run, scan, out, chunks):
    torch.set_num_threads(TORCH_THREADS)
    predict_volume(run, read_volume(scan), out, chunks=chunks, progress=False)
    return out


def _assert_same_prediction(a, b):
    levels = [zarr.open_group(str(p), mode="r").attrs["multiscales"][0]["datasets"] for p in (a, b)]
    assert levels[0] == levels[1]
    for level in range(len(levels[0])):
        np.testing.assert_array_equal(np.asarray(read_ome_zarr(a, level)[0]), np.asarray(read_ome_zarr(b, level)[0]))


@pytest.mark.parametrize("preset", ["dense", "xpression"])
def test_two_workers_give_the_serial_result(preset, client, trained_run, xpression_run, scan_zarr, tmp_path):
    run = trained_run if preset == "dense" else xpression_run
    chunks = CHUNKS if preset == "dense" else (4, 6, 6)  # xpression: 4 × 18 × 18 cells
    ref = _serial(run, scan_zarr, tmp_path / "serial.ome.zarr", chunks)
    out = tmp_path / "dask.ome.zarr"
    stats = predict_volume_distributed(run, scan_zarr, out, scheduler=client, chunks=chunks,
                                       torch_threads=TORCH_THREADS, progress=False)
    assert stats["computed"] == stats["blocks"] > 4 and stats["skipped"] == stats["found_done"] == 0
    _assert_same_prediction(out, ref)
    (record,) = _runs(out)
    assert len(record["workers"]) == 2  # both worker processes ran blocks
    assert sorted(map(tuple, record["computed_blocks"])) == [i for i, _ in iter_blocks(stats["shape_czyx"][1:], chunks)]
    # Each worker process loaded this model once, however many blocks it ran.
    fingerprint = TrainedModel.load(run).fingerprint
    for counts in client.run(worker_build_counts).values():
        loads = [n for key, n in counts.items() if key.startswith("('model'") and fingerprint in key]
        assert loads == [1]


def test_a_worker_killed_mid_run_loses_no_finished_block(client, trained_run, scan_zarr, tmp_path):
    out = tmp_path / "killed_worker.ome.zarr"
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(predict_volume_distributed, trained_run, scan_zarr, out, scheduler=client,
                              chunks=CHUNKS, torch_threads=TORCH_THREADS, progress=False)
        deadline = time.monotonic() + 60
        while len(_markers(out)) < 4:
            assert not running.done(), f"prediction ended before the kill: {running.result()}"
            assert time.monotonic() < deadline, "no block finished in 60 s"
            time.sleep(0.005)
        os.kill(victim, signal.SIGKILL)
        done_at_kill = _markers(out)
        stats = running.result(timeout=240)
    assert 4 <= len(done_at_kill) < stats["blocks"], "the kill must land mid-run for this test to mean anything"
    after = _markers(out)
    assert len(after) == stats["blocks"]
    assert {k: after[k] for k in done_at_kill} == done_at_kill  # no finished block was written again
    (record,) = _runs(out)
    assert record["computed"] + record["found_done"] == record["blocks"] and record["skipped"] == 0
    assert victim not in client.run(os.getpid).values()  # the nanny replaced the killed process
    _assert_same_prediction(out, _serial(trained_run, scan_zarr, tmp_path / "serial.ome.zarr", CHUNKS))


def test_a_killed_client_is_resumed_on_the_same_cluster_computing_only_unfinished_blocks(
        client, trained_run, scan_zarr, tmp_path):
    out = tmp_path / "killed_client.ome.zarr"
    cmd = [sys.executable, "-m", "voxelome.cli", "predict", str(trained_run), "--volume", str(scan_zarr),
           "--out", str(out), "--chunks", ",".join(map(str, CHUNKS)), "--scheduler", client.scheduler.address,
           "--torch-threads", str(TORCH_THREADS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    try:
        while len(_markers(out)) < 4:
            assert proc.poll() is None, f"predict ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no block finished in 90 s"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The scheduler cancels the dead client's queued tasks; the running ones go on (a thread cannot be stopped)
    # and mark their blocks: wait until no worker executes anything, cancelled tasks included.
    deadline = time.monotonic() + 60
    while any(client.processing().values()) or any(client.run(_executing).values()):
        assert time.monotonic() < deadline, "the cluster did not settle after the client died"
        time.sleep(0.05)
    done_at_kill = _markers(out)
    all_blocks = {"_".join(map(str, i)) for i, _ in iter_blocks((16, 72, 72), CHUNKS)}
    assert 4 <= len(done_at_kill) < len(all_blocks), "the kill must land mid-run for this test to mean anything"
    assert not _runs(out)  # the killed run never finished

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    (record,) = _runs(out)
    computed = {"_".join(map(str, i)) for i in record["computed_blocks"]}
    assert computed == all_blocks - set(done_at_kill)  # every unfinished block, and only those
    assert record["skipped"] == len(done_at_kill) and record["found_done"] == 0
    after = _markers(out)
    assert set(after) == all_blocks and {k: after[k] for k in done_at_kill} == done_at_kill
    _assert_same_prediction(out, _serial(trained_run, scan_zarr, tmp_path / "serial.ome.zarr", CHUNKS))


def test_in_memory_scans_too_big_for_the_task_graph_are_refused(tmp_path):
    big = Volume.from_array(np.zeros((64, 256, 512), np.float32), 10.0)  # 32 MiB held in memory
    with pytest.raises(VoxelomeError, match="held in memory.*write_volume_ome_zarr"):
        volume_source(big)
    small = Volume.from_array(np.zeros((8, 16, 16), np.float32), 10.0)
    assert volume_source(small).open() is small
    on_disk = read_volume(write_volume_ome_zarr(tmp_path / "big.ome.zarr", big))
    assert volume_source(on_disk).open() is on_disk  # file-backed: only its path travels


def test_a_bad_scheduler_address_names_the_fix():
    with pytest.raises(VoxelomeError, match="'local' or a dask scheduler address"):
        with connect("my-cluster"):
            pass


def test_field_export_is_another_block_job_on_the_same_cluster(client, tmp_path):
    """The block job is generic: a neural-field volume export maps over the cluster unchanged."""
    from test_field_fit import GENES, synthetic_stack

    from voxelome.infer.distributed import write_field_volume_distributed
    from voxelome.infer.field_export import FittedField
    from voxelome.train.field_trainer import fit_field, make_field_config
    from voxelome.train.point_data import PointData

    data = PointData.from_anndata(synthetic_stack(), genes=GENES[:3])
    cfg = make_field_config("cpu", iterations=20, batch_size=256, n_levels=4, log2_table_size=10, seed=0,
                            num_threads=TORCH_THREADS)
    run = tmp_path / "field"
    fit_field(data, cfg, run, progress=False)
    torch.set_num_threads(TORCH_THREADS)
    ref = FittedField.load(run).write_volume(tmp_path / "serial.ome.zarr", 50.0, chunks=(4, 8, 8), progress=False)
    out = tmp_path / "dask.ome.zarr"
    stats = write_field_volume_distributed(run, out, 50.0, scheduler=client, chunks=(4, 8, 8),
                                           torch_threads=TORCH_THREADS, progress=False)
    assert stats["computed"] == stats["blocks"] == ref["blocks"] > 4
    _assert_same_prediction(out, tmp_path / "serial.ome.zarr")
    assert len(_runs(out)[0]["workers"]) == 2
    # an ensemble's run folder (two fields averaged, `reconstruct fit --ensemble`) exports the same way
    from voxelome.infer.field_ensemble import write_ensemble

    fit_field(data, make_field_config("cpu", **{**cfg.to_dict(), "seed": 1}), tmp_path / "ens" / "b", progress=False)
    shutil.copytree(run, tmp_path / "ens" / "a")
    write_ensemble(tmp_path / "ens", ["a", "b"], ["seed 0", "seed 1"], rule="test")
    FittedField.load(tmp_path / "ens").write_volume(tmp_path / "ens_serial.ome.zarr", 50.0, chunks=(4, 8, 8),
                                                    progress=False)
    write_field_volume_distributed(tmp_path / "ens", tmp_path / "ens_dask.ome.zarr", 50.0, scheduler=client,
                                   chunks=(4, 8, 8), torch_threads=TORCH_THREADS, progress=False)
    _assert_same_prediction(tmp_path / "ens_dask.ome.zarr", tmp_path / "ens_serial.ome.zarr")
    with pytest.raises(AssertionError):  # the ensemble is not its first member
        _assert_same_prediction(tmp_path / "ens_dask.ome.zarr", tmp_path / "serial.ome.zarr")
