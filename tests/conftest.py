"""Shared fixtures: a tiny seeded lung phantom, a section placed on it, tiny configs and one trained run.

Everything here is session-scoped and built once (the phantom takes < 0.5 s, the tiny dense run
~2 s on 2 CPU cores). Fixtures that tests might mutate are handed out as copies.
"""

from __future__ import annotations

import os

# Must be set before torch loads its OpenMP runtime. With the default busy-waiting policy, 2 torch
# threads on a machine where another process holds a core run 10-100x slower (measured: a tiny
# whole-volume prediction 0.7 s → 68 s); PASSIVE makes idle threads sleep instead of spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "2")  # inherited by the CLI subprocesses
os.environ.setdefault("MKL_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# The suite budget assumes 2 CPU cores.
torch.set_num_threads(2)

from voxelome.datasets import axial_placement, make_lung_phantom  # noqa: E402
from voxelome.register import place_section  # noqa: E402
from voxelome.train import make_config, targets_from_section, train_model  # noqa: E402

#: Tiny phantom: 32 × 144 × 144 voxels of 10 µm; its axial mid-plane section holds ~190 spots.
PHANTOM_SEED = 0
PHANTOM_SHAPE = (32, 144, 144)
#: Overrides of the dense preset that make a training step take a few tens of ms.
TINY_DENSE = dict(epochs=2, steps_per_epoch=2, batch_size=2, width=8, window_um=(320.0, 320.0, 320.0),
                  crop_um=(160.0, 480.0, 480.0))
#: Overrides of the xpression preset: 3 × 11 × 11-voxel patches instead of the paper's 21 × 128 × 128.
TINY_XPRESSION = dict(epochs=2, steps_per_epoch=2, batch_size=4, patch_um=(30.0, 100.0, 100.0))


@pytest.fixture(scope="session")
def phantom():
    return make_lung_phantom("small", seed=PHANTOM_SEED, shape=PHANTOM_SHAPE)


@pytest.fixture(scope="session")
def placement(phantom):
    return axial_placement(phantom)


@pytest.fixture(scope="session")
def _placed_section(phantom, placement):
    sec = phantom.cut_section(placement, seed=0)
    sec = place_section(sec, placement, phantom.volume)
    sec.obsm["signatures"] = np.asarray(sec.obsm["signatures_true"], dtype=np.float32)
    assert sec.n_obs >= 150, "the tiny phantom must still give a useful section"
    return sec


@pytest.fixture
def section(_placed_section):
    """A placed section with ``obsm['signatures'] = obsm['signatures_true']`` (a fresh copy per test)."""
    return _placed_section.copy()


@pytest.fixture(scope="session")
def raw_section(phantom, placement):
    """The simulated section as cut (counts, pixels, truth), not yet placed by voxelome.register."""
    return phantom.cut_section(placement, seed=0)


@pytest.fixture(scope="session")
def tiny_config():
    return make_config("dense", **TINY_DENSE)


@pytest.fixture(scope="session")
def targets(phantom, _placed_section, tiny_config):
    return targets_from_section(_placed_section, phantom.volume, val_fraction=tiny_config.val_fraction,
                                block_um=tiny_config.split_block_um, seed=tiny_config.seed)


@pytest.fixture(scope="session")
def trained_run(phantom, targets, tiny_config, tmp_path_factory):
    """A tiny trained dense run folder. Read-only for tests: copy it before changing anything."""
    run = tmp_path_factory.mktemp("dense_run") / "run"
    train_model(phantom.volume, targets, tiny_config, run, progress=False)
    return run


@pytest.fixture(scope="session")
def volume_file(phantom, tmp_path_factory):
    """The phantom scan as an ``.npz`` with its voxel size (what the CLI reads)."""
    path = tmp_path_factory.mktemp("volume") / "phantom.npz"
    np.savez(path, data=np.asarray(phantom.volume.data), spacing_um=np.asarray(phantom.volume.spacing_um))
    return path
