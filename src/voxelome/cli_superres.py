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


def _check_section_files(paths, spots, what: str = "--section") -> None:
    """Fail before any work when a legacy ST counts file has no spot file beside it and none was given."""
    for k, path in enumerate(paths):
        path = Path(path)
        name = path.name.lower()
        given = bool(spots) and spots[k] is not None
        if given or not path.exists() or not (name.endswith(".tsv") or name.endswith(".tsv.gz")):
            continue
        stem = path.name.split(".")[0]
        beside = [path.parent / f"{stem}_selection.tsv", path.parent.parent / "ST-spotfiles" / f"{stem}_selection.tsv"]
        if not any(c.exists() for c in beside):
            spots_opt = "--spots" if what == "--section" else "--calibration-spots"
            raise VoxelomeError(f"{what} {path}: a legacy ST counts file needs its spot file (pixel positions), "
                                f"looked for {beside[0].name} beside it and in ../ST-spotfiles/; pass {spots_opt} "
                                f"SPOTS.tsv (one per {what}, in order).")


def _check_common(pixel_size_um, spot_diameter_um, factor=None, n_genes=None) -> None:
    from voxelome.errors import check_positive

    for flag, value in (("--pixel-size-um", pixel_size_um), ("--spot-diameter-um", spot_diameter_um)):
        if value is not None:
            try:
                check_positive(flag, value)
            except (TypeError, ValueError):
                raise VoxelomeError(f"{flag}={value!r} must be a finite number > 0.") from None
    if factor is not None and int(factor) < 2:
        raise VoxelomeError(f"--factor {factor} must be an integer ≥ 2 (spots per block side when degrading; "
                            "2 = a grid 2× finer than the spots).")
    if n_genes is not None and int(n_genes) < 1:
        raise VoxelomeError(f"--n-genes {n_genes} must be ≥ 1 (e.g. 50: the top-variance genes to super-resolve).")


def _sections(paths, images, pixel_size_um, input_um, spots=(), spot_diameter_um=None, what: str = "--section"):
    from voxelome.datasets.superres_sections import SectionImage
    from voxelome.io import read_section

    images, spots = list(images or []), list(spots or [])
    img_opt = "--image" if what == "--section" else "--calibration-image"
    spots_opt = "--spots" if what == "--section" else "--calibration-spots"
    if images and len(images) != len(paths):
        raise VoxelomeError(f"{img_opt}, when given, needs one image per {what} (got {len(paths)} sections, "
                            f"{len(images)} images).")
    if spots and len(spots) != len(paths):
        raise VoxelomeError(f"{spots_opt}, when given, needs one spot file per {what} (got {len(paths)} sections, "
                            f"{len(spots)} spot files).")
    _check_section_files(paths, spots, what)
    adatas = [read_section(p, pixel_size_um=pixel_size_um, spot_diameter_um=spot_diameter_um,
                           **({"spots": spots[k]} if spots else {})) for k, p in enumerate(paths)]
    ims = [SectionImage.read(i, a, input_um) for i, a in zip(images, adatas)] if images else [None] * len(adatas)
    return adatas, ims


def run_fit(sections: list[Path], images: list[Path], out: Path, *, n_genes: int = 50, factor: int = 2,
            calibration_sections=(), calibration_images=(), preset: str = "superres", sets=(),
            pixel_size_um: Optional[float] = None, input_um: float = 4.0, n_features: int = 8,
            select_steps=(), progress: bool = True, spots=(), calibration_spots=(),
            spot_diameter_um: Optional[float] = None, phases: bool = False) -> Path:
    """Fit a super-resolution run on sections degraded by ``factor``; calibrate on held-out sections if given.

    ``phases``: train on each section at all ``factor²`` block phases
    (:func:`voxelome.datasets.superres_augment.all_phases`), not only the grid's own.

    ``select_steps`` (DDIM step candidates) are compared on the calibration sections before calibrating
    (:meth:`TrainedSuperRes.select_steps`); the best becomes the run's default. Every input is read and
    checked before training, so a mistake in the calibration inputs does not cost a training run.
    """
    from voxelome.cli_common import parse_sets
    from voxelome.datasets.superres_sections import HistologyFeatures, restore_pair
    from voxelome.io.atomic import atomic_write_json
    from voxelome.train.dense2d_data import select_target_genes
    from voxelome.train.superres_config import make_superres_config
    from voxelome.train.superres_trainer import train_superres

    if not sections:
        raise VoxelomeError("pass at least one --section to train on.")
    _check_common(pixel_size_um, spot_diameter_um, factor, n_genes)
    if select_steps and not calibration_sections:
        raise VoxelomeError(f"--select-steps {','.join(map(str, select_steps))} needs held-out sections to compare "
                            "on: add --calibration-section (and its --calibration-image).")
    if images and calibration_sections and len(calibration_images or []) != len(calibration_sections):
        raise VoxelomeError(f"the model is trained with H&E (--image), so every --calibration-section needs its "
                            f"--calibration-image (got {len(calibration_sections)} sections, "
                            f"{len(calibration_images or [])} images).")
    if not images and calibration_images:
        raise VoxelomeError("--calibration-image given but no --image for the training sections: give both "
                            "(an H&E model) or neither (expression only).")
    cfg = make_superres_config(preset, **parse_sets(list(sets or []), example="iterations=800"))
    bad = [k for k in select_steps if not 1 <= int(k) <= cfg.num_train_timesteps]
    if bad:
        raise VoxelomeError(f"--select-steps {','.join(map(str, select_steps))}: every count must lie in "
                            f"[1, {cfg.num_train_timesteps}] (e.g. 2,5,10,20).")
    adatas, ims = _sections(sections, images, pixel_size_um, input_um, spots, spot_diameter_um)
    cads, cims = (_sections(calibration_sections, calibration_images, pixel_size_um, input_um, calibration_spots,
                            spot_diameter_um, what="--calibration-section") if calibration_sections else ([], []))
    genes = select_target_genes(adatas, int(n_genes), "variance")
    if len(genes) < int(n_genes):
        import warnings

        warnings.warn(f"--n-genes {n_genes}: the training sections share only {len(genes)} genes; modelling all of "
                      "them (time and memory grow with the genes: 50–500 is the usual range).", stacklevel=2)
    for a, p in zip(cads, calibration_sections):  # same panel as training, or the run is of no use to calibrate
        missing = [g for g in genes if g not in set(map(str, a.var_names))]
        if missing:
            raise VoxelomeError(f"--calibration-section {p} lacks {len(missing)} of the {len(genes)} genes selected "
                                f"for training, e.g. {missing[:5]}; calibrate on a section of the same panel.")
    names = [_name(s) for s in sections]
    raw = [restore_pair(a, genes, factor=factor, image=im, name=n, raw_features=True)
           for a, im, n in zip(adatas, ims, names)]
    features = HistologyFeatures.fit(np.vstack([r for _, r in raw]), n_features) if ims[0] is not None else None
    pairs = []
    for (pair, r) in raw:
        if features is not None:
            pair.image = features.transform(r).T.reshape(-1, *pair.high_mask.shape)
        pairs.append(pair.validate())
    if phases:
        from voxelome.datasets.superres_augment import all_phases

        pairs = all_phases(pairs)
    run = Path(out)
    model = train_superres(pairs, cfg, run, progress=progress)
    if features is not None:
        atomic_write_json(run / FEATURES_FILE, {"input_um": input_um, **features.to_dict()})
    if calibration_sections:
        cal = [restore_pair(a, genes, factor=factor, image=im, features=features, name=_name(p))
               for a, im, p in zip(cads, cims, calibration_sections)]
        if select_steps:
            chosen = model.select_steps(cal, select_steps, progress=progress)
            if progress:
                typer.echo(f"sampler: {chosen['steps']} DDIM steps, {chosen['n_samples']} samples "
                           f"(scores in {run / 'sampler.json'})", err=True)
        model.calibrate(cal, progress=progress)
        if progress:
            typer.echo(f"intervals calibrated on {', '.join(_name(p) for p in calibration_sections)} "
                       f"({run / 'calibration.json'})", err=True)
    return run


def _read_labels(labels: Path):
    if not Path(labels).exists():
        raise VoxelomeError(f"--labels {labels}: no such file (a label TIFF on the output grid: 0 = background, "
                            "cells/bins numbered from 1).")
    import tifffile

    return tifffile.imread(labels)


def run_predict(run: Path, sections: list[Path], images: list[Path], out: Path, *, mode: str = "beyond",
                samples: Optional[int] = None, steps: Optional[int] = None, seed: int = 0,
                section_spacing_um: Optional[float] = None, labels: Optional[Path] = None,
                pixel_size_um: Optional[float] = None, overwrite: bool = False, spots=(),
                spot_diameter_um: Optional[float] = None, progress: bool = True) -> dict:
    """Super-resolve sections (one → ``(c, y, x)``; several → a slice-wise ``(c, z, y, x)`` volume).

    Every input (output path, spacing, labels, sampler options) is checked before sampling. In ``restore``
    mode the report also scores the trivial baseline (the blocks' means repeated over their spots) beside
    the model.
    """
    from voxelome.datasets.superres_sections import HistologyFeatures, array_box, beyond_pair, restore_pair
    from voxelome.errors import check_choice
    from voxelome.evaluate.superres_baselines import bicubic_upsample, nearest_upsample
    from voxelome.evaluate.superres_metrics import superres_scores
    from voxelome.models.diffusion.calibration import coverage
    from voxelome.infer.superres import aggregate_to_labels, write_superres
    from voxelome.train.superres_model import TrainedSuperRes

    check_choice("mode", mode, ("beyond", "restore"))
    _check_common(pixel_size_um, spot_diameter_um)
    if not sections:
        raise VoxelomeError("pass at least one --section to super-resolve.")
    if Path(out).exists() and not overwrite:
        raise VoxelomeError(f"--out {out} exists; pass --overwrite to replace it or choose another path.")
    for flag, value in (("--samples", samples), ("--steps", steps)):
        if value is not None and int(value) < 1:
            raise VoxelomeError(f"{flag} {value} must be ≥ 1 (leave it out for the run's default).")
    volume = len(sections) > 1
    if volume and not (section_spacing_um and section_spacing_um > 0):
        raise VoxelomeError(f"{len(sections)} sections make a slice-wise volume: pass --section-spacing-um (the "
                            "distance between consecutive sections in µm, e.g. 15).")
    if labels is not None and volume:
        raise VoxelomeError("--labels works with one --section (a 2D label image on the output grid).")
    label_image = _read_labels(labels) if labels is not None else None
    model = TrainedSuperRes.load(run)
    if samples is not None and int(samples) < 2 and not model.config.deterministic:
        raise VoxelomeError(f"--samples {samples}: a diffusion run needs ≥ 2 samples for a spread and intervals "
                            f"(the run's default is {model.n_samples}).")
    feat_path = Path(run) / FEATURES_FILE
    features, input_um = None, 4.0
    if feat_path.exists():
        d = json.loads(feat_path.read_text())
        features, input_um = HistologyFeatures.from_dict(d), float(d["input_um"])
        if not images:
            raise VoxelomeError(f"the run {run} was trained with H&E features; pass --image for every --section.")
    elif images:
        raise VoxelomeError(f"the run {run} is expression-only (trained without --image); drop --image.")
    adatas, ims = _sections(sections, images, pixel_size_um, input_um, spots, spot_diameter_um)
    build = beyond_pair if mode == "beyond" else restore_pair
    # several sections share one grid: the array frame covering all of them (sections on the same array
    # layout; register them first — `voxelome register stack` — when the tissue moved between sections)
    box = array_box(adatas) if volume else None
    pairs = [build(a, model.genes, factor=model.factor, image=im, features=features, name=_name(p), box=box)
             for a, im, p in zip(adatas, ims, sections)]
    if label_image is not None:
        grid, shape = pairs[0].high_mask.shape, label_image.shape
        k = shape[0] // grid[0] if grid[0] else 0
        if label_image.ndim != 2 or k < 1 or shape != (grid[0] * k, grid[1] * k):
            raise VoxelomeError(f"--labels {labels} has shape {shape}; it must be the output grid {tuple(grid)} or an "
                                f"integer multiple of it (e.g. {(grid[0] * 4, grid[1] * 4)}). Resample the labels "
                                "to the map's grid.")
    preds, masks, report, pixel_um = [], [], {"mode": mode, "sections": {}}, None
    from tqdm.auto import tqdm

    bar = tqdm(pairs, desc="superres predict", unit="section", disable=not (progress and volume))
    for pair in bar:
        pred = model.predict(pair, samples, steps=steps, seed=seed, keep_samples=labels is not None)
        preds.append(pred)
        masks.append(pair.high_mask)
        size = pair.extra.get("pixel_size_yx_um", pair.pixel_size_um)  # (y, x) on a Visium (hexagonal) lattice
        pixel_um = pixel_um or size
        entry = {"grid": list(pair.high_mask.shape), "pixel_size_um": size,
                 # output pixel (column, row, 1) → H&E pixel (x, y) as obsm['spatial'] (None on a hexagonal lattice)
                 "output_to_image_px": pair.extra.get("output_to_image_px")}
        if mode == "restore":  # the truth is the measured spots: score like the benchmark, beside a baseline
            keys = ("rmse", "ssim", "pearson", "pearson_median")
            sc = superres_scores(pred.mean, pair.high, pair.high_mask)
            entry["scores"] = {k: sc[k] for k in keys}
            entry["baseline_scores"] = {}  # nearest: each block's mean repeated; bicubic: spline through them
            for name, fn in (("nearest", nearest_upsample), ("bicubic", bicubic_upsample)):
                base = superres_scores(fn(pair.low, pair.low_mask, pair.factor), pair.high, pair.high_mask)
                entry["baseline_scores"][name] = {k: base[k] for k in keys}
            if not model.config.deterministic:  # do the intervals hold on this section's real spots?
                entry["interval"] = {"level": pred.level, "calibrated": pred.calibrated,
                                     "coverage": coverage(pred.lower, pred.upper, pair.high, pair.high_mask),
                                     "mean_width": float((pred.upper - pred.lower)[:, pair.high_mask].mean())}
        report["sections"][pair.name] = entry
    write_superres(out, preds if volume else preds[0], model.genes, pixel_um,
                   masks=masks if volume else masks[0], section_spacing_um=section_spacing_um,
                   overwrite=overwrite, extra={"run": str(run), "mode": mode, "seed": seed,
                                               "steps": steps or model.sample_steps,
                                               "samples": samples or model.n_samples})
    if label_image is not None:
        from voxelome.io.atomic import atomic_write_h5ad

        cells = aggregate_to_labels(preds[0], label_image, model.genes)
        atomic_write_h5ad(cells, Path(out) / "labels.h5ad")
        report["labels"] = {"n": int(cells.n_obs), "file": str(Path(out) / "labels.h5ad")}
    (Path(out) / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report


_SPOTS_HELP = ("Legacy ST spot file (x y … pixel_x pixel_y selected) of each --section, in order, when it is not "
               "found beside the counts file (<name>_selection.tsv) or in ../ST-spotfiles/.")
_DIAMETER_HELP = "Spot diameter in µm when the section does not say (55 Visium, 100 legacy ST)."


@app.command("fit")
def fit(section: list[Path] = typer.Option(..., help="Training section (h5ad or legacy ST); repeat for several."),
        image: Optional[list[Path]] = typer.Option(None, help="H&E image of each --section, in order (omit for "
                                                              "expression-only)."),
        out: Path = typer.Option(..., help="Run folder to write (an interrupted fit resumes from its last.pt)."),
        n_genes: int = typer.Option(50, help="Top-variance genes to super-resolve."),
        factor: int = typer.Option(2, help="Spots per block side when degrading (and the output refinement), ≥ 2."),
        calibration_section: Optional[list[Path]] = typer.Option(None, help="Held-out section(s) for the interval "
                                                                            "calibration (recommended)."),
        calibration_image: Optional[list[Path]] = typer.Option(None, help="H&E of each calibration section."),
        preset: str = typer.Option("superres-spots", help="superres-spots (real spot data: the her2st benchmark's "
                                   "configuration) | superres (larger, 1,500 steps: smooth/simulated maps) | "
                                   "superres-deterministic | superres-tiny."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Config override key=value (repeatable), "
                                                                     "e.g. iterations=200."),
        pixel_size_um: Optional[float] = typer.Option(None, help="µm per full-resolution image pixel (override)."),
        input_um: float = typer.Option(4.0, help="µm/px the H&E is resampled to for the features."),
        select_steps: Optional[str] = typer.Option(None, help="Comma-separated DDIM step counts (e.g. 2,5,10,20) "
                                                              "compared on the calibration sections; the best "
                                                              "becomes the run's default."),
        spots: Optional[list[Path]] = typer.Option(None, help=_SPOTS_HELP),
        calibration_spots: Optional[list[Path]] = typer.Option(None, help="Spot file of each --calibration-section "
                                                                          "(as --spots)."),
        spot_diameter_um: Optional[float] = typer.Option(None, help=_DIAMETER_HELP),
        phases: bool = typer.Option(True, "--phases/--no-phases", help="Train on every block phase of each section "
                                    "(factor² groupings of the same spots into pseudo-spots): more pairs from the "
                                    "same data, as in the her2st benchmark.")):
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
                             pixel_size_um=pixel_size_um, input_um=input_um, select_steps=steps,
                             spots=spots or [], calibration_spots=calibration_spots or [],
                             spot_diameter_um=spot_diameter_um, phases=phases)
    typer.echo(f"run written to {run}")


@app.command("predict")
def predict(run: Path = typer.Argument(..., help="Run folder from `voxelome superres fit`."),
            section: list[Path] = typer.Option(..., help="Section(s) to super-resolve; several = a slice-wise volume."),
            image: Optional[list[Path]] = typer.Option(None, help="H&E image of each --section."),
            out: Path = typer.Option(..., help="Output folder (mean/std/lower/upper OME-Zarr + summary.json)."),
            mode: str = typer.Option("beyond", help="beyond: a grid `factor`× finer than the spots; restore: "
                                                    "degrade then recover the spots (scored, beside baselines)."),
            samples: Optional[int] = typer.Option(None, help="Samples per section (default: the run's: "
                                                             "8, or those of --select-steps)."),
            steps: Optional[int] = typer.Option(None, help="DDIM steps (default: the run's: 20, or the "
                                                           "count chosen by fit --select-steps). Other steps or "
                                                           "samples than the calibrated ones give uncalibrated "
                                                           "intervals."),
            seed: int = typer.Option(0, help="Sampling seed."),
            section_spacing_um: Optional[float] = typer.Option(None, help="Distance between sections (µm); "
                                                                          "required with several --section."),
            labels: Optional[Path] = typer.Option(None, help="Label TIFF on the output grid (or an integer "
                                                             "multiple of it) → labels.h5ad per label."),
            pixel_size_um: Optional[float] = typer.Option(None, help="µm per full-resolution image pixel (override)."),
            overwrite: bool = typer.Option(False, help="Replace an existing output."),
            spots: Optional[list[Path]] = typer.Option(None, help=_SPOTS_HELP),
            spot_diameter_um: Optional[float] = typer.Option(None, help=_DIAMETER_HELP)):
    """Sample the model: mean, per-pixel std and intervals as OME-Zarr (opens in napari)."""
    report = _friendly(run_predict)(run, section, image or [], out, mode=mode, samples=samples, steps=steps, seed=seed,
                                    section_spacing_um=section_spacing_um, labels=labels,
                                    pixel_size_um=pixel_size_um, overwrite=overwrite, spots=spots or [],
                                    spot_diameter_um=spot_diameter_um)
    typer.echo(json.dumps(report, indent=1, default=float))
