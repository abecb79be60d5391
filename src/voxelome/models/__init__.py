"""Networks only: they map tensors to tensors and know nothing of files or µm."""

from voxelome.models.dense import DenseSignatureNet3D
from voxelome.models.xpression import XPressionCNN

__all__ = ["DenseSignatureNet3D", "XPressionCNN"]
