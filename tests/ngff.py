"""Check an OME-Zarr output against the OME-NGFF specification with an independent implementation.

``read_ome_zarr`` is voxelome's own reader, so a test that only reads an output back with it cannot notice metadata
that napari-ome-zarr, spatialdata or Fiji would reject. ``yaozarrs`` (pydantic models of the NGFF specification)
validates the group's metadata and its structure: every level's array exists, has one dimension per axis, and its
transforms have that many entries. Its warnings (a SHOULD of the specification broken, e.g. a unit outside UDUNITS)
count as failures here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import yaozarrs

#: What voxelome writes (DESIGN.md): channel first, then space in µm.
SPACE_UNIT = "micrometer"


def assert_ngff_image(path, axes: str | None = None):
    """Validate ``path`` as an NGFF 0.4 multiscale image; optionally check its axis names (``"czyx"``, ``"cyx"``).

    Also checks what the specification allows but voxelome promises: a channel axis first, every spatial axis in
    micrometres, and coarser levels with larger (never smaller) pixel sizes. Returns the validated image model.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = yaozarrs.validate_zarr_store(str(Path(path))).ome_metadata()
    assert isinstance(image, yaozarrs.v04.Image), f"{path}: {type(image).__name__}, not an NGFF 0.4 image"
    multiscale = image.multiscales[0]
    names = "".join(a.name for a in multiscale.axes)
    if axes is not None:
        assert names == axes, f"{path}: axes {names!r}, expected {axes!r}"
    assert multiscale.axes[0].type == "channel", f"{path}: the first axis is {multiscale.axes[0]}, not a channel"
    space = [k for k, a in enumerate(multiscale.axes) if a.type == "space"]
    assert space and all(multiscale.axes[k].unit == SPACE_UNIT for k in space), f"{path}: {multiscale.axes}"
    scales = [d.coordinateTransformations[0].scale for d in multiscale.datasets]
    for finer, coarser in zip(scales, scales[1:]):
        assert all(coarser[k] >= finer[k] for k in space), f"{path}: level scales {scales} shrink"
    return image
