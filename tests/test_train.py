"""Training: configs (errors, YAML), run folders, reloading, exact resume, input checks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_DENSE, TINY_XPRESSION
from voxelome.constants import CONFIG_SCHEMA_VERSION
from voxelome.errors import VoxelomeError
from voxelome.infer.predict import TrainedModel
from voxelome.train import make_config, targets_from_section, train_model
from voxelome.train.checkpoint import FORMAT, load_checkpoint
from voxelome.train.config import config_from_dict, config_to_yaml, load_config_file


# --- config ----------------------------------------------------------------------------
def test_unknown_config_key_suggests_the_right_one():
    with pytest.raises(VoxelomeError, match=r"'epoch'.*Did you mean 'epochs'\?"):
        make_config("dense", epoch=3)


def test_unknown_preset_suggests_the_right_one():
    with pytest.raises(VoxelomeError, match=r"Did you mean 'xpression'\?"):
        make_config("xpresion")


@pytest.mark.parametrize("overrides, pattern", [
    (dict(val_fraction=1.5), r"val_fraction=1\.5 must lie in \(0, 0\.9\)"),
    (dict(val_fraction=0.0), r"val_fraction=0\.0"),
    (dict(blend="gausian"), r"blend='gausian'.*Did you mean 'gaussian'\?"),
    (dict(model="dens"), r"Did you mean 'dense'\?"),
    (dict(epochs=0), r"epochs=0 must be ≥ 1"),
    (dict(lr=-1.0), r"lr=-1\.0 must be > 0"),
    (dict(output_stride=3), r"output_stride=3 must be 1, 2 or 4"),
    (dict(overlap=1.0), r"overlap=1\.0"),
])
def test_bad_config_values_are_named(overrides, pattern):
    with pytest.raises(VoxelomeError, match=pattern):
        make_config("dense", **overrides)


@pytest.mark.parametrize("preset, overrides", [
    ("dense", TINY_DENSE),
    ("dense", dict(input_spacing_um=None, blend="constant", seed=7)),
    ("xpression", TINY_XPRESSION),
])
def test_yaml_round_trip(tmp_path, preset, overrides):
    cfg = make_config(preset, **overrides)
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(cfg, {"data": {"names": ["a", "b"]}, "voxelome_version": "x"}))
    text = yaml.safe_load(path.read_text())
    assert list(text)[0] == "schema_version" and text["schema_version"] == CONFIG_SCHEMA_VERSION
    assert load_config_file(path) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_hand_written_yaml_subset_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: xpression\nepochs: 3\npatch_um: [30, 100, 100]\n")
    cfg = load_config_file(path)
    assert cfg == make_config("xpression", epochs=3, patch_um=(30, 100, 100))
    assert isinstance(cfg.patch_um, tuple)
    path.write_text("epoch: 3\n")
    with pytest.raises(VoxelomeError, match="Did you mean 'epochs'"):
        load_config_file(path)
    path.write_text("schema_version: 99\nepochs: 3\n")
    with pytest.raises(VoxelomeError, match="schema_version=99"):
        load_config_file(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(VoxelomeError, match="mapping"):
        load_config_file(path)


def test_dense_width_not_multiple_of_eight_is_usable_or_rejected_early(phantom, targets, tmp_path):
    try:
        cfg = make_config("dense", **{**TINY_DENSE, "epochs": 1, "steps_per_epoch": 1, "width": 12})
    except VoxelomeError as exc:  # rejected up front, naming the field: acceptable
        assert "width" in str(exc)
        return
    run = train_model(phantom.volume, targets, cfg, tmp_path / "run", progress=False)
    assert (run / "checkpoint.pt").is_file()


# --- run folders -----------------------------------------------------------------------
def _spot_values(run_dir, volume, targets):
    model = TrainedModel.load(run_dir)
    pred = model.spot_predictor()
    return pred.predict(pred.sampler(volume, targets), np.arange(len(targets.proportions)))


@pytest.mark.parametrize("preset, overrides", [("dense", TINY_DENSE), ("xpression", TINY_XPRESSION)])
def test_run_folder_is_self_describing_and_reloads_alone(phantom, targets, tmp_path, preset, overrides):
    cfg = make_config(preset, **overrides)
    run = train_model(phantom.volume, targets, cfg, tmp_path / "run", progress=False)
    for name in ("config.yaml", "checkpoint.pt", "last.pt", "history.json"):
        assert (run / name).is_file(), name

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["schema_version"] == CONFIG_SCHEMA_VERSION
    assert saved["data"]["names"] == targets.names
    assert load_config_file(run / "config.yaml") == cfg

    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(cfg.epochs))
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history)

    # The checkpoint is plain tensors and containers: torch's safe loader accepts it.
    payload = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == FORMAT
    assert payload["config"] == cfg.to_dict()
    assert payload["meta"]["names"] == targets.names
    assert payload["meta"]["spacing_um"] == list(phantom.volume.spacing_um)
    assert all(isinstance(v, torch.Tensor) for v in payload["model_state"].values())
    best = min(history, key=lambda h: h["val_loss"])
    assert payload["epoch"] == best["epoch"] and payload["val_loss"] == pytest.approx(best["val_loss"])
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == cfg.epochs - 1 and "optimizer_state" in last

    before = _spot_values(run, phantom.volume, targets)
    assert before.shape == (len(targets.proportions), targets.n_signatures)
    np.testing.assert_allclose(before.sum(1), 1.0, atol=1e-4)

    # Move the folder: the copy alone (original deleted) reloads and predicts the same values.
    moved = tmp_path / "elsewhere" / "copied_run"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    model = TrainedModel.load(moved)
    assert model.config == cfg and model.names == targets.names
    np.testing.assert_array_equal(_spot_values(moved, phantom.volume, targets), before)


def test_load_rejects_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(VoxelomeError, match="no checkpoint"):
        TrainedModel.load(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(VoxelomeError, match="corrupt"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(VoxelomeError, match="not a voxelome checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# --- resume ----------------------------------------------------------------------------
def _strip_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _assert_same_run(a, b):
    """Two run folders hold bit-identical models, optimiser states and histories."""
    la, lb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert la["epoch"] == lb["epoch"]
    assert la["model_state"].keys() == lb["model_state"].keys()
    for name, t in la["model_state"].items():
        assert torch.equal(t, lb["model_state"][name]), name
    for name, t in load_checkpoint(a / "checkpoint.pt")["model_state"].items():
        assert torch.equal(t, load_checkpoint(b / "checkpoint.pt")["model_state"][name]), name
    assert la["best_val"] == lb["best_val"] and la["bad_epochs"] == lb["bad_epochs"]
    h_a = json.loads((a / "history.json").read_text())
    assert _strip_seconds(json.loads((b / "history.json").read_text())) == _strip_seconds(h_a)
    return h_a


# Trains the conftest's tiny phantom/section in a separate process (same data: everything is seeded).
_TRAIN_SCRIPT = """
import sys
import conftest as c
from voxelome.register import place_section
from voxelome.train import make_config, targets_from_section, train_model
ph = c.make_lung_phantom("small", seed=c.PHANTOM_SEED, shape=c.PHANTOM_SHAPE)
pl = c.axial_placement(ph)
sec = place_section(ph.cut_section(pl, seed=0), pl, ph.volume)
sec.obsm["signatures"] = sec.obsm["signatures_true"].astype("float32")
cfg = make_config("dense", **{**c.TINY_DENSE, "epochs": int(sys.argv[2])})
t = targets_from_section(sec, ph.volume, val_fraction=cfg.val_fraction, block_um=cfg.split_block_um, seed=cfg.seed)
train_model(ph.volume, t, cfg, sys.argv[1], progress=False)
"""


def test_resume_after_a_kill_follows_the_uninterrupted_trajectory(phantom, targets, tmp_path):
    """SIGKILL a training process after its first epoch, resume in this process: same model, bit for bit."""
    n = 8
    cfg = make_config("dense", **{**TINY_DENSE, "epochs": n})  # the preset's own lr schedule
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, str(run), str(n)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 50
    try:
        while not (run / "last.pt").exists():
            assert proc.poll() is None, f"training ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no epoch finished in 50 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = load_checkpoint(run / "last.pt")["epoch"]
    assert killed_at < n - 1, "the kill must land mid-run for this test to mean anything"
    assert not (run / "history.json").exists()

    train_model(phantom.volume, targets, cfg, run, resume=True, progress=False)
    full = train_model(phantom.volume, targets, cfg, tmp_path / "full", progress=False)
    history = _assert_same_run(full, run)
    assert [h["epoch"] for h in history] == list(range(n))


def test_extending_a_constant_lr_run_follows_the_uninterrupted_trajectory(phantom, targets, tmp_path):
    n, k = 4, 2
    full_cfg = make_config("dense", **{**TINY_DENSE, "epochs": n, "lr_schedule": "constant"})
    full = train_model(phantom.volume, targets, full_cfg, tmp_path / "full", progress=False)

    part = train_model(phantom.volume, targets, dataclasses.replace(full_cfg, epochs=k), tmp_path / "part",
                       progress=False)
    assert load_checkpoint(part / "last.pt")["epoch"] == k - 1
    # Extend the same folder to n epochs: only `epochs` changes, which must be allowed.
    train_model(phantom.volume, targets, full_cfg, part, resume=True, progress=False)
    assert len(_assert_same_run(full, part)) == n
    assert load_config_file(part / "config.yaml") == full_cfg

    # Running again with the same config resumes past the end: nothing changes.
    before = load_checkpoint(part / "last.pt")["model_state"]
    train_model(phantom.volume, targets, full_cfg, part, resume=True, progress=False)
    after = load_checkpoint(part / "last.pt")["model_state"]
    assert all(torch.equal(t, after[name]) for name, t in before.items())
    assert len(json.loads((part / "history.json").read_text())) == n


def test_extending_a_cosine_run_is_exact_or_refused(phantom, targets, tmp_path):
    """The cosine schedule spans `epochs`: an extended run must match an uninterrupted one, or be refused."""
    n, k = 4, 2
    full_cfg = make_config("dense", **{**TINY_DENSE, "epochs": n, "lr_schedule": "cosine"})
    part = train_model(phantom.volume, targets, dataclasses.replace(full_cfg, epochs=k), tmp_path / "part",
                       progress=False)
    try:
        train_model(phantom.volume, targets, full_cfg, part, resume=True, progress=False)
    except VoxelomeError as exc:  # refusing, with a message that names the cause, is acceptable
        assert "epochs" in str(exc) and "lr_schedule" in str(exc)
        return
    full = train_model(phantom.volume, targets, full_cfg, tmp_path / "full", progress=False)
    _assert_same_run(full, part)


def test_resume_with_a_different_config_is_refused(phantom, targets, tmp_path):
    # (constant lr: this test is about the config check; the cosine schedule's resume is tested above)
    cfg = make_config("dense", **{**TINY_DENSE, "epochs": 1, "steps_per_epoch": 1, "lr_schedule": "constant"})
    run = train_model(phantom.volume, targets, cfg, tmp_path / "run", progress=False)
    other = dataclasses.replace(cfg, lr=cfg.lr * 2)
    with pytest.raises(VoxelomeError, match=r"different config.*'lr'.*no-resume"):
        train_model(phantom.volume, targets, other, run, resume=True, progress=False)
    # ... unless told to start over.
    train_model(phantom.volume, targets, other, run, resume=False, progress=False)
    assert load_checkpoint(run / "last.pt")["config"]["lr"] == other.lr


def test_no_resume_starts_over_from_scratch(phantom, targets, tmp_path):
    cfg = make_config("dense", **{**TINY_DENSE, "epochs": 2, "lr_schedule": "constant"})
    a = train_model(phantom.volume, targets, cfg, tmp_path / "a", progress=False)
    b = train_model(phantom.volume, targets, dataclasses.replace(cfg, epochs=1), tmp_path / "b", progress=False)
    train_model(phantom.volume, targets, cfg, b, resume=False, progress=False)
    sa, sb = load_checkpoint(a / "last.pt")["model_state"], load_checkpoint(b / "last.pt")["model_state"]
    assert all(torch.equal(t, sb[name]) for name, t in sa.items())


# --- inputs ----------------------------------------------------------------------------
def test_spots_outside_the_volume_are_refused(phantom, section, tiny_config):
    section.obsm["spatial_3d"] = np.asarray(section.obsm["spatial_3d"]).copy()
    section.obsm["spatial_3d"][3, 0] += 1e5
    with pytest.raises(VoxelomeError, match=r"1 of \d+ spots lie outside the volume.*units"):
        targets_from_section(section, phantom.volume, val_fraction=0.2, block_um=400.0, seed=0)


def test_section_without_signatures_names_the_fix(phantom, section):
    del section.obsm["signatures"]
    with pytest.raises(VoxelomeError, match=r"obsm\['signatures'\].*voxelome signatures"):
        targets_from_section(section, phantom.volume, val_fraction=0.2, block_um=400.0, seed=0)


def test_unplaced_section_names_the_fix(phantom, section):
    del section.obsm["spatial_3d"]
    with pytest.raises(VoxelomeError, match="place_section"):
        targets_from_section(section, phantom.volume, val_fraction=0.2, block_um=400.0, seed=0)


def test_bad_proportions_are_refused(phantom, section):
    section.obsm["signatures"] = np.asarray(section.obsm["signatures"]).copy()
    section.obsm["signatures"][0, 0] = np.nan
    with pytest.raises(VoxelomeError, match="NaN or negative"):
        targets_from_section(section, phantom.volume, val_fraction=0.2, block_um=400.0, seed=0)


def test_spatial_split_holds_out_whole_blocks(phantom, section):
    t = targets_from_section(section, phantom.volume, val_fraction=0.25, block_um=300.0, seed=4)
    held = ~t.train_mask
    assert 0.2 <= held.mean() <= 0.5
    rel = t.centres_xyz_um - t.centres_xyz_um[0]  # blocks are laid out on the plane from the first spot
    blocks = np.floor(np.column_stack([rel @ t.u, rel @ t.v]) / 300.0)
    for b in np.unique(blocks[held], axis=0):
        assert held[np.all(blocks == b, axis=1)].all()
    # same seed, same split; held_out column overrides the draw
    again = targets_from_section(section, phantom.volume, val_fraction=0.25, block_um=300.0, seed=4)
    np.testing.assert_array_equal(again.train_mask, t.train_mask)
    section.obs["held_out"] = np.arange(section.n_obs) % 5 == 0
    fixed = targets_from_section(section, phantom.volume, val_fraction=0.25, block_um=300.0, seed=4)
    np.testing.assert_array_equal(~fixed.train_mask, section.obs["held_out"].to_numpy())


def test_a_scan_too_large_for_memory_trains_from_lazy_crops_identically(phantom, targets, tmp_path, monkeypatch):
    """Above REGION_MEMORY_BYTES the region around the section is not loaded: crops are read from the scan as
    needed. They are the same crops (mirrored edges included), so the run is the same, bit for bit."""
    from voxelome.train import sampling

    centres = targets.centres_xyz_um
    eager, scaler = sampling.load_region(phantom.volume, centres, 200.0, None)
    with pytest.warns(UserWarning, match="reads its crops from the scan as needed"):
        lazy, lazy_scaler = sampling.load_region(phantom.volume, centres, 200.0, None, max_bytes=1024)
    assert lazy_scaler == scaler and lazy.scaler is not None and not isinstance(lazy.array, np.ndarray)
    for start, shape in (((0, 0, 0), (8, 16, 16)), (tuple(eager.start - 3), (10, 20, 20)),
                         (tuple(eager.start + np.asarray(eager.array.shape) - 5), (12, 12, 12))):
        np.testing.assert_array_equal(lazy.crop(start, shape), eager.crop(start, shape))
    cfg = make_config("dense", **{**TINY_DENSE, "epochs": 2})
    full = train_model(phantom.volume, targets, cfg, tmp_path / "eager", progress=False)
    monkeypatch.setattr(sampling, "REGION_MEMORY_BYTES", 1024)
    with pytest.warns(UserWarning, match="reads its crops from the scan as needed"):
        train_model(phantom.volume, targets, cfg, tmp_path / "lazy", progress=False)
    _assert_same_run(full, tmp_path / "lazy")
