"""Figures (one PNG each) and the single-file HTML report of a run."""

from voxelome.plot.figures import orthogonal_views, scatter_pred_vs_true, section_overlay, training_curves
from voxelome.plot.report import flatten_dict, write_html_report

__all__ = [
    "flatten_dict",
    "orthogonal_views",
    "scatter_pred_vs_true",
    "section_overlay",
    "training_curves",
    "write_html_report",
]
