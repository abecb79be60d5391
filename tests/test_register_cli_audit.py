"""`voxelome register plane|stack` as a new lab meets them (issue 3, real-data audit): --pixel-size-um like every
other verb, slice.tif carrying its µm pixel size, search flags and stack inputs checked in the CLI's own words
before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_register_plane import PX, deep_phantom, plane_errors, section, write_plane_inputs  # noqa: F401  (module fixtures reused)
from typer.testing import CliRunner

from voxelome.cli import app
from voxelome.register.placement import SectionPlacement


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_plane_accepts_pixel_size_um_and_writes_a_slice_tif_in_um(tmp_path, deep_phantom, section):  # noqa: F811
    import tifffile

    img, truth = section
    vol = deep_phantom.volume
    write_plane_inputs(tmp_path, deep_phantom, section)
    out = tmp_path / "reg"
    r = invoke("register", "plane", "--volume", tmp_path / "vol.npy", "--spacing-um", 10, "--image",
               tmp_path / "he.tif", "--pixel-size-um", PX, "--out", out, "--landmarks", tmp_path / "lm.csv")
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "plane.json").read_text())
    assert plane_errors(SectionPlacement.from_dict(rec["placement"]), truth, vol, img.shape[:2])[0] <= 2.0
    assert rec["image_pixel_size_um"] == PX  # what `train --plane` needs to map spot pixels
    with tifffile.TiffFile(out / "slice.tif") as tf:
        page = tf.pages[0]
        num, den = page.tags["XResolution"].value
        assert tf.imagej_metadata["unit"] in ("um", "micron", "µm")
        assert abs(den / num - rec["slice_pixel_size_um"]) < 1e-3 * rec["slice_pixel_size_um"]
        assert page.asarray().shape == tuple(np.shape(tifffile.imread(out / "slice.tif")))
    assert (out / "overlay.png").stat().st_size > 0


def test_plane_from_a_sections_stored_hires_image_then_train_maps_its_spots(tmp_path, deep_phantom, section):  # noqa: F811
    """`register plane --section S` registers the H&E a Visium section carries (uns['spatial'], hires, at
    pixel_size_um / tissue_hires_scalef) and records that image's pixel size, so `train --plane` maps the spots'
    full-resolution pixels where the registered image lies."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from voxelome.cli import _registered_placement
    from voxelome.io import validate_section, write_h5ad

    img, truth = section
    write_plane_inputs(tmp_path, deep_phantom, section)
    full_px = PX / 4  # full-resolution pixels 4× finer than the stored hires image (tissue_hires_scalef 0.25)
    rng = np.random.default_rng(0)
    h, w = img.shape[:2]
    spots_full = np.column_stack([rng.uniform(0.2, 0.8, 60) * w * 4, rng.uniform(0.2, 0.8, 60) * h * 4])
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(3, (60, 5)).astype(np.float32) + 1),
                   obs=pd.DataFrame(index=[f"s{i}" for i in range(60)]),
                   var=pd.DataFrame(index=[f"G{i}" for i in range(5)]))
    a.obsm["spatial"] = spots_full
    a.uns["spatial"] = {"lib": {"images": {"hires": img}, "scalefactors": {"tissue_hires_scalef": 0.25}}}
    write_h5ad(validate_section(a, pixel_size_um=full_px, spot_diameter_um=55.0), tmp_path / "s.h5ad")
    out = tmp_path / "reg"
    r = invoke("register", "plane", "--volume", tmp_path / "vol.npy", "--spacing-um", 10, "--section",
               tmp_path / "s.h5ad", "--out", out, "--landmarks", tmp_path / "lm.csv")
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "plane.json").read_text())
    assert rec["image_pixel_size_um"] == pytest.approx(PX)
    spots = _registered_placement(out / "plane.json", full_px).map(spots_full)
    err = np.sqrt(np.mean(np.sum((spots - truth.map(spots_full / 4)) ** 2, 1))) / 10.0  # voxels of 10 µm
    assert err <= 2.0, err
    for extra, message in ((["--image", tmp_path / "he.tif"], "exactly one of them"),
                           (["--pixel-size-um", PX], "goes with --image")):
        r = invoke("register", "plane", "--volume", tmp_path / "vol.npy", "--spacing-um", 10, "--section",
                   tmp_path / "s.h5ad", "--out", out, *extra)
        assert r.exit_code == 2 and message in r.output, r.output
    r = invoke("register", "plane", "--volume", tmp_path / "vol.npy", "--spacing-um", 10, "--image",
               tmp_path / "he.tif", "--out", out)
    assert r.exit_code == 2 and "--image needs --pixel-size-um" in r.output


def test_plane_search_flags_are_checked_in_cli_words(tmp_path):
    base = ["register", "plane", "--volume", tmp_path / "nope.npy", "--image", tmp_path / "nope.png",
            "--pixel-size", 5, "--out", tmp_path / "o"]
    for flag, value in (("--max-tilt", 70), ("--max-rotation", 200), ("--depth-um", -5)):
        r = invoke(*base, flag, value)
        assert r.exit_code == 2 and flag in r.output, (flag, r.output)


def test_stack_inputs_are_checked_before_registration(tmp_path, deep_phantom):  # noqa: F811
    import anndata as ad
    import skimage.io

    from voxelome.datasets import axial_placement
    from voxelome.datasets.histology import render_he
    from voxelome.io.sections import validate_section, write_h5ad

    rng = np.random.default_rng(0)
    secs, ims = [], []
    for k, z in enumerate((20, 24)):
        img, _ = render_he(deep_phantom, axial_placement(deep_phantom, z, pixel_size_um=10.0), shape=(96, 96),
                           seed=k, crop=False)
        ims.append(tmp_path / f"s{k}.png")
        skimage.io.imsave(ims[-1], img, check_contrast=False)
        a = ad.AnnData(X=rng.poisson(5, (30, 12)).astype(np.float32))
        a.var_names = [f"g{i}" for i in range(12)]
        a.obsm["spatial"] = rng.uniform(20, 76, (30, 2))
        secs.append(tmp_path / f"s{k}.h5ad")
        write_h5ad(validate_section(a, pixel_size_um=10.0, spot_diameter_um=55.0), secs[-1])
    base = ["register", "stack", *secs, "--z", "0,20"]
    r = invoke(*base, "--out", tmp_path / "st.h5ad", "--images", ims[0])
    assert r.exit_code == 2 and "--images needs one image per section" in r.output, r.output
    r = invoke(*base, "--out", tmp_path / "st.txt", "--images", f"{ims[0]},{ims[1]}")
    assert r.exit_code == 2 and "--out" in r.output and ".h5ad" in r.output, r.output
    r = invoke(*base, "--out", tmp_path / "st.h5ad", "--zarr-out", tmp_path / "st.ome.zarr")
    assert r.exit_code == 2 and "--images" in r.output, r.output
    # a space after the comma (as people type lists) is not part of the next path
    r = invoke(*base, "--out", tmp_path / "st.h5ad", "--images", f"{ims[0]}, {ims[1]}",
               "--zarr-out", tmp_path / "st.ome.zarr")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(summary["dice_adjacent"]) == 1 and 0 <= summary["dice_adjacent"][0] <= 1
    assert (tmp_path / "st.ome.zarr").is_dir() and (tmp_path / "st.h5ad").exists()
