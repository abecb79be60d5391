"""README's "Your own block, end to end", run as written: a scan, a Visium outs folder carrying its hires H&E;
convert → register plane --section → train --plane → predict. The spots must land where the section was cut."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image
from tenx import write_10x_h5
from test_register_plane import PX, deep_phantom, section  # noqa: F401  (module fixtures reused)
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.io.omezarr import read_ome_zarr

TINY = ["--set", "epochs=1", "--set", "steps_per_epoch=2", "--set", "batch_size=2", "--set", "width=8",
        "--set", "window_um=[320,320,320]", "--set", "crop_um=[160,480,480]"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _outs(tmp_path, deep_phantom, section):  # noqa: F811
    """A Space Ranger outs folder: the phantom's spots on the rendered H&E's plane, the H&E as tissue_hires_image."""
    img, truth = section
    spots = deep_phantom.cut_section(truth, seed=0)  # spot pixels in the section's own frame, same plane and µm/px
    xyz = truth.map(spots.obsm["spatial"])
    # the spots' full-resolution pixels = the image's pixels (scale factor 1): solve truth.map(p) = xyz
    img_px = np.linalg.lstsq(truth.matrix[:, :2], (xyz - truth.matrix[:, 2]).T, rcond=None)[0].T
    outs = tmp_path / "visium" / "outs"
    (outs / "spatial").mkdir(parents=True)
    barcodes = np.array([f"AAAC{i:06d}-1" for i in range(spots.n_obs)])
    counts = sp.csc_matrix(np.asarray(spots.X.todense() if sp.issparse(spots.X) else spots.X).T.astype(np.int32))
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", barcodes, list(spots.var_names),
                  ["Gene Expression"] * spots.n_vars, counts, library="block")
    pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": spots.obs["array_row"].to_numpy(),
                  "array_col": spots.obs["array_col"].to_numpy(), "pxl_row_in_fullres": img_px[:, 1],
                  "pxl_col_in_fullres": img_px[:, 0]}).to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 55.0 / PX, "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 0.5,
         "fiducial_diameter_fullres": 10.0}))
    Image.fromarray(img).save(outs / "spatial" / "tissue_hires_image.png")
    return outs, xyz


def test_readme_chain_places_and_trains_the_section(tmp_path, deep_phantom, section):  # noqa: F811
    outs, true_xyz = _outs(tmp_path, deep_phantom, section)
    vol = deep_phantom.volume
    np.savez(tmp_path / "scan.npz", data=np.asarray(vol.data), spacing_um=np.asarray(vol.spacing_um))
    scan = tmp_path / "scan.ome.zarr"
    assert invoke("convert", tmp_path / "scan.npz", "--out", scan).exit_code == 0
    r = invoke("register", "plane", "--volume", scan, "--section", outs, "--out", tmp_path / "reg",
               "--max-tilt", 10, "--max-rotation", 30, "--depth-um", 60)  # the narrowed range of test_register_plane
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    r = invoke("train", "--volume", scan, "--section", outs, "--plane", tmp_path / "reg" / "plane.json", "--out", run,
               *TINY)
    assert r.exit_code == 0, r.output
    import anndata as ad

    placed = ad.read_h5ad(run / "section.h5ad")
    rms_vox = np.sqrt(np.mean(np.sum((placed.obsm["spatial_3d"] - true_xyz) ** 2, 1))) / 10.0
    assert rms_vox <= 2.0, rms_vox  # every spot where the section was cut, within 2 voxels
    r = invoke("predict", run, "--volume", scan, "--out", tmp_path / "prediction.ome.zarr", "--chunks", "16,64,64")
    assert r.exit_code == 0, r.output
    data, spacing, names = read_ome_zarr(tmp_path / "prediction.ome.zarr")
    assert data.shape[0] == len(names) == 6 and np.isfinite(np.asarray(data)).all()
