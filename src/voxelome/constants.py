"""Names every module agrees on: AnnData keys, array axes and file names.

Keep keys here and nowhere else so that readers, models and reports cannot drift apart.
"""

# --- AnnData keys -------------------------------------------------------------------
#: Spot centres in *pixels* of the section image, ``(x, y)``, as scverse stores them.
SPATIAL_KEY = "spatial"
#: Spot centres in volume micrometres ``(x, y, z)`` once the section is placed.
SPATIAL_3D_KEY = "spatial_3d"
#: Per-spot niche proportions, ``(n_spots, n_signatures)``, rows on the simplex.
SIGNATURES_KEY = "signatures"
#: Predicted per-spot proportions written by :mod:`voxelome.infer`.
PREDICTED_SIGNATURES_KEY = "signatures_pred"
#: Raw counts layer when ``X`` holds something else.
COUNTS_LAYER = "counts"
#: ``uns`` entry holding voxelome metadata of a section (pixel size, spot diameter, plane).
UNS_KEY = "voxelome"
#: Keys inside ``adata.uns[UNS_KEY]``.
PIXEL_SIZE_KEY = "pixel_size_um"
SPOT_DIAMETER_KEY = "spot_diameter_um"
PLANE_KEY = "plane"
#: ``varm`` key with gene loadings of the signatures, ``(n_genes, n_signatures)``.
SIGNATURE_LOADINGS_KEY = "signature_loadings"
#: ``obs`` column marking the held-out spots (bool).
HELD_OUT_KEY = "held_out"
#: Per-spot expression predicted by a dense 2D model (PixNet: the map summed over each spot's disk),
#: ``obsm`` array ``(n_spots, n_genes)`` in the targets' unit (log1p-normalised counts).
PREDICTED_EXPRESSION_KEY = "expression_pred"
#: ``uns[UNS_KEY]`` entry: the gene (column) names of ``obsm[PREDICTED_EXPRESSION_KEY]``.
PREDICTED_GENES_KEY = "expression_pred_genes"
#: ``uns[UNS_KEY]`` entry: the disk radius (µm) the per-spot predictions were summed over.
PREDICTED_RADIUS_KEY = "expression_pred_radius_um"

# --- axes ---------------------------------------------------------------------------
VOLUME_AXES = ("z", "y", "x")
CHANNEL_VOLUME_AXES = ("c", "z", "y", "x")

# --- run folders --------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
LAST_CHECKPOINT_FILE = "last.pt"
SIGNATURES_FILE = "signatures.npz"
REPORT_FILE = "report.html"
CONFIG_SCHEMA_VERSION = 1
