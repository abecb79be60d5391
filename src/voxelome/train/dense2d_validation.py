"""Validation of dense 2D training: which spots are held out, and how the held-out spots score.

Used by :func:`voxelome.train.dense2d_trainer.train_dense2d` for early stopping and to keep the best
epoch (``best.pt``). Two ways to hold spots out (config fields): ``val_sections`` (whole sections, never
fitted — the honest split) and ``val_fraction`` (a seeded random share of every training section's
spots — neighbouring spots are correlated, so its scores are optimistic).
"""

from __future__ import annotations

import numpy as np
import torch

from voxelome.errors import VoxelomeError
from voxelome.train.dense2d_config import Dense2DConfig
from voxelome.train.dense2d_data import SlideData

BEST_CHECKPOINT_FILE = "best.pt"


def validation_split(slides: list[SlideData], config: Dense2DConfig):
    """Split the slides' spots into fitted and validation spots as ``config`` asks.

    Whole sections named in ``config.val_sections`` are validation only; of the other sections' training
    spots a ``config.val_fraction`` is drawn (seeded by ``config.seed`` and the section's index).

    Returns
    -------
    fit : list of SlideData
        Copies of the slides whose ``train`` masks hold the fitted spots only.
    val_masks : list of ndarray of bool
        Per slide, its validation spots (all False without validation).
    """
    import dataclasses

    from voxelome.errors import did_you_mean

    if not config.validates:
        return list(slides), [np.zeros(len(s.centres_xy), bool) for s in slides]
    names = [s.name for s in slides]
    for name in config.val_sections:
        if name not in names:
            raise VoxelomeError(f"val_sections names {name!r}, which is not one of the sections {names}."
                                f"{did_you_mean(name, names)}")
    fit, val = [], []
    for k, s in enumerate(slides):
        train = np.asarray(s.train, bool).copy()
        held = np.zeros_like(train)
        if s.name in config.val_sections:
            held, train = train, np.zeros_like(train)
        elif config.val_fraction > 0:
            idx = np.flatnonzero(train)
            n = int(round(config.val_fraction * len(idx)))
            pick = np.random.default_rng([config.seed, 104_729, k]).choice(idx, n, replace=False)
            held[pick], train[pick] = True, False
        fit.append(dataclasses.replace(s, train=train))
        val.append(held)
    if not any(v.any() for v in val):
        raise VoxelomeError("validation is on but no spot was held out; raise val_fraction or name val_sections.")
    if not any(f.train.any() for f in fit):
        raise VoxelomeError("every section is a validation section; leave at least one to train on.")
    return fit, val


def validation_scores(trained, slides: list[SlideData], val_masks) -> dict:
    """``{'val_pcc': mean per-gene Pearson r, 'val_loss': training loss}`` over all validation spots.

    ``trained`` is a :class:`~voxelome.train.dense2d_trainer.TrainedDense2D` (its current weights).
    """
    from voxelome.train.dense2d_trainer import dense2d_loss, expression_scores

    preds, trues = [], []
    for s, m in zip(slides, val_masks):
        if m.any():
            preds.append(trained.predict_spots(s, s.centres_xy[m]))
            trues.append(s.targets[m])
    pred, true = np.vstack(preds), np.vstack(trues)
    loss = dense2d_loss(torch.from_numpy(pred).double(), torch.from_numpy(true).double(),
                        trained.config.pearson_weight)
    return {"val_pcc": expression_scores(pred, true)["pcc_mean"], "val_loss": float(loss)}
