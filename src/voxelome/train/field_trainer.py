"""Fit a neural transcriptomic field to a registered stack of sections; resumable, seeded.

Recipe of NTF (Gong et al., bioRxiv 2026): every iteration draws a batch of points from all
sections, jitters their coordinates with Gaussian noise (a point-spread model: a spot measures a
neighbourhood, and jitter across z lets the fine grid levels between sections be trained), and
takes an Adam step on the negative log-likelihood. Published: Adam 1e-4, 20k iterations of 8,192
points, mixed precision (preset ``paper``). The ``cpu`` preset (lr 1e-2, cosine decay, fewer
iterations, 2^17-entry tables) is tuned for a few minutes on a CPU; see BENCHMARKS.md.

Each iteration's randomness is drawn from ``(seed, iteration)`` alone, and the learning rate is a
function of the iteration, so a run resumed from ``last.pt`` is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from voxelome.constants import CHECKPOINT_FILE, CONFIG_FILE, CONFIG_SCHEMA_VERSION, LAST_CHECKPOINT_FILE
from voxelome.errors import VoxelomeError, check_choice, check_positive, did_you_mean
from voxelome.models.field import HashGridConfig, TranscriptomicField, check_likelihood, resolve_backend
from voxelome.models.field.likelihoods import is_count_model
from voxelome.train.checkpoint import load_checkpoint, save_checkpoint
from voxelome.train.point_data import DEFAULT_SECTION_KEY, PointData
from voxelome.train.trainer import resolve_device

log = logging.getLogger(__name__)
FIELD_FORMAT = "voxelome.field/1"


@dataclass(frozen=True)
class FieldConfig:
    """How to fit a field. Defaults are the published NTF recipe (preset ``paper``)."""

    likelihood: str = "nb"
    """Observation model: ``nb``, ``zinb``, ``poisson`` (counts) or ``gaussian`` (normalised values)."""
    seed: int = 0
    """Seed of the initialisation, the batches and the jitter."""
    iterations: int = 20_000
    """Optimiser steps."""
    batch_size: int = 8192
    """Points per step."""
    lr: float = 1e-4
    """Adam learning rate (NTF: 1e-4)."""
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (decay to 5 % of ``lr`` over ``iterations``)."""
    jitter_um: tuple[float, float, float] = (10.0, 10.0, 10.0)
    """Standard deviation (µm, along x, y, z) of the Gaussian jitter of training coordinates."""
    n_levels: int = 12
    """Hash grid: resolution levels."""
    n_features: int = 2
    """Hash grid: features per level."""
    log2_table_size: int = 19
    """Hash grid: log2 of the table entries per level."""
    base_resolution: int = 2
    """Hash grid: cells per axis of the coarsest level."""
    per_level_scale: float = 1.5
    """Hash grid: resolution growth per level."""
    hidden: int = 64
    """MLP width."""
    n_hidden_layers: int = 1
    """MLP hidden layers."""
    section_dim: int = 8
    """Per-section embedding size for batch effects (0 disables them)."""
    section_penalty: float = 1e-3
    """L2 penalty on the section effects, so the shared field explains what sections have in common."""
    model_library: bool = True
    """Count likelihoods: also learn the spots' log library size as a field (one more output), so that
    expected *measured* values away from the measured spots use the local sequencing depth instead of
    the training median (depth varies across a tissue; see BENCHMARKS.md, "library field"). Ignored
    for ``gaussian``."""
    library_weight: float = 1.0
    """Weight of the log library's log-likelihood in the loss, in genes (1: it counts as one more gene)."""
    low_rank: str = "mixture"
    """With fixed gene loadings: ``mixture`` (softmax proportions @ loadings) or ``linear``."""
    target_sum: float = 1e4
    """Scale of normalised expression: log1p(counts / library · target_sum)."""
    box_margin: float = 0.05
    """Margin of the field's bounding box around the training points, as a fraction of its extent."""
    box_shape: str = "cube"
    """``cube``: the field's box is a cube around the points, so every grid level has the same
    resolution in µm along x, y and z (as in Instant-NGP); ``points``: the points' own box, each axis
    scaled to [0, 1] — a thin stack then gets a far finer grid across z than in-plane."""
    backend: str = "auto"
    """Encoding backend: ``auto`` (tinycudann on a GPU when installed, else torch), ``torch`` or ``tcnn``."""
    table_dtype: str = "auto"
    """Hash-table storage: ``auto`` (float32), ``float32``, ``bfloat16``, ``float16``."""
    amp: str = "auto"
    """Mixed precision of the MLP: ``auto`` (bfloat16 autocast on a GPU, off on a CPU), ``bf16``, ``fp16``, ``off``."""
    compile: bool = False
    """Wrap the training step's forward in ``torch.compile`` (pays on a GPU for long runs)."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:1`` …"""
    num_threads: int = 0
    """CPU threads for torch (0 = leave torch's setting)."""
    checkpoint_every: int = 500
    """Write ``last.pt`` every this many iterations (and at the end)."""
    log_every: int = 50
    """Record the mean loss of this many iterations in the history."""

    def __post_init__(self):
        check_likelihood(self.likelihood)
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_choice("low_rank", self.low_rank, ("mixture", "linear"))
        check_choice("backend", self.backend, ("auto", "torch", "tcnn"))
        check_choice("table_dtype", self.table_dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice("amp", self.amp, ("auto", "bf16", "fp16", "off"))
        check_choice("box_shape", self.box_shape, ("cube", "points"))
        for name in ("iterations", "batch_size", "hidden", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise VoxelomeError(f"FieldConfig.{name}={v!r} must be a positive integer.")
        check_positive("lr", self.lr)
        check_positive("target_sum", self.target_sum)
        check_positive("section_penalty", self.section_penalty, allow_zero=True)
        check_positive("library_weight", self.library_weight)
        if not isinstance(self.model_library, bool):
            raise VoxelomeError(f"FieldConfig.model_library={self.model_library!r} must be true or false.")
        check_positive("box_margin", self.box_margin, allow_zero=True)
        jit = np.broadcast_to(np.asarray(self.jitter_um, dtype=float), (3,))
        if not (np.isfinite(jit).all() and (jit >= 0).all()):
            raise VoxelomeError(f"jitter_um={self.jitter_um!r} must be ≥ 0 µm (one number or x, y, z).")
        object.__setattr__(self, "jitter_um", tuple(float(v) for v in jit))
        self.encoding()  # validates the grid fields

    def encoding(self) -> HashGridConfig:
        return HashGridConfig(self.n_levels, self.n_features, self.log2_table_size, self.base_resolution,
                              float(self.per_level_scale))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["jitter_um"] = list(self.jitter_um)
        return d


FIELD_PRESETS = {
    "paper": {},
    # 400 × 2,048 points (1,500 × 4,096 until the ninth session): on the real stacks (a few hundred spots per
    # section) the longer schedule scored lower on 19 of 21 held-out sections (tied on 2), her2st patients E–H
    # included, and took ~6× longer (BENCHMARKS.md); at 1 M–100 M simulated cells the held-out loss is within ~1 %
    # of its final value after 0.8 M points
    "cpu": dict(iterations=400, batch_size=2048, lr=1e-2, lr_schedule="cosine", log2_table_size=17),
}
#: Fields that may change when resuming (extending a constant-rate run, or moving it to another device).
RESUMABLE_CHANGES = frozenset({"iterations", "device", "num_threads", "checkpoint_every", "log_every", "compile"})


def make_field_config(preset: str = "paper", **overrides) -> FieldConfig:
    """A :class:`FieldConfig` from a preset (``paper`` or ``cpu``) plus overrides."""
    check_choice("preset", preset, FIELD_PRESETS)
    known = {f.name for f in fields(FieldConfig)}
    bad = [k for k in overrides if k not in known]
    if bad:
        raise VoxelomeError(f"FieldConfig has no field {bad[0]!r}.{did_you_mean(bad[0], known)}")
    return FieldConfig(**{**FIELD_PRESETS[preset], **overrides})


def field_config_from_dict(d: dict) -> FieldConfig:
    known = {f.name for f in fields(FieldConfig)}
    d = {"model_library": False, **d}  # runs written before the library field had none
    return FieldConfig(**{k: (tuple(v) if k == "jitter_um" else v) for k, v in d.items() if k in known})


def learning_rate(config: FieldConfig, it: int) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    return float(config.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * it / max(config.iterations - 1, 1)))))


def bounding_box(xyz_um: np.ndarray, margin: float, jitter_um, shape: str = "points"):
    """Field box ``(lo, hi)`` (x, y, z) µm: the points' box grown by ``margin``·extent + 3·jitter.

    ``shape="cube"`` then widens the shorter axes about their centre to the longest one.
    """
    lo, hi = np.asarray(xyz_um.min(0), np.float64), np.asarray(xyz_um.max(0), np.float64)
    pad = margin * np.maximum(hi - lo, 1e-6) + 3 * np.asarray(jitter_um)
    pad = np.maximum(pad, 1.0)
    lo, hi = lo - pad, hi + pad
    if shape == "cube":
        centre, half = (lo + hi) / 2, (hi - lo).max() / 2
        lo, hi = centre - half, centre + half
    return lo.tolist(), hi.tolist()


def suggest_jitter(data: PointData, in_plane: float = 1.0, across: float = 0.75) -> tuple[float, float, float]:
    """A point-spread jitter (x, y, z) µm from the stack's geometry.

    In-plane: ``in_plane`` × the median distance from a point to its nearest neighbour in the same
    section (the spot pitch); across: ``across`` × the median z gap between consecutive sections
    (by their median z), so that the field is trained across the whole gap. The rule was set on the
    phantom (BENCHMARKS.md), not tuned per dataset.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    pitch, zs = [], []
    for code in np.unique(data.section):
        pts = data.xyz_um[data.section == code]
        zs.append(float(np.median(pts[:, 2])))
        if len(pts) > 1:
            sub = pts[rng.choice(len(pts), min(len(pts), 2000), replace=False)]
            d, _ = cKDTree(pts[:, :2]).query(sub[:, :2], k=2)
            pitch.append(float(np.median(d[:, 1])))
    gaps = np.diff(np.sort(zs))
    gap = float(np.median(gaps[gaps > 0])) if (gaps > 0).any() else 0.0
    xy = in_plane * float(np.median(pitch)) if pitch else 0.0
    return (xy, xy, across * gap)


def build_field_model(config: FieldConfig, meta: dict) -> TranscriptomicField:
    """The network of a run from its config and metadata (also used to reload it)."""
    loadings = meta.get("loadings")
    return TranscriptomicField(
        len(meta["genes"]), config.likelihood, len(meta["section_names"]), config.encoding(), config.hidden,
        config.n_hidden_layers, config.section_dim, None if loadings is None else torch.tensor(loadings),
        config.low_rank, meta["backend"], meta["table_dtype"],
        library_head=config.model_library and is_count_model(config.likelihood))


def _amp_dtype(config: FieldConfig, device: torch.device):
    if config.amp == "off" or (config.amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if config.amp == "fp16" else torch.bfloat16


def _unit_coords(xyz_um, lo, extent, chunk: int = 1 << 20) -> np.ndarray:
    """``(xyz_um - lo) / extent`` as float32 ``(n, 3)``, computed in float64 one chunk at a time (a memmap
    of 10^8 points is read sequentially, with no ``(n, 3)`` float64 temporary)."""
    out = np.empty((len(xyz_um), 3), np.float32)
    for a in range(0, len(xyz_um), chunk):
        out[a:a + chunk] = (np.asarray(xyz_um[a:a + chunk], np.float64) - lo) / extent
    return out


class _Batches:
    """Draws iteration ``it``'s batch from ``(seed, it)`` alone: indices, jittered unit-cube coords, targets."""

    def __init__(self, data: PointData, config: FieldConfig, meta: dict, device):
        self.data, self.config, self.device = data, config, device
        self.lo = np.asarray(meta["box_lo"])
        self.extent = np.asarray(meta["box_hi"]) - self.lo
        self.rows = data.to_tensors(device)
        self.xyz = torch.from_numpy(_unit_coords(data.xyz_um, self.lo, self.extent)).to(device)
        self.section = torch.from_numpy(data.section).to(device)  # int64, or a point store's int32 memmap
        self.log_lib = torch.from_numpy(np.log(data.library).astype(np.float32)).to(device)
        self.jitter = torch.tensor(np.asarray(config.jitter_um) / self.extent, dtype=torch.float32, device=device)
        self.gauss_log1p = config.likelihood == "gaussian" and data.is_counts

    def fixed(self, data: PointData, n: int):
        """Up to ``n`` points of ``data`` (a seeded subset), unjittered, as ``(x, y, log_lib)`` for a held-out loss."""
        rng = np.random.default_rng([self.config.seed, 2**31])
        idx = np.sort(rng.choice(len(data), min(n, len(data)), replace=False))
        x = torch.from_numpy(_unit_coords(data.xyz_um[idx], self.lo, self.extent)).to(self.device)
        y = torch.from_numpy(data.rows(idx)).to(self.device)
        log_lib = torch.from_numpy(np.log(data.library[idx]).astype(np.float32)).to(self.device)
        if self.config.likelihood == "gaussian" and data.is_counts:
            y = torch.log1p(y * (self.config.target_sum / torch.exp(log_lib))[:, None])
        return x, y, log_lib

    def __call__(self, it: int):
        rng = np.random.default_rng([self.config.seed, it])
        idx = torch.from_numpy(rng.integers(0, len(self.data), self.config.batch_size)).to(self.device)
        noise = torch.from_numpy(rng.standard_normal((self.config.batch_size, 3), dtype=np.float32)).to(self.device)
        x = self.xyz[idx] + noise * self.jitter
        y = self.rows(idx)
        log_lib = self.log_lib[idx]
        if self.gauss_log1p:
            y = torch.log1p(y * (self.config.target_sum / torch.exp(log_lib))[:, None])
        return x, y, log_lib, self.section[idx].long()


def _init_bias(model: TranscriptomicField, data: PointData, config: FieldConfig) -> None:
    """Start every gene at its mean (log mean rate for counts), and the library head at the mean log library, so
    early steps learn structure, not scale."""
    rng = np.random.default_rng(config.seed)
    idx = rng.choice(len(data), min(len(data), 20_000), replace=False)
    if model.library_head:
        log_lib = np.log(data.library[idx])
        with torch.no_grad():
            model.library_bias.fill_(float(log_lib.mean()))
            model.library_log_sigma.fill_(float(np.log(max(log_lib.std(), 1e-3))))
    if model.loadings is not None and model.low_rank == "mixture":
        return
    y = data.rows(idx).astype(np.float64)
    if model.counts:
        rate = y.sum(0) / data.library[idx].sum()
        bias = np.log(np.maximum(rate, 1e-8))
    else:
        if data.is_counts:
            y = np.log1p(y / data.library[idx, None] * config.target_sum)
        bias = y.mean(0)
    with torch.no_grad():
        model.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


def fit_field(data: PointData | object, config: FieldConfig, run_dir, *, loadings=None, resume: bool = True,
              progress: bool = True, genes=None, obsm_key=None, layer=None,
              section_key: str = DEFAULT_SECTION_KEY, validation: PointData | None = None,
              validation_points: int = 16384) -> Path:
    """Fit a field and write a run folder.

    Parameters
    ----------
    data : PointData or AnnData
        The stack (an AnnData is parsed with :meth:`PointData.from_anndata` and ``genes``,
        ``obsm_key``, ``layer``, ``section_key``).
    config : FieldConfig
        Model and optimisation settings.
    run_dir : path
        Output folder: ``config.yaml``, ``checkpoint.pt`` (final weights), ``last.pt`` (resume
        point, with optimiser state), ``history.json``.
    loadings : array, shape (k, g), optional
        Fixed gene loadings for the low-rank model (e.g. ``SignatureModel.loadings`` restricted
        to the modelled genes, or the phantom's profiles); ``None`` gives one output per gene.
    resume : bool
        Continue from ``run_dir/last.pt`` when it exists (same config and data required).
    validation : PointData, optional
        Held-out points (same genes): every ``log_every`` iterations the history also records
        ``val_loss``, the negative log-likelihood (mean over points and genes) of up to
        ``validation_points`` of them (a seeded subset, coordinates not jittered, the average section),
        and a first entry at iteration 0 (``loss`` None) holds the untrained field's; the time it takes
        is left out of the history's ``seconds`` (wall) and ``cpu_seconds`` (process CPU time).

    Returns
    -------
    Path
        ``run_dir``.
    """
    if not isinstance(data, PointData):
        data = PointData.from_anndata(data, genes=genes, obsm_key=obsm_key, layer=layer, section_key=section_key)
    if is_count_model(config.likelihood) and not data.is_counts:
        raise VoxelomeError(f"likelihood={config.likelihood!r} models counts, but the data are not non-negative "
                            "integers; use likelihood='gaussian' for normalised values or pass the raw counts.")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    backend = resolve_backend(config.backend, device)
    table_dtype = "float32" if config.table_dtype == "auto" else config.table_dtype
    lo, hi = bounding_box(data.xyz_um, config.box_margin, config.jitter_um, config.box_shape)
    meta = {"format": FIELD_FORMAT, "genes": list(data.genes), "section_names": list(data.section_names),
            "box_lo": lo, "box_hi": hi, "points_lo": np.asarray(data.xyz_um.min(0), float).tolist(),
            "points_hi": np.asarray(data.xyz_um.max(0), float).tolist(), "backend": backend, "table_dtype": table_dtype,
            "is_counts": bool(data.is_counts), "n_points": len(data),
            "median_library": float(np.median(data.library)),
            "loadings": None if loadings is None else np.asarray(loadings, dtype=np.float32).tolist()}
    torch.manual_seed(config.seed)
    model = build_field_model(config, meta).to(device)
    _init_bias(model, data, config)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.99), eps=1e-15)
    batches = _Batches(data, config, meta, device)
    amp = _amp_dtype(config, device)
    if validation is not None and list(validation.genes) != list(data.genes):
        raise VoxelomeError("validation points must have the same genes, in the same order, as the training points.")
    held_out = None if validation is None else batches.fixed(validation, validation_points)

    def loss_fn(x, y, log_lib, sec):
        nll = model.objective(x, y, log_lib, sec, config.library_weight)
        if model.section_out is not None and config.section_penalty > 0:
            nll = nll + config.section_penalty * model.section_out.weight.square().sum() / model.n_genes
        return nll

    step_loss = torch.compile(loss_fn) if config.compile else loss_fn
    history, start = [], 0
    last_path = run_dir / LAST_CHECKPOINT_FILE
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        _check_resume(last_path, state, config, meta)
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer_state"])
        start, history = int(state["iteration"]), list(state["history"])
        log.info("resuming %s at iteration %d", run_dir, start)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(
        {"schema_version": CONFIG_SCHEMA_VERSION, "kind": "field", "config": config.to_dict(),
         "data": {"genes": meta["genes"], "sections": meta["section_names"], "n_points": len(data),
                  "box_lo_um": lo, "box_hi_um": hi}}, sort_keys=False))

    def save(it):
        save_checkpoint(last_path, model_state=model.state_dict(), config=config.to_dict(), meta=meta,
                        optimizer_state=opt.state_dict(), iteration=it, history=history)

    def held_out_loss() -> float:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return float(-model.log_prob(*held_out).mean())

    if held_out is not None and start == 0:
        history.append({"iteration": 0, "loss": None, "lr": learning_rate(config, 0), "seconds": 0.0,
                        "val_loss": held_out_loss()})
    model.train()
    window, t0, c0 = [], time.perf_counter(), time.process_time()
    for it in tqdm(range(start, config.iterations), desc="fit field", disable=not progress, initial=start,
                   total=config.iterations):
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, it)
        x, y, log_lib, sec = batches(it)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = step_loss(x, y, log_lib, sec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            history.append({"iteration": it + 1, "loss": float(np.mean(window)), "lr": learning_rate(config, it),
                            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0})
            if held_out is not None:
                history[-1]["val_loss"] = held_out_loss()
            window, t0, c0 = [], time.perf_counter(), time.process_time()
        if (it + 1) % config.checkpoint_every == 0 and it + 1 < config.iterations:
            save(it + 1)
    save(config.iterations)
    save_checkpoint(run_dir / CHECKPOINT_FILE, model_state=model.state_dict(), config=config.to_dict(), meta=meta,
                    iteration=config.iterations)
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    return run_dir


def _check_resume(path, state, config: FieldConfig, meta: dict) -> None:
    free = RESUMABLE_CHANGES - ({"iterations"} if config.lr_schedule == "cosine" else set())
    old = {k: v for k, v in state["config"].items() if k not in free}
    new = {k: v for k, v in config.to_dict().items() if k not in free}
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in new if old.get(k) != new.get(k)}
        raise VoxelomeError(f"{path} was written with a different config ({diff}); resume with the same settings "
                            "(a cosine schedule spans `iterations`, so such a run cannot be extended), or start a new "
                            "run folder (resume=False / --no-resume).")
    same = all(state["meta"].get(k) == meta[k] for k in ("genes", "section_names", "n_points"))
    if not same or not np.allclose(state["meta"]["box_lo"], meta["box_lo"]):
        raise VoxelomeError(f"{path} was fitted on other data (genes, sections or points differ); start a new "
                            "run folder or pass resume=False.")
    old_w, new_w = state["meta"].get("loadings"), meta.get("loadings")
    if (old_w is None) != (new_w is None) or (new_w is not None and (np.shape(old_w) != np.shape(new_w)
                                                                     or not np.allclose(old_w, new_w))):
        raise VoxelomeError(f"{path} was fitted with other gene loadings (low-rank output); start a new run folder "
                            "or pass resume=False.")


__all__ = ["FIELD_PRESETS", "FieldConfig", "bounding_box", "build_field_model", "field_config_from_dict",
           "fit_field", "make_field_config", "suggest_jitter"]
