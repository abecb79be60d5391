"""`voxelome superres` as a new lab meets it (issue 6, real-data audit): inputs checked before any training or
sampling, legacy ST counts whose spot file lives elsewhere (--spots), plain tables (--spot-diameter-um),
intervals called calibrated only for the calibrated sampler, restore scores beside baselines."""

from __future__ import annotations

import gzip
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from test_superres_cli import TINY, files, invoke, run  # noqa: F401  (module fixtures reused)

from voxelome.datasets.superres_sections import restore_pair
from voxelome.infer.slide import read_slide_map


def _legacy_st(h5ad_path, d):
    """The synthetic section written as legacy ST: counts ``<name>.tsv.gz`` and a spot file in another folder."""
    sec = ad.read_h5ad(h5ad_path)
    ax, ay = sec.obs["array_x"].to_numpy(), sec.obs["array_y"].to_numpy()
    ids = [f"{x}x{y}" for x, y in zip(ax, ay)]
    (d / "cnts").mkdir()
    (d / "spots").mkdir()
    with gzip.open(d / "cnts" / "S9.tsv.gz", "wt") as fh:
        pd.DataFrame(np.asarray(sec.X), index=ids, columns=list(sec.var_names)).to_csv(fh, sep="\t")
    px = np.asarray(sec.obsm["spatial"], float)
    pd.DataFrame({"x": ax, "y": ay, "new_x": ax.astype(float), "new_y": ay.astype(float), "pixel_x": px[:, 0],
                  "pixel_y": px[:, 1], "selected": 1}).to_csv(d / "spots" / "S9_spots.tsv", sep="\t", index=False)
    meta = sec.uns["voxelome"]
    return d / "cnts" / "S9.tsv.gz", d / "spots" / "S9_spots.tsv", meta["pixel_size_um"], meta["spot_diameter_um"]


def test_fit_checks_every_input_before_training(files, tmp_path):  # noqa: F811
    (s1, i1), (s3, i3) = files[1], files[3]
    base = ["superres", "fit", "--section", s1, "--image", i1, *TINY]
    for factor in (0, 1):
        r = invoke(*base, "--factor", factor, "--out", tmp_path / f"f{factor}")
        assert r.exit_code == 2 and "--factor" in r.output and "≥ 2" in r.output, r.output
    r = invoke(*base, "--pixel-size-um", 0, "--out", tmp_path / "px")
    assert r.exit_code == 2 and "--pixel-size-um=0.0" in r.output, r.output
    r = invoke(*base, "--n-genes", 0, "--out", tmp_path / "g")
    assert r.exit_code == 2 and "--n-genes 0" in r.output, r.output
    # an H&E model calibrated on a section without its image: refused up front, no training run is spent
    r = invoke(*base, "--calibration-section", s3, "--out", tmp_path / "c")
    assert r.exit_code == 2 and "--calibration-image" in r.output, r.output
    r = invoke(*base, "--calibration-section", s3, "--calibration-image", i3, "--select-steps", "0,5",
               "--out", tmp_path / "s")
    assert r.exit_code == 2 and "--select-steps 0,5" in r.output, r.output
    assert not any((tmp_path / n / "checkpoint.pt").exists() for n in ("f0", "f1", "px", "g", "c", "s"))


def test_legacy_counts_with_spot_file_elsewhere_and_plain_scale_options(run, files, tmp_path):  # noqa: F811
    counts, spots, px_um, diam_um = _legacy_st(files[4][0], tmp_path)
    image = files[4][1]
    r = invoke("superres", "predict", run, "--section", counts, "--image", image, "--out", tmp_path / "a.zarr")
    assert r.exit_code == 2 and "--spots" in r.output and "S9_selection.tsv" in r.output, r.output
    r = invoke("superres", "predict", run, "--section", counts, "--image", image, "--spots", spots, "--spots", spots,
               "--out", tmp_path / "a.zarr")
    assert r.exit_code == 2 and "one spot file per --section" in r.output, r.output
    r = invoke("superres", "predict", run, "--section", counts, "--image", image, "--spots", spots,
               "--pixel-size-um", px_um, "--spot-diameter-um", diam_um, "--out", tmp_path / "a.zarr")
    assert r.exit_code == 0, r.output
    # the same table as a plain .h5ad without uns scale: --pixel-size-um and --spot-diameter-um make it readable
    sec = ad.read_h5ad(files[4][0])
    del sec.uns["voxelome"]
    sec.write_h5ad(tmp_path / "plain.h5ad")
    r = invoke("superres", "predict", run, "--section", tmp_path / "plain.h5ad", "--image", image,
               "--pixel-size-um", px_um, "--spot-diameter-um", diam_um, "--out", tmp_path / "b.zarr")
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "a.zarr" / "summary.json").read_text())
    b = json.loads((tmp_path / "b.zarr" / "summary.json").read_text())
    assert a["pixel_size_um"] == pytest.approx(b["pixel_size_um"])


def test_predict_checks_inputs_before_sampling(run, files, tmp_path):  # noqa: F811
    s, i = files[4]
    base = ["superres", "predict", run, "--section", s, "--image", i]
    (tmp_path / "exists.zarr").mkdir()
    r = invoke(*base, "--out", tmp_path / "exists.zarr")
    assert r.exit_code == 2 and "--overwrite" in r.output, r.output
    for flag, value in (("--steps", 0), ("--samples", 0), ("--samples", 1)):
        r = invoke(*base, flag, value, "--out", tmp_path / "o.zarr")
        assert r.exit_code == 2 and flag in r.output, (flag, value, r.output)
    r = invoke(*base, "--labels", tmp_path / "nope.tif", "--out", tmp_path / "o.zarr")
    assert r.exit_code == 2 and "--labels" in r.output and "no such file" in r.output, r.output
    tifffile.imwrite(tmp_path / "bad.tif", np.ones((5, 7), np.int32))
    r = invoke(*base, "--labels", tmp_path / "bad.tif", "--out", tmp_path / "o.zarr")
    assert r.exit_code == 2 and "integer multiple" in r.output, r.output
    assert not (tmp_path / "o.zarr").exists()  # nothing half-written: the labels are checked before the output
    r = invoke("superres", "predict", tmp_path / "no_run", "--section", s, "--image", i, "--out", tmp_path / "o.zarr")
    assert r.exit_code == 2 and "voxelome superres fit" in r.output, r.output


def test_intervals_are_calibrated_only_for_the_calibrated_sampler(run, files, tmp_path):  # noqa: F811
    s, i = files[4]
    sampler = json.loads((run / "sampler.json").read_text())
    r = invoke("superres", "predict", run, "--section", s, "--image", i, "--out", tmp_path / "d.zarr")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "d.zarr" / "summary.json").read_text())["calibrated"] is True
    other = 2 if sampler["steps"] != 2 else 3
    with pytest.warns(UserWarning, match="uncalibrated"):
        r = invoke("superres", "predict", run, "--section", s, "--image", i, "--steps", other,
                   "--out", tmp_path / "e.zarr")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.zarr" / "summary.json").read_text())["calibrated"] is False


def test_restore_report_scores_baselines_beside_the_model(run, files, tmp_path):  # noqa: F811
    s, i = files[4]
    r = invoke("superres", "predict", run, "--section", s, "--image", i, "--mode", "restore",
               "--out", tmp_path / "r.zarr")
    assert r.exit_code == 0, r.output
    entry = json.loads((tmp_path / "r.zarr" / "report.json").read_text())["sections"]["s4"]
    assert set(entry["baseline_scores"]) == {"nearest", "bicubic"}
    for scores in (entry["scores"], *entry["baseline_scores"].values()):
        assert set(scores) == {"rmse", "ssim", "pearson", "pearson_median"}
        assert np.isfinite(scores["rmse"]) and scores["rmse"] > 0
    # the intervals' coverage of the section's real spots, recomputed from the written bounds
    genes = json.loads((tmp_path / "r.zarr" / "summary.json").read_text())["genes"]
    pair = restore_pair(ad.read_h5ad(s), genes)
    lower, upper = (read_slide_map(tmp_path / "r.zarr" / f"{k}.ome.zarr")[0] for k in ("lower", "upper"))
    inside = (pair.high >= lower) & (pair.high <= upper)
    assert entry["interval"]["calibrated"] is True and entry["interval"]["level"] == 0.9
    assert entry["interval"]["coverage"] == pytest.approx(inside[:, pair.high_mask].mean(), abs=1e-6)
    assert entry["interval"]["mean_width"] > 0


def test_more_genes_than_the_sections_share_is_said(files, tmp_path):  # noqa: F811
    (s1, i1) = files[1]
    with pytest.warns(UserWarning, match="share only 4 genes"):
        r = invoke("superres", "fit", "--section", s1, "--image", i1, *TINY[:-2], "--n-genes", 50,
                   "--set", "iterations=2", "--out", tmp_path / "all")
    assert r.exit_code == 0, r.output


def test_report_maps_output_pixels_to_image_pixels(run, files, tmp_path):  # noqa: F811
    s, i = files[4]
    sec = ad.read_h5ad(s)
    ax, ay = sec.obs["array_x"].to_numpy(), sec.obs["array_y"].to_numpy()
    spots_px = np.asarray(sec.obsm["spatial"], float)
    for mode, f in (("restore", 1), ("beyond", 2)):
        r = invoke("superres", "predict", run, "--section", s, "--image", i, "--mode", mode,
                   "--out", tmp_path / f"{mode}.zarr")
        assert r.exit_code == 0, r.output
        m = np.asarray(json.loads((tmp_path / f"{mode}.zarr" / "report.json").read_text())
                       ["sections"]["s4"]["output_to_image_px"])
        # the f × f output pixels of each spot, averaged, sit on the spot's centre in the H&E
        col, row = (ax - ax.min()) * f + (f - 1) / 2, (ay - ay.min()) * f + (f - 1) / 2
        mapped = np.column_stack([col, row, np.ones(len(col))]) @ m.T
        assert np.abs(mapped - spots_px).max() < 1.0, (mode, np.abs(mapped - spots_px).max())


def test_expression_only_run_refuses_images(files, tmp_path):  # noqa: F811
    (s1, _), (s4, i4) = files[1], files[4]
    r = invoke("superres", "fit", "--section", s1, *TINY[:2], "--set", "iterations=2", "--set", "device=cpu",
               "--n-genes", 3, "--out", tmp_path / "expr")
    assert r.exit_code == 0, r.output
    r = invoke("superres", "predict", tmp_path / "expr", "--section", s4, "--image", i4, "--out", tmp_path / "p.zarr")
    assert r.exit_code == 2 and "expression-only" in r.output and "drop --image" in r.output, r.output
    r = invoke("superres", "predict", tmp_path / "expr", "--section", s4, "--out", tmp_path / "p.zarr")
    assert r.exit_code == 0, r.output
