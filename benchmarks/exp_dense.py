"""One dense training run on the phantom with config overrides, scored like bench_xpression (development ablations).

    python benchmarks/exp_dense.py NAME THREADS '{"epochs": 40}'    # → benchmarks/out/exp/NAME/res.json

Same phantom, section, split, second section and volume score as ``bench_xpression.py`` (dense only, no xpression,
no baseline); prints held-out spot r, second-section r and held-out volume r with per-signature values.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from voxelome.datasets import axial_placement, make_lung_phantom
from voxelome.demo import second_placement
from voxelome.evaluate.phantom import block_mean, score_volume
from voxelome.infer.predict import TrainedModel, predict_volume
from voxelome.io.omezarr import read_ome_zarr
from voxelome.pipeline import predict_section_spots, spot_metrics
from voxelome.register import place_section
from voxelome.train.config import make_config
from voxelome.train.spots import targets_from_section
from voxelome.train.trainer import train_model

name = sys.argv[1]; threads = int(sys.argv[2]); over = json.loads(sys.argv[3])
torch.set_num_threads(threads)
out = Path(__file__).parent / "out" / "exp" / name; out.mkdir(parents=True, exist_ok=True)
ph = make_lung_phantom(seed=0)
pl = axial_placement(ph)
sec = place_section(ph.cut_section(pl, seed=0), pl, ph.volume)
sec.obsm["signatures"] = sec.obsm["signatures_true"]
targets = targets_from_section(sec, ph.volume, val_fraction=0.2, block_um=400.0, seed=0)
held = ~targets.train_mask
other = ph.cut_section(second_placement(ph, 0), seed=1)
names = list(ph.signature_names)
cfg = make_config("dense", seed=0, **over)
t0 = time.perf_counter()
run = train_model(ph.volume, targets, cfg, out / "run", resume=True)
ts = time.perf_counter() - t0
model = TrainedModel.load(run)
pr = model.spot_predictor()
sp = pr.predict(pr.sampler(ph.volume, targets), np.flatnonzero(held))
res = {"train_s": ts, "spots": spot_metrics(sp, targets.proportions[held], names)["mean"],
       "second": spot_metrics(predict_section_spots(model, ph.volume, other), np.asarray(other.obsm["signatures_true"]), names)["mean"]}
t0 = time.perf_counter()
predict_volume(model, ph.volume, out / "pred.ome.zarr", overwrite=True, progress=False)
res["pred_s"] = time.perf_counter() - t0
pred = np.asarray(read_ome_zarr(out / "pred.ome.zarr")[0])
step = model.output_step()
_, spacing, origin = model.output_geometry(ph.volume)
tis = block_mean(ph.tissue[None].astype(np.float32), step)[0] > 0.5
_, _, normal = pl.frame
v = score_volume(pred, block_mean(ph.truth, step), tis, spacing_um_zyx=spacing, origin_um_zyx=origin,
                 plane_point_xyz=pl.matrix[:, 2], plane_normal_xyz=normal, names=names)
res["volume"] = v["mean"]; res["per"] = {k: round(x, 3) for k, x in v["per_channel"].items()}
res["epochs_run"] = len(json.loads((run / "history.json").read_text()))
print(name, over, json.dumps(res))
(out / "res.json").write_text(json.dumps({"over": over, **res}, indent=1))
