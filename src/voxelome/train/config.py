"""Training configuration: one frozen dataclass, presets by name, plain YAML next to every run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import yaml

from voxelome.constants import CONFIG_SCHEMA_VERSION
from voxelome.errors import VoxelomeError, check_choice, did_you_mean
from voxelome.models.dense import NORMS

MODELS = ("dense", "xpression")


@dataclass(frozen=True)
class TrainConfig:
    """How to train an image → signature model. Every field has a preset default."""

    model: str = "dense"
    """Network: ``dense`` (voxelome's fully convolutional net) or ``xpression`` (the published patch CNN)."""
    seed: int = 0
    """Seed of every random step (split, crops, augmentation, initialisation)."""
    epochs: int = 60
    """Maximum number of epochs (an epoch is ``steps_per_epoch`` optimiser steps). 60, the X-Pression benchmark's
    budget behind its figures (BENCHMARKS.md: 40 → 60 epochs, with patience 8 → 15, moved the phantom's held-out
    volume r 0.848 → 0.881); the default was 40 until the ninth session."""
    steps_per_epoch: int = 10
    """Optimiser steps per epoch; validation, checkpointing and early stopping happen per epoch."""
    batch_size: int = 8
    """Crops per step (dense) or patches per step (xpression)."""
    lr: float = 3e-3
    """Adam learning rate (X-Pression used 1e-4)."""
    lr_schedule: str = "cosine"
    """``cosine`` (decay to 5 % of ``lr`` over ``epochs``) or ``constant`` (X-Pression used a constant rate)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    patience: int = 15
    """Early stopping: epochs without validation improvement before stopping (the validation spots are few and
    noisy, and the cosine schedule still improves the model late, so the dense default is generous)."""
    val_fraction: float = 0.2
    """Fraction of spots held out for validation (spatial blocks, never used for fitting)."""
    split_block_um: float = 400.0
    """Side of the square blocks (µm) that are held out together, so neighbours do not leak."""
    augment: bool = True
    """Random flips and in-plane 90° rotations of crops/patches."""
    rotate_3d: bool = True
    """Dense net: also rotate crops by 90° about any axis, so structures cut in one plane are learnt in
    every orientation; used only when the scan's voxels are isotropic (within 10 %)."""
    # --- dense ---
    width: int = 24
    """Dense net: channels of the first stage."""
    input_spacing_um: float | None = 16.0
    """Dense net: working voxel size (µm) the scan is average-pooled to (rounded to a whole number of scan
    voxels); None keeps the scan's voxels. 16 µm sees 50–300 µm niches cheaply."""
    output_stride: int = 1
    """Dense net: output voxel = this many working voxels (1, 2 or 4)."""
    norm: str = "batch"
    """Dense net: feature normalisation, ``batch`` (running statistics at prediction time, so every output voxel
    depends only on its neighbourhood: windows agree where they overlap), ``layer`` (per voxel, over channels;
    also local, independent of the batch) or ``group`` (statistics over the whole window: the prediction then
    depends on the window's content; kept for old runs)."""
    crop_um: tuple[float, float, float] = (320.0, 960.0, 960.0)
    """Dense net: training crop size (z, y, x) in µm, centred near the section."""
    window_um: tuple[float, float, float] = (640.0, 640.0, 640.0)
    """Dense net: sliding-window size (z, y, x) in µm for whole-volume prediction."""
    overlap: float = 0.25
    """Dense net: fractional overlap of neighbouring windows."""
    blend: str = "gaussian"
    """Dense net: window blending, ``gaussian`` or ``constant``."""
    # --- xpression ---
    patch_um: tuple[float, float, float] = (33.6, 204.8, 204.8)
    """X-Pression: patch size (z, y, x) in µm; 21×128×128 voxels at the paper's 1.6 µm."""
    grid_step_um: tuple[float, float, float] = (33.6, 25.6, 25.6)
    """X-Pression: spacing of patch centres when predicting a volume (every 21 slices, 16 px in-plane at 1.6 µm)."""
    oversample_rare: bool = True
    """X-Pression: sample spots inversely to the frequency of their dominant signature."""
    dropout: float = 0.3
    """X-Pression: dropout before the output layer."""
    # --- runtime ---
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda[:n]``."""
    num_threads: int = 0
    """CPU threads for torch (0: leave torch's default)."""
    inference_batch: int = 64
    """X-Pression patches per forward pass at prediction time."""

    def __post_init__(self):
        check_choice("model", self.model, MODELS)
        check_choice("blend", self.blend, ("gaussian", "constant"))
        check_choice("norm", self.norm, NORMS)
        check_choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        for name in ("epochs", "steps_per_epoch", "batch_size", "width", "inference_batch"):
            if int(getattr(self, name)) < 1:
                raise VoxelomeError(f"{name}={getattr(self, name)!r} must be ≥ 1.")
        if not 0.0 < self.val_fraction < 0.9:
            raise VoxelomeError(f"val_fraction={self.val_fraction!r} must lie in (0, 0.9); e.g. 0.2.")
        if not 0.0 <= self.overlap < 1.0:
            raise VoxelomeError(f"overlap={self.overlap!r} must lie in [0, 1); e.g. 0.25.")
        if self.output_stride not in (1, 2, 4):
            raise VoxelomeError(f"output_stride={self.output_stride!r} must be 1, 2 or 4.")
        if self.lr <= 0:
            raise VoxelomeError(f"lr={self.lr!r} must be > 0.")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


PRESETS: dict[str, TrainConfig] = {
    "dense": TrainConfig(),
    # The published recipe: Adam 1e-4, patch CNN, early stopping, rare-signature oversampling.
    "xpression": TrainConfig(model="xpression", lr=1e-4, lr_schedule="constant", weight_decay=0.0, batch_size=32, epochs=60,
                             steps_per_epoch=20, patience=10),
}


def field_docs() -> dict[str, str]:
    """Docstring of each field (for ``--help`` and the report)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def make_config(preset: str = "dense", **overrides) -> TrainConfig:
    """A preset with some fields replaced; unknown fields get a "did you mean"."""
    check_choice("preset", preset, PRESETS)
    names = {f.name for f in fields(TrainConfig)}
    for key in overrides:
        if key not in names:
            raise VoxelomeError(f"config key {key!r} does not exist.{did_you_mean(key, names)}")
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(PRESETS[preset], **clean)


def config_from_dict(d: dict) -> TrainConfig:
    """Rebuild a config saved by :func:`config_to_yaml` (checks the schema version)."""
    d = dict(d)
    version = d.pop("schema_version", CONFIG_SCHEMA_VERSION)
    if version != CONFIG_SCHEMA_VERSION:
        raise VoxelomeError(f"config schema_version={version} is not supported (this voxelome reads {CONFIG_SCHEMA_VERSION}).")
    preset = d.pop("preset", "dense" if d.get("model", "dense") == "dense" else "xpression")
    return make_config(preset, **d)


def config_to_yaml(config: TrainConfig, extra: dict | None = None) -> str:
    """Plain YAML with the schema version first."""
    payload = {"schema_version": CONFIG_SCHEMA_VERSION, **config.to_dict()}
    if extra:
        payload.update(extra)
    return yaml.safe_dump(payload, sort_keys=False)


def load_config_file(path) -> TrainConfig:
    """Read a YAML config (as written next to a run, or hand-written with a subset of fields)."""
    with open(path) as fh:
        d = yaml.safe_load(fh) or {}
    if not isinstance(d, dict):
        raise VoxelomeError(f"config file {path} must hold a mapping of field: value.")
    d = {k: v for k, v in d.items() if k not in ("data", "voxelome_version")}
    return config_from_dict(d)
