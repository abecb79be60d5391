"""``voxelome register``: find a section's plane in a volume; stack serial sections into 3D.

    voxelome register plane --volume V --image HE.png --pixel-size 5 --out DIR [--landmarks L.csv]
    voxelome register stack S1.h5ad S2.h5ad ... --z 0,15,30 --out stack.h5ad [--method icp|fgw]
    voxelome register order S1.h5ad S2.h5ad ... [--out order.json] [--figure order.png]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from voxelome.errors import VoxelomeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Registration: section → volume plane, serial sections → one 3D stack.")


def _friendly(fn):
    from voxelome.cli import _friendly as wrap

    return wrap(fn)


def _read_image(path: Path) -> np.ndarray:
    if not path.exists():
        raise VoxelomeError(f"section image '{path}' does not exist.")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    if path.suffix.lower() == ".npy":
        return np.load(path)
    import skimage.io

    return skimage.io.imread(path)


def _read_landmarks(path: Path):
    """CSV with columns px_x, px_y, x_um, y_um, z_um (header optional)."""
    try:
        arr = np.genfromtxt(path, delimiter=",", dtype=float)
    except (OSError, ValueError) as exc:
        raise VoxelomeError(f"could not read landmarks '{path}': {exc}.") from None
    arr = arr[~np.isnan(arr).all(1)] if arr.ndim == 2 else arr
    if arr.ndim != 2 or arr.shape[1] != 5:
        raise VoxelomeError(f"landmarks '{path}' must have 5 columns: px_x, px_y, x_um, y_um, z_um (one pair per row).")
    return arr[:, :2], arr[:, 2:]


@app.command("plane")
def plane(volume: Path = typer.Option(..., help="Volume: TIFF, OME-Zarr, zarr, NIfTI or NPY."),
          image: Optional[Path] = typer.Option(None, help="Section image: H&E (RGB) or grey, .png/.jpg/.tif/.npy "
                                               "(with --pixel-size-um)."),
          pixel_size: Optional[float] = typer.Option(None, "--pixel-size", "--pixel-size-um",
                                                     help="µm per section image pixel (with --image)."),
          section: Optional[Path] = typer.Option(None, help="Instead of --image: a section (Space Ranger outs or .h5ad) "
                                                 "whose stored hires H&E is registered, its pixel size from its scale "
                                                 "factors."),
          out: Path = typer.Option(..., help="Output folder: plane.json, slice.tif, overlay.png."),
          spacing_um: Optional[str] = typer.Option(None, help="Volume voxel size z,y,x µm if the file does not say."),
          landmarks: Optional[Path] = typer.Option(None, help="CSV px_x,px_y,x_um,y_um,z_um (≥ 3 rows) to seed the search."),
          max_tilt: float = typer.Option(15.0, help="Largest tilt searched about each axis (deg)."),
          max_rotation: float = typer.Option(180.0, help="Largest in-plane rotation searched either way (deg)."),
          depth_um: Optional[float] = typer.Option(None, help="± depth searched around the tissue centroid (µm)."),
          seed: int = typer.Option(0)):
    """Find the plane of a 2D section image inside a volume (3D affine in µm, resampled slice, overlay, score)."""
    _friendly(_plane)(volume, image, pixel_size, out, spacing_um, landmarks, max_tilt, max_rotation, depth_um, seed,
                      section)


def _check_search_flags(max_tilt, max_rotation, depth_um) -> None:
    """The search range in the CLI's own words (the API's PlaneSearchRange names its fields)."""
    if not (np.isfinite(max_tilt) and 0 <= max_tilt < 60):
        raise VoxelomeError(f"--max-tilt {max_tilt:g} must be in [0, 60) degrees (e.g. the default 15).")
    if not (np.isfinite(max_rotation) and 0 <= max_rotation <= 180):
        raise VoxelomeError(f"--max-rotation {max_rotation:g} must be in [0, 180] degrees (180: any rotation).")
    if depth_um is not None and not (np.isfinite(depth_um) and depth_um >= 0):
        raise VoxelomeError(f"--depth-um {depth_um:g} must be ≥ 0 µm (leave it out for half the volume's depth).")


def _write_slice_tif(path: Path, slice_: np.ndarray, pixel_size_um: float) -> None:
    """The resampled plane as a float32 TIFF that states its pixel size in µm (ImageJ/Fiji, napari, tifffile)."""
    import tifffile

    tifffile.imwrite(path, slice_.astype(np.float32), imagej=True, resolution=(1.0 / pixel_size_um,) * 2,
                     metadata={"unit": "um", "axes": "YX"})


def _plane(volume, image, pixel_size, out, spacing_um, landmarks, max_tilt, max_rotation, depth_um, seed,
           section=None):
    from voxelome.cli import _triplet
    from voxelome.io import read_volume
    from voxelome.io.atomic import atomic_write_json
    from voxelome.register.plane_figure import plane_overlay_figure
    from voxelome.register.plane_search import PlaneSearchRange, register_plane

    _check_search_flags(max_tilt, max_rotation, depth_um)
    if (image is None) == (section is None):
        raise VoxelomeError("give the section image either as --image HE.tif --pixel-size-um P, or as --section S "
                            "(its stored hires H&E); exactly one of them.")
    if image is not None and pixel_size is None:
        raise VoxelomeError("--image needs --pixel-size-um (µm per pixel of that image).")
    if section is not None:
        from voxelome.io import read_section
        from voxelome.io.sections import section_image

        if pixel_size is not None:
            raise VoxelomeError("--pixel-size-um goes with --image; with --section the pixel size comes from the "
                                "section's scale factors.")
        img, pixel_size = section_image(read_section(section))
        image = section
    else:
        img = _read_image(image)
    vol = read_volume(volume, _triplet(spacing_um, "spacing-um"))
    typer.echo(f"searching the plane of {image} ({img.shape[1]} × {img.shape[0]} px at {pixel_size:g} µm) in "
               f"{volume} {tuple(vol.shape)} (z, y, x) at {tuple(round(float(v), 3) for v in vol.spacing_um)} µm: "
               f"tilts ±{max_tilt:g}°, rotations ±{max_rotation:g}°, grid then refinement…", err=True)
    search = PlaneSearchRange(max_tilt_deg=max_tilt, max_rotation_deg=max_rotation, depth_um=depth_um)
    lm = _read_landmarks(landmarks) if landmarks is not None else None
    res = register_plane(vol, img, pixel_size, search=search, landmarks=lm, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    # the pixel size of the registered image: `train --plane` rescales the map to the section's spot pixels
    atomic_write_json(out / "plane.json", {**res.to_dict(), "image_pixel_size_um": float(pixel_size)})
    _write_slice_tif(out / "slice.tif", res.slice, res.slice_pixel_size_um)
    plane_overlay_figure(res, img, pixel_size, out / "overlay.png")
    typer.echo(json.dumps({"score": res.score, "tilt_deg": res.tilt_deg, "scale": res.scale,
                           "seconds": round(res.seconds, 1), "placement": res.placement.to_dict()["matrix"]}))


@app.command("stack")
def stack(sections: List[Path] = typer.Argument(..., help="Sections in cutting order (.h5ad, Visium outs, Xenium or "
                                                          "MERSCOPE folders, ...)."),
          z: str = typer.Option(..., help="Depth of each section in µm, comma-separated, increasing (e.g. 0,15,30)."),
          out: Path = typer.Option(..., help="Output stack .h5ad (obsm['spatial_3d'] x,y,z µm)."),
          method: str = typer.Option("icp", help="icp (fast, expression ICP) or fgw (PASTE-like optimal transport)."),
          images: Optional[str] = typer.Option(None, help="Comma-separated H&E images, one per section: image-based "
                                                          "stacking (rigid + optional B-spline) instead of expression."),
          pixel_size_um: Optional[float] = typer.Option(None, help="µm per pixel of the sections, if readers cannot tell."),
          bspline: bool = typer.Option(False, help="Image stacks: add a B-spline refinement after the rigid fit."),
          zarr_out: Optional[Path] = typer.Option(None, help="Image stacks: the registered 3D image as OME-Zarr (c,z,y,x)."),
          max_points: Optional[int] = typer.Option(None, help="Expression stacks: sections with more spots/cells "
                                                   "are aligned as pooled grid bins (default 5000 icp, 1500 fgw)."),
          check_order: bool = typer.Option(True, help="With 3 or more sections, also check the given order against "
                                                      "the sections' expression (`register order`) and warn when "
                                                      "another order fits clearly better; the stack keeps your order."),
          figure: Optional[Path] = typer.Option(None, help="Write a PNG of adjacent sections before and after "
                                                "alignment, spots coloured by expression PC1 (check it by eye)."),
          seed: int = typer.Option(0)):
    """Align serial sections into one 3D frame and write one AnnData with per-section transforms."""
    _friendly(_stack)(sections, z, out, method, images, pixel_size_um, bspline, zarr_out, max_points, check_order,
                      seed, figure)


@app.command("order")
def order(sections: List[Path] = typer.Argument(..., help="Sections in the order you believe they were cut (≥ 3)."),
          out: Optional[Path] = typer.Option(None, help="Write the check (similarity matrix, suggested order) as JSON."),
          figure: Optional[Path] = typer.Option(None, help="Write the similarity in the given and suggested order as a PNG."),
          pixel_size_um: Optional[float] = typer.Option(None, help="µm per pixel of the sections, if readers cannot tell."),
          n_genes: int = typer.Option(100, help="Genes compared: the highest mean log1p(counts per 10k)."),
          max_points: int = typer.Option(5000, help="Sections with more spots/cells are aligned as pooled grid bins.")):
    """Check the cutting order of serial sections against their expression.

    Each pair is aligned rigidly and scored by how well one section's spots are predicted gene by gene from the
    other's nearest spots; the path through all sections that makes neighbours most alike is the suggested order
    (its direction is arbitrary). Exits 0 either way; read `consistent` and `gain`.
    """
    _friendly(_order)(sections, out, figure, pixel_size_um, n_genes, max_points)


def _order(sections, out, figure, pixel_size_um, n_genes, max_points):
    from voxelome.io import read_section
    from voxelome.io.atomic import atomic_write_json
    from voxelome.register.section_order import check_section_order

    adatas = [read_section(s, pixel_size_um=pixel_size_um) for s in sections]
    names = [Path(s).name.split(".")[0] for s in sections]
    check = check_section_order(adatas, names, n_genes=n_genes, max_points=max_points, progress=True)
    summary = check.to_dict()
    if out is not None:
        atomic_write_json(Path(out), summary)
    if figure is not None:
        from voxelome.plot.figures import section_order

        summary["figure"] = str(section_order(check.similarity, check.names, check.suggested, figure, gain=check.gain))
    summary.pop("similarity")
    typer.echo(json.dumps(summary))


def _order_warning(adatas, names, max_points) -> Optional[dict]:
    """``register stack``'s order check: warns (through ``check_section_order``) and returns its short summary."""
    import warnings

    from voxelome.register.section_order import check_section_order

    if len(adatas) < 3:
        return None
    with warnings.catch_warnings():  # the stack has just said how many genes the sections share
        warnings.filterwarnings("ignore", message="gene sets differ between sections")
        check = check_section_order(adatas, names, max_points=max_points or 5000, progress=True)
    return {"consistent": check.consistent, "suggested": check.suggested, "gain": round(check.gain, 3)}


def _alignment_figure(adatas, stacked, names, path: Path) -> None:
    """``register stack --figure``: adjacent sections as read and as stacked, coloured by joint expression PC1."""
    from voxelome.plot.stack_figures import stack_alignment
    from voxelome.register.stack_expression import joint_embedding, section_xy_um

    sec = stacked.obs["section"].astype(str).to_numpy()
    parts = [stacked[sec == n] for n in names]
    counts = [p.layers["counts"] if "counts" in p.layers else p.X for p in parts]
    pc1 = [e[:, 0] for e in joint_embedding(counts, n_components=2)]
    stack_alignment([section_xy_um(a) for a in adatas], [np.asarray(p.obsm["spatial_3d"])[:, :2] for p in parts],
                    pc1, names, path)


def _stack(sections, z, out, method, images, pixel_size_um, bspline, zarr_out, max_points, check_order, seed,
           figure=None):
    from voxelome.io import read_section
    from voxelome.io.sections import write_h5ad

    try:
        z_um = [float(v) for v in z.split(",")]
    except ValueError:
        raise VoxelomeError(f"--z={z!r} must be numbers separated by commas, e.g. 0,15,30.") from None
    if Path(out).suffix.lower() != ".h5ad":
        raise VoxelomeError(f"--out {out} should end in .h5ad (the stacked spots as AnnData), e.g. stack.h5ad.")
    paths = [Path(p.strip()) for p in images.split(",") if p.strip()] if images else []
    if images and len(paths) != len(sections):
        raise VoxelomeError(f"--images needs one image per section, comma-separated in the sections' order: got "
                            f"{len(paths)} image(s) for {len(sections)} sections.")
    if zarr_out is not None and not images:
        raise VoxelomeError("--zarr-out writes the registered H&E stack: it needs --images (one per section).")
    adatas = [read_section(s, pixel_size_um=pixel_size_um) for s in sections]
    names = [Path(s).name.split(".")[0] for s in sections]
    if images:
        from voxelome.register.stack_image import stack_images

        res = stack_images(paths, z_um, adatas=adatas, names=names, bspline=bspline, zarr_out=zarr_out, seed=seed)
        st = res.adata
    else:
        from voxelome.register.stack_expression import stack_sections

        st = stack_sections(adatas, z_um, names=names, method=method, seed=seed, max_points=max_points)
    write_h5ad(st, out)
    order_check = _order_warning(adatas, names, max_points) if check_order else None  # after the stack's own checks
    info = st.uns["voxelome"]["stack"]
    summary = {"spots": st.n_obs, "sections": list(info["sections"]), "method": info["method"],
               "bin_um": info.get("bin_um"), "seconds": round(info["seconds"], 2), "out": str(out)}
    if "dice_adjacent" in info:  # image stacks: tissue overlap of adjacent registered sections
        summary["dice_adjacent"] = [round(float(d), 3) for d in info["dice_adjacent"]]
    if zarr_out is not None:
        summary["zarr_out"] = str(zarr_out)
    if order_check is not None:
        summary["order_check"] = order_check
    if figure is not None:
        _alignment_figure(adatas, st, list(info["sections"]), figure)
        summary["figure"] = str(figure)
    typer.echo(json.dumps(summary))
