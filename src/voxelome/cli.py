"""Command line: one verb per stage, each a thin layer over the API.

    voxelome demo                       the whole pipeline on the synthetic lung phantom
    voxelome signatures SECTION ...     niche signatures of one ST section
    voxelome train --volume V --section S --slice-index K ...
    voxelome predict RUN --volume V --out pred.ome.zarr
    voxelome evaluate RUN --volume V --section S
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from voxelome.cli_common import friendly as _friendly
from voxelome.cli_common import parse_numbers
from voxelome.cli_common import parse_sets as _parse_sets
from voxelome.errors import VoxelomeError
from voxelome.train.config import field_docs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="voxelome: 3D niche-signature and expression maps from one ST section and a volume.")


def _triplet(text: Optional[str], name: str):
    vals = parse_numbers(text, name, (1, 3), example="100,200,50")
    if vals is None:
        return None
    return vals[0] if len(vals) == 1 else tuple(vals)


SET_HELP = "Override a config field, key=value (repeatable). Fields: " + "; ".join(
    f"{k}: {v}" for k, v in field_docs().items())


def _load_volume(path: Path, spacing_um: Optional[str]):
    from voxelome.io import read_volume

    return read_volume(path, spacing_um=_triplet(spacing_um, "spacing-um"))


def _placement(volume, pixel_size_um: float, slice_index, origin, normal, landmarks, plane=None):
    from voxelome.register import SectionPlacement

    given = [slice_index is not None, origin is not None or normal is not None, landmarks is not None,
             plane is not None]
    if sum(given) != 1:
        raise VoxelomeError("place the section with exactly one of --slice-index, --origin/--normal, --landmarks, or "
                            "--plane (the plane.json of `voxelome register plane`).")
    if plane is not None:
        return _registered_placement(plane, pixel_size_um)
    if slice_index is not None:
        return SectionPlacement.from_slice(volume, slice_index, pixel_size_um)
    if landmarks is not None:
        import pandas as pd

        table = pd.read_csv(landmarks)
        cols = ["px_x", "px_y", "x_um", "y_um", "z_um"]
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise VoxelomeError(f"landmark file {landmarks} lacks columns {missing}; expected {cols}.")
        return SectionPlacement.from_landmarks(table[cols[:2]].to_numpy(), table[cols[2:]].to_numpy())
    if origin is None or normal is None:
        raise VoxelomeError("--origin and --normal go together (both x,y,z; origin in µm).")
    return SectionPlacement.from_origin_normal(_triplet(origin, "origin"), _triplet(normal, "normal"), pixel_size_um)


def _registered_placement(path: Path, section_pixel_size_um: float):
    """The placement of ``register plane``'s ``plane.json``, for the section's spot pixels.

    The registration maps pixels of the image it was given (``image_pixel_size_um``); spots are in the section's own
    pixels (Visium: full-resolution image pixels), so the map is rescaled by their ratio.
    """
    from voxelome.register import SectionPlacement

    if not path.is_file():
        raise VoxelomeError(f"--plane {path} does not exist; it is the plane.json that `voxelome register plane` writes.")
    try:
        record = json.loads(path.read_text())
        placement = SectionPlacement.from_dict(record["placement"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise VoxelomeError(f"--plane {path} is not a `register plane` result (plane.json with a 'placement' "
                            f"matrix): {type(exc).__name__}: {exc}.") from None
    image_px = record.get("image_pixel_size_um")
    if image_px is None:
        typer.echo(f"{path} does not record the registered image's pixel size (written before it did): assuming "
                   f"the section's spot pixels are that image's pixels ({section_pixel_size_um:g} µm).", err=True)
        return placement
    return placement.scaled(section_pixel_size_um / float(image_px))


@app.command()
@_friendly
def demo(out: Path = typer.Option(Path("voxelome-demo"), help="Output folder."),
         preset: str = typer.Option("dense", help="Model preset: dense or xpression."),
         seed: int = typer.Option(0, help="Seed of the phantom and of training."),
         quick: bool = typer.Option(False, help="A smaller phantom and shorter training (for tests)."),
         oblique: bool = typer.Option(False, help="Cut the training section at an oblique plane."),
         epochs: Optional[int] = typer.Option(None, help="Training epochs (default 20: a few minutes on 2 cores).")):
    """Run the whole pipeline on the synthetic lung phantom and write a report."""
    from voxelome.demo import run_demo

    report = run_demo(out, preset=preset, seed=seed, quick=quick, oblique=oblique, epochs=epochs)
    typer.echo(f"report: {report.resolve()}")


@app.command()
@_friendly
def signatures(section: Path = typer.Argument(..., help="Section: Visium outs/ folder, .h5ad, or legacy-ST counts .tsv(.gz)."),
               out: Path = typer.Option(..., help="Output .h5ad with obsm['signatures']; the model goes next to it."),
               method: str = typer.Option("archetypes", help="archetypes (chrysalis-style) or nmf."),
               n_signatures: int = typer.Option(6, help="Number of signatures."),
               n_genes: int = typer.Option(1000, help="Spatially variable genes kept."),
               seed: int = typer.Option(0),
               pixel_size_um: Optional[float] = typer.Option(None, help="µm per image pixel, if the reader cannot tell."),
               spots: Optional[Path] = typer.Option(None, help="Legacy ST: the spot file (x y ... pixel_x pixel_y).")):
    """Derive niche signatures from one section and store per-spot proportions."""
    from voxelome.io import read_section
    from voxelome.io.atomic import atomic_write_h5ad
    from voxelome.signatures import SignatureConfig, fit_signatures, project_signatures

    kwargs = {"pixel_size_um": pixel_size_um}
    if spots is not None:
        kwargs["spots"] = spots
    adata = read_section(section, **kwargs)
    model = fit_signatures(adata, SignatureConfig(method=method, n_signatures=n_signatures, n_genes=n_genes, seed=seed))
    project_signatures(model, adata)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_path = model.save(out.with_name(out.stem + "_signatures.npz"))
    atomic_write_h5ad(adata, out)
    typer.echo(f"{model.n_signatures} signatures on {adata.n_obs} spots × {len(model.genes)} genes → {out} (model: {model_path})")


@app.command()
@_friendly
def train(volume: Optional[Path] = typer.Option(None, help="Scan: TIFF, OME-Zarr, NIfTI, NPY/NPZ (every preset but dense2d)."),
          image: Optional[list[Path]] = typer.Option(None, help="--preset dense2d: the section's H&E image (2D histology, no --volume)."),
          section: Path = typer.Option(..., help="Section .h5ad (with obsm['signatures'] from `voxelome signatures`, or counts to fit them)."),
          out: Path = typer.Option(..., help="Output folder (run/ inside it holds the checkpoint)."),
          preset: str = typer.Option("dense", help="dense or xpression."),
          spacing_um: Optional[str] = typer.Option(None, help="Voxel size µm 'dz,dy,dx' or one number, if the file does not say."),
          pixel_size_um: Optional[float] = typer.Option(None, help="Section µm per pixel, if the file does not say."),
          slice_index: Optional[float] = typer.Option(None, help="The section is axial slice K of the volume."),
          origin: Optional[str] = typer.Option(None, help="Plane origin x,y,z in µm (with --normal)."),
          normal: Optional[str] = typer.Option(None, help="Plane normal x,y,z (with --origin)."),
          landmarks: Optional[Path] = typer.Option(None, help="CSV of ≥ 3 landmark pairs: px_x,px_y,x_um,y_um,z_um."),
          plane: Optional[Path] = typer.Option(None, help="plane.json of `voxelome register plane` (the section's "
                                               "H&E registered into this volume)."),
          config: Optional[Path] = typer.Option(None, help="YAML file of config fields."),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP),
          signatures_model: Optional[Path] = typer.Option(None, help="The .npz `voxelome signatures` saved; copied into the run so `predict --genes` can map genes."),
          no_resume: bool = typer.Option(False, "--no-resume", help="Start over instead of resuming run/last.pt."),
          predict: bool = typer.Option(False, help="Also predict the whole volume into out/prediction.ome.zarr.")):
    """Train an image → signature model on one placed section.

    On several processes/GPUs: `torchrun --nproc-per-node N -m voxelome.cli train ...` (same options).
    """
    if preset.startswith("dense2d"):  # 2D histology → dense expression maps (PixNet), in cli_dense2d.py
        from voxelome.cli_dense2d import run_train

        typer.echo(f"run: {run_train([section], list(image or []), out, preset=preset, config=config, sets=set_, pixel_size_um=pixel_size_um)}")
        return
    if volume is None:
        raise VoxelomeError("--volume is required (the scan to train on); only --preset dense2d trains on a 2D --image.")
    from voxelome.io import read_section
    from voxelome.pipeline import run_pipeline
    from voxelome.train.config import load_config_file, make_config
    from voxelome.train.ddp import launched_rank

    vol = _load_volume(volume, spacing_um)
    base = load_config_file(config).to_dict() if config else {}
    base.update(_parse_sets(set_))
    if "model" in base and base["model"] != preset:
        preset = base["model"]
    cfg = make_config(preset, **{k: v for k, v in base.items() if k != "model"})
    if launched_rank() > 0:  # a torchrun rank > 0: train alongside rank 0 (it prepares and broadcasts the
        from voxelome.train.trainer import train_model  # targets, writes the run, and does everything else)

        train_model(vol, None, cfg, out / "run", resume=not no_resume, progress=False)
        return
    adata = read_section(section, pixel_size_um=pixel_size_um)
    px = adata.uns["voxelome"]["pixel_size_um"]
    placement = _placement(vol, px, slice_index, origin, normal, landmarks, plane)
    key = "signatures" if "signatures" in adata.obsm else None
    if signatures_model is not None:
        import shutil

        from voxelome.signatures import SignatureModel

        SignatureModel.load(signatures_model)  # fail early on a bad file
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(signatures_model, out / "signatures.npz")
    result = run_pipeline(vol, adata, placement, out, train_config=cfg, signatures_key=key, predict=predict,
                          resume=not no_resume)
    typer.echo(json.dumps(result.metrics["held_out_spots"], indent=1))
    typer.echo(f"run: {result.run_dir}")


@app.command()
@_friendly
def convert(volume: Path = typer.Argument(..., help="Scan: TIFF stack, a folder of 2D slices, NIfTI, MetaImage/NRRD, "
                                          "NPY/NPZ or zarr."),
            out: Path = typer.Option(..., help="Output .ome.zarr: chunked, multiscale, µm scale (napari)."),
            spacing_um: Optional[str] = typer.Option(None, help="Voxel size µm 'dz,dy,dx' or one number, if the file does "
                                                     "not say (a folder of slices never stores the slice distance)."),
            overwrite: bool = typer.Option(False, help="Replace an existing output.")):
    """Write a scan as a chunked multiscale OME-Zarr, the format every verb reads fastest.

    A prediction window reads only the chunks it covers; from a folder of slices or a stripped TIFF every window
    decodes whole slices, so a large scan is worth converting once.
    """
    from dask.diagnostics import ProgressBar

    from voxelome.io import write_volume_ome_zarr
    from voxelome.io.atomic import atomic_dir

    if out.exists() and not overwrite:
        raise VoxelomeError(f"--out {out} exists; pass --overwrite or choose another path.")
    vol = _load_volume(volume, spacing_um)
    typer.echo(f"{volume}: {vol.shape} (z, y, x) voxels of {tuple(round(float(v), 4) for v in vol.spacing_um)} µm "
               f"→ {out}", err=True)
    with ProgressBar(out=sys.stderr), atomic_dir(out) as tmp:  # written whole or not at all
        write_volume_ome_zarr(tmp, vol, overwrite=True)
    typer.echo(f"OME-Zarr → {out}")


@app.command()
@_friendly
def predict(run: Path = typer.Argument(..., help="Run folder (holding checkpoint.pt) or the train --out folder."),
            volume: Optional[Path] = typer.Option(None, help="Scan to predict (same voxel size as in training)."),
            image: Optional[Path] = typer.Option(None, help="dense2d runs: the H&E image to map (writes a (c, y, x) OME-Zarr)."),
            pixel_size_um: Optional[float] = typer.Option(None, help="dense2d runs: µm per pixel of --image."),
            out: Path = typer.Option(..., help="Output .ome.zarr (resumes if it exists)."),
            spacing_um: Optional[str] = typer.Option(None, help="Voxel size µm if the file does not say."),
            chunks: Optional[str] = typer.Option(None, help="Output chunk z,y,x in output voxels."),
            overwrite: bool = typer.Option(False, help="Replace an existing output of another geometry."),
            genes: Optional[str] = typer.Option(None, help="Also write maps of these genes (comma-separated; 'all' for every signature gene) from the signature loadings."),
            scheduler: Optional[str] = typer.Option(None, help="Map the blocks over a Dask cluster: 'local' (worker processes on this machine) or a scheduler address, e.g. tcp://10.0.0.5:8786. Default: one process."),
            workers: Optional[int] = typer.Option(None, help="--scheduler local: number of worker processes (default: one per core)."),
            threads_per_worker: int = typer.Option(1, help="--scheduler local: blocks run at once per worker."),
            torch_threads: int = typer.Option(1, help="With --scheduler: torch CPU threads per worker."),
            device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: the run's config, CUDA when present)."),
            precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (autocast; GPU fast path)."),
            compile_mode: Optional[str] = typer.Option(None, "--compile", help="torch.compile mode: default, reduce-overhead (CUDA graphs) or max-autotune."),
            channels_last: bool = typer.Option(False, help="channels-last-3D activations (GPU fast path).")):
    """Predict the whole volume, chunk by chunk, into a multiscale OME-Zarr."""
    if image is not None:  # a dense2d run on a 2D image (cli_dense2d.py)
        from voxelome.cli_dense2d import run_predict

        typer.echo(json.dumps(run_predict(run, image, out, pixel_size_um=pixel_size_um, overwrite=overwrite), indent=1))
        return
    if volume is None:
        raise VoxelomeError("--volume is required (the scan to predict); for a dense2d run pass --image.")
    from voxelome.accel import AccelOptions
    from voxelome.infer.predict import TrainedModel, predict_volume

    run = _run_dir(run)
    ch = tuple(int(c) for c in _triplet(chunks, "chunks")) if chunks else None
    accel = AccelOptions(precision=precision, channels_last=channels_last, compile=compile_mode)
    if scheduler is not None:
        from voxelome.infer.distributed import VolumeRef, predict_volume_distributed

        spacing = _triplet(spacing_um, "spacing-um")
        ref = VolumeRef(str(volume.resolve()), None if spacing is None else tuple(np.broadcast_to(spacing, 3).tolist()))
        stats = predict_volume_distributed(run, ref, out, scheduler=scheduler, n_workers=workers,
                                           threads_per_worker=threads_per_worker, chunks=ch, overwrite=overwrite,
                                           device=device, accel=accel, torch_threads=torch_threads)
    else:
        vol = _load_volume(volume, spacing_um)
        model = run if (device is None and accel.is_default) else TrainedModel.load(run, device=device, accel=accel)
        stats = predict_volume(model, vol, out, chunks=ch, overwrite=overwrite)
    typer.echo(json.dumps(stats, indent=1))
    if genes:
        from voxelome.genes import write_gene_volume
        from voxelome.signatures import SignatureModel

        if not (run.parent / "signatures.npz").exists():
            raise VoxelomeError(f"--genes needs the signature model in {run.parent / 'signatures.npz'}; train with "
                                "--signatures-model (or let train fit the signatures from counts).")
        sig = SignatureModel.load(run.parent / "signatures.npz")
        names = None if genes == "all" else [g.strip() for g in genes.split(",")]
        gene_out = out.with_name(out.name.replace(".ome.zarr", "") + "_genes.ome.zarr")
        typer.echo(f"genes: {write_gene_volume(out, sig, gene_out, genes=names)}")


def _run_dir(path: Path) -> Path:
    if (path / "checkpoint.pt").exists():
        return path
    if (path / "run" / "checkpoint.pt").exists():
        return path / "run"
    raise VoxelomeError(f"no checkpoint.pt in {path} or {path / 'run'}; pass the folder `voxelome train --out` wrote.")


@app.command()
@_friendly
def evaluate(run: Path = typer.Argument(..., help="Run folder or train --out folder."),
             volume: Optional[Path] = typer.Option(None, help="Scan."),
             image: Optional[Path] = typer.Option(None, help="dense2d runs: the section's H&E image (then --section is its counts)."),
             section: Path = typer.Option(..., help="A placed section .h5ad with obsm['signatures'] (e.g. out/section.h5ad, or another section)."),
             out: Path = typer.Option(Path("evaluation"), help="Folder for metrics.json and figures."),
             spacing_um: Optional[str] = typer.Option(None, help="Voxel size µm if the file does not say.")):
    """Score a trained model on a section's spots (held-out spots when it is the training section)."""
    if image is not None:  # a dense2d run on a 2D section (cli_dense2d.py)
        from voxelome.cli_dense2d import run_evaluate

        typer.echo(json.dumps(run_evaluate(run, section, image, out), indent=1))
        return
    if volume is None:
        raise VoxelomeError("--volume is required (the scan); for a dense2d run pass --image.")
    import anndata as ad

    from voxelome.constants import HELD_OUT_KEY, SIGNATURES_KEY, SPATIAL_KEY
    from voxelome.infer.predict import TrainedModel
    from voxelome.io.atomic import atomic_write_json
    from voxelome.pipeline import predict_section_spots, spot_metrics
    from voxelome.plot.figures import section_overlay

    model = TrainedModel.load(_run_dir(run))
    vol = _load_volume(volume, spacing_um)
    adata = ad.read_h5ad(section)
    if SIGNATURES_KEY not in adata.obsm or "spatial_3d" not in adata.obsm:
        raise VoxelomeError(f"{section} needs obsm['signatures'] and obsm['spatial_3d'] (use the section.h5ad that train wrote).")
    pred = predict_section_spots(model, vol, adata)
    held = adata.obs[HELD_OUT_KEY].to_numpy(bool) if HELD_OUT_KEY in adata.obs else np.ones(adata.n_obs, bool)
    true = np.asarray(adata.obsm[SIGNATURES_KEY])
    metrics = {"spots": spot_metrics(pred[held], true[held], model.names)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    section_overlay(adata.obsm[SPATIAL_KEY], true, pred, model.names, out / "section_overlay.png", held_out=held)
    typer.echo(json.dumps(metrics, indent=1))


from voxelome.cli_field import app as _reconstruct_app  # noqa: E402 - the `reconstruct` verbs (neural field)
app.add_typer(_reconstruct_app, name="reconstruct")
from voxelome.cli_register import app as _register_app  # noqa: E402 - `register plane` / `register stack`
app.add_typer(_register_app, name="register")
from voxelome.cli_dense2d import app as _dense2d_app  # noqa: E402 - dense 2D maps from H&E (PixNet)
app.add_typer(_dense2d_app, name="dense2d")
from voxelome.cli_superres import app as _superres_app  # noqa: E402 - super-resolution by cross-modal diffusion
app.add_typer(_superres_app, name="superres")


def main():  # pragma: no cover - entry point
    sys.exit(app())
if __name__ == "__main__":  # pragma: no cover
    main()
