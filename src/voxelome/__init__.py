"""voxelome: deep-learning 3D spatial transcriptomics.

One ST section registered into a micro-CT volume → 3D niche-signature and gene maps
(X-Pression), dense expression maps (PixNet-style), neural transcriptomic fields, and
cross-modal super-resolution. Geometry is in micrometres; volumes are ``(z, y, x)``.
"""

__version__ = "0.1.0"
