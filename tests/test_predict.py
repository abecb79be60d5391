"""Whole-volume prediction: OME-Zarr layout, resume after a SIGKILL, job identity, gene maps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from conftest import TINY_DENSE
from voxelome.errors import VoxelomeError
from voxelome.genes import write_gene_volume
from voxelome.infer.blocks import DONE_DIR, iter_blocks
from voxelome.infer.predict import TrainedModel, predict_volume
from voxelome.io import read_volume
from voxelome.io.omezarr import read_ome_zarr
from voxelome.io.volume import Volume
from voxelome.signatures import SignatureConfig, fit_signatures
from voxelome.train import make_config, train_model
from ngff import assert_ngff_image


def _markers(out):
    folder = out / DONE_DIR
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if p.name != "runs.jsonl" and not p.name.startswith(".")}


def _runs(out):
    return [json.loads(line) for line in (out / DONE_DIR / "runs.jsonl").read_text().splitlines() if line.strip()]


def test_prediction_is_ngff_with_micrometre_scale(trained_run, phantom, tmp_path):
    model = TrainedModel.load(trained_run)
    out = tmp_path / "pred.ome.zarr"
    stats = predict_volume(model, phantom.volume, out, chunks=(8, 16, 16), progress=False)
    shape, spacing, origin = model.output_geometry(phantom.volume)
    k = len(model.names)
    # stride 2 of 10 µm voxels: a 32 × 144 × 144 scan gives 16 × 72 × 72 outputs of 20 µm
    assert shape == (16, 72, 72) and spacing == (20.0, 20.0, 20.0)
    assert stats["shape_czyx"] == [k, *shape] and stats["computed"] == stats["blocks"] == 2 * 5 * 5

    data, read_spacing, names = read_ome_zarr(out)
    assert_ngff_image(out, "czyx")  # as napari-ome-zarr / spatialdata read it
    assert data.shape == (k, *shape)
    assert read_spacing == spacing and names == model.names
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    ms = attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert all(a["unit"] == "micrometer" for a in ms["axes"][1:])
    t0 = {t["type"]: t for t in ms["datasets"][0]["coordinateTransformations"]}
    assert t0["scale"]["scale"] == [1.0, *spacing]
    assert t0["translation"]["translation"] == [0.0, *origin]
    # a pyramid: level 1 halves y and x (z = 16 is below 2 × min_size and stays)
    assert [d["path"] for d in ms["datasets"]] == ["0", "1"]
    level1, spacing1, _ = read_ome_zarr(out, level=1)
    assert level1.shape == (k, 16, 36, 36) and spacing1 == (20.0, 40.0, 40.0)
    assert attrs["voxelome"]["model"] == model.fingerprint

    values = np.asarray(data)
    assert np.isfinite(values).all() and values.min() >= 0
    np.testing.assert_allclose(values.sum(0), 1.0, atol=1e-4)  # proportions on the simplex
    assert values.std(axis=(1, 2, 3)).max() > 1e-4  # not a constant map
    np.testing.assert_allclose(np.asarray(level1), values.reshape(k, 16, 36, 2, 36, 2).mean((3, 5)), atol=1e-6)

    # Predicting again is a no-op resume.
    again = predict_volume(model, phantom.volume, out, chunks=(8, 16, 16), progress=False)
    assert again["computed"] == 0 and again["skipped"] == again["blocks"]
    np.testing.assert_array_equal(np.asarray(read_ome_zarr(out)[0]), values)


def _predict_cmd(run, volume_file, out):
    return [sys.executable, "-m", "voxelome.cli", "predict", str(run), "--volume", str(volume_file),
            "--out", str(out), "--chunks", "8,8,8"]


def test_resume_after_sigkill_recomputes_only_unfinished_blocks(trained_run, volume_file, tmp_path):
    out = tmp_path / "killed.ome.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(_predict_cmd(trained_run, volume_file, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 50
    try:
        while len(_markers(out)) < 2:
            assert proc.poll() is None, f"predict ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no chunk finished in 50 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = _markers(out)  # the process is dead: this is the state it left

    model = TrainedModel.load(trained_run)
    volume = read_volume(volume_file)
    shape, _, _ = model.output_geometry(volume)
    all_blocks = {"_".join(map(str, idx)) for idx, _ in iter_blocks(shape, (8, 8, 8))}
    assert len(all_blocks) == 2 * 9 * 9
    assert 2 <= len(done_at_kill) < len(all_blocks), "the kill must land mid-run for this test to mean anything"
    assert not (out / DONE_DIR / "runs.jsonl").exists()  # the killed run never finished

    second = subprocess.run(_predict_cmd(trained_run, volume_file, out), capture_output=True, text=True, env=env,
                            timeout=600)  # generous: a loaded CI box is slow, not wrong
    assert second.returncode == 0, second.stderr
    (record,) = _runs(out)
    computed = {"_".join(map(str, idx)) for idx in record["computed_blocks"]}
    assert computed == all_blocks - done_at_kill  # no finished chunk was recomputed, every other one was
    assert record["skipped"] == len(done_at_kill) and record["blocks"] == len(all_blocks)
    assert _markers(out) == all_blocks

    # The result equals an uninterrupted run (in this process, same torch thread count) bit for bit.
    ref = tmp_path / "uninterrupted.ome.zarr"
    predict_volume(model, volume, ref, chunks=(8, 8, 8), progress=False)
    for level in (0, 1):
        np.testing.assert_array_equal(np.asarray(read_ome_zarr(out, level)[0]), np.asarray(read_ome_zarr(ref, level)[0]))


@pytest.fixture(scope="module")
def other_run(phantom, targets, tmp_path_factory):
    """A second tiny model (another seed): different weights, same geometry."""
    run = tmp_path_factory.mktemp("other") / "run"
    train_model(phantom.volume, targets, make_config("dense", **{**TINY_DENSE, "seed": 1, "epochs": 1}), run,
                progress=False)
    return run


def test_another_model_cannot_resume_an_existing_output(trained_run, other_run, phantom, tmp_path):
    out = tmp_path / "pred.ome.zarr"
    predict_volume(trained_run, phantom.volume, out, chunks=(8, 24, 24), progress=False)
    first = np.asarray(read_ome_zarr(out)[0])
    with pytest.raises(VoxelomeError, match="another model or volume.*overwrite"):
        predict_volume(other_run, phantom.volume, out, chunks=(8, 24, 24), progress=False)
    np.testing.assert_array_equal(np.asarray(read_ome_zarr(out)[0]), first)  # refused without touching it

    stats = predict_volume(other_run, phantom.volume, out, chunks=(8, 24, 24), overwrite=True, progress=False)
    assert stats["computed"] == stats["blocks"]
    fresh = tmp_path / "fresh.ome.zarr"
    predict_volume(other_run, phantom.volume, fresh, chunks=(8, 24, 24), progress=False)
    replaced = np.asarray(read_ome_zarr(out)[0])
    np.testing.assert_array_equal(replaced, np.asarray(read_ome_zarr(fresh)[0]))
    assert not np.array_equal(replaced, first)
    assert len(_runs(out)) == 1  # the old audit trail went with the old output


def test_another_volume_cannot_resume_an_existing_output(trained_run, phantom, tmp_path):
    out = tmp_path / "pred.ome.zarr"
    predict_volume(trained_run, phantom.volume, out, chunks=(8, 24, 24), progress=False)
    flipped = Volume.from_array(np.asarray(phantom.volume.data)[:, ::-1].copy(), phantom.volume.spacing_um,
                                name="another scan")
    with pytest.raises(VoxelomeError, match="another model or volume"):
        predict_volume(trained_run, flipped, out, chunks=(8, 24, 24), progress=False)


def test_volume_with_another_spacing_is_refused(trained_run, phantom, tmp_path):
    coarse = Volume.from_array(np.asarray(phantom.volume.data), 12.0)
    with pytest.raises(VoxelomeError, match=r"spacing .* differs from the training scan's.*resample"):
        predict_volume(trained_run, coarse, tmp_path / "p.ome.zarr", progress=False)
    assert not (tmp_path / "p.ome.zarr").exists()


def test_gene_maps_equal_signature_loadings_applied_to_proportions(trained_run, phantom, raw_section, tmp_path):
    pred_path = tmp_path / "pred.ome.zarr"
    predict_volume(trained_run, phantom.volume, pred_path, chunks=(8, 24, 24), progress=False)
    sig = fit_signatures(raw_section, SignatureConfig(n_signatures=6, n_genes=60, seed=0, max_iter=100))
    props, spacing, _ = read_ome_zarr(pred_path)
    expected = sig.to_genes(np.asarray(props)).astype(np.float32)

    out = write_gene_volume(pred_path, sig, tmp_path / "genes.ome.zarr", progress=False)
    genes, gene_spacing, names = read_ome_zarr(out)
    assert names == list(sig.genes) and gene_spacing == spacing
    assert genes.shape == (len(sig.genes), *props.shape[1:])
    np.testing.assert_allclose(np.asarray(genes), expected, rtol=1e-5, atol=1e-6)
    pred_t = zarr.open_group(str(pred_path), mode="r").attrs["multiscales"][0]["datasets"][0]
    gene_t = zarr.open_group(str(out), mode="r").attrs["multiscales"][0]["datasets"][0]
    assert gene_t["coordinateTransformations"] == pred_t["coordinateTransformations"]

    chosen = [sig.genes[3], sig.genes[0]]
    sub = write_gene_volume(pred_path, sig, tmp_path / "two.ome.zarr", genes=chosen, progress=False)
    data, _, names = read_ome_zarr(sub)
    assert names == chosen
    np.testing.assert_allclose(np.asarray(data), expected[[3, 0]], rtol=1e-5, atol=1e-6)
    with pytest.raises(VoxelomeError, match="not signature genes"):
        write_gene_volume(pred_path, sig, tmp_path / "bad.ome.zarr", genes=["NOT_A_GENE"], progress=False)
