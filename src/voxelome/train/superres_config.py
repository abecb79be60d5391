"""Configuration of cross-modal diffusion super-resolution: a frozen dataclass, presets by name, plain YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from voxelome.errors import VoxelomeError, check_choice
from voxelome.models.diffusion.process import PREDICTION_TYPES, SCHEDULES
from voxelome.train.config_io import fields_of, from_preset, to_yaml


@dataclass(frozen=True)
class SuperResConfig:
    """How to train and sample a super-resolution diffusion model. Every field has a preset default."""

    width: int = 32
    """Denoiser channels at full resolution (doubled per coarser level)."""
    levels: int = 2
    """U-Net resolution levels."""
    tokens: int = 6
    """Tissue-level tokens per side for the cross-attention (0: no cross-attention)."""
    heads: int = 4
    """Attention heads."""
    graph_neighbours: int = 8
    """Genes linked to each gene in the co-expression graph layer (0: no graph layer)."""
    dropout: float = 0.0
    """Dropout inside residual blocks."""
    base: str = "bicubic"
    """Upsampling the network refines: ``bicubic`` or ``nearest`` (block replication; keeps block means)."""
    deterministic: bool = False
    """Train the same network as a plain MSE regressor of the clean map (the deterministic baseline)."""
    self_condition: bool = False
    """Feed the network its previous clean-map estimate (self-conditioning; ignored when deterministic)."""
    num_train_timesteps: int = 1000
    """Forward-process steps."""
    beta_schedule: str = "squaredcos_cap_v2"
    """Noise schedule (cosine by default)."""
    prediction_type: str = "sample"
    """What the network predicts: ``epsilon``, ``sample`` (clean map) or ``v_prediction``."""
    iterations: int = 1500
    """Optimiser steps."""
    batch_size: int = 8
    """Crops per step."""
    crop_px: int = 32
    """Training crop side in high-res pixels (rounded down to a multiple of the factor; pairs smaller than a
    crop are zero-padded with an empty mask)."""
    lr: float = 1e-3
    """AdamW learning rate (cosine decay to 5 %)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    ema_decay: float = 0.995
    """Exponential moving average of the weights used for sampling (0: none)."""
    augment: bool = True
    """Random flips and 90° rotations of crops (all inputs alike)."""
    seed: int = 0
    """Seed of every random step (initialisation, crops, diffusion steps and noise)."""
    checkpoint_every: int = 100
    """Write ``last.pt`` every this many steps (resume point)."""
    sample_steps: int = 20
    """DDIM steps at sampling."""
    n_samples: int = 8
    """Samples drawn per map (mean, spread, intervals)."""
    eta: float = 0.0
    """DDIM stochasticity (0: deterministic given the initial noise)."""
    consistency: bool = False
    """Shift each sample so its low-res block means equal the observed low-res map."""
    interval: float = 0.9
    """Central coverage of the reported intervals."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda[:n]``."""
    num_threads: int = 0
    """CPU threads for torch (0: leave torch's default)."""

    def __post_init__(self):
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("beta_schedule", self.beta_schedule, SCHEDULES)
        check_choice("base", self.base, ("bicubic", "nearest"))
        for name in ("width", "levels", "heads", "iterations", "batch_size", "crop_px", "checkpoint_every",
                     "sample_steps", "n_samples", "num_train_timesteps"):
            if int(getattr(self, name)) < 1:
                raise VoxelomeError(f"{name}={getattr(self, name)!r} must be ≥ 1.")
        if self.width < 8 or self.width % self.heads:
            raise VoxelomeError(f"width={self.width} must be ≥ 8 and divisible by heads={self.heads}; e.g. 32.")
        if self.sample_steps > self.num_train_timesteps:
            raise VoxelomeError(f"sample_steps={self.sample_steps} must be ≤ num_train_timesteps="
                                f"{self.num_train_timesteps}.")
        if self.tokens < 0 or self.graph_neighbours < 0:
            raise VoxelomeError("tokens and graph_neighbours must be ≥ 0 (0 switches the part off).")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.dropout < 1:
            raise VoxelomeError(f"ema_decay={self.ema_decay} and dropout={self.dropout} must lie in [0, 1).")
        if not 0 < self.interval < 1:
            raise VoxelomeError(f"interval={self.interval} must lie in (0, 1); e.g. 0.9.")
        if not self.lr > 0 or self.eta < 0:
            raise VoxelomeError(f"lr={self.lr} must be > 0 and eta={self.eta} ≥ 0.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, SuperResConfig] = {
    # CPU-feasible default (a few minutes on 2 cores for grids of a few hundred pixels a side).
    "superres": SuperResConfig(),
    # The deterministic baseline: same network, no noise input, MSE on the clean map.
    "superres-deterministic": SuperResConfig(deterministic=True),
    # Real spot data (few hundred spots per section, noisy counts): the configuration chosen on her2st's inner split
    # (BENCHMARKS.md: train C2, C4, C5 → validate C6), the her2st benchmark's. The residual on a nearest-upsampled
    # base with block-mean consistency keeps the output at least as faithful as block replication; the larger
    # default overfits a couple of sections (her2st C5 restore: r 0.574 after 1,500 steps vs 0.675 for replication).
    "superres-spots": SuperResConfig(width=16, dropout=0.1, iterations=200, crop_px=16, consistency=True,
                                     base="nearest"),
    # Tiny, for tests and smoke runs.
    "superres-tiny": SuperResConfig(width=16, tokens=4, heads=2, iterations=60, batch_size=4, crop_px=16,
                                    checkpoint_every=20, sample_steps=10, n_samples=4),
}


def make_superres_config(preset: str = "superres", **overrides) -> SuperResConfig:
    """A preset with some fields replaced; unknown fields get a "did you mean"."""
    return from_preset(PRESETS, preset, overrides)


def superres_config_to_yaml(config: SuperResConfig, extra: dict | None = None) -> str:
    return to_yaml(config, "superres", extra)


def superres_config_from_dict(d: dict) -> SuperResConfig:
    """Rebuild a config from :func:`superres_config_to_yaml` output or a hand-written subset of fields."""
    values, preset = fields_of(d)
    return make_superres_config(preset or "superres", **values)
