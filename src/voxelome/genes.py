"""Signature maps → gene maps, block by block, through the signature gene loadings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voxelome.infer.blocks import all_done, run_blockwise
from voxelome.io.omezarr import build_pyramid, create_ome_zarr, read_ome_zarr
from voxelome.signatures import SignatureModel


def write_gene_volume(signature_path, model: SignatureModel, out_path, *, genes=None, progress: bool = True) -> Path:
    """Write ``(g, z, y, x)`` expression (log1p-normalised scale) predicted from a signature volume.

    Parameters
    ----------
    signature_path : path
        OME-Zarr ``(k, z, y, x)`` of proportions (from :func:`voxelome.infer.predict.predict_volume`).
    model : SignatureModel
        The signatures the proportions refer to (its loadings turn them into genes).
    out_path : path
        Output OME-Zarr; resumable like the prediction.
    genes : list of str, optional
        Genes to map (default: all signature genes).
    """
    props, spacing, names = read_ome_zarr(signature_path)
    genes = list(genes or model.genes)
    import zarr

    group = zarr.open_group(str(signature_path), mode="r")
    level0 = group["0"]
    translation = np.zeros(3)
    for t in group.attrs["multiscales"][0]["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "translation":
            translation = np.asarray(t["translation"][-3:], float)
    chunks = tuple(level0.chunks[1:])
    out = create_ome_zarr(out_path, (len(genes), *props.shape[1:]), chunks_czyx=(min(len(genes), 16), *chunks),
                          dtype="float32", spacing_um_zyx=spacing, origin_um_zyx=tuple(translation), channel_names=genes)

    def compute(region):
        block = np.asarray(props[(slice(None), *region)], dtype=np.float32)
        return model.to_genes(block, genes=genes).astype(np.float32)

    run_blockwise(compute, out, out_path, chunks_zyx=chunks, progress=progress, desc="gene maps")
    if all_done(out_path, props.shape[1:], chunks):
        build_pyramid(out_path)
    return Path(out_path)
