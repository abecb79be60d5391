"""`voxelome superres fit / predict` on synthetic square-array sections with H&E images, and bad input."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import tifffile
from PIL import Image
from test_dense2d_train import PITCH_PX, synthetic_section
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.datasets.superres_sections import array_grid, beyond_pair, restore_pair
from voxelome.errors import VoxelomeError
from voxelome.infer.slide import read_slide_map
from voxelome.io.omezarr import read_ome_zarr
from ngff import assert_ngff_image

runner = CliRunner()
TINY = ["--preset", "superres-tiny", "--set", "iterations=20", "--set", "device=cpu", "--n-genes", "3"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _section(seed: int, d):
    img, adata, values, _ = synthetic_section(seed, size=320)
    counts = np.random.default_rng(seed).poisson(np.column_stack([values * 40, np.full(len(values), 200.0)]))
    xy = adata.obsm["spatial"] + 0.5
    grid = np.round((xy - xy.min(0)) / PITCH_PX).astype(int)
    sec = ad.AnnData(X=counts.astype(np.float32), obsm={"spatial": adata.obsm["spatial"]},
                     uns={"voxelome": dict(adata.uns["voxelome"])})
    sec.obs["array_x"], sec.obs["array_y"] = grid[:, 0] + 1, grid[:, 1] + 1
    sec.var_names = ["TUM", "STR", "GRAD", "HOUSE"]
    sec.write_h5ad(d / f"s{seed}.h5ad")
    Image.fromarray(img).save(d / f"s{seed}.png")
    return d / f"s{seed}.h5ad", d / f"s{seed}.png"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("superres_cli")
    return {s: _section(s, d) for s in (1, 2, 3, 4)}


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("superres_run") / "run"
    (s1, i1), (s2, i2), (s3, i3) = files[1], files[2], files[3]
    r = invoke("superres", "fit", "--section", s1, "--image", i1, "--section", s2, "--image", i2,
               "--calibration-section", s3, "--calibration-image", i3, "--select-steps", "1,3", "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    return out


def test_fit_writes_a_calibrated_run(run):
    assert {"checkpoint.pt", "config.yaml", "calibration.json", "histology_features.json"} <= {
        p.name for p in run.iterdir()}
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["level"] == 0.9 and len(cal["multipliers"]) == 3 and all(m > 0 for m in cal["multipliers"])
    sampler = json.loads((run / "sampler.json").read_text())  # steps chosen on the calibration section
    assert set(sampler["scores"]) == {"1", "3"} and cal["steps"] == sampler["steps"] in (1, 3)


def test_predict_restore_scores_the_measured_spots(run, files, tmp_path):
    s, i = files[4]
    with pytest.warns(UserWarning, match="calibrated for 1 steps × 4 samples, not 4 × 3"):  # a quicker sampler
        r = invoke("superres", "predict", run, "--section", s, "--image", i, "--mode", "restore", "--out",
                   tmp_path / "r.zarr", "--samples", 3, "--steps", 4)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.zarr" / "report.json").read_text())
    scores = rep["sections"]["s4"]["scores"]
    assert set(scores) == {"rmse", "ssim", "pearson", "pearson_median"} and np.isfinite(scores["rmse"])
    data, px, names = read_slide_map(tmp_path / "r.zarr" / "mean.ome.zarr")
    assert names == json.loads((tmp_path / "r.zarr" / "summary.json").read_text())["genes"]
    assert abs(px[0] - PITCH_PX * 4.0) < 1.0  # the array pitch in µm (24 px × 4 µm)


@pytest.mark.filterwarnings("ignore:intervals were calibrated for:UserWarning")  # quicker sampler
def test_predict_beyond_refines_the_grid_and_aggregates_labels(run, files, tmp_path):
    s, i = files[4]
    n_x = int(ad.read_h5ad(s).obs["array_x"].max())
    labels = np.zeros((2 * n_x, 2 * n_x), np.int32)
    labels[:4, :4] = 1
    labels[4:8, :4] = 2
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    r = invoke("superres", "predict", run, "--section", s, "--image", i, "--out", tmp_path / "b.zarr", "--samples", 3,
               "--steps", 4, "--labels", tmp_path / "labels.tif")
    assert r.exit_code == 0, r.output
    data, px, _ = read_slide_map(tmp_path / "b.zarr" / "mean.ome.zarr")
    assert data.shape[1:] == (2 * n_x, 2 * n_x) and abs(px[0] - PITCH_PX * 2.0) < 0.5
    cells = ad.read_h5ad(tmp_path / "b.zarr" / "labels.h5ad")
    assert cells.n_obs == 2 and np.allclose(cells.X[0], np.asarray(data[:, :4, :4]).mean((1, 2)), atol=1e-4)


@pytest.mark.filterwarnings("ignore:intervals were calibrated for:UserWarning")  # quicker sampler
def test_predict_several_sections_writes_a_volume(run, files, tmp_path):
    (s3, i3), (s4, i4) = files[3], files[4]
    r = invoke("superres", "predict", run, "--section", s3, "--image", i3, "--section", s4, "--image", i4,
               "--section-spacing-um", 16, "--out", tmp_path / "v.zarr", "--samples", 2, "--steps", 3)
    assert r.exit_code == 0, r.output
    arr, spacing, _ = read_ome_zarr(tmp_path / "v.zarr" / "upper.ome.zarr")
    assert_ngff_image(tmp_path / "v.zarr" / "upper.ome.zarr", "czyx")
    assert arr.shape[:2] == (3, 2) and spacing[0] == 16.0


def test_bad_input_gets_clear_errors(run, files, tmp_path):
    s, i = files[4]
    r = invoke("superres", "predict", run, "--section", s, "--out", tmp_path / "x.zarr")
    assert r.exit_code == 2 and "pass --image" in r.output
    r = invoke("superres", "predict", run, "--section", s, "--image", i, "--mode", "sharpen", "--out", tmp_path / "y")
    assert r.exit_code == 2 and "mode" in r.output
    r = invoke("superres", "predict", run, "--section", s, "--image", i, "--section", s, "--image", i,
               "--out", tmp_path / "z.zarr", "--samples", 2, "--steps", 2)
    assert r.exit_code == 2 and "--section-spacing-um" in r.output
    r = invoke("superres", "fit", "--section", s, "--image", i, "--select-steps", "2,5", "--out", tmp_path / "f")
    assert r.exit_code == 2 and "--calibration-section" in r.output
    r = invoke("superres", "fit", "--section", s, "--image", i, "--calibration-section", s, "--calibration-image", i,
               "--select-steps", "two,five", "--out", tmp_path / "g")
    assert r.exit_code == 2 and "comma-separated integers" in r.output
    sec = ad.read_h5ad(s)
    with pytest.raises(VoxelomeError, match="lacks 1 of the model's genes"):
        restore_pair(sec, ["TUM", "NOPE"])
    with pytest.raises(VoxelomeError, match="does not contain every spot"):
        beyond_pair(sec, ["TUM"], box=(5, 5, 2, 2))


def _visium_like(path, d):
    """The square test section relabelled as a Visium hexagonal lattice: array_col = 2·x + (row parity), alternate
    rows shifted by half a pitch and rows √3/2 of a pitch apart, in pixels as in the image."""
    sec = ad.read_h5ad(path)
    x, y = sec.obs["array_x"].to_numpy(), sec.obs["array_y"].to_numpy()
    sec.obs = sec.obs.drop(columns=["array_x", "array_y"])
    sec.obs["array_row"], sec.obs["array_col"] = y, 2 * x + y % 2
    sec.obsm["spatial"] = np.column_stack([(x + (y % 2) / 2) * PITCH_PX, y * PITCH_PX * np.sqrt(3) / 2]) + 20.0
    sec.write_h5ad(d / "visium.h5ad")
    return d / "visium.h5ad", sec


@pytest.mark.filterwarnings("ignore:intervals were calibrated for:UserWarning")  # quicker sampler
def test_visium_hexagonal_lattice_in_offset_coordinates(run, files, tmp_path):
    from voxelome.datasets.superres_sections import _grid_to_px, _lattice

    s, i = files[4]
    path, hexa = _visium_like(s, tmp_path)
    square = ad.read_h5ad(s)
    ax, ay = array_grid(hexa)  # offset coordinates: the original square indices back
    np.testing.assert_array_equal(ax, square.obs["array_x"].to_numpy())
    np.testing.assert_array_equal(ay, square.obs["array_y"].to_numpy())
    ax, ay, shift = _lattice(hexa)
    assert set(shift(ay)) == {0.0, 0.5}
    aff = _grid_to_px(hexa, ax, ay, shift)  # exact on the half-pitch-shifted rows
    fitted = np.column_stack([ax + shift(ay), ay, np.ones(len(ax))]) @ aff.T
    np.testing.assert_allclose(fitted, hexa.obsm["spatial"], atol=1e-6)
    pair = restore_pair(hexa, ["TUM", "STR"])
    um = 4.0  # µm per image pixel of the synthetic sections
    np.testing.assert_allclose(pair.extra["pixel_size_yx_um"], (PITCH_PX * um * np.sqrt(3) / 2, PITCH_PX * um))
    assert pair.high_mask.sum() == hexa.n_obs and pair.low_mask.all()  # dense offset grid: every 2×2 block full
    assert "pixel_size_yx_um" not in restore_pair(square, ["TUM"]).extra  # square arrays: one pixel size
    r = invoke("superres", "predict", run, "--section", path, "--image", i, "--out", tmp_path / "v.zarr",
               "--samples", 2, "--steps", 2)
    assert r.exit_code == 0, r.output
    data, px, _ = read_slide_map(tmp_path / "v.zarr" / "mean.ome.zarr")
    np.testing.assert_allclose(px, (PITCH_PX * um * np.sqrt(3) / 4, PITCH_PX * um / 2))  # (y, x) of the 2× grid
    assert json.loads((tmp_path / "v.zarr" / "summary.json").read_text())["pixel_size_um"] == pytest.approx(list(px))
