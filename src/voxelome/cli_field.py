"""``voxelome reconstruct``: fit a neural transcriptomic field to serial sections and query it.

    voxelome reconstruct fit STACK.h5ad --out RUN [--genes A,B | --n-genes 500] [--settings auto|select|ntf|robust|pair] [--ensemble 2] [--seeds N]
                             [--knn-blend auto|off]
    voxelome reconstruct fit CELLS.h5ad --out RUN --z-slabs 11        # volumetric cells without sections
    voxelome reconstruct store STACK.h5ad --out STORE [--genes A,B | --n-genes 500]   # then: reconstruct fit STORE --out RUN
    voxelome reconstruct volume RUN --out field.ome.zarr --spacing 20 [--bbox x0,y0,z0,x1,y1,z1]
    voxelome reconstruct section RUN --out plane.ome.zarr --origin x,y,z --normal nx,ny,nz --pixel-size 10 --shape 100,100
    voxelome reconstruct predict RUN --points points.csv --out values.csv
    voxelome reconstruct denoise RUN --stack STACK.h5ad --out denoised.h5ad
    voxelome reconstruct evaluate STACK.h5ad --out EVAL [--held-out S3,S5]   # held-out sections vs the baselines
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from voxelome.cli_common import friendly as _friendly
from voxelome.cli_common import parse_names, parse_numbers, parse_sets
from voxelome.cli_field_ensemble import (blend_with_knn, compared_schedule, ensemble_done, fit_pair,
                                         fit_selection_ensemble, sections_text)
from voxelome.cli_field_evaluate import evaluate
from voxelome.cli_field_query import denoise, predict, section, volume
from voxelome.errors import VoxelomeError, did_you_mean

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Neural transcriptomic field: a continuous 3D expression field fit to serial sections.")


#: genes modelled when none are named: a field's time per iteration grows with them (NTF fits 500–1,000)
DEFAULT_FIELD_GENES = 500


def _sets(items: list[str]) -> dict:
    return parse_sets(items, example="iterations=2000")


Z_SLABS_HELP = ("For volumetric data without sections (3D STARmap, cleared tissue): group the points into z-slabs "
                 "of this thickness (µm) and use them as the sections (obs[section-key] is not read); fits then "
                 "have no per-section effects.")


def _check_n_genes(n_genes) -> None:
    if n_genes is not None and n_genes < 0:
        raise VoxelomeError(f"--n-genes {n_genes} must be ≥ 0 (0 = every gene, or only the --genes named).")


def _choose_genes(adata, named, n_genes, *, layer=None, chunk: int = 1_000_000, verb: str = "modelling"):
    """The genes to model: the ``named`` ones, plus the ``n_genes`` most variable others (default: 500 without named
    genes, none beside them; checked by :func:`_check_n_genes`). ``None`` = every gene."""
    n = (0 if named else DEFAULT_FIELD_GENES) if n_genes is None else int(n_genes)
    if n == 0:
        return named
    from voxelome.train.point_data import variable_genes

    taken = set(named or [])
    if n + len(taken) >= adata.n_vars:
        return None
    top = [g for g in variable_genes(adata, n + len(taken), layer=layer, chunk=chunk) if g not in taken][:n]
    typer.echo(f"{verb} " + (f"the {len(taken)} named genes and " if taken else "") + f"the {len(top)} most variable "
               f"{'others ' if taken else ''}of {adata.n_vars} genes (--n-genes; --genes A,B names genes, "
               "--n-genes 0 for all or only the named)")
    return [*(named or []), *top]


@app.command()
@_friendly
def fit(stack: Path = typer.Argument(..., help="AnnData .h5ad of all sections: obsm['spatial_3d'] (µm) + obs[section-key]; "
                                              "or a point store folder from `reconstruct store` (fitted from disk)."),
        out: Path = typer.Option(..., help="Run folder (config.yaml, checkpoint.pt, last.pt)."),
        genes: Optional[str] = typer.Option(None, help="Genes to model, comma-separated (default: the --n-genes most variable)."),
        n_genes: Optional[int] = typer.Option(None, help="Model the N most variable genes (log1p counts per 10k; "
                                              f"default {DEFAULT_FIELD_GENES}); with --genes, N more beside the named "
                                              "ones (default none); 0 = every gene (slow: time per iteration grows "
                                              "with genes)."),
        obsm_key: Optional[str] = typer.Option(None, help="Model obsm[KEY] (e.g. signatures) instead of genes."),
        section_key: str = typer.Option("section", help="obs column naming each point's section."),
        z_slabs: Optional[float] = typer.Option(None, help=Z_SLABS_HELP),
        drop_empty: bool = typer.Option(False, "--drop-empty", help="Drop spots/cells without any count (imaging "
                                        "panels often have some; a count likelihood cannot normalise them) and say "
                                        "how many."),
        layer: Optional[str] = typer.Option(None, help="Counts layer (default layers['counts'] or X)."),
        preset: str = typer.Option("cpu", help="paper (NTF: Adam 1e-4, 20k × 8192) or cpu (tuned for a CPU)."),
        settings: str = typer.Option("auto", help="select: choose among 5 candidates on held-out inner sections "
                                     "(selection.json; 5 × --select-sections short extra fits); ntf: NB on counts, "
                                     "jitter = spot pitch and 0.75× the section gap, section effects (NTF's recipe); "
                                     "robust: Gaussian on log1p counts, jitter 1.5× pitch in-plane and 4.5× the gap "
                                     "across, no section effects (for near-replicate serial sections); pair: the mean "
                                     "of an NB field (jitter 0.5× pitch) and a low-rank Gaussian one; auto: pair for "
                                     "counts held in memory (.h5ad, genes), select for other values on ≥ 3 sections, "
                                     "else ntf. "
                                     "--likelihood, --jitter and --set change single fields."),
        likelihood: Optional[str] = typer.Option(None, help="nb, zinb, poisson or gaussian (default: from --settings)."),
        jitter: str = typer.Option("auto", help="Coordinate jitter σ µm: 'auto' (from --settings, the spot pitch and "
                                   "the section gap), one number, or x,y,z."),
        signatures_model: Optional[Path] = typer.Option(None, help="A `voxelome signatures` .npz: low-rank field through its fixed gene loadings."),
        set_: list[str] = typer.Option([], "--set", help="Override a FieldConfig field, key=value (repeatable)."),
        select_sections: int = typer.Option(2, help="With --settings select: inner sections held out in turn."),
        ensemble: int = typer.Option(2, help="With --settings select: fit the N best candidates (on the whole stack, "
                                     "with the schedule they were compared at) and query their mean (RUN/members/, "
                                     "RUN/ensemble.json); 1 = the best alone (one fit instead of two)."),
        seeds: Optional[int] = typer.Option(None, help="Fit every field N times with seeds s … s+N−1 (s: --set seed, "
                                            "default 0) and query their mean (RUN/members/, RUN/ensemble.json): a fit "
                                            "to a few hundred spots per section varies with its seed, the mean less "
                                            "(2 vs 1: +0.0025 held-out r on 16 of 17 real-stack folds); N× the final "
                                            "fitting time; 1 = one field in RUN. Default 2 for an .h5ad, 1 for a point "
                                            "store (atlas scale: long fits that vary little with the seed)."),
        knn_blend: str = typer.Option("auto", help="auto: hold out up to 2 inner sections, fit the ensemble's "
                                      "configurations without them and keep the weight (0, 0.25 or 0.5) of 3D kNN of "
                                      "the measured points that predicts them best; every query then averages it in "
                                      "(RUN/knn_blend.json; on volumetric STARmap cells 0.5 gained +0.01 r, on "
                                      "sectioned stacks 0 is kept). One extra fit per configuration. off: the fields "
                                      "alone. Ensemble runs (--seeds ≥ 2 or --ensemble ≥ 2) of ≥ 3 sections."),
        no_resume: bool = typer.Option(False, "--no-resume", help="Start over instead of resuming last.pt.")):
    """Fit a field to a registered stack of sections."""
    import anndata as ad

    from voxelome.train.field_selection import (
        FIELD_CANDIDATES,
        ROBUST_CANDIDATE,
        candidate_overrides,
        pca_loadings,
        select_field,
        with_budget,
    )
    from voxelome.train.field_trainer import fit_field, make_field_config, suggest_jitter
    from voxelome.train.point_data import PointData

    if not stack.exists():
        raise VoxelomeError(f"stack file {stack} does not exist.")
    _check_n_genes(n_genes)
    if seeds is not None and seeds < 1:
        raise VoxelomeError(f"--seeds {seeds} must be ≥ 1 (fits per field, averaged; 1 = a single fit).")
    seeds = (1 if stack.is_dir() else 2) if seeds is None else seeds
    if knn_blend not in ("auto", "off"):
        raise VoxelomeError(f"--knn-blend {knn_blend!r} is not one of auto, off."
                            f"{did_you_mean(knn_blend, ['auto', 'off'])}")
    choices = ["auto", "select", "ntf", "robust", "pair"]
    if settings not in choices:
        raise VoxelomeError(f"--settings {settings!r} is not one of {', '.join(choices)}.{did_you_mean(settings, choices)}")
    if stack.is_dir():  # a point store: memmapped, never loaded into RAM
        if genes or obsm_key or layer or signatures_model or z_slabs is not None or drop_empty:
            raise VoxelomeError("--genes/--obsm-key/--layer/--signatures-model/--z-slabs/--drop-empty do not apply to "
                                "a point store (its genes and sections were set when it was written); pass them to "
                                "`reconstruct store`.")
        adata = None
        data = PointData.from_store(stack)
    else:
        adata = ad.read_h5ad(stack)
        if drop_empty:
            adata = _without_empty(adata, layer)
    loadings, gene_list = None, parse_names(genes)
    sig = None
    if signatures_model is not None:
        from voxelome.signatures import SignatureModel

        sig = SignatureModel.load(signatures_model)
        gene_list = [g for g in (gene_list or sig.genes) if g in set(adata.var_names) and g in set(sig.genes)]
    if adata is not None and sig is None and obsm_key is None:
        gene_list = _choose_genes(adata, gene_list, n_genes, layer=layer)
    if adata is not None:
        data = PointData.from_anndata(adata, genes=gene_list, obsm_key=obsm_key, layer=layer, section_key=section_key,
                                      z_slab_um=z_slabs)
        if z_slabs is None and len(data.section_names) >= 3:
            _warn_if_disordered(adata, section_key, layer)
    overrides = _sets(set_)
    chosen_by_user = likelihood or jitter != "auto" or {"likelihood", "jitter_um", "section_dim"} & set(overrides)
    if data.z_slab_um is not None:  # slabs of one volume share no batch effect: a per-slab term would absorb z biology
        if overrides.get("section_dim", 0):
            raise VoxelomeError(f"--set section_dim={overrides['section_dim']} asks for per-section effects, but the "
                                "sections are z-slabs of one volume (--z-slabs), which have none; drop it.")
        typer.echo(f"{len(data.section_names)} z-slabs of {data.z_slab_um:g} µm stand for sections "
                   f"({data.section_names[0]} … {data.section_names[-1]}); no per-section effects")
        overrides = {**overrides, "section_dim": 0}
    if settings == "auto":
        genes_in_memory = adata is not None and sig is None and obsm_key is None
        if chosen_by_user:
            settings, why = "ntf", " (--likelihood/--jitter/--set given)"
        elif genes_in_memory and data.is_counts:  # the pair: ahead of select on the real stacks (BENCHMARKS.md)
            settings, why = "pair", " (counts held in memory)"
        elif genes_in_memory and len(data.section_names) >= 3:
            settings, why = "select", " (values that are not counts, ≥ 3 sections)"
        else:
            settings, why = "ntf", " (a pair or a choice needs genes held in memory)"
        typer.echo(f"--settings auto → {settings}{why}")
    if settings == "pair":
        if sig is not None or obsm_key or not data.is_counts or adata is None:
            raise VoxelomeError("--settings pair fits an NB field on counts and a low-rank one on their principal "
                                "axes: it needs gene counts held in memory (an .h5ad, no --signatures-model/--obsm-key); "
                                "use --settings ntf.")
        if chosen_by_user:
            raise VoxelomeError("--settings pair fixes the likelihood, jitter and section effects of its two fields; "
                                "drop --likelihood, --jitter and --set likelihood/jitter_um/section_dim, or use "
                                "--settings ntf.")
        if ensemble not in (1, 2):
            raise VoxelomeError(f"--ensemble {ensemble} applies to --settings select; --settings pair always fits "
                                "its two fields (drop --ensemble).")
        fit_pair(data, out, seeds, preset, overrides, resume=not no_resume, knn_blend=knn_blend)
        return
    if settings == "select":
        if chosen_by_user:
            raise VoxelomeError("--settings select chooses the likelihood, jitter and section effects itself; drop "
                                "--likelihood, --jitter and --set likelihood/jitter_um/section_dim, or pick other --settings.")
        if sig is not None or obsm_key:
            raise VoxelomeError("--settings select compares gene-level fits; it does not apply with --signatures-model "
                                "or --obsm-key.")
        n_candidates = sum(data.is_counts or c.get("likelihood") == "gaussian" for c in FIELD_CANDIDATES.values())
        if not 1 <= ensemble <= n_candidates:
            raise VoxelomeError(f"--ensemble {ensemble} must be between 1 and the {n_candidates} candidates compared "
                                "(2, the default, averages the two best).")
        chosen = select_field(data, out / "selection", preset=preset, max_validation_sections=select_sections,
                              **overrides)
        base = chosen["overrides"]
        if chosen["pca"]:
            loadings = pca_loadings(data, chosen["pca"])
        typer.echo(f"chosen on held-out {', '.join(chosen['validation_sections'])}: {chosen['best']} (mean r "
                   + ", ".join(f"{k}: {v:.3f}" for k, v in chosen["mean_r"].items()) + f"; {out / 'selection'}/selection.json)")
        typer.echo(f"held-out mean r of the two best averaged: {chosen['top2_mean_r']:.3f} (the best alone: "
                   f"{chosen['mean_r'][chosen['best']]:.3f})")
        if ensemble > 1 or seeds > 1:
            fit_selection_ensemble(data, chosen, out, ensemble, seeds, preset, overrides, resume=not no_resume,
                                   knn_blend=knn_blend)
            return
    elif ensemble not in (1, 2):  # 2 is the default, meant for select
        raise VoxelomeError(f"--ensemble {ensemble} applies to --settings select (the candidates it ranks); "
                            f"--settings {settings} fits one field (drop --ensemble or use --settings select).")
    elif settings == "robust":
        base = candidate_overrides(data, FIELD_CANDIDATES[ROBUST_CANDIDATE])
    else:  # ntf
        base = {"likelihood": "nb" if data.is_counts and not obsm_key else "gaussian", "jitter_um": suggest_jitter(data)}
    if likelihood:
        base["likelihood"] = likelihood
    if jitter != "auto":
        base["jitter_um"] = tuple(parse_numbers(jitter, "jitter", (1, 3)))
    if sig is None and obsm_key is None and base["likelihood"] != "gaussian" and not data.is_counts:
        raise VoxelomeError(f"likelihood {base['likelihood']!r} models counts, but the stack's values are not counts; "
                            "use --likelihood gaussian or pass the raw counts.")
    config = make_field_config(preset, **{**base, **overrides})
    if settings == "select":  # the schedule the candidates were compared with: fit what was validated
        config = with_budget(config, chosen["budget"])
        typer.echo(compared_schedule(config))
    if sig is not None:
        lookup = {g: i for i, g in enumerate(sig.genes)}
        load = np.asarray(sig.loadings)[:, [lookup[g] for g in data.genes]]
        # signature loadings are log1p(per target_sum); count models need rates, gaussian the log1p values
        loadings = np.expm1(load) / config.target_sum if config.likelihood != "gaussian" else load
    from voxelome.infer.field_ensemble import ENSEMBLE_FILE
    from voxelome.train.field_members import MemberSpec, fit_members

    if seeds > 1:
        specs = [MemberSpec(settings, "field", config, loadings)]
        members = fit_members(data, out, specs, seeds=seeds, rule=f"one configuration (--settings {settings})",
                              resume=not no_resume, log=typer.echo)
        blend_with_knn(data, specs, out, knn_blend if sig is None and obsm_key is None else "off", not no_resume)
        typer.echo(ensemble_done(data, members, out))
        return
    from voxelome.infer.field_knn import remove_blend

    remove_blend(out)
    (out / ENSEMBLE_FILE).unlink(missing_ok=True)  # a single field now: an older ensemble record must not shadow it
    run = fit_field(data, config, out, loadings=loadings, resume=not no_resume)
    typer.echo(f"field of {len(data.genes)} variables on {len(data)} points from {sections_text(data)} → {run}")


def _without_empty(adata, layer):
    """``adata`` without the rows whose counts (the matrix a fit reads: ``layers[layer]``, ``layers['counts']`` or
    ``X``) sum to 0."""
    from voxelome.train.point_data import _counts_matrix

    total = np.asarray(_counts_matrix(adata, layer).sum(axis=1)).ravel()
    empty = int((total <= 0).sum())
    typer.echo(f"--drop-empty: {empty} of {adata.n_obs} points have no counts and are left out")
    return adata[total > 0].copy() if empty else adata


def _warn_if_disordered(adata, section_key: str, layer) -> None:
    """A field reads each section's z neighbours: say so when the sections' expression disagrees with their z order."""
    from voxelome.register.section_order import check_stack_order

    check = check_stack_order(adata, section_key=section_key, layer=layer, warn=False)
    if not check.consistent:
        typer.echo(f"warning: the sections' expression does not follow their z order {check.names}: neighbours in "
                   f"{check.suggested} are {check.gain:.0%} more alike (per-gene r of neighbours "
                   f"{check.suggested_score:.3f} vs {check.given_score:.3f}). Check the section numbering and z "
                   "before trusting interpolation between sections (README: 'Check the cutting order first').",
                   err=True)


@app.command()
@_friendly
def store(stack: Path = typer.Argument(..., help="AnnData .h5ad of all sections (read backed, chunk by chunk)."),
          out: Path = typer.Option(..., help="Point store folder (memmapped .npy CSR + coordinates)."),
          genes: Optional[str] = typer.Option(None, help="Genes to keep, comma-separated (default: the --n-genes most variable)."),
          n_genes: Optional[int] = typer.Option(None, help="Keep the N most variable genes (one extra chunked pass "
                                                f"over the file; default {DEFAULT_FIELD_GENES}); with --genes, N more "
                                                "beside the named ones (default none); 0 = every gene."),
          section_key: str = typer.Option("section", help="obs column naming each point's section."),
          z_slabs: Optional[float] = typer.Option(None, help=Z_SLABS_HELP),
          drop_empty: bool = typer.Option(False, "--drop-empty", help="Leave out spots/cells without any count."),
          layer: Optional[str] = typer.Option(None, help="Counts layer (default layers['counts'] or X)."),
          chunk: int = typer.Option(1_000_000, help="Rows read at a time."),
          overwrite: bool = typer.Option(False, help="Replace an existing store.")):
    """Write a stack too large for RAM to a point store, for `reconstruct fit STORE`."""
    import anndata as ad

    from voxelome.train.point_store import MANIFEST, open_point_store, write_point_store

    _check_n_genes(n_genes)
    gene_list = parse_names(genes)
    if stack.is_file():
        backed = ad.read_h5ad(stack, backed="r")
        gene_list = _choose_genes(backed, gene_list, n_genes, layer=layer, chunk=chunk, verb="keeping")
        backed.file.close()
    write_point_store(stack, out, genes=gene_list, layer=layer, section_key=section_key, chunk=chunk,
                      overwrite=overwrite, z_slab_um=z_slabs, drop_empty=drop_empty)
    data = open_point_store(out, check=False, min_sections=1)  # just written and checked by the writer
    dropped = json.loads((out / MANIFEST).read_text()).get("n_dropped_empty", 0)
    typer.echo(f"point store of {len(data)} points × {data.n_genes} genes ({data.values.nnz} non-zeros) → {out}"
               + (f"; {dropped} points without counts left out (--drop-empty)" if dropped else ""))


# the query verbs (volume, section, predict, denoise) live in cli_field_query, the held-out check (evaluate) in
# cli_field_evaluate; registered here in --help order
for _command in (volume, section, predict, denoise, evaluate):
    app.command()(_command)
