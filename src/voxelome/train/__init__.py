"""Training: configs and presets, targets from a placed section, the loop, checkpoints."""

from voxelome.train.config import PRESETS, TrainConfig, make_config
from voxelome.train.spots import SpotTargets, targets_from_section
from voxelome.train.trainer import train_model

__all__ = ["PRESETS", "SpotTargets", "TrainConfig", "make_config", "targets_from_section", "train_model"]
