"""Readers and writers: volumes (TIFF, OME-Zarr, NIfTI, NPY/NPZ), sections (Visium, legacy ST,
Xenium, MERSCOPE, h5ad), the OME-Zarr writer, and atomic file writes. Everything is returned in voxelome's
canonical layout: volumes ``(z, y, x)`` in µm, sections as validated AnnData.
"""

from voxelome.io.atomic import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_h5ad,
    atomic_write_json,
    atomic_write_text,
)
from voxelome.io.omezarr import build_pyramid, create_ome_zarr, read_ome_zarr, write_volume_ome_zarr
from voxelome.io.imaging_st import read_merscope, read_xenium
from voxelome.io.legacy_st import read_legacy_st
from voxelome.io.sections import read_h5ad_section, read_section, validate_section, write_h5ad
from voxelome.io.visium import read_visium
from voxelome.io.volume import Volume
from voxelome.io.volumes import read_volume

__all__ = [
    "Volume",
    "read_volume",
    "read_section",
    "read_visium",
    "read_legacy_st",
    "read_xenium",
    "read_merscope",
    "read_h5ad_section",
    "validate_section",
    "write_h5ad",
    "create_ome_zarr",
    "build_pyramid",
    "read_ome_zarr",
    "write_volume_ome_zarr",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_bytes",
    "atomic_write_h5ad",
    "atomic_torch_save",
]
