"""The embedded lung phantom: deterministic, valid truth, a section with ground truth at its spots."""

import numpy as np
import pytest

from voxelome.datasets import axial_placement, make_lung_phantom, oblique_placement
from voxelome.errors import VoxelomeError
from voxelome.register.sampling import sample_footprints


@pytest.fixture(scope="module")
def phantom():
    return make_lung_phantom("small", seed=3)


def test_deterministic_by_seed(phantom):
    again = make_lung_phantom("small", seed=3)
    np.testing.assert_array_equal(np.asarray(again.volume.data), np.asarray(phantom.volume.data))
    np.testing.assert_array_equal(again.truth, phantom.truth)
    other = make_lung_phantom("small", seed=4)
    assert not np.array_equal(np.asarray(other.volume.data), np.asarray(phantom.volume.data))


def test_truth_is_a_distribution_on_tissue_and_every_signature_dominates_somewhere(phantom):
    truth, tissue = phantom.truth, phantom.tissue
    assert truth.shape[0] >= 5 and truth.shape[1:] == phantom.volume.shape
    assert truth.min() >= 0
    np.testing.assert_allclose(truth[:, tissue].sum(0), 1.0, atol=1e-4)
    dominant = truth[:, tissue].argmax(0)
    counts = np.bincount(dominant, minlength=truth.shape[0]) / dominant.size
    assert np.all(counts > 0.005), dict(zip(phantom.signature_names, counts.round(3)))


def test_section_counts_and_spot_truth(phantom):
    placement = axial_placement(phantom)
    section = phantom.cut_section(placement, seed=0)
    assert section.n_obs >= 150 and section.n_vars >= 200
    counts = section.X.toarray() if hasattr(section.X, "toarray") else np.asarray(section.X)
    assert counts.min() >= 0 and np.all(counts == np.round(counts)) and counts.sum() > 0
    # the stored per-spot truth is the footprint mean of the 3D truth
    u, v, n = placement.frame
    spots = np.asarray(section.obsm["spatial_3d"])[:40]
    direct = np.stack([sample_footprints(phantom.truth_volume(c), spots, u, v, 55.0, 5.0) for c in range(6)], 1)
    direct = direct / direct.sum(1, keepdims=True)  # spots at the organ edge are renormalised over tissue
    np.testing.assert_allclose(np.asarray(section.obsm["signatures_true"])[:40], direct, atol=0.05)
    np.testing.assert_allclose(np.asarray(section.obsm["signatures_true"]).sum(1), 1.0, atol=1e-3)


def test_default_section_has_1000_spots():
    ph = make_lung_phantom(seed=0)
    section = ph.cut_section(axial_placement(ph))
    assert section.n_obs >= 1000 and section.n_vars >= 200


def test_oblique_section_spans_depth(phantom):
    section = phantom.cut_section(oblique_placement(phantom, tilt_deg=10.0, seed=1), seed=1)
    z = np.asarray(section.obsm["spatial_3d"])[:, 2]
    assert np.ptp(z) > 100.0


@pytest.mark.parametrize("bad", [dict(spacing_um=-1.0), dict(n_signatures=3), dict(shape=(4, 8, 8))])
def test_bad_config_is_rejected_with_the_parameter_named(bad):
    with pytest.raises(VoxelomeError, match=next(iter(bad))):
        make_lung_phantom("small", **bad)
