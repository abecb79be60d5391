"""Neural Transcriptomic Field (Gong et al., bioRxiv 2026) in four layers.

encoding (:mod:`.encoding`, multi-resolution hash grid, pure torch or tinycudann) → field
(:mod:`.field`, encoding + small MLP) → model (:mod:`.model`, per-gene likelihoods of
:mod:`.likelihoods`, section batch effects, low-rank output) → trainer
(:mod:`voxelome.train.field_trainer`).
"""

from voxelome.models.field.encoding import HashGridConfig, TcnnHashGrid, TorchHashGrid, make_encoding, resolve_backend
from voxelome.models.field.field import NeuralField
from voxelome.models.field.likelihoods import LIKELIHOODS, check_likelihood, log_prob
from voxelome.models.field.model import TranscriptomicField

__all__ = ["LIKELIHOODS", "HashGridConfig", "NeuralField", "TcnnHashGrid", "TorchHashGrid", "TranscriptomicField",
           "check_likelihood", "log_prob", "make_encoding", "resolve_backend"]
