"""CLI verbs for super-resolved ST by cross-modal diffusion; thin over the API.

    voxelome superres fit      --section S1.h5ad --image HE1.jpg [--section ... --image ...] --out RUN
                               [--calibration-section S5.h5ad --calibration-image HE5.jpg] [--n-genes 50]
                               [--select-steps 2,5,10,20]
    voxelome superres predict  RUN --section S.h5ad --image HE.jpg --out S_superres.zarr
                               [--mode beyond|restore] [--samples 8] [--steps 20] [--labels cells.tif]

Sections are square spot arrays (legacy ST: ``obs['array_x'/'array_y']``), read like every other verb
(``.h5ad``, legacy ST counts + spot files). Without ``--image`` the model is expression-only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from voxelome.errors import VoxelomeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Super-resolved ST by cross-modal diffusion: fit on sections, predict mean/spread/intervals.")

FEATURES_FILE = "histology_features.json"


def _friendly(fn):
    from voxelome.cli_common import friendly

    return friendly(fn)


def _name(path) -> str:
    """``C5.tsv.gz`` → ``C5``."""
    return Path(path).name.split(".")[0]


def _sections(paths, images, pixel_size_um, input_um):
    from voxelome.datasets.superres_sections import SectionImage
    from voxelome.io import read_section

    images = list(images or [])
    if images and len(images) != len(paths):
        raise VoxelomeError(f"--image, when given, needs one image per --section (got {len(paths)} sections, "
                            f"{len(images)} images).")
    adatas = [read_section(p, pixel_size_um=pixel_size_um) for p in paths]
    ims = [SectionImage.read(i, a, input_um) for i, a in zip(images, adatas)] if images else [None] * len(adatas)
    return adatas, ims


def run_fit(sections: list[Path], images: list[Path], out: Path, *, n_genes: int = 50, factor: int = 2,
            calibration_sections=(), calibration_images=(), preset: str = "superres", sets=(),
            pixel_size_um: Optional[float] = None, input_um: float = 4.0, n_features: int = 8,
            select_steps=(), progress: bool = True) -> Path:
    """Fit a super-resolution run on sections degraded by ``factor``; calibrate on held-out sections if given.

    ``select_steps`` (DDIM step candidates) are compared on the calibration sections before calibrating
    (:meth:`TrainedSuperRes.select_steps`); the best becomes the run's default.
    """
    from voxelome.cli_common import parse_sets
    from voxelome.datasets.superres_sections import HistologyFeatures, restore_pair
    from voxelome.io.atomic import atomic_write_json
    from voxelome.train.dense2d_data import select_target_genes
    from voxelome.train.superres_config import make_superres_config
    from voxelome.train.superres_trainer import train_superres

    if not sections:
        raise VoxelomeError("pass at least one --section to train on.")
    if select_steps and not calibration_sections:
        raise VoxelomeError(f"--select-steps {','.join(map(str, select_steps))} needs held-out sections to compare "
                            "on: add --calibration-section (and its --calibration-image).")
    adatas, ims = _sections(sections, images, pixel_size_um, input_um)
    genes = select_target_genes(adatas, int(n_genes), "variance")
    names = [_name(s) for s in sections]
    raw = [restore_pair(a, genes, factor=factor, image=im, name=n, raw_features=True)
           for a, im, n in zip(adatas, ims, names)]
    features = HistologyFeatures.fit(np.vstack([r for _, r in raw]), n_features) if ims[0] is not None else None
    pairs = []
    for (pair, r) in raw:
        if features is not None:
            pair.image = features.transform(r).T.reshape(-1, *pair.high_mask.shape)
        pairs.append(pair.validate())
    cfg = make_superres_config(preset, **parse_sets(list(sets or []), example="iterations=800"))
    run = Path(out)
    model = train_superres(pairs, cfg, run, progress=progress)
    if features is not None:
        atomic_write_json(run / FEATURES_FILE, {"input_um": input_um, **features.to_dict()})
    if calibration_sections:
        cads, cims = _sections(calibration_sections, calibration_images, pixel_size_um, input_um)
        cal = [restore_pair(a, genes, factor=factor, image=im, features=features, name=_name(p))
               for a, im, p in zip(cads, cims, calibration_sections)]
        if select_steps:
            model.select_steps(cal, select_steps)
        model.calibrate(cal)
    return run


def run_predict(run: Path, sections: list[Path], images: list[Path], out: Path, *, mode: str = "beyond",
                samples: Optional[int] = None, steps: Optional[int] = None, seed: int = 0,
                section_spacing_um: Optional[float] = None, labels: Optional[Path] = None,
                pixel_size_um: Optional[float] = None, overwrite: bool = False) -> dict:
    """Super-resolve sections (one → ``(c, y, x)``; several → a slice-wise ``(c, z, y, x)`` volume)."""
    from voxelome.datasets.superres_sections import HistologyFeatures, array_box, beyond_pair, restore_pair
    from voxelome.errors import check_choice
    from voxelome.evaluate.superres_metrics import superres_scores
    from voxelome.infer.superres import aggregate_to_labels, write_superres
    from voxelome.train.superres_model import TrainedSuperRes

    check_choice("mode", mode, ("beyond", "restore"))
    model = TrainedSuperRes.load(run)
    feat_path = Path(run) / FEATURES_FILE
    features, input_um = None, 4.0
    if feat_path.exists():
        d = json.loads(feat_path.read_text())
        features, input_um = HistologyFeatures.from_dict(d), float(d["input_um"])
        if not images:
            raise VoxelomeError(f"the run {run} was trained with H&E features; pass --image for every --section.")
    adatas, ims = _sections(sections, images, pixel_size_um, input_um)
    build = beyond_pair if mode == "beyond" else restore_pair
    # several sections share one grid: the array frame covering all of them (sections on the same array
    # layout; register them first — `voxelome register stack` — when the tissue moved between sections)
    box = array_box(adatas) if len(adatas) > 1 else None
    preds, masks, report, pixel_um = [], [], {"mode": mode, "sections": {}}, None
    for a, im, p in zip(adatas, ims, sections):
        pair = build(a, model.genes, factor=model.factor, image=im, features=features, name=_name(p), box=box)
        pred = model.predict(pair, samples, steps=steps, seed=seed, keep_samples=labels is not None)
        preds.append(pred)
        masks.append(pair.high_mask)
        size = pair.extra.get("pixel_size_yx_um", pair.pixel_size_um)  # (y, x) on a Visium (hexagonal) lattice
        pixel_um = pixel_um or size
        entry = {"grid": list(pair.high_mask.shape), "pixel_size_um": size}
        if mode == "restore":  # the truth is the measured spots: score like the benchmark
            sc = superres_scores(pred.mean, pair.high, pair.high_mask)
            entry["scores"] = {k: sc[k] for k in ("rmse", "ssim", "pearson", "pearson_median")}
        report["sections"][_name(p)] = entry
    volume = len(preds) > 1
    write_superres(out, preds if volume else preds[0], model.genes, pixel_um,
                   masks=masks if volume else masks[0], section_spacing_um=section_spacing_um,
                   overwrite=overwrite, extra={"run": str(run), "mode": mode, "seed": seed,
                                               "steps": steps or model.sample_steps,
                                               "samples": samples or model.n_samples})
    if labels is not None:
        if volume:
            raise VoxelomeError("--labels works with one --section (a 2D label image on the output grid).")
        import tifffile

        from voxelome.io.atomic import atomic_write_h5ad

        cells = aggregate_to_labels(preds[0], tifffile.imread(labels), model.genes)
        atomic_write_h5ad(cells, Path(out) / "labels.h5ad")
        report["labels"] = {"n": int(cells.n_obs), "file": str(Path(out) / "labels.h5ad")}
    (Path(out) / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report


@app.command("fit")
def fit(section: list[Path] = typer.Option(..., help="Training section (h5ad or legacy ST); repeat for several."),
        image: Optional[list[Path]] = typer.Option(None, help="H&E image of each --section, in order (omit for "
                                                              "expression-only)."),
        out: Path = typer.Option(..., help="Run folder to write."),
        n_genes: int = typer.Option(50, help="Top-variance genes to super-resolve."),
        factor: int = typer.Option(2, help="Spots per block side when degrading (and the output refinement)."),
        calibration_section: Optional[list[Path]] = typer.Option(None, help="Held-out section(s) for the interval "
                                                                            "calibration (recommended)."),
        calibration_image: Optional[list[Path]] = typer.Option(None, help="H&E of each calibration section."),
        preset: str = typer.Option("superres", help="superres | superres-deterministic | superres-tiny."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Config override key=value (repeatable)."),
        pixel_size_um: Optional[float] = typer.Option(None, help="µm per full-resolution image pixel (override)."),
        input_um: float = typer.Option(4.0, help="µm/px the H&E is resampled to for the features."),
        select_steps: Optional[str] = typer.Option(None, help="Comma-separated DDIM step counts (e.g. 2,5,10,20) "
                                                              "compared on the calibration sections; the best "
                                                              "becomes the run's default.")):
    """Train a super-resolution model on sections degraded on purpose (blocks of spots → spots)."""
    try:
        steps = [int(k) for k in select_steps.split(",")] if select_steps else []
    except ValueError:
        typer.echo(f"error: --select-steps {select_steps!r} must be comma-separated integers, e.g. 2,5,10,20.",
                   err=True)
        raise typer.Exit(2)
    run = _friendly(run_fit)(section, image or [], out, n_genes=n_genes, factor=factor,
                             calibration_sections=calibration_section or [],
                             calibration_images=calibration_image or [], preset=preset, sets=set_ or [],
                             pixel_size_um=pixel_size_um, input_um=input_um, select_steps=steps)
    typer.echo(f"run written to {run}")


@app.command("predict")
def predict(run: Path = typer.Argument(..., help="Run folder from `voxelome superres fit`."),
            section: list[Path] = typer.Option(..., help="Section(s) to super-resolve; several = a slice-wise volume."),
            image: Optional[list[Path]] = typer.Option(None, help="H&E image of each --section."),
            out: Path = typer.Option(..., help="Output folder (mean/std/lower/upper OME-Zarr + summary.json)."),
            mode: str = typer.Option("beyond", help="beyond: a grid `factor`× finer than the spots; restore: "
                                                    "degrade then recover the spots (scored)."),
            samples: Optional[int] = typer.Option(None, help="Samples per section (default: the run's: "
                                                             "8, or those of --select-steps)."),
            steps: Optional[int] = typer.Option(None, help="DDIM steps (default: the run's: 20, or the "
                                                           "count chosen by fit --select-steps)."),
            seed: int = typer.Option(0, help="Sampling seed."),
            section_spacing_um: Optional[float] = typer.Option(None, help="Distance between sections (µm), volumes."),
            labels: Optional[Path] = typer.Option(None, help="Label TIFF on the output grid → labels.h5ad per label."),
            pixel_size_um: Optional[float] = typer.Option(None, help="µm per full-resolution image pixel (override)."),
            overwrite: bool = typer.Option(False, help="Replace an existing output.")):
    """Sample the model: mean, per-pixel std and intervals as OME-Zarr (opens in napari)."""
    report = _friendly(run_predict)(run, section, image or [], out, mode=mode, samples=samples, steps=steps, seed=seed,
                                    section_spacing_um=section_spacing_um, labels=labels,
                                    pixel_size_um=pixel_size_um, overwrite=overwrite)
    typer.echo(json.dumps(report, indent=1, default=float))
