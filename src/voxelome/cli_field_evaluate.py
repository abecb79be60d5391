"""``voxelome reconstruct evaluate``: hold sections out, fit the field as ``fit`` does, score it beside the baselines.

    voxelome reconstruct evaluate STACK.h5ad --out EVAL [--held-out S3,S5 | --max-sections 2] [fit's options]
    voxelome reconstruct evaluate CELLS.h5ad --out EVAL --z-slabs 22       # volumetric cells: whole z-slabs held out

Per held-out section: ``EVAL/<section>/train.h5ad`` (the other sections), ``EVAL/<section>/run`` (the field, fitted
by ``reconstruct fit`` with the options given; rerunning resumes finished fits); then ``EVAL/report.json``,
``EVAL/per_gene.csv`` and ``EVAL/evaluate.png`` (:mod:`voxelome.evaluate.field_holdout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from voxelome.cli_common import friendly as _friendly
from voxelome.cli_common import parse_names
from voxelome.errors import VoxelomeError


#: obs column of the z-slab names with ``--z-slabs`` (kept in each fold's train.h5ad; ``fit --z-slabs`` ignores it)
SLAB_KEY = "z_slab"


@_friendly
def evaluate(stack: Path = typer.Argument(..., help="AnnData .h5ad of all sections: obsm['spatial_3d'] (µm) + "
                                                    "obs[section-key], counts (as for `reconstruct fit`)."),
             out: Path = typer.Option(..., help="Output folder: one subfolder per held-out section, report.json, "
                                                "per_gene.csv, evaluate.png."),
             held_out: Optional[str] = typer.Option(None, help="Sections to hold out, comma-separated (default: "
                                                    "--max-sections inner sections, evenly spread). An outer "
                                                    "section tests extrapolation."),
             max_sections: int = typer.Option(2, help="Inner sections held out when --held-out is not given; "
                                              "each costs one fit."),
             genes: Optional[str] = typer.Option(None, help="As for `fit`: genes to model (scored on these)."),
             n_genes: Optional[int] = typer.Option(None, help="As for `fit`: the N most variable genes (default "
                                                   "500), chosen on the training sections of each fold."),
             section_key: str = typer.Option("section", help="obs column naming each point's section."),
             z_slabs: Optional[float] = typer.Option(None, help="Volumetric cells without sections: z-slabs of this "
                                                     "thickness (µm) stand for sections, as in `fit --z-slabs`; "
                                                     "whole slabs are held out."),
             layer: Optional[str] = typer.Option(None, help="Counts layer (default layers['counts'] or X)."),
             settings: str = typer.Option("auto", help="As for `fit` (auto, pair, select, ntf, robust)."),
             seeds: Optional[int] = typer.Option(None, help="As for `fit` (default 2)."),
             set_: list[str] = typer.Option([], "--set", help="As for `fit`: a FieldConfig field, key=value."),
             knn_blend: str = typer.Option("auto", help="As for `fit` (auto, off): 3D kNN averaged in where the "
                                           "training sections' own held-out inner sections say so.")):
    """Score the field on sections it never saw, beside nearest-section, linear-interpolation and 3D-kNN baselines."""
    import anndata as ad

    from voxelome.cli_field import fit
    from voxelome.evaluate.field_baselines import section_depths
    from voxelome.evaluate.field_holdout import baseline_scores, choose_held_out, score_section, write_report
    from voxelome.infer.field_export import FittedField
    from voxelome.io.sections import write_h5ad
    from voxelome.train.field_selection import held_out_truth
    from voxelome.train.point_data import PointData
    from voxelome.train.point_data import z_slabs as point_z_slabs

    if not stack.exists() or stack.is_dir():
        raise VoxelomeError(f"stack {stack} must be an existing .h5ad (evaluation holds sections out of it; a point "
                            "store cannot be split: evaluate on an .h5ad subsample of it).")
    adata = ad.read_h5ad(stack)
    if "spatial_3d" not in adata.obsm:
        raise VoxelomeError("the stack has no obsm['spatial_3d'] (x, y, z µm); stack the sections with "
                            "`voxelome register stack` first.")
    xyz = np.asarray(adata.obsm["spatial_3d"], float)
    score_key = section_key
    if z_slabs is not None:  # the slabs `fit --z-slabs` makes (edges at multiples of the thickness: same on any subset)
        codes, slab_names = point_z_slabs(xyz[:, 2], z_slabs)
        score_key = SLAB_KEY
        adata.obs[score_key] = np.asarray(slab_names)[codes]
    elif section_key not in adata.obs:
        raise VoxelomeError(f"the stack has no obs[{section_key!r}]; name the column of section names with "
                            "--section-key, or pass --z-slabs for volumetric cells without sections.")
    section = adata.obs[score_key].astype(str).to_numpy()
    depths = section_depths(xyz, section)
    chosen = choose_held_out(depths, parse_names(held_out), max_sections)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, name in enumerate(chosen, 1):
        typer.echo(f"[{k}/{len(chosen)}] held out: {name} (z {depths[name]:g} µm); fitting on the other "
                   f"{len(depths) - 1} sections")
        fold = out / name
        fold.mkdir(exist_ok=True)
        train_path = fold / "train.h5ad"
        train_adata = adata[section != name].copy()
        if train_path.exists():  # a rerun resumes the fits, so they must be of the same spots
            _check_same_spots(ad.read_h5ad(train_path), train_adata, out)
        else:
            write_h5ad(train_adata, train_path)
        fit(stack=train_path, out=fold / "run", genes=genes, n_genes=n_genes, obsm_key=None, section_key=section_key,
            z_slabs=z_slabs, drop_empty=False, layer=layer, preset="cpu", settings=settings, likelihood=None,
            jitter="auto", signatures_model=None, set_=list(set_), select_sections=2, ensemble=2, seeds=seeds,
            knn_blend=knn_blend, no_resume=False)
        field = FittedField.load(fold / "run")
        test = PointData.from_anndata(adata[section == name], genes=field.genes, layer=layer, section_key=score_key,
                                      min_sections=1)
        train = PointData.from_anndata(adata[section != name], genes=field.genes, layer=layer, section_key=score_key)
        test_y, train_y = held_out_truth(test), held_out_truth(train)
        pred = field.predict(test.xyz_um, value="measured")
        base = baseline_scores(train.xyz_um, np.asarray(train.section_names)[train.section], train_y, test.xyz_um,
                               test_y)
        rows.append(score_section(name, depths, field.genes, pred, test_y, base))
        r = rows[-1]
        typer.echo(f"{name}: field r {r['field']['r']:.3f}; " + ", ".join(
            f"{b} {v['r']:.3f} (k {v['k']})" for b, v in r["baselines"].items()))
    meta = {"stack": str(stack), "held_out": chosen, "sections_by_z": list(depths), "z_slab_um": z_slabs,
            "settings": settings,
            "seeds": 2 if seeds is None else seeds, "set": list(set_), "knn_blend": knn_blend, "value": "measured",
            "score": "per-gene Pearson r and RMSE over the held-out spots, log1p(counts per 10k)"}
    report = write_report(out, rows, meta)
    typer.echo(report["verdict"] + f" ({out / 'report.json'}, {out / 'evaluate.png'})", err=True)
    typer.echo(json.dumps({k: report[k] for k in ("held_out", "mean_field_r", "mean_baseline_r", "best_baseline",
                                                  "field_minus_best_baseline", "sections_field_ahead")}))


def _check_same_spots(saved, now, out: Path) -> None:
    """Refuse to resume an evaluation folder written for other spots or counts (its fits would be of another stack)."""
    same = saved.shape == now.shape and list(saved.obs_names) == list(now.obs_names)
    if same:
        same = np.isclose(float(saved.X.sum()), float(now.X.sum()), rtol=1e-9)
    if not same:
        raise VoxelomeError(f"{out} holds an evaluation of other spots or counts (its training sections differ from "
                            "this stack's); pass a new --out, or delete that folder to start over.")
