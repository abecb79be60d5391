"""``reconstruct fit``'s ensembles: the best candidates of a selection, or the fixed two-section pair, each fitted
with several seeds into ``RUN/members/`` and recorded in ``RUN/ensemble.json`` (queries average them)."""

from __future__ import annotations

from pathlib import Path

import typer


def sections_text(data) -> str:
    """"5 sections" or "9 z-slabs of 11 µm", for the fit's closing line."""
    n = len(data.section_names)
    return f"{n} sections" if data.z_slab_um is None else f"{n} z-slabs of {data.z_slab_um:g} µm"


def compared_schedule(config) -> str:
    """The line that says a selection's fields are fitted with the schedule their candidates were compared at."""
    return (f"fitting on every section with the schedule the candidates were compared at: {config.iterations} "
            f"iterations × {config.batch_size} points")


def _candidate_member(data, name: str, candidate_overrides: dict, pca: int, preset: str, overrides: dict,
                      budget=None):
    """The :class:`MemberSpec` of select's candidate ``name`` (folder ``candidate-K``, K its index in
    :data:`FIELD_CANDIDATES`): ``preset`` + the candidate's overrides + the user's, capped at ``budget`` if given,
    through the top ``pca`` principal axes when ``pca`` > 0."""
    from voxelome.train.field_members import MemberSpec
    from voxelome.train.field_selection import FIELD_CANDIDATES, pca_loadings, with_budget
    from voxelome.train.field_trainer import make_field_config

    config = with_budget(make_field_config(preset, **{**candidate_overrides, **overrides}), budget)
    return MemberSpec(name, f"candidate-{list(FIELD_CANDIDATES).index(name)}", config,
                      pca_loadings(data, pca) if pca else None)


def blend_with_knn(data, specs, out: Path, knn_blend: str, resume: bool) -> None:
    """``--knn-blend auto``: choose on held-out inner sections how much 3D kNN of the measured points every query
    averages in (:func:`~voxelome.train.field_knn_blend.choose_knn_blend`); ``off`` (or < 3 sections, or a point
    store): the fields alone."""
    from voxelome.infer.field_knn import remove_blend
    from voxelome.train.field_knn_blend import blend_summary, choose_knn_blend
    from voxelome.train.point_store import DiskCSR

    if knn_blend == "off":
        remove_blend(out)
        return
    if len(data.section_names) < 3 or isinstance(data.values, DiskCSR):
        remove_blend(out)
        typer.echo("kNN blend: not considered (it is chosen on a held-out inner section of a stack in memory: "
                   "≥ 3 sections, an .h5ad)")
        return
    typer.echo(blend_summary(choose_knn_blend(data, specs, out, resume=resume, log=typer.echo)))


def fit_selection_ensemble(data, chosen: dict, out: Path, n: int, seeds: int, preset: str, overrides: dict,
                           resume: bool, knn_blend: str = "off") -> None:
    """Fit the ``n`` best candidates of a selection, each with ``seeds`` seeds, into ``out/members/`` (as they were
    compared: :func:`with_budget`) and record them (``ensemble.json``)."""
    from voxelome.train.field_members import fit_members

    specs = [_candidate_member(data, name, chosen["settings"][name]["overrides"], chosen["settings"][name]["pca"],
                               preset, overrides, chosen["budget"]) for name in chosen["ranking"][:n]]
    typer.echo(compared_schedule(specs[0].config))
    members = fit_members(data, out, specs, seeds=seeds, resume=resume, log=typer.echo,
                          rule=f"mean of the {n} candidate(s) with the best mean r on held-out sections "
                               f"{', '.join(chosen['validation_sections'])}")
    blend_with_knn(data, specs, out, knn_blend, resume)
    typer.echo(ensemble_done(data, members, out))


def fit_pair(data, out: Path, seeds: int, preset: str, overrides: dict, resume: bool, knn_blend: str = "off") -> None:
    """``--settings pair``: the two :data:`PAIR_CANDIDATES`, each with ``seeds`` seeds, averaged in every query."""
    from voxelome.train.field_members import fit_members
    from voxelome.train.field_selection import FIELD_CANDIDATES, PAIR_CANDIDATES, candidate_overrides

    specs = [_candidate_member(data, name, candidate_overrides(data, FIELD_CANDIDATES[name]),
                               int(FIELD_CANDIDATES[name].get("pca", 0)), preset, overrides)
             for name in PAIR_CANDIDATES]
    members = fit_members(data, out, specs, seeds=seeds, resume=resume, log=typer.echo,
                          rule="--settings pair: an NB field and a low-rank Gaussian one (the best pair on triplets "
                               "of real stacks, benchmarks/bench_field_pairs.py)")
    blend_with_knn(data, specs, out, knn_blend, resume)
    typer.echo(ensemble_done(data, members, out))


def ensemble_done(data, members, out: Path) -> str:
    """The fit's closing line for an ensemble run."""
    from voxelome.infer.field_knn import blend_weight

    weight = blend_weight(out)
    return (f"ensemble of {len(members)} fields of {len(data.genes)} variables on {len(data)} points from "
            f"{sections_text(data)} → {out} (queries average the members"
            + (f", then with 3D kNN of the measured points at weight {weight:g})" if weight else ")"))
