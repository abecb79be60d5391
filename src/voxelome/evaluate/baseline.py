"""The trivial baseline every image → signature model must beat: smoothed intensity + ridge.

Features are Gaussian-smoothed intensities and local standard deviations at a few scales
(:func:`voxelome.evaluate.metrics.ridge_baseline_features`); a ridge regression fitted on the
*same training spots* as the network maps them to proportions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from voxelome.evaluate.metrics import ridge_baseline_features
from voxelome.io.volume import Volume
from voxelome.register.sampling import sample_points
from voxelome.train.spots import SpotTargets

SCALES_UM = (10.0, 20.0, 40.0, 80.0, 160.0)


def _to_simplex(y: np.ndarray, axis: int) -> np.ndarray:
    y = np.clip(y, 0, None)
    return y / np.clip(y.sum(axis=axis, keepdims=True), 1e-8, None)


@dataclass
class RidgeBaseline:
    """Multi-scale smoothed intensity features + ridge regression, fitted on training spots.

    Only for volumes that fit in memory (benchmarks and the demo).
    """

    features: np.ndarray  # (f, z, y, x)
    volume: Volume
    model: object = None

    @classmethod
    def fit(cls, volume: Volume, targets: SpotTargets, scales_um=SCALES_UM) -> "RidgeBaseline":
        feats = ridge_baseline_features(np.asarray(volume.data), volume.spacing_um, scales_um)
        base = cls(feats, volume)
        x = base.spot_features(targets.centres_xyz_um[targets.train_mask])
        base.model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))).fit(
            x, targets.proportions[targets.train_mask])
        return base

    def spot_features(self, centres_xyz_um: np.ndarray) -> np.ndarray:
        vols = [self.volume.with_data(f) for f in self.features]
        return np.stack([sample_points(v, centres_xyz_um) for v in vols], 1)

    def predict_spots(self, centres_xyz_um: np.ndarray) -> np.ndarray:
        """Proportions ``(n, k)`` at spot centres."""
        return _to_simplex(self.model.predict(self.spot_features(centres_xyz_um)), axis=1)

    def predict_grid(self, step) -> np.ndarray:
        """Proportions ``(k, *out_shape)`` on the output grid of cells of ``step`` voxels (block means)."""
        from voxelome.evaluate.phantom import block_mean

        f = block_mean(self.features, step)
        flat = f.reshape(f.shape[0], -1).T
        y = self.model.predict(flat).T.reshape(-1, *f.shape[1:])
        return _to_simplex(y, axis=0).astype(np.float32)
