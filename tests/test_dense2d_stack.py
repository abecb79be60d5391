"""A registered RGB stack (OME-Zarr (3, z, y, x)) → 3D expression volume (c, z, y, x): API and CLI
(`voxelome dense2d predict RUN --stack …`), µm frame kept, each slice equal to the 2D map of that section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dense2d_train import PX_UM, TINY, synthetic_section
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.cli_dense2d import run_predict_stack
from voxelome.errors import VoxelomeError
from voxelome.infer.slide import RGBStack
from voxelome.io.omezarr import read_ome_zarr, write_volume_ome_zarr
from voxelome.io.volumes import read_volume
from voxelome.train.dense2d_config import make_dense2d_config
from voxelome.train.dense2d_data import slide_from_section
from voxelome.train.dense2d_trainer import TrainedDense2D, train_dense2d
from ngff import assert_ngff_image

ORIGIN = (32.0, -120.0, -84.0)


def _stack_store(path, px_um, n=3, size=112):
    """Synthetic H&E sections (downsampled to ``px_um``) as an RGB OME-Zarr stack, 50 µm apart."""
    f = int(round(px_um / PX_UM))
    secs = [synthetic_section(10 + k, size * f)[0][::f, ::f] for k in range(n)]
    data = np.ascontiguousarray(np.stack(secs).transpose(3, 0, 1, 2))
    write_volume_ome_zarr(path, data, spacing_um_zyx=(50.0, px_um, px_um), origin_um_zyx=ORIGIN,
                          channel_names=["R", "G", "B"])
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    img, adata, values, _ = synthetic_section(1)
    slide = slide_from_section(img, adata, values, input_um=PX_UM, name="s1")
    cfg = make_dense2d_config("dense2d", **{**TINY, "epochs": 1, "steps_per_epoch": 2})
    d = tmp_path_factory.mktemp("stack") / "run"
    train_dense2d([slide], cfg, d, ["TUM", "STR", "GRAD"])
    return d


def test_rgb_stack_resamples_sections_in_the_same_micrometre_frame(tmp_path):
    data = np.full((3, 2, 30, 40), 255, np.uint8)
    data[:, :, 10:20, 5:15] = 40  # a dark square at rows 10–19, columns 5–14 (8 µm voxels)
    write_volume_ome_zarr(tmp_path / "s.ome.zarr", data, spacing_um_zyx=(50.0, 8.0, 8.0), origin_um_zyx=ORIGIN,
                          channel_names=["R", "G", "B"])
    st = RGBStack(tmp_path / "s.ome.zarr", pixel_size_um=4.0)
    assert st.shape == (2, 60, 80, 3) and st.pixel_size_um == 4.0 and st.section_spacing_um == 50.0
    sec = st[1]
    assert sec.shape == (60, 80, 3) and sec.dtype == np.uint8
    rows = np.flatnonzero((sec[..., 0] < 128).any(1))
    cols = np.flatnonzero((sec[..., 0] < 128).any(0))
    # edges of the square in µm: stored voxel i spans origin + (i − ½)·8 … ; working pixel j spans origin' + (j − ½)·4
    want_y, want_x = ORIGIN[1] + (10 - 0.5) * 8, ORIGIN[2] + (5 - 0.5) * 8
    got_y = st.origin_um_zyx[1] + (rows[0] - 0.5) * 4
    got_x = st.origin_um_zyx[2] + (cols[0] - 0.5) * 4
    assert abs(got_y - want_y) <= 4 and abs(got_x - want_x) <= 4
    assert abs((rows[-1] - rows[0] + 1) * 4 - 80) <= 8 and abs((cols[-1] - cols[0] + 1) * 4 - 80) <= 8
    with pytest.raises(VoxelomeError, match="not one of the 2 sections"):
        st[5]
    write_volume_ome_zarr(tmp_path / "grey.ome.zarr", data[:1], spacing_um_zyx=(50.0, 8.0, 8.0))
    with pytest.raises(VoxelomeError, match="RGB stack"):
        RGBStack(tmp_path / "grey.ome.zarr")


def test_cli_maps_a_registered_stack_into_a_volume_equal_to_the_per_section_maps(run, tmp_path):
    store = _stack_store(tmp_path / "stack.ome.zarr", PX_UM)
    r = CliRunner().invoke(app, ["dense2d", "predict", str(run), "--stack", str(store), "--out",
                                 str(tmp_path / "vol.ome.zarr"), "--genes", "GRAD,TUM"])
    assert r.exit_code == 0, r.output
    data, spacing, names = read_ome_zarr(tmp_path / "vol.ome.zarr")
    assert_ngff_image(tmp_path / "vol.ome.zarr", "czyx")
    model = TrainedDense2D.load(run)
    s = model.stride
    assert names == ["GRAD", "TUM"] and data.shape == (2, 3, 112 // s, 112 // s)
    assert spacing == (50.0, PX_UM * s, PX_UM * s)
    # map voxel (0, 0, 0) is centred on its s × s input pixels
    shift = (s - 1) / 2 * PX_UM
    np.testing.assert_allclose(read_volume(tmp_path / "vol.ome.zarr", key=0).origin_um,
                               (ORIGIN[0], ORIGIN[1] + shift, ORIGIN[2] + shift))
    st = RGBStack(store, pixel_size_um=PX_UM)
    for z in range(3):
        want = model.predict_map(st[z])[[2, 0]]
        np.testing.assert_allclose(np.asarray(data[:, z]), want, rtol=1e-5, atol=1e-6)
    assert (np.asarray(data) >= 0).all()


@pytest.mark.filterwarnings("ignore:the stack is at")
def test_a_coarser_stack_is_refused_unless_allowed_and_bad_requests_fail_clearly(run, tmp_path):
    store = _stack_store(tmp_path / "coarse.ome.zarr", 2 * PX_UM, n=2, size=56)
    with pytest.raises(VoxelomeError, match="--allow-coarse"):
        run_predict_stack(run, store, tmp_path / "v.ome.zarr", n_genes=1)
    with pytest.warns(UserWarning, match="coarser than the model"):
        res = run_predict_stack(run, store, tmp_path / "v.ome.zarr", n_genes=1, allow_coarse=True)
    assert res["shape_czyx"] == [1, 2, 56, 56] and res["genes"] == 1
    with pytest.raises(VoxelomeError, match="Did you mean 'GRAD'"):
        run_predict_stack(run, store, tmp_path / "v2.ome.zarr", genes=["GRAF"], allow_coarse=True)
    with pytest.raises(VoxelomeError, match="exists"):
        run_predict_stack(run, store, tmp_path / "v.ome.zarr", n_genes=1, allow_coarse=True)
    r = CliRunner().invoke(app, ["dense2d", "predict", str(run), "--stack", str(store), "--image", str(store),
                                 "--out", str(tmp_path / "x.ome.zarr")])
    assert r.exit_code == 2 and "either --image" in r.output
