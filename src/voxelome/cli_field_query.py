"""``voxelome reconstruct volume|section|predict|denoise``: query a fitted field (or ensemble run) from the shell.

The commands are registered on the ``reconstruct`` app by :mod:`voxelome.cli_field` (which holds ``fit`` and
``store``); each reads the run folder with :meth:`voxelome.infer.field_export.FittedField.load`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from voxelome.cli_common import friendly as _friendly
from voxelome.cli_common import parse_names, parse_numbers
from voxelome.errors import VoxelomeError


def _load(run: Path):
    from voxelome.infer.field_export import FittedField

    return FittedField.load(run)


@_friendly
def volume(run: Path = typer.Argument(..., help="Run folder from `reconstruct fit`."),
           out: Path = typer.Option(..., help="Output .ome.zarr (c, z, y, x); resumes if interrupted."),
           spacing: str = typer.Option(..., "--spacing", "--spacing-um",  # -um: as the other verbs spell it
                                       help="Voxel size µm: one number or dz,dy,dx."),
           bbox: Optional[str] = typer.Option(None, help="Box x0,y0,z0,x1,y1,z1 µm (default: the training spots' box, first to last section)."),
           genes: Optional[str] = typer.Option(None, help="Channels, comma-separated (default: all)."),
           chunks: str = typer.Option("16,64,64", help="Output chunk z,y,x in voxels."),
           overwrite: bool = typer.Option(False, help="Replace an output of another field or grid.")):
    """Write the field on a voxel grid of any spacing and box (chunked OME-Zarr)."""
    sp = parse_numbers(spacing, "spacing", (1, 3))
    box = parse_numbers(bbox, "bbox", (6,))
    ch = [int(c) for c in parse_numbers(chunks, "chunks", (3,))]
    stats = _load(run).write_volume(out, sp[0] if len(sp) == 1 else sp, bbox_um=None if box is None else (box[:3], box[3:]),
                                    genes=parse_names(genes), chunks=ch, overwrite=overwrite)
    typer.echo(json.dumps(stats, indent=1))


@_friendly
def section(run: Path = typer.Argument(..., help="Run folder from `reconstruct fit`."),
            out: Path = typer.Option(..., help="Output: .ome.zarr (c, y, x) with µm scale and gene names (napari), "
                                     ".tif (ImageJ hyperstack, µm; Fiji), or .npz (values (g, rows, cols), genes, "
                                     "placement matrix)."),
            origin: str = typer.Option(..., help="Plane origin x,y,z µm (pixel (0, 0))."),
            normal: str = typer.Option("0,0,1", help="Plane normal x,y,z (oblique allowed)."),
            pixel_size: float = typer.Option(10.0, "--pixel-size", "--pixel-size-um", help="µm per output pixel."),
            shape: str = typer.Option(..., help="rows,cols of the output."),
            genes: Optional[str] = typer.Option(None, help="Genes (default all).")):
    """A virtual section on any plane."""
    from voxelome.register.placement import SectionPlacement

    field = _load(run)
    placement = SectionPlacement.from_origin_normal(parse_numbers(origin, "origin", (3,)),
                                                    parse_numbers(normal, "normal", (3,)), pixel_size)
    from voxelome.io.planes import plane_format, write_plane

    kind = plane_format(out)
    rows, cols = (int(v) for v in parse_numbers(shape, "shape", (2,)))
    values = field.virtual_section(placement, (rows, cols), parse_names(genes))
    names = [field.genes[i] for i in field.gene_index(parse_names(genes))]
    write_plane(out, values, names, pixel_size, placement.matrix, kind=kind)
    typer.echo(f"virtual section {values.shape} (genes, rows, cols) at {pixel_size:g} µm → {out}")


@_friendly
def predict(run: Path = typer.Argument(..., help="Run folder from `reconstruct fit`."),
            points: Path = typer.Option(..., help="CSV with columns x, y, z (µm)."),
            out: Path = typer.Option(..., help="Output CSV: x, y, z and one column per gene."),
            genes: Optional[str] = typer.Option(None, help="Genes (default all)."),
            value: str = typer.Option("rate", help="rate: denoised log1p counts per 10k; measured: the expected "
                                      "log1p value a spot there would read (count fields: at the CSV's `library` "
                                      "column (total counts) when it has one, else at the depth the field predicts "
                                      "there).")):
    """Field values at arbitrary points."""
    import pandas as pd

    if value not in ("rate", "measured"):
        raise VoxelomeError(f"--value {value!r}: use 'rate' (denoised expression) or 'measured' (what a spot would "
                            "read).")
    table = pd.read_csv(points)
    missing = [c for c in "xyz" if c not in table.columns]
    if missing:
        raise VoxelomeError(f"{points} lacks columns {missing}; it needs x, y, z in µm.")
    field = _load(run)
    names = [field.genes[i] for i in field.gene_index(parse_names(genes))]
    library = table["library"].to_numpy(float) if value == "measured" and "library" in table.columns else None
    values = field.predict(table[["x", "y", "z"]].to_numpy(float), names, value=value, library=library)
    pd.concat([table[["x", "y", "z"]], pd.DataFrame(values, columns=names)], axis=1).to_csv(out, index=False)
    typer.echo(f"{len(table)} points × {len(names)} genes → {out}")


@_friendly
def denoise(run: Path = typer.Argument(..., help="Run folder from `reconstruct fit`."),
            stack: Path = typer.Option(..., help="AnnData .h5ad with obsm['spatial_3d']."),
            out: Path = typer.Option(..., help="Output .h5ad with obsm['field_denoised']."),
            section_key: str = typer.Option("section", help="obs column of sections (their batch effects are applied).")):
    """Denoised field values at the measured spots."""
    import anndata as ad

    from voxelome.infer.field_export import FIELD_DENOISED_KEY
    from voxelome.io.atomic import atomic_write_h5ad

    adata = ad.read_h5ad(stack)
    _load(run).denoise(adata, section_key=section_key)
    atomic_write_h5ad(adata, out)
    typer.echo(f"obsm[{FIELD_DENOISED_KEY!r}] {adata.obsm[FIELD_DENOISED_KEY].shape} → {out}")
