"""Block-wise whole-volume work: a public per-block function and a resumable loop over blocks.

Each output chunk is computed whole (with whatever input halo its function needs), written
to the zarr store, then marked done with an empty file. A killed run restarted with the same
command skips marked chunks and recomputes only the rest; a chunk half-written at the kill has
no marker and is simply redone. The loop here is the serial scheduler; the Dask scheduler
(:mod:`voxelome.infer.distributed`) maps the same :func:`process_block` over a cluster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from itertools import product
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

DONE_DIR = ".voxelome_done"


def iter_blocks(out_shape_zyx, chunks_zyx) -> Iterator[tuple[tuple[int, int, int], tuple[slice, slice, slice]]]:
    """Yield ``(block_index, out_region)`` for every chunk of an output grid, in C order."""
    counts = [-(-s // c) for s, c in zip(out_shape_zyx, chunks_zyx)]
    for idx in product(*[range(n) for n in counts]):
        yield idx, tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks_zyx, out_shape_zyx))


def _marker(store_path: Path, idx) -> Path:
    return Path(store_path) / DONE_DIR / "_".join(str(i) for i in idx)


def is_done(store_path, idx) -> bool:
    """Whether block ``idx`` was written and marked by an earlier (or concurrent) run."""
    return _marker(store_path, idx).exists()


def append_run_record(store_path, record: dict) -> None:
    """Append one run's record to the audit trail ``<store>/.voxelome_done/runs.jsonl``."""
    log_path = Path(store_path) / DONE_DIR / "runs.jsonl"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def process_block(compute: Callable[[tuple[slice, slice, slice]], np.ndarray], out_array, store_path, idx,
                  out_region) -> None:
    """Compute one output chunk, write it, then mark it done (the marker only after the write)."""
    values = compute(out_region)
    out_array[(slice(None), *out_region)] = values
    marker = _marker(store_path, idx)
    marker.parent.mkdir(exist_ok=True)
    marker.touch()


def run_blockwise(compute: Callable[[tuple[slice, slice, slice]], np.ndarray], out_array, store_path, *,
                  chunks_zyx, progress: bool = True, desc: str = "predict") -> dict:
    """Fill ``out_array`` ``(c, z, y, x)`` chunk by chunk, skipping chunks already done.

    Returns
    -------
    dict
        ``{"blocks": total, "computed": n computed now, "skipped": n done before}``.
    """
    blocks = list(iter_blocks(out_array.shape[1:], chunks_zyx))
    todo = [(i, r) for i, r in blocks if not _marker(store_path, i).exists()]
    bar = tqdm(todo, desc=desc, unit="chunk", disable=not progress, initial=len(blocks) - len(todo),
               total=len(blocks))
    computed = []
    for idx, region in bar:
        process_block(compute, out_array, store_path, idx, region)
        computed.append(list(idx))
    stats = {"blocks": len(blocks), "computed": len(computed), "skipped": len(blocks) - len(todo)}
    # an audit trail of which blocks each (re)run computed
    append_run_record(store_path, {**stats, "pid": os.getpid(), "computed_blocks": computed})
    return stats


def all_done(store_path, out_shape_zyx, chunks_zyx) -> bool:
    return all(_marker(store_path, i).exists() for i, _ in iter_blocks(out_shape_zyx, chunks_zyx))
