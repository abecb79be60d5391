"""dense2d on the command line: `voxelome train --preset dense2d`, `predict --image`, `evaluate --image`, errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
from PIL import Image
from test_dense2d_train import PX_UM, synthetic_section
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.constants import PREDICTED_EXPRESSION_KEY, PREDICTED_GENES_KEY, UNS_KEY
from voxelome.infer.slide import read_slide_map

runner = CliRunner()
TINY = ["--set", "epochs=1", "--set", "steps_per_epoch=2", "--set", "batch_size=2", "--set", "width=4",
        "--set", "decoder_width=8", "--set", "tile_px=64", "--set", "predict_tile_px=64", "--set", "n_genes=3",
        "--set", "device=cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A synthetic section as .h5ad with counts + its image as PNG."""
    d = tmp_path_factory.mktemp("dense2d_cli")
    img, adata, values, _ = synthetic_section(5)
    counts = np.random.default_rng(0).poisson(np.column_stack([values * 40, np.full(len(values), 200.0)]))
    sec = ad.AnnData(X=counts.astype(np.float32), obsm={"spatial": adata.obsm["spatial"]},
                     uns={"voxelome": dict(adata.uns["voxelome"])})
    sec.var_names = ["TUM", "STR", "GRAD", "HOUSE"]
    sec.write_h5ad(d / "s.h5ad")
    Image.fromarray(img).save(d / "s.png")
    return d


def test_train_predict_evaluate_dense2d(files, tmp_path):
    out = tmp_path / "o"
    r = invoke("train", "--preset", "dense2d", "--section", files / "s.h5ad", "--image", files / "s.png", "--out", out,
               *TINY)
    assert r.exit_code == 0, r.output
    assert (out / "run" / "checkpoint.pt").exists()
    r = invoke("predict", out, "--image", files / "s.png", "--pixel-size-um", PX_UM, "--out", tmp_path / "m.ome.zarr")
    assert r.exit_code == 0, r.output
    data, px, names = read_slide_map(tmp_path / "m.ome.zarr")
    assert data.shape == (3, 56, 56) and px == (16.0, 16.0) and len(names) == 3 and (data[:] >= 0).all()
    r = invoke("evaluate", out, "--section", files / "s.h5ad", "--image", files / "s.png", "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(m) == {"dense2d", "train_mean_baseline"} and m["dense2d"]["n_spots"] == 64
    # per-spot predictions into the section's AnnData, at a radius of choice
    r = invoke("dense2d", "predict", out, "--image", files / "s.png", "--out", tmp_path / "m2.ome.zarr", "--section",
               files / "s.h5ad", "--spot-radius-um", 50, "--spots-out", tmp_path / "pred.h5ad")
    assert r.exit_code == 0, r.output
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert pred.obsm[PREDICTED_EXPRESSION_KEY].shape == (64, 3)
    assert list(pred.uns[UNS_KEY][PREDICTED_GENES_KEY]) == names
    assert pred.uns[UNS_KEY]["expression_pred_radius_um"] == pytest.approx(50.0)


def test_cli_errors_are_one_line_exit_2(files, tmp_path):
    r = invoke("train", "--preset", "dense2d", "--section", files / "s.h5ad", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "one image per section" in r.output
    r = invoke("train", "--section", files / "s.h5ad", "--out", tmp_path / "o", "--slice-index", 1)
    assert r.exit_code == 2 and "--volume is required" in r.output
    r = invoke("train", "--preset", "dense2d", "--section", files / "s.h5ad", "--image", files / "s.png",
               "--out", tmp_path / "o", "--set", "encoder=resnet")
    assert r.exit_code == 2 and "encoder='resnet'" in r.output
    r = invoke("train", "--preset", "dense2d", "--section", files / "s.h5ad", "--image", files / "s.png",
               "--out", tmp_path / "o", "--set", "encoder_weights=/nowhere/uni.bin")
    assert r.exit_code == 2 and "/nowhere/uni.bin" in r.output and "does not download" in r.output
    r = invoke("predict", tmp_path, "--image", files / "s.png", "--out", tmp_path / "x.ome.zarr")
    assert r.exit_code == 2 and "checkpoint" in r.output
