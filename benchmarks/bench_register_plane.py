"""Benchmark: automatic section → volume plane search on the lung phantom (issue 3).

Random oblique planes of the default phantom (112 × 352 × 352 voxels of 10 µm) are rendered as
H&E-like images (5 µm/px) and registered back with ``register_plane`` (default search range:
tilts ±15° about x and y, any in-plane rotation, depth ±560 µm around the tissue centroid, scale
0.8–1.25). Errors are measured against the true placement over every section pixel inside the volume:
RMS 3D distance (voxels) and the angle between normals. Success = RMS ≤ 2 voxels and angle ≤ 2°.

Baselines in the same run: (1) "centroid, axial" — the section laid axially through the volume's
tissue centroid with its own centroid matched (what one gets without search); (2) "landmarks" — 3
landmark pairs clicked with 20 µm error; (3) landmarks seeding the refinement.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/bench_register_plane.py \
        --n 24 --out benchmarks/out/register_plane

``--volume PATH`` runs the same protocol on a real scan instead (any file ``voxelome.io.read_volume`` reads; e.g. the
ICBM152 T1 brain MRI in ``../shared/data``): sections rendered by
:func:`voxelome.datasets.histology.render_he_from_volume` (stained by intensity, non-monotonically), true depths
and landmark errors in voxels (``--max-depth-vox``, 2 voxels of clicking error), pixels half a voxel.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from voxelome.datasets import make_lung_phantom
from voxelome.datasets.histology import optical_density, render_he, render_he_from_volume
from voxelome.io import read_volume
from voxelome.register.placement import SectionPlacement
from voxelome.register.plane_figure import plane_overlay_figure
from voxelome.register.plane_search import _otsu_centroid, register_plane


def errors(est: SectionPlacement, truth: SectionPlacement, vol, shape, vox):
    h, w = shape
    yy, xx = np.mgrid[0:h:2, 0:w:2]
    px = np.column_stack([xx.ravel(), yy.ravel()])
    inside = vol.contains(truth.map(px), margin_voxels=0)
    d = np.linalg.norm(est.map(px[inside]) - truth.map(px[inside]), axis=1)
    ang = float(np.degrees(np.arccos(min(1.0, abs(est.frame[2] @ truth.frame[2])))))
    return float(np.sqrt(np.mean(d ** 2)) / vox), ang


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--max-tilt", type=float, default=12.0, help="largest true tilt of a random plane (deg)")
    ap.add_argument("--max-depth", type=float, default=150.0, help="largest true depth offset from the centre (µm)")
    ap.add_argument("--pixel-size", type=float, default=None, help="µm per section pixel (default half a voxel)")
    ap.add_argument("--volume", type=Path, default=None, help="a real scan instead of the phantom")
    ap.add_argument("--max-depth-vox", type=float, default=15.0, help="with --volume: --max-depth in voxels")
    ap.add_argument("--bin", type=int, default=1, help="with --volume: average it over BIN³ blocks first (a coarser scan)")
    ap.add_argument("--levels", default=None, help="search pyramid, e.g. 4,2,1 (default: register_plane's, "
                                                   "from the volume's size)")
    ap.add_argument("--n-seeds", type=int, default=None, help="register_plane's n_seeds (default its own)")
    ap.add_argument("--n-screen", type=int, default=None, help="register_plane's n_screen (default its own)")
    ap.add_argument("--planes", default=None, help="comma-separated plane numbers to run (the same random planes)")
    ap.add_argument("--out", default="benchmarks/out/register_plane")
    a = ap.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.volume is None:
        ph = make_lung_phantom(a.preset, seed=1)
        vol = ph.volume
        render = lambda pl, seed: render_he(ph, pl, seed=seed)  # noqa: E731
        source = f"phantom {a.preset} seed 1"
    else:
        vol = read_volume(a.volume).binned(a.bin)
        vol = vol.with_data(np.asarray(vol.data))
        render = lambda pl, seed: render_he_from_volume(vol, pl, seed=seed)  # noqa: E731
        source = str(a.volume) + (f" binned {a.bin}×" if a.bin > 1 else "")
    levels = None if a.levels is None else tuple(int(v) for v in a.levels.split(","))
    search_kw = {k: v for k, v in (("n_seeds", a.n_seeds), ("n_screen", a.n_screen)) if v is not None}
    only = None if a.planes is None else {int(v) for v in a.planes.split(",")}
    vox = float(min(vol.spacing_um))
    a.pixel_size = a.pixel_size or vox / 2
    if a.volume is not None:
        a.max_depth = a.max_depth_vox * vox
    click_um = 2 * vox  # landmark clicking error (phantom: 20 µm)
    rng = np.random.default_rng(2026)
    rows = []
    for k in range(a.n):
        tilt, az = rng.uniform(0, a.max_tilt), rng.uniform(0, 2 * np.pi)
        rot, dz = rng.uniform(-180, 180), rng.uniform(-a.max_depth, a.max_depth)
        if only is not None and k not in only:
            rng.normal(0, click_um, (3, 3))  # the landmark errors' draw: later planes stay the same
            continue
        t = np.deg2rad(tilt)
        normal = np.array([np.sin(t) * np.cos(az), np.sin(t) * np.sin(az), np.cos(t)])
        centre = vol.index_to_xyz((np.asarray(vol.shape) - 1) / 2) + np.array([0, 0, dz])
        pl = SectionPlacement.from_origin_normal(centre, normal, a.pixel_size, in_plane_rotation_deg=rot)
        img, truth = render(pl, 100 + k)
        res = register_plane(vol, img, a.pixel_size, seed=k, levels=levels, **search_kw)
        rms, ang = errors(res.placement, truth, vol, img.shape[:2], vox)
        # baseline 1: axial through the tissue centroid, centroids matched, no rotation
        od = optical_density(img)
        cy, cx = _otsu_centroid(od, (a.pixel_size,) * 2, (0.0, 0.0))
        vc = _otsu_centroid(np.asarray(vol.data), vol.spacing_um, vol.origin_um)[::-1]
        base = SectionPlacement(np.column_stack([[a.pixel_size, 0, 0], [0, a.pixel_size, 0],
                                                 vc - np.array([cx, cy, 0.0])]))
        b_rms, b_ang = errors(base, truth, vol, img.shape[:2], vox)
        # baseline 2: three landmarks with 2 voxels of clicking error; 3: the same landmarks seeding the refinement
        h, w = img.shape[:2]
        lm_px = np.array([[0.25 * w, 0.3 * h], [0.75 * w, 0.35 * h], [0.5 * w, 0.75 * h]])
        lm_xyz = truth.map(lm_px) + rng.normal(0, click_um, (3, 3))
        lm = SectionPlacement.from_landmarks(lm_px, lm_xyz)
        l_rms, l_ang = errors(lm, truth, vol, img.shape[:2], vox)
        res_l = register_plane(vol, img, a.pixel_size, landmarks=(lm_px, lm_xyz), seed=k, levels=levels,
                               **search_kw)
        lr_rms, lr_ang = errors(res_l.placement, truth, vol, img.shape[:2], vox)
        row = dict(plane=k, tilt_deg=tilt, rotation_deg=rot, depth_um=dz, rms_vox=rms, angle_deg=ang,
                   ok=bool(rms <= 2 and ang <= 2), levels=res.search["levels"], seconds=res.seconds, score=res.score, scale=res.scale,
                   timings=res.search["timings"], baseline_rms_vox=b_rms, baseline_angle_deg=b_ang,
                   landmarks_rms_vox=l_rms, landmarks_angle_deg=l_ang, landmarks_refined_rms_vox=lr_rms,
                   landmarks_refined_angle_deg=lr_ang, landmarks_refined_seconds=res_l.seconds)
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "timings"}),
              flush=True)
        if len(rows) == 1:
            plane_overlay_figure(res, img, a.pixel_size, out / "overlay_plane0.png")
    ok = np.array([r["ok"] for r in rows])
    col = lambda key: np.array([r[key] for r in rows])
    summary = dict(
        n=len(rows), volume=f"{source}, shape {vol.shape}, {vox:g} µm voxels", pixel_size_um=a.pixel_size,
        true_planes=f"tilt U(0, {a.max_tilt})° any azimuth, in-plane rotation U(-180, 180)°, depth U(±{a.max_depth}) µm",
        search="PlaneSearchRange() defaults: tilts ±15° per axis (5° grid), rotation all (15° grid), depth ± half the "
               "volume's depth (grid: one coarse-level voxel), scale 0.8–1.25",
        success_rate=float(ok.mean()), median_rms_vox=float(np.median(col("rms_vox"))),
        median_angle_deg=float(np.median(col("angle_deg"))), max_rms_vox_of_successes=float(col("rms_vox")[ok].max()) if ok.any() else None,
        levels=rows[0]["levels"], median_seconds=float(np.median(col("seconds"))), mean_seconds=float(np.mean(col("seconds"))),
        baseline_success_rate=float(np.mean((col("baseline_rms_vox") <= 2) & (col("baseline_angle_deg") <= 2))),
        baseline_median_rms_vox=float(np.median(col("baseline_rms_vox"))),
        landmarks_median_rms_vox=float(np.median(col("landmarks_rms_vox"))),
        landmarks_success_rate=float(np.mean((col("landmarks_rms_vox") <= 2) & (col("landmarks_angle_deg") <= 2))),
        landmarks_refined_median_rms_vox=float(np.median(col("landmarks_refined_rms_vox"))),
        landmarks_refined_success_rate=float(np.mean((col("landmarks_refined_rms_vox") <= 2)
                                                     & (col("landmarks_refined_angle_deg") <= 2))),
        landmarks_refined_median_seconds=float(np.median(col("landmarks_refined_seconds"))),
        threads="SimpleITK 1 thread, numpy/OpenMP 1 thread",
    )
    summary["rms_ratio_baseline_over_search"] = summary["baseline_median_rms_vox"] / summary["median_rms_vox"]
    (out / "results.json").write_text(json.dumps(dict(summary=summary, planes=rows), indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
