"""Evaluation: per-channel metrics, held-out masks and the trivial baseline's features."""

from voxelome.evaluate.metrics import (
    distance_to_plane_mask,
    kl_divergence_rows,
    mae_per_channel,
    pearson_per_channel,
    pearson_per_column,
    ridge_baseline_feature_names,
    ridge_baseline_features,
    rmse_per_channel,
    summarise,
)

__all__ = [
    "distance_to_plane_mask",
    "kl_divergence_rows",
    "mae_per_channel",
    "pearson_per_channel",
    "pearson_per_column",
    "ridge_baseline_feature_names",
    "ridge_baseline_features",
    "rmse_per_channel",
    "summarise",
]
