"""Whole-volume prediction: sliding windows, patch grids, resumable block-wise writes."""

from voxelome.infer.blocks import iter_blocks, process_block, run_blockwise
from voxelome.infer.sliding_window import WindowGrid, patch_grid_inference, sliding_window_inference

__all__ = ["WindowGrid", "iter_blocks", "patch_grid_inference", "process_block", "run_blockwise",
           "sliding_window_inference"]
