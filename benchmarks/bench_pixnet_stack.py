"""Benchmark: dense maps (PixNet-style) on the REGISTERED her2st C2–C6 H&E stack → 3D expression volume.

Steps (one run, recorded in BENCHMARKS.md):

1. Register the five sections with the registration issue's image stack (``stack_images``, rigid, at its
   default 20 µm/px working resolution — the setting its benchmark validated; sections 16 µm apart as there).
2. Apply those transforms to each section's full-resolution H&E, rendered at 4 µm/px (the dense model's
   working resolution; box filter as in training): a 4 µm registered RGB stack in the same µm frame, written
   as OME-Zarr ``(3, z, y, x)``. Check against the
   registration's own 20 µm output (box-averaged ×5: mean |difference|, tissue-mask Dice of adjacent sections).
3. For every held-out section k, the leave-one-section-out model of ``bench_pixnet_her2st.py`` that never saw
   section k (``run_<k>``) scores k's spots (a) on its unregistered image (as in that benchmark), (b) on the map
   predicted on slice k of the registered 4 µm stack, spots moved by the same transform, and (c) on slice k of
   the registration's 20 µm stack enlarged to 4 µm. Agreement of (a) and (b) per gene; time per slice.
   The training-mean baseline (r = 0) is reported beside.
4. The volume itself is made with the CLI (``voxelome dense2d predict RUN --stack … --n-genes 50``; time and
   peak RSS with ``/usr/bin/time -v``), see BENCHMARKS.md.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/bench_pixnet_stack.py \\
        --runs benchmarks/out/pixnet_her2st --out benchmarks/out/pixnet_stack
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pixnet_her2st import DATA, SECTIONS, _slide, load_sections, scores

from voxelome.infer.slide import RGBStack
from voxelome.io.omezarr import write_volume_ome_zarr
from voxelome.train.dense2d_data import SlideData, gene_targets
from voxelome.train.dense2d_trainer import TrainedDense2D

WORK = 20.0  # registration working µm/px (stack_images default)
OUT_UM = 4.0  # dense model working µm/px
MARGIN = 0.15  # stack_images default padding of the reference grid


def work_exact(full_w, full_h, px, work):
    """Exact µm per pixel (x, y) of an image read at ``work`` µm/px the way ``read_downsampled`` sizes it."""
    w = max(int(round(full_w * px / work)), 8)
    h = max(int(round(full_h * px / work)), 8)
    return full_w * px / w, full_h * px / h, (h, w)


def register(ads, imgs):
    from voxelome.register.stack_image import stack_images

    t = time.perf_counter()
    res = stack_images(imgs, np.arange(len(imgs)) * 16.0, adatas=ads, names=list(SECTIONS), work_um=WORK)
    return res, time.perf_counter() - t


def render_to_reference(path, px, e20, tx, ref_shape4, origin4, sub: int = 4):
    """A section's full-resolution H&E → the registered reference grid at 4 µm (ITK frame of the 20 µm fit).

    The registration's section frame puts the centre of 20 µm pixel j at j·20 (ITK); its true position is
    (j + ½)·e20 µm, so true µm t maps to t·20/e20 − 10 there; full-resolution pixel i is centred at true
    (i + ½)·px. Each 4 µm output pixel is the mean of ``sub × sub`` linearly interpolated samples of the
    full-resolution image — a box filter like the one the model's training images were made with.
    (Interpolating the 4 µm image itself blurs texture the model depends on; see BENCHMARKS.md.)
    """
    import SimpleITK as sitk
    from PIL import Image

    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB"))
    sp = (px * WORK / e20[0], px * WORK / e20[1])
    step = OUT_UM / sub
    ref = sitk.Image(int(ref_shape4[1] * sub), int(ref_shape4[0] * sub), sitk.sitkUInt8)
    ref.SetSpacing((step, step))
    ref.SetOrigin(tuple(o - OUT_UM / 2 + step / 2 for o in origin4))
    out = np.empty((3,) + tuple(ref_shape4), np.uint8)
    for c in range(3):
        img = sitk.GetImageFromArray(np.ascontiguousarray(full[..., c]))
        img.SetSpacing(sp)
        img.SetOrigin((0.5 * sp[0] - WORK / 2, 0.5 * sp[1] - WORK / 2))
        fine = sitk.GetArrayFromImage(sitk.Resample(img, ref, tx, sitk.sitkLinear, 255.0, sitk.sitkUInt8))
        del img
        box = fine.reshape(ref_shape4[0], sub, ref_shape4[1], sub).mean((1, 3), dtype=np.float32)
        out[c] = np.clip(np.round(box), 0, 255).astype(np.uint8)
    return out


def spots_to_reference(ad, px, e20, tx, origin4):
    """Spot centres → continuous pixel coordinates (x, y) of the 4 µm registered grid (pixel i covers [i, i+1))."""
    xy = np.asarray(ad.obsm["spatial"], float)
    sec = np.column_stack([(xy[:, 0] + 0.5) * px * WORK / e20[0] - WORK / 2,
                           (xy[:, 1] + 0.5) * px * WORK / e20[1] - WORK / 2])
    inv = tx.GetInverse()
    q = np.array([inv.TransformPoint(tuple(map(float, p))) for p in sec])
    return (q - np.asarray(origin4)) / OUT_UM + 0.5


def agreement(a, b):
    """Mean per-gene Pearson r between two predictions and their mean relative |difference|."""
    from voxelome.evaluate.metrics import pearson_per_column

    r = pearson_per_column(a, b)
    return {"pearson_mean": float(np.nanmean(r)), "pearson_min": float(np.nanmin(r)),
            "rel_abs_diff": float(np.abs(a - b).mean() / np.abs(a).mean())}


def score_volume(volume, runs, out, fold):
    """Score section ``fold``'s spots from slice ``fold`` of a volume written by ``voxelome dense2d predict --stack``."""
    from voxelome.io.omezarr import read_ome_zarr
    from voxelome.models.spot_aggregation import aggregate_disks

    data, spacing, genes = read_ome_zarr(volume)
    k = list(SECTIONS).index(fold)
    ad = load_sections(runs / "cache", OUT_UM)[fold][0]
    c = np.load(out / "registered_spot_centres_4um_px.npz")[fold]
    stride = spacing[1] / OUT_UM
    radius = float(ad.uns["voxelome"]["spot_diameter_um"]) / 2 / OUT_UM
    truth = gene_targets(ad, genes)
    inside = ((c - radius) >= 0).all(1) & (c[:, 0] + radius <= data.shape[3] * stride) & \
        (c[:, 1] + radius <= data.shape[2] * stride)
    pred = aggregate_disks(np.asarray(data[:, k]), c[inside] / stride, radius / stride)
    res = {"volume": str(volume), "fold": fold, "genes": len(genes), "scores": scores(pred, truth[inside])}
    print(json.dumps(res, indent=1))
    (out / f"volume_scores_{fold}.json").write_text(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("benchmarks/out/pixnet_her2st"),
                    help="output folder of bench_pixnet_her2st.py (run_<section>/ and cache/)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/pixnet_stack"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--score-volume", type=Path, default=None,
                    help="instead: score --fold's spots from a volume of `voxelome dense2d predict --stack` (needs an "
                         "earlier full run in --out)")
    ap.add_argument("--fold", default="C4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.score_volume is not None:
        return score_volume(args.score_volume, args.runs, args.out, args.fold)
    warnings.simplefilter("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    data = load_sections(args.runs / "cache", OUT_UM)
    names = list(SECTIONS)
    ads = [data[n][0] for n in names]
    imgs = [DATA / "ST-imgs" / "C" / SECTIONS[n] for n in names]
    results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{args.threads} thread(s)", "sections": names}
    res, secs = register(ads, imgs)
    results["register_seconds"] = round(secs, 1)
    results["register_dice_20um"] = res.metrics["dice_adjacent"]
    fulls = [Image.open(p).size for p in imgs]
    pxs = [float(a.uns["voxelome"]["pixel_size_um"]) for a in ads]
    e20s = [work_exact(f[0], f[1], p, WORK) for f, p in zip(fulls, pxs)]
    h0, w0 = e20s[0][2]
    pad = int(round(MARGIN * max(h0, w0)))
    ref20 = res.rgb.shape[2:]
    if tuple(ref20) != (h0 + 2 * pad, w0 + 2 * pad):
        raise SystemExit(f"reference grid {ref20} is not the expected {(h0 + 2 * pad, w0 + 2 * pad)}")
    f = int(round(WORK / OUT_UM))
    ref4 = (ref20[0] * f, ref20[1] * f)
    origin20 = (-pad * WORK, -pad * WORK)
    origin4 = tuple(o - WORK / 2 + OUT_UM / 2 for o in origin20)  # same extent, 4 µm pixel centres
    t = time.perf_counter()
    stack4, centres = [], []
    for k, n in enumerate(names):
        stack4.append(render_to_reference(imgs[k], pxs[k], e20s[k][:2], res.transforms[k], ref4, origin4))
        centres.append(spots_to_reference(ads[k], pxs[k], e20s[k][:2], res.transforms[k], origin4))
    stack4 = np.stack(stack4, 1)  # (3, z, y, x)
    np.savez(args.out / "registered_spot_centres_4um_px.npz", **dict(zip(names, centres)))
    results["render_seconds"] = round(time.perf_counter() - t, 1)
    store4 = args.out / "her2st_C_registered_4um.ome.zarr"
    write_volume_ome_zarr(store4, stack4, spacing_um_zyx=(16.0, OUT_UM, OUT_UM),
                          origin_um_zyx=(0.0, origin4[1], origin4[0]), channel_names=["R", "G", "B"], overwrite=True)
    store20 = args.out / "her2st_C_registered_20um.ome.zarr"
    write_volume_ome_zarr(store20, res.rgb, spacing_um_zyx=(16.0, WORK, WORK),
                          origin_um_zyx=(0.0, origin20[1], origin20[0]), channel_names=["R", "G", "B"], overwrite=True)
    # check the 4 µm stack against the registration's own 20 µm output
    from voxelome.register.stack_image import dice, tissue_mask

    box = [stack4[:, k].reshape(3, ref20[0], f, ref20[1], f).mean((2, 4), dtype=np.float32) for k in range(len(names))]
    masks = [tissue_mask(np.moveaxis(b, 0, -1).round().astype(np.uint8)) for b in box]
    results["check_vs_registration_20um"] = {
        "mean_abs_diff_per_section": [float(np.abs(b - res.rgb[:, k]).mean()) for k, b in enumerate(box)],
        "dice_adjacent_from_4um": [dice(masks[k - 1], masks[k]) for k in range(1, len(names))]}
    del box
    print(json.dumps(results), flush=True)
    st20 = RGBStack(store20, pixel_size_um=OUT_UM)
    radius = float(ads[0].uns["voxelome"]["spot_diameter_um"]) / 2 / OUT_UM
    results["folds"] = {}
    for k, n in enumerate(names):
        model = TrainedDense2D.load(args.runs / f"run_{n}", device="cpu")
        genes = model.genes
        truth = gene_targets(ads[k], genes)
        fold = {"model": f"run_{n} (trained on {', '.join(m for m in names if m != n)})", "n_spots": int(len(truth))}
        t = time.perf_counter()
        raw = model.predict_spots(_slide(np.load(data[n][1]), ads[k], genes, n))
        fold["seconds_unregistered"] = round(time.perf_counter() - t, 1)
        img = np.ascontiguousarray(np.moveaxis(stack4[:, k], 0, -1))
        c = centres[k]
        inside = ((c - radius) >= 0).all(1) & (c[:, 0] + radius <= img.shape[1]) & (c[:, 1] + radius <= img.shape[0])
        fold["n_spots_inside_registered_grid"] = int(inside.sum())
        t = time.perf_counter()
        dense_map = model.predict_map(img)  # the whole registered slice, as the volume holds it
        fold["seconds_registered_slice_map"] = round(time.perf_counter() - t, 1)
        from voxelome.models.spot_aggregation import aggregate_disks

        reg = aggregate_disks(dense_map, c[inside] / model.stride, radius / model.stride)
        sl = SlideData(st20[k], st20.pixel_size_um, c[inside] * OUT_UM / st20.pixel_size_um,
                       radius * OUT_UM / st20.pixel_size_um, truth[inside])
        coarse = model.predict_spots(sl)
        mean = np.vstack([gene_targets(ads[j], genes) for j, m in enumerate(names) if m != n]).mean(0)
        mean = np.broadcast_to(mean, truth[inside].shape)  # the training-mean baseline
        for label, cols in (("top50", slice(0, 50)), ("top250", slice(None))):
            tr = truth[inside][:, cols]
            fold[label] = {"train_mean": scores(mean[:, cols], tr), "unregistered": scores(raw[inside][:, cols], tr),
                           "registered_4um": scores(reg[:, cols], tr),
                           "registered_20um_enlarged": scores(coarse[:, cols], tr),
                           "agreement_registered_vs_unregistered": agreement(raw[inside][:, cols], reg[:, cols])}
        results["folds"][n] = fold
        print(n, {lab: {m: round(v["pcc_mean"], 3) for m, v in fold[lab].items() if "pcc_mean" in v}
                  for lab in ("top50", "top250")}, fold["top50"]["agreement_registered_vs_unregistered"], flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    summary = {}
    for lab in ("top50", "top250"):
        for m in ("unregistered", "registered_4um", "registered_20um_enlarged"):
            summary[f"{lab}/{m}/pcc_mean"] = float(np.mean([f[lab][m]["pcc_mean"] for f in results["folds"].values()]))
        summary[f"{lab}/agreement_pearson_mean"] = float(np.mean(
            [f[lab]["agreement_registered_vs_unregistered"]["pearson_mean"] for f in results["folds"].values()]))
    results["mean_over_folds"] = summary
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
