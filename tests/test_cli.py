"""The command line: help, user errors as one-line messages (exit 2), and each verb end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.io import read_section, validate_section, write_h5ad
from voxelome.io.omezarr import read_ome_zarr
from ngff import assert_ngff_image

VERBS = ("demo", "signatures", "train", "predict", "evaluate", "convert")
TINY_SETS = ["--set", "epochs=1", "--set", "steps_per_epoch=2", "--set", "batch_size=2", "--set", "width=8",
             "--set", "window_um=[320,320,320]", "--set", "crop_um=[160,480,480]"]

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def _write_section(raw_section, path, keep_truth_names: bool):
    sec = raw_section.copy()
    del sec.obsm["spatial_3d"]
    if not keep_truth_names:  # what a real section has: no ground-truth signature names
        del sec.uns["voxelome"]["signature_names"]
    validate_section(sec)
    return write_h5ad(sec, path)


@pytest.fixture(scope="module")
def section_h5ad(raw_section, tmp_path_factory):
    """The phantom section's counts as a validated .h5ad (no signatures yet), like a real section."""
    return _write_section(raw_section, tmp_path_factory.mktemp("section") / "section.h5ad", keep_truth_names=False)


# --- help -------------------------------------------------------------------------------
def test_help_lists_every_verb():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for verb in VERBS:
        assert verb in result.output


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb):
    result = invoke(verb, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and verb in result.output


def test_convert_a_slice_folder_to_ome_zarr(volume_file, tmp_path):
    """`voxelome convert`: any readable scan → a chunked multiscale OME-Zarr with its µm spacing, atomically."""
    import tifffile

    scan = np.load(volume_file)
    folder = tmp_path / "recon"
    folder.mkdir()
    for k, plane in enumerate(scan["data"]):
        tifffile.imwrite(folder / f"rec_{k:04d}.tif", plane)
    out = tmp_path / "scan.ome.zarr"
    spacing = ",".join(map(str, scan["spacing_um"]))
    r = invoke("convert", folder, "--out", out)
    assert r.exit_code == 2 and "slice distance" in r.output  # a folder of slices never stores it
    r = invoke("convert", folder, "--out", out, "--spacing-um", spacing)
    assert r.exit_code == 0, r.output
    data, got_spacing, _ = read_ome_zarr(out)
    np.testing.assert_array_equal(np.asarray(data)[0], scan["data"])
    assert got_spacing == tuple(scan["spacing_um"])
    assert (out / "1").exists()  # multiscale
    r = invoke("convert", folder, "--out", out, "--spacing-um", spacing)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert not list(tmp_path.glob(".scan.ome.zarr.tmp-*"))  # no temporary left behind


def test_train_help_documents_config_fields():
    result = invoke("train", "--help")
    assert "--set" in result.output and "epochs" in result.output


def test_installed_entry_point_runs():
    exe = Path(sys.executable).with_name("voxelome")
    exe = exe if exe.exists() else shutil.which("voxelome")
    assert exe, "the `voxelome` console script is not installed next to the interpreter"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for verb in VERBS:
        assert verb in proc.stdout


# --- user errors ------------------------------------------------------------------------
def _no_traceback(result):
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_train_unknown_config_key_exits_2_with_did_you_mean(volume_file, section_h5ad, tmp_path):
    result = invoke("train", "--volume", volume_file, "--section", section_h5ad, "--out", tmp_path / "o",
                    "--slice-index", 16, "--set", "epoch=3")
    assert result.exit_code == 2, result.output
    assert "did you mean 'epochs'" in result.output.lower()
    _no_traceback(result)
    assert not (tmp_path / "o").exists()


def test_train_bad_set_syntax_exits_2(volume_file, section_h5ad, tmp_path):
    result = invoke("train", "--volume", volume_file, "--section", section_h5ad, "--out", tmp_path / "o",
                    "--slice-index", 16, "--set", "epochs")
    assert result.exit_code == 2 and "key=value" in result.output
    _no_traceback(result)


def test_missing_volume_file_exits_2_with_clear_message(section_h5ad, tmp_path):
    missing = tmp_path / "no_such_scan.npz"
    result = invoke("train", "--volume", missing, "--section", section_h5ad, "--out", tmp_path / "o",
                    "--slice-index", 16)
    assert result.exit_code == 2, result.output
    assert "no such volume file" in result.output and "no_such_scan.npz" in result.output
    _no_traceback(result)


def test_predict_without_a_run_exits_2(volume_file, tmp_path):
    result = invoke("predict", tmp_path, "--volume", volume_file, "--out", tmp_path / "p.ome.zarr")
    assert result.exit_code == 2 and "no checkpoint.pt" in result.output
    _no_traceback(result)


def test_train_needs_exactly_one_placement(volume_file, section_h5ad, tmp_path):
    result = invoke("train", "--volume", volume_file, "--section", section_h5ad, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "exactly one of --slice-index" in result.output
    _no_traceback(result)


def test_train_on_the_plane_register_plane_found(volume_file, section_h5ad, tmp_path):
    """`register plane` → `train --plane plane.json`: its map (for the registered image's pixels, here half the
    section's pixel size) is rescaled to the spots' pixels; they land where the known placement puts them."""
    from voxelome.io import read_volume
    from voxelome.register import SectionPlacement

    vol = read_volume(volume_file)
    px = read_section(section_h5ad).uns["voxelome"]["pixel_size_um"]
    # the plane found in slice 16, with the tissue 12 % smaller than its nominal pixel size says (a shrinkage register
    # plane finds within its 0.8–1.25 scale range; the old 10 % units check refused it)
    truth = SectionPlacement.from_slice(vol, 16, px).scaled(0.88)
    plane = tmp_path / "plane.json"  # what `register plane --pixel-size-um px/2` writes for a 2× finer H&E
    plane.write_text(json.dumps({"placement": truth.scaled(0.5).to_dict(), "score": -0.5, "image_pixel_size_um": px / 2}))
    out = tmp_path / "o"
    result = invoke("train", "--volume", volume_file, "--section", section_h5ad, "--out", out, "--plane", plane,
                    *TINY_SETS)
    assert result.exit_code == 0, result.output
    trained = ad.read_h5ad(out / "section.h5ad")
    np.testing.assert_allclose(trained.obsm["spatial_3d"], truth.map(trained.obsm["spatial"]), atol=1e-6)
    for bad, message in ((tmp_path / "none.json", "does not exist"), (section_h5ad, "not a `register plane` result")):
        r = invoke("train", "--volume", volume_file, "--section", section_h5ad, "--out", tmp_path / "b", "--plane", bad)
        assert r.exit_code == 2 and message in r.output, r.output
    r = invoke("train", "--volume", volume_file, "--section", section_h5ad, "--out", tmp_path / "b", "--plane", plane,
               "--slice-index", 16)
    assert r.exit_code == 2 and "exactly one of" in r.output


def test_slice_index_outside_volume_exits_2(volume_file, section_h5ad, tmp_path):
    result = invoke("train", "--volume", volume_file, "--section", section_h5ad, "--out", tmp_path / "o",
                    "--slice-index", 99)
    assert result.exit_code == 2 and "valid: 0 … 31" in result.output
    _no_traceback(result)


# --- the verbs end to end ---------------------------------------------------------------
def test_signatures_verb_writes_proportions(section_h5ad, tmp_path):
    sig_out = tmp_path / "sig" / "section_sig.h5ad"
    result = invoke("signatures", section_h5ad, "--out", sig_out, "--n-signatures", 5, "--n-genes", 80)
    assert result.exit_code == 0, result.output
    sig = ad.read_h5ad(sig_out)
    props = np.asarray(sig.obsm["signatures"])
    assert props.shape == (sig.n_obs, 5)
    np.testing.assert_allclose(props.sum(1), 1.0, atol=1e-6)
    assert props.min() >= -1e-9 and props.std(0).min() > 0.01  # five distinct, varying signatures
    assert read_section(sig_out).n_obs == sig.n_obs  # still a valid section for the next verb
    from voxelome.signatures import SignatureModel

    model = SignatureModel.load(tmp_path / "sig" / "section_sig_signatures.npz")
    assert model.n_signatures == 5 and len(model.genes) == 80


def test_train_predict_evaluate(volume_file, section_h5ad, tmp_path):
    # train on counts: it fits the signatures itself (6 archetypes) and keeps the model for gene maps
    out = tmp_path / "train_out"
    result = invoke("train", "--volume", volume_file, "--section", section_h5ad, "--out", out, "--slice-index", 16,
                    *TINY_SETS)
    assert result.exit_code == 0, result.output
    for name in ("run/checkpoint.pt", "run/config.yaml", "run/history.json", "section.h5ad", "metrics.json",
                 "signatures.npz"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 1 and metrics["held_out_spots"]["n_spots"] > 0
    trained = ad.read_h5ad(out / "section.h5ad")
    assert trained.obsm["signatures_pred"].shape == (trained.n_obs, 6)
    np.testing.assert_allclose(trained.obsm["spatial_3d"][:, 2], 160.0)  # slice 16 of 10 µm voxels

    pred = tmp_path / "pred.ome.zarr"
    result = invoke("predict", out, "--volume", volume_file, "--out", pred, "--chunks", "8,24,24",
                    "--genes", "SFTPC,PECAM1")
    assert result.exit_code == 0, result.output
    data, spacing, names = read_ome_zarr(pred)
    assert data.shape == (6, 16, 72, 72) and spacing == (20.0, 20.0, 20.0) and len(names) == 6
    np.testing.assert_allclose(np.asarray(data).sum(0), 1.0, atol=1e-4)
    genes, gene_spacing, gene_names = read_ome_zarr(tmp_path / "pred_genes.ome.zarr")
    assert_ngff_image(pred, "czyx")
    assert_ngff_image(tmp_path / "pred_genes.ome.zarr", "czyx")
    assert gene_names == ["SFTPC", "PECAM1"] and genes.shape == (2, 16, 72, 72) and gene_spacing == spacing

    # the same scan as a micro-CT reconstruction folder (one TIFF per z, slice distance given): the same prediction
    import tifffile

    scan = np.load(volume_file)
    folder = tmp_path / "recon"
    folder.mkdir()
    for k, plane in enumerate(scan["data"]):
        tifffile.imwrite(folder / f"rec_{k}.tif", plane)
    result = invoke("predict", out, "--volume", folder, "--out", tmp_path / "pred_slices.ome.zarr", "--chunks", "8,24,24",
                    "--spacing-um", ",".join(map(str, scan["spacing_um"])))
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.asarray(read_ome_zarr(tmp_path / "pred_slices.ome.zarr")[0]), np.asarray(data),
                               atol=1e-6)

    ev = tmp_path / "eval"
    result = invoke("evaluate", out, "--volume", volume_file, "--section", out / "section.h5ad", "--out", ev)
    assert result.exit_code == 0, result.output
    scores = json.loads((ev / "metrics.json").read_text())["spots"]
    assert (ev / "section_overlay.png").stat().st_size > 0
    # evaluate scores the held-out spots with the same model: the numbers train reported.
    assert scores["n_spots"] == metrics["held_out_spots"]["n_spots"]
    assert scores["mean"] == pytest.approx(metrics["held_out_spots"]["mean"], abs=1e-5)


def test_signatures_then_train_then_gene_maps(volume_file, section_h5ad, tmp_path):
    """The documented chain: `voxelome signatures` → `voxelome train --signatures-model` → `predict --genes`."""
    sig_out = tmp_path / "sig.h5ad"
    assert invoke("signatures", section_h5ad, "--out", sig_out, "--n-signatures", 5, "--n-genes", 80).exit_code == 0
    out = tmp_path / "train_out"
    result = invoke("train", "--volume", volume_file, "--section", sig_out, "--out", out, "--slice-index", 16,
                    "--signatures-model", tmp_path / "sig_signatures.npz", *TINY_SETS)
    assert result.exit_code == 0, result.output
    from voxelome.infer.predict import TrainedModel

    # the 5 given signatures keep the names `voxelome signatures` gave them
    assert TrainedModel.load(out / "run").names == [f"S{i}" for i in range(5)]
    pred = tmp_path / "pred.ome.zarr"
    result = invoke("predict", out, "--volume", volume_file, "--out", pred, "--chunks", "8,24,24", "--genes", "all")
    assert result.exit_code == 0, result.output
    genes, _, names = read_ome_zarr(tmp_path / "pred_genes.ome.zarr")
    assert genes.shape[0] == len(names) == 80


def test_train_on_a_phantom_section_h5ad_with_truth_names(volume_file, raw_section, tmp_path):
    # A phantom section saved to .h5ad keeps uns['voxelome']['signature_names'] (h5ad reads it back as an array).
    path = _write_section(raw_section, tmp_path / "phantom_section.h5ad", keep_truth_names=True)
    sig_out = tmp_path / "sig.h5ad"
    assert invoke("signatures", path, "--out", sig_out, "--n-signatures", 5, "--n-genes", 80).exit_code == 0
    result = invoke("train", "--volume", volume_file, "--section", sig_out, "--out", tmp_path / "o",
                    "--slice-index", 16, *TINY_SETS)
    assert result.exit_code == 0, result.output
    from voxelome.infer.predict import TrainedModel

    # 5 fitted signatures: not the phantom's 6 truth names
    assert TrainedModel.load(tmp_path / "o" / "run").names == [f"S{i}" for i in range(5)]


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    result = invoke("demo", "--quick", "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("report.html", "metrics.json", "metrics_phantom.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data, _, _ = read_ome_zarr(out / "prediction.ome.zarr")
    assert data.ndim == 4
    phantom_metrics = json.loads((out / "metrics_phantom.json").read_text())
    assert np.isfinite(phantom_metrics["volume_held_out_r"]["model"]["mean"])
    html = (out / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64" in html

