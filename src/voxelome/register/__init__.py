"""Placing sections in volumes: planes, landmarks, resampling."""

from voxelome.register.placement import SectionPlacement
from voxelome.register.sampling import sample_footprints, sample_points
from voxelome.register.section import place_section

__all__ = ["SectionPlacement", "place_section", "sample_footprints", "sample_points"]
