"""Section placement: the three constructors, their error messages, and place_section's checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from voxelome.errors import VoxelomeError
from voxelome.io.volume import Volume
from voxelome.register import SectionPlacement, place_section

# A known, non-trivial affine: 2.5 µm/px, image axes rotated and tilted in the volume, pixel (0, 0)
# at (100, 200, 300) µm. Columns: µm per pixel along image x, along image y, origin.
_ROT = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
KNOWN = np.column_stack([2.5 * _ROT[:, 0], 2.5 * _ROT[:, 1], [100.0, 200.0, 300.0]])
PIXELS = np.array([[0.0, 0.0], [400.0, 30.0], [50.0, 380.0], [420.0, 410.0]])


def _volume(shape=(32, 64, 64), spacing=10.0):
    return Volume.from_array(np.zeros(shape, np.float32), spacing)


# --- from_landmarks --------------------------------------------------------------------
def test_landmarks_recover_known_affine_exactly():
    world = PIXELS @ KNOWN[:, :2].T + KNOWN[:, 2]
    p = SectionPlacement.from_landmarks(PIXELS, world)
    np.testing.assert_allclose(p.matrix, KNOWN, atol=1e-9)
    assert p.residual_um == pytest.approx(0.0, abs=1e-9)
    assert p.pixel_size_um == pytest.approx(2.5)
    np.testing.assert_allclose(p.map(PIXELS), world, atol=1e-9)


def test_landmarks_with_noise_report_residual():
    rng = np.random.default_rng(0)
    px = rng.uniform(0, 500, (12, 2))
    world = px @ KNOWN[:, :2].T + KNOWN[:, 2]
    noise = rng.normal(0, 2.0, world.shape)
    p = SectionPlacement.from_landmarks(px, world + noise)
    # Least squares: the residual is below the noise (it absorbs 9 parameters) but clearly non-zero.
    assert 0.5 < p.residual_um < np.sqrt(np.mean(np.sum(noise**2, 1)))
    rms = np.sqrt(np.mean(np.sum((p.map(px) - (world + noise)) ** 2, axis=1)))
    assert p.residual_um == pytest.approx(rms, rel=1e-9)
    # ... and the fit is close to the true map over the landmarks' extent (within the noise).
    np.testing.assert_allclose(p.map(px), world, atol=4.0)
    np.testing.assert_allclose(p.matrix[:, :2], KNOWN[:, :2], atol=0.05)


def test_collinear_landmarks_are_rejected():
    # Four section pixels on one line cannot fix the plane: the fit is underdetermined.
    px = np.array([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
    world = px @ KNOWN[:, :2].T + KNOWN[:, 2]
    with pytest.raises(VoxelomeError, match="collinear"):
        SectionPlacement.from_landmarks(px, world)


def test_identical_landmarks_are_rejected():
    px = np.array([[5.0, 5.0]] * 3)
    with pytest.raises(VoxelomeError, match="collinear"):
        SectionPlacement.from_landmarks(px, np.zeros((3, 3)))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_fewer_than_three_landmarks_are_rejected(n):
    with pytest.raises(VoxelomeError, match="at least 3"):
        SectionPlacement.from_landmarks(PIXELS[:n], (PIXELS[:n] @ KNOWN[:, :2].T) + KNOWN[:, 2])


def test_landmark_shapes_and_nan_are_rejected():
    world = PIXELS @ KNOWN[:, :2].T + KNOWN[:, 2]
    with pytest.raises(VoxelomeError, match=r"\(n, 2\).*\(n, 3\)"):
        SectionPlacement.from_landmarks(PIXELS, world[:3])
    with pytest.raises(VoxelomeError, match=r"\(n, 2\).*\(n, 3\)"):
        SectionPlacement.from_landmarks(world, world)
    bad = world.copy()
    bad[1, 2] = np.nan
    with pytest.raises(VoxelomeError, match="NaN"):
        SectionPlacement.from_landmarks(PIXELS, bad)


# --- from_slice / from_origin_normal ---------------------------------------------------
def test_from_slice_maps_pixels_onto_the_axial_plane():
    vol = Volume.from_array(np.zeros((20, 30, 40), np.float32), (4.0, 2.0, 2.0), origin_um=(10.0, 0.0, 0.0))
    p = SectionPlacement.from_slice(vol, 7, pixel_size_um=0.5, offset_um=(3.0, 4.0))
    xyz = p.map([[0.0, 0.0], [10.0, 20.0]])
    np.testing.assert_allclose(xyz, [[3.0, 4.0, 10.0 + 7 * 4.0], [8.0, 14.0, 38.0]])
    u, v, n = p.frame
    np.testing.assert_allclose(np.stack([u, v, n]), np.eye(3), atol=1e-12)


@pytest.mark.parametrize("z", [-1, -0.01, 32, 40.5])
def test_from_slice_outside_volume_names_valid_range(z):
    with pytest.raises(VoxelomeError, match=r"valid: 0 … 31"):
        SectionPlacement.from_slice(_volume(), z, pixel_size_um=1.0)


def test_from_slice_rejects_bad_pixel_size():
    with pytest.raises(VoxelomeError, match="pixel_size_um"):
        SectionPlacement.from_slice(_volume(), 3, pixel_size_um=0.0)


@pytest.mark.parametrize("normal", [(0, 0, 1), (1, 0, 0), (0.3, -0.2, 0.9), (-2.0, 5.0, 0.5), (0.95, 0.1, 0.05)])
@pytest.mark.parametrize("rotation", [0.0, 33.0])
def test_origin_normal_frame_is_orthonormal_right_handed(normal, rotation):
    p = SectionPlacement.from_origin_normal((10.0, 20.0, 30.0), normal, pixel_size_um=2.0,
                                            in_plane_rotation_deg=rotation)
    u, v, n = p.frame
    frame = np.stack([u, v, n])
    np.testing.assert_allclose(frame @ frame.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(frame) == pytest.approx(1.0)
    np.testing.assert_allclose(n, np.asarray(normal, float) / np.linalg.norm(normal), atol=1e-12)
    np.testing.assert_allclose(p.map([[0.0, 0.0]])[0], (10.0, 20.0, 30.0))
    assert p.pixel_size_um == pytest.approx(2.0)
    # Pixels stay on the plane: displacement ⟂ normal, and 1 px = 2 µm along both image axes.
    d = p.map([[7.0, -3.0]])[0] - (10.0, 20.0, 30.0)
    assert abs(d @ n) < 1e-9
    assert np.linalg.norm(d) == pytest.approx(2.0 * np.hypot(7, 3))


def test_in_plane_rotation_rotates_image_axes_about_the_normal():
    a = SectionPlacement.from_origin_normal((0, 0, 0), (0, 0, 1), 1.0)
    b = SectionPlacement.from_origin_normal((0, 0, 0), (0, 0, 1), 1.0, in_plane_rotation_deg=90.0)
    np.testing.assert_allclose(b.frame[0], a.frame[1], atol=1e-12)
    np.testing.assert_allclose(b.frame[1], -a.frame[0], atol=1e-12)


@pytest.mark.parametrize("normal", [(0, 0, 0), (1, 0), (np.nan, 0, 1)])
def test_origin_normal_rejects_bad_normal(normal):
    with pytest.raises(VoxelomeError, match="normal"):
        SectionPlacement.from_origin_normal((0, 0, 0), normal, 1.0)


def test_placement_dict_round_trip():
    p = SectionPlacement(KNOWN, residual_um=1.25)
    q = SectionPlacement.from_dict(p.to_dict())
    np.testing.assert_array_equal(q.matrix, p.matrix)
    assert q.residual_um == 1.25
    with pytest.raises(VoxelomeError, match=r"\(3, 3\)"):
        SectionPlacement.from_dict({"matrix": [[1, 0], [0, 1]]})


# --- place_section ---------------------------------------------------------------------
def test_place_section_writes_spatial_3d(raw_section, phantom, placement):
    sec = raw_section.copy()
    del sec.obsm["spatial_3d"]
    del sec.uns["voxelome"]["plane"]
    out = place_section(sec, placement, phantom.volume)
    assert out is sec
    expected = sec.obsm["spatial"] @ placement.matrix[:, :2].T + placement.matrix[:, 2]
    np.testing.assert_allclose(out.obsm["spatial_3d"], expected)
    z_um = phantom.volume.shape[0] // 2 * phantom.volume.spacing_um[0]
    np.testing.assert_allclose(out.obsm["spatial_3d"][:, 2], z_um)
    assert SectionPlacement.from_dict(out.uns["voxelome"]["plane"]).matrix.tolist() == placement.matrix.tolist()
    assert phantom.volume.contains(out.obsm["spatial_3d"]).all()


def test_place_section_copy_leaves_input_untouched(raw_section, phantom, placement):
    sec = raw_section.copy()
    del sec.obsm["spatial_3d"]
    out = place_section(sec, placement, phantom.volume, copy=True)
    assert "spatial_3d" in out.obsm and "spatial_3d" not in sec.obsm


def _shifted(placement, dx_um=0.0, dz_um=0.0):
    m = placement.matrix.copy()
    m[0, 2] += dx_um
    m[2, 2] += dz_um
    return SectionPlacement(m)


def test_place_section_rejects_many_spots_outside(raw_section, phantom, placement):
    # Shifting the section by a quarter of the volume's width pushes far more than 5 % of spots out.
    shift = phantom.volume.extent_um[2] / 4
    with pytest.raises(VoxelomeError, match="fall outside the volume"):
        place_section(raw_section.copy(), _shifted(placement, dx_um=shift), phantom.volume)


def test_place_section_drops_a_few_spots_outside_with_warning(raw_section, phantom, placement):
    sec = raw_section.copy()
    n = sec.n_obs
    sec.obsm["spatial"] = sec.obsm["spatial"].copy()
    sec.obsm["spatial"][:2] += 1e5  # two spots far outside: < 5 %
    with pytest.warns(UserWarning, match="2 of"):
        out = place_section(sec, placement, phantom.volume)
    assert out.n_obs == n - 2
    assert phantom.volume.contains(out.obsm["spatial_3d"]).all()


def test_place_section_plane_missing_volume(raw_section, phantom, placement):
    with pytest.raises(VoxelomeError, match="misses the volume"):
        place_section(raw_section.copy(), _shifted(placement, dz_um=5000.0), phantom.volume)


def test_place_section_pixel_size_mismatch(raw_section, phantom):
    # The section says 1 µm/px; a placement built for 0.5 µm/px means the units do not fit.
    wrong = SectionPlacement.from_slice(phantom.volume, 10, pixel_size_um=0.5)
    with pytest.raises(VoxelomeError, match="units do not fit"):
        place_section(raw_section.copy(), wrong, phantom.volume)


def test_place_section_accepts_a_registered_scale_but_not_other_units(raw_section, phantom):
    px = raw_section.uns["voxelome"]["pixel_size_um"]
    for scale in (0.8, 1.2):  # tissue shrinkage/expansion within register plane's search range
        placed = place_section(raw_section.copy(), SectionPlacement.from_slice(phantom.volume, 10, px * scale))
        assert placed.uns["voxelome"]["plane"]["matrix"][0][0] == pytest.approx(px * scale)
    for scale in (0.7, 1.45, 1000.0):  # other units (hires vs full-resolution pixels, mm vs µm)
        with pytest.raises(VoxelomeError, match="units do not fit"):
            place_section(raw_section.copy(), SectionPlacement.from_slice(phantom.volume, 10, px * scale))


def test_place_section_needs_spatial(raw_section, placement):
    sec = raw_section.copy()
    del sec.obsm["spatial"]
    with pytest.raises(VoxelomeError, match="obsm\\['spatial'\\]"):
        place_section(sec, placement)


def test_place_section_without_volume_does_not_check(raw_section, placement):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = place_section(raw_section.copy(), _shifted(placement, dz_um=5000.0))
    assert out.obsm["spatial_3d"][:, 2].min() > 5000.0
