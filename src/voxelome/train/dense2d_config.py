"""Configuration of dense 2D (PixNet-style) training: a frozen dataclass, presets by name, plain YAML.

Kept apart from :class:`voxelome.train.config.TrainConfig` (whose fields describe 3D volumes, crops in
(z, y, x) µm and signature proportions); the conventions are the same: one docstring per field, presets
by name, unknown keys get a "did you mean", the YAML carries a schema version.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import yaml

from voxelome.errors import VoxelomeError, check_choice
from voxelome.train.config_io import fields_of, from_preset, to_yaml

TARGETS = ("genes", "signatures")
GENE_SELECTIONS = ("variance", "moran")
VAL_METRICS = ("pcc", "loss")


@dataclass(frozen=True)
class Dense2DConfig:
    """How to train an H&E image → dense expression map model. Every field has a preset default."""

    targets: str = "genes"
    """``genes`` (top-``n_genes`` genes, log1p-normalised) or ``signatures`` (``obsm['signatures']``)."""
    n_genes: int = 250
    """Number of target genes (ranked on the training spots; e.g. 50 or 250)."""
    gene_selection: str = "variance"
    """``variance`` (highly variable genes) or ``moran`` (spatially variable genes, Moran's I)."""
    encoder: str = "small"
    """Encoder: ``small`` (from-scratch CNN), ``timm:<model>``, ``torchvision:<model>`` or a registered name."""
    encoder_weights: str | None = None
    """Local file of encoder weights (nothing is downloaded); None trains the encoder from scratch."""
    width: int = 16
    """``small`` encoder: channels at stride 2 (doubled at 4 and 8)."""
    decoder_width: int = 32
    """Decoder channels."""
    input_um: float = 4.0
    """Working pixel size (µm) the H&E is resampled to before the network (4 µm makes CPU training feasible;
    foundation-model encoders want ~0.5–1 µm)."""
    output_stride: int = 4
    """Input pixels per map pixel: the map has ``input_um · output_stride`` µm/px (16 µm by default)."""
    tile_px: int = 128
    """Training tile side in working pixels (a multiple of the encoder's coarsest stride)."""
    seed: int = 0
    """Seed of every random step (tiles, augmentation, initialisation)."""
    epochs: int = 30
    """Number of epochs (an epoch is ``steps_per_epoch`` optimiser steps). 30, the her2st benchmark's budget
    (BENCHMARKS.md); the former default of 20 scored lower there on every held-out section (top-50 PCC@M 0.376 vs
    0.391)."""
    steps_per_epoch: int = 10
    """Optimiser steps per epoch."""
    batch_size: int = 8
    """Tiles per step."""
    lr: float = 2e-3
    """AdamW learning rate (cosine decay to 5 % over the epochs)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    pearson_weight: float = 0.5
    """Loss = MSE + this × (1 − mean per-gene Pearson r over the batch's spots), as in PixNet."""
    augment: bool = True
    """Random flips and 90° rotations of tiles."""
    color_jitter: float = 0.08
    """Colour jitter amplitude: per-channel gain 1 ± this and offset ± this/2 (0 disables)."""
    overlap: float = 0.25
    """Whole-slide prediction: fractional overlap of neighbouring tiles."""
    blend: str = "gaussian"
    """Whole-slide prediction: tile blending, ``gaussian`` or ``constant``."""
    predict_tile_px: int = 256
    """Whole-slide prediction: tile side in working pixels."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda[:n]``."""
    num_threads: int = 0
    """CPU threads for torch (0: leave torch's default)."""
    val_fraction: float = 0.0
    """Validation: fraction of each training section's spots held out at random (seeded) and scored after
    every epoch. Neighbouring spots are correlated, so this is optimistic; ``val_sections`` is the cleaner split."""
    val_sections: tuple = ()
    """Validation: names of whole sections (``SlideData.name``) used only for validation, never fitted
    (and left out of target-gene selection)."""
    val_metric: str = "pcc"
    """Validation score: ``pcc`` (mean per-gene Pearson r on the validation spots, higher is better) or
    ``loss`` (the training loss over all validation spots, lower is better)."""
    patience: int = 0
    """Early stopping: stop after this many epochs without a validation improvement (0: run every epoch).
    With validation on, the final checkpoint holds the best epoch's weights (``best.pt``)."""
    min_delta: float = 0.0
    """Early stopping: the smallest change of the validation score that counts as an improvement."""

    def __post_init__(self):
        check_choice("targets", self.targets, TARGETS)
        check_choice("gene_selection", self.gene_selection, GENE_SELECTIONS)
        check_choice("blend", self.blend, ("gaussian", "constant"))
        check_choice("val_metric", self.val_metric, VAL_METRICS)
        names = self.val_sections
        if names is None:
            names = ()
        elif isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        object.__setattr__(self, "val_sections", tuple(str(n) for n in names))
        if not 0 <= float(self.val_fraction) < 1:
            raise VoxelomeError(f"val_fraction={self.val_fraction!r} must lie in [0, 1); e.g. 0.15.")
        if int(self.patience) < 0 or float(self.min_delta) < 0:
            raise VoxelomeError(f"patience={self.patience!r} and min_delta={self.min_delta!r} must be ≥ 0.")
        if self.patience and not self.validates:
            raise VoxelomeError(f"patience={self.patience} needs validation spots: set val_fraction (e.g. 0.15) or "
                                "val_sections (names of sections to validate on).")
        for name in ("n_genes", "width", "decoder_width", "epochs", "steps_per_epoch", "batch_size",
                     "tile_px", "predict_tile_px"):
            if int(getattr(self, name)) < 1:
                raise VoxelomeError(f"{name}={getattr(self, name)!r} must be ≥ 1.")
        if self.output_stride < 1 or self.output_stride & (self.output_stride - 1):
            raise VoxelomeError(f"output_stride={self.output_stride!r} must be a power of two (1, 2, 4, 8).")
        if self.tile_px % max(16, self.output_stride) or self.predict_tile_px % max(16, self.output_stride):
            raise VoxelomeError(f"tile_px={self.tile_px} and predict_tile_px={self.predict_tile_px} must be "
                                "multiples of 16 (the small encoder's coarsest stride); e.g. 128 and 256.")
        for name in ("input_um", "lr"):
            if not float(getattr(self, name)) > 0:
                raise VoxelomeError(f"{name}={getattr(self, name)!r} must be > 0.")
        if not 0 <= self.overlap < 1:
            raise VoxelomeError(f"overlap={self.overlap!r} must lie in [0, 1); e.g. 0.25.")
        if self.pearson_weight < 0 or self.color_jitter < 0:
            raise VoxelomeError("pearson_weight and color_jitter must be ≥ 0.")

    @property
    def output_um(self) -> float:
        """Map pixel size in µm (nominal; the exact one follows from the image's pixel size)."""
        return float(self.input_um) * int(self.output_stride)

    @property
    def validates(self) -> bool:
        """Whether training scores validation spots after every epoch."""
        return float(self.val_fraction) > 0 or bool(self.val_sections)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["val_sections"] = list(self.val_sections)
        return d


PRESETS: dict[str, Dense2DConfig] = {
    # CPU-feasible default: 4 µm/px input, 16 µm/px map, small from-scratch CNN, 250 genes.
    "dense2d": Dense2DConfig(),
    # The same with 50 genes (PixNet's top-50 setting).
    "dense2d-top50": Dense2DConfig(n_genes=50),
}


def make_dense2d_config(preset: str = "dense2d", **overrides) -> Dense2DConfig:
    """A preset with some fields replaced; unknown fields get a "did you mean"."""
    return from_preset(PRESETS, preset, overrides)


def dense2d_config_to_yaml(config: Dense2DConfig, extra: dict | None = None) -> str:
    """Plain YAML, schema version and kind first."""
    return to_yaml(config, "dense2d", extra)


def dense2d_config_from_dict(d: dict) -> Dense2DConfig:
    """Rebuild a config from :func:`dense2d_config_to_yaml` output or a hand-written subset of fields."""
    values, preset = fields_of(d)
    return make_dense2d_config(preset or "dense2d", **values)


def load_dense2d_config_file(path) -> Dense2DConfig:
    """Read a YAML config file (as written next to a run, or hand-written)."""
    with open(path) as fh:
        d = yaml.safe_load(fh) or {}
    if not isinstance(d, dict):
        raise VoxelomeError(f"config file {path} must hold a mapping of field: value.")
    return dense2d_config_from_dict(d)
