"""CLI verbs for dense 2D expression maps from histology (PixNet); thin over the API.

    voxelome dense2d train    --section S.h5ad --image HE.jpg [--section ... --image ...] --out RUN
    voxelome dense2d predict  RUN --image HE.jpg --pixel-size-um 0.69 --out map.ome.zarr [--section S --spots-out pred.h5ad]
    voxelome dense2d predict  RUN --stack registered.ome.zarr --out volume.ome.zarr [--genes ERBB2,... | --n-genes 50]
    voxelome dense2d evaluate RUN --section S --image HE.jpg --out DIR

``voxelome train --preset dense2d``, ``voxelome predict RUN --image ...`` and ``voxelome evaluate RUN --image ...``
call the same functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from voxelome.cli_common import parse_names
from voxelome.errors import VoxelomeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Dense 2D expression maps from H&E images (PixNet): train, predict a slide, evaluate.")


def _friendly(fn):
    from voxelome.cli_common import friendly

    return friendly(fn)


def _sets(items) -> dict:
    from voxelome.cli_common import parse_sets

    return parse_sets(list(items or []), example="n_genes=50")


def _read(section: Path, pixel_size_um, spots: Optional[Path] = None):
    from voxelome.io import read_section

    kwargs = {"pixel_size_um": pixel_size_um}
    if spots is not None:
        kwargs["spots"] = spots
    return read_section(section, **kwargs)


def run_train(sections: list[Path], images: list[Path], out: Path, *, preset: str = "dense2d", config: Optional[Path] = None,
              sets=(), pixel_size_um: Optional[float] = None, spots: Optional[list[Path]] = None, progress: bool = True):
    """Train a dense2d run from files; returns the run folder."""
    from voxelome.train.dense2d_config import load_dense2d_config_file, make_dense2d_config
    from voxelome.train.dense2d_trainer import train_dense2d_sections

    if not sections or len(sections) != len(images):
        raise VoxelomeError(f"--section and --image go in pairs, one image per section (got {len(sections)} "
                            f"sections, {len(images)} images).")
    spots = list(spots or [])
    if spots and len(spots) != len(sections):
        raise VoxelomeError("--spots, when given, needs one spot file per --section.")
    adatas = [_read(s, pixel_size_um, spots[i] if spots else None) for i, s in enumerate(sections)]
    base = load_dense2d_config_file(config).to_dict() if config else {}
    base.update(_sets(sets))
    cfg = make_dense2d_config(preset, **base)
    run = out / "run"
    train_dense2d_sections(adatas, [str(i) for i in images], cfg, run, pixel_size_um=pixel_size_um, progress=progress)
    return run


def _run_dir(path: Path) -> Path:
    for cand in (path, path / "run"):
        if (cand / "checkpoint.pt").exists():
            return cand
    raise VoxelomeError(f"no checkpoint.pt in {path} or {path / 'run'}; pass the folder `voxelome train --preset dense2d --out` wrote.")


def is_dense2d_run(path: Path) -> bool:
    """Whether ``path`` (a run or train --out folder) holds a dense2d run."""
    import yaml

    for cand in (path, path / "run"):
        cfg = cand / "config.yaml"
        if cfg.exists():
            try:
                return (yaml.safe_load(cfg.read_text()) or {}).get("kind") == "dense2d"
            except Exception:  # noqa: BLE001 - not ours to judge
                return False
    return False


def _slide(model, image: Path, adata, pixel_size_um):
    from voxelome.train.dense2d_data import slide_from_section

    return slide_from_section(str(image), adata, np.zeros((adata.n_obs, len(model.genes)), np.float32),
                              input_um=model.input_um, pixel_size_um=pixel_size_um)


def run_predict(run: Path, image: Path, out: Path, *, pixel_size_um: Optional[float] = None,
                section: Optional[Path] = None, spots: Optional[Path] = None, spots_out: Optional[Path] = None,
                spot_radius_um: Optional[float] = None, overwrite: bool = False, chunk: int = 256) -> dict:
    """Whole-slide map → OME-Zarr ``(c, y, x)``; optionally per-spot predictions → ``.h5ad``."""
    from voxelome.constants import PREDICTED_EXPRESSION_KEY, PREDICTED_GENES_KEY, PREDICTED_RADIUS_KEY, UNS_KEY
    from voxelome.infer.slide import write_slide_map
    from voxelome.train.dense2d_data import load_he_image, section_geometry
    from voxelome.train.dense2d_trainer import TrainedDense2D

    model = TrainedDense2D.load(_run_dir(run))
    adata = _read(section, pixel_size_um, spots) if section is not None else None
    if pixel_size_um is None and adata is not None:
        pixel_size_um = section_geometry(adata)[0]
    if pixel_size_um is None:
        raise VoxelomeError("--pixel-size-um is needed (µm per pixel of the image), or pass --section whose "
                            "reader knows it.")
    arr, (sx, sy) = load_he_image(str(image), pixel_size_um, model.input_um)
    work_um = pixel_size_um / ((sx + sy) / 2)
    write_slide_map(out, arr, model.predictor, tile=model.config.predict_tile_px, stride=model.stride,
                    channel_names=model.genes, pixel_size_um=work_um, overlap=model.config.overlap,
                    blend=model.config.blend, chunk=chunk, overwrite=overwrite,
                    extra_attrs={"voxelome": {"kind": "dense2d", "run": str(run), "image": str(image),
                                              "unit": "target units per map pixel; a region's value is the sum"}})
    result = {"map": str(out), "genes": len(model.genes), "map_pixel_um": work_um * model.stride,
              "shape_cyx": [len(model.genes), -(-arr.shape[0] // model.stride), -(-arr.shape[1] // model.stride)]}
    if adata is not None:
        from voxelome.io.atomic import atomic_write_h5ad

        slide = _slide(model, image, adata, pixel_size_um)
        radius_px = None if spot_radius_um is None else spot_radius_um / slide.pixel_size_um
        pred = model.predict_spots(slide, radius_px=radius_px)
        adata.obsm[PREDICTED_EXPRESSION_KEY] = pred.astype(np.float32)
        adata.uns.setdefault(UNS_KEY, {})
        adata.uns[UNS_KEY][PREDICTED_GENES_KEY] = list(model.genes)
        adata.uns[UNS_KEY][PREDICTED_RADIUS_KEY] = float((radius_px or slide.radius_px) * slide.pixel_size_um)
        dest = spots_out or out.with_name(out.name.replace(".ome.zarr", "") + "_spots.h5ad")
        atomic_write_h5ad(adata, dest)
        result["spots"] = str(dest)
    return result


def run_predict_stack(run: Path, stack: Path, out: Path, *, genes: Optional[list[str]] = None,
                      n_genes: Optional[int] = None, overwrite: bool = False, chunk: int = 256,
                      progress: bool = False, allow_coarse: bool = False) -> dict:
    """Registered RGB stack (OME-Zarr ``(3, z, y, x)``) → 3D expression volume OME-Zarr ``(G, z, y, x)`` in µm.

    Each section is resampled to the model's working pixel size and mapped like one slide; the volume keeps
    the stack's z spacing and µm frame (origin). A stack more than 1.5× coarser than the model's working
    pixel is refused unless ``allow_coarse`` (enlarged sections lack the texture the model reads: on her2st a
    20 µm stack enlarged to 4 µm gave negative held-out r, see BENCHMARKS.md).
    """
    import time
    import warnings

    from voxelome.infer.slide import RGBStack
    from voxelome.train.dense2d_trainer import TrainedDense2D

    if genes is not None and n_genes is not None:
        raise VoxelomeError("give --genes or --n-genes, not both.")
    run_dir = _run_dir(run)
    model = TrainedDense2D.load(run_dir)
    if n_genes is not None:
        if not 1 <= n_genes <= len(model.genes):
            raise VoxelomeError(f"--n-genes={n_genes} must lie in 1…{len(model.genes)} (the model's outputs).")
        genes = model.genes[:n_genes]
    st = RGBStack(stack, pixel_size_um=model.input_um)
    if min(st.store_pixel_size_um) > 1.5 * model.input_um:
        msg = (f"the stack is at {st.store_pixel_size_um[0]:.3g} µm/px, coarser than the model's {model.input_um:.3g} "
               "µm/px: enlarged sections lack the texture the model reads (maps are not meaningful); render the "
               "registered sections at the model's pixel size (benchmarks/bench_pixnet_stack.py shows how)")
        if not allow_coarse:
            raise VoxelomeError(msg + ", or pass --allow-coarse to map it anyway.")
        warnings.warn(msg + ".", stacklevel=2)
    t0 = time.perf_counter()
    model.write_stack(out, st, genes=genes, overwrite=overwrite, chunk=chunk, progress=progress,
                      extra_attrs={"voxelome": {"kind": "dense2d_stack", "run": str(run_dir), "stack": str(stack),
                                                "unit": "target units per map pixel; a region's value is the sum"}})
    names = genes or model.genes
    return {"volume": str(out), "genes": len(names), "shape_czyx": [len(names), st.shape[0],
            -(-st.shape[1] // model.stride), -(-st.shape[2] // model.stride)],
            "spacing_um_zyx": [st.section_spacing_um, st.pixel_size_um * model.stride, st.pixel_size_um * model.stride],
            "seconds": round(time.perf_counter() - t0, 1)}


def run_evaluate(run: Path, section: Path, image: Path, out: Path, *, pixel_size_um: Optional[float] = None,
                 spots: Optional[Path] = None) -> dict:
    """Scores on a section's spots beside the training-mean baseline; writes ``out/metrics.json``."""
    from voxelome.io.atomic import atomic_write_json
    from voxelome.train.checkpoint import load_checkpoint
    from voxelome.train.dense2d_data import gene_targets, signature_targets
    from voxelome.train.dense2d_trainer import TrainedDense2D, expression_scores

    run = _run_dir(run)
    model = TrainedDense2D.load(run)
    adata = _read(section, pixel_size_um, spots)
    true = gene_targets(adata, model.genes) if model.config.targets == "genes" else signature_targets(adata)
    pred = model.predict_spots(_slide(model, image, adata, pixel_size_um))
    mean = np.asarray(load_checkpoint(run / "checkpoint.pt")["meta"]["train_mean"], float)
    metrics = {"dense2d": expression_scores(pred, true),
               "train_mean_baseline": expression_scores(np.broadcast_to(mean, true.shape), true)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


@app.command("train")
def train_cmd(section: list[Path] = typer.Option(..., help="Section (.h5ad, Visium outs, legacy ST counts); repeat for several."),
              image: list[Path] = typer.Option(..., help="H&E image of each --section, in the same order."),
              out: Path = typer.Option(..., help="Output folder (run/ inside holds the checkpoint)."),
              preset: str = typer.Option("dense2d", help="dense2d (250 genes) or dense2d-top50."),
              config: Optional[Path] = typer.Option(None, help="YAML file of Dense2DConfig fields."),
              set_: list[str] = typer.Option([], "--set", help="Override a config field, key=value (repeatable), e.g. n_genes=50."),
              pixel_size_um: Optional[float] = typer.Option(None, help="µm per image pixel, if the reader cannot tell."),
              spots: list[Path] = typer.Option([], help="Legacy ST spot file per --section (when not found beside the counts).")):
    """Train an H&E → dense expression map model on the sections' measured spots."""
    _friendly(lambda: typer.echo(f"run: {run_train(section, image, out, preset=preset, config=config, sets=set_, pixel_size_um=pixel_size_um, spots=spots)}"))()


@app.command("predict")
def predict_cmd(run: Path = typer.Argument(..., help="Run folder (or train --out folder)."),
                image: Optional[Path] = typer.Option(None, help="H&E image to map (or --stack)."),
                out: Path = typer.Option(..., help="Output .ome.zarr: (c, y, x) for --image, (c, z, y, x) for --stack, in µm."),
                stack: Optional[Path] = typer.Option(None, help="Registered RGB stack OME-Zarr (3, z, y, x), e.g. from "
                                                     "`voxelome register stack --images … --zarr-out`: a 3D volume."),
                genes: Optional[str] = typer.Option(None, help="--stack: comma-separated outputs to write (default all)."),
                n_genes: Optional[int] = typer.Option(None, help="--stack: write the first N outputs (top-N genes)."),
                allow_coarse: bool = typer.Option(False, help="--stack: map a stack > 1.5× coarser than the model's pixel size."),
                pixel_size_um: Optional[float] = typer.Option(None, help="µm per image pixel (or from --section)."),
                section: Optional[Path] = typer.Option(None, help="Also predict this section's spots into an .h5ad."),
                spots: Optional[Path] = typer.Option(None, help="Legacy ST spot file for --section."),
                spots_out: Optional[Path] = typer.Option(None, help="Where the per-spot .h5ad goes (default beside --out)."),
                spot_radius_um: Optional[float] = typer.Option(None, help="Sum the map over disks of this radius instead of the section's spot radius."),
                overwrite: bool = typer.Option(False, help="Replace an existing output store.")):
    """Predict a whole slide (--image), or every section of a registered stack (--stack), into a multiscale OME-Zarr."""

    def go():
        if (image is None) == (stack is None):
            raise VoxelomeError("give either --image (one slide → (c, y, x) map) or --stack (a registered RGB "
                                "OME-Zarr stack → (c, z, y, x) volume).")
        if stack is not None:
            if section is not None or spots is not None or spots_out is not None:
                raise VoxelomeError("--section/--spots/--spots-out go with --image; per-spot values of a stack "
                                    "section: predict that section's image.")
            names = parse_names(genes)
            return run_predict_stack(run, stack, out, genes=names, n_genes=n_genes, overwrite=overwrite,
                                     allow_coarse=allow_coarse)
        if genes is not None or n_genes is not None:
            raise VoxelomeError("--genes/--n-genes go with --stack.")
        return run_predict(run, image, out, pixel_size_um=pixel_size_um, section=section, spots=spots,
                           spots_out=spots_out, spot_radius_um=spot_radius_um, overwrite=overwrite)

    _friendly(lambda: typer.echo(json.dumps(go(), indent=1)))()


@app.command("evaluate")
def evaluate_cmd(run: Path = typer.Argument(..., help="Run folder (or train --out folder)."),
                 section: Path = typer.Option(..., help="Section with counts (held out from training)."),
                 image: Path = typer.Option(..., help="Its H&E image."),
                 out: Path = typer.Option(Path("evaluation"), help="Folder for metrics.json."),
                 pixel_size_um: Optional[float] = typer.Option(None, help="µm per image pixel, if the reader cannot tell."),
                 spots: Optional[Path] = typer.Option(None, help="Legacy ST spot file for --section.")):
    """Score a dense2d model on a section's spots (PCC@M/@S/@F, MSE, MAE) beside the training-mean baseline."""
    _friendly(lambda: typer.echo(json.dumps(run_evaluate(run, section, image, out, pixel_size_um=pixel_size_um, spots=spots), indent=1)))()
