"""Training on several processes, GPUs or nodes with PyTorch DDP, launched by ``torchrun``.

The same ``voxelome train`` command (and :func:`~voxelome.train.trainer.train_model`) runs on one
CPU process unchanged, and under ``torchrun --nproc-per-node N`` trains one model on N processes
(``gloo`` on CPU, ``nccl`` on CUDA, one GPU per local rank):

* every rank draws the same global batch from the existing per-``(seed, epoch)`` RNG and keeps a
  strided shard of it (crop/patch ``i`` goes to rank ``i mod N``, like ``DistributedSampler``);
  its loss is weighted so that DDP's gradient average equals the gradient of the single-process
  loss of the whole batch (for the dense net each crop counts by its number of spots);
* gradients are all-reduced by :class:`~torch.nn.parallel.DistributedDataParallel`; the epoch's
  train loss is all-reduced; validation batches are split across ranks and the predictions summed,
  so every rank computes the same validation loss and takes the same early-stopping decision;
* rank 0 alone writes the run folder (config, checkpoints, history); on resume it reads
  ``last.pt`` and broadcasts it, so other ranks need no shared file system for checkpoints, and
  the spot targets are broadcast from rank 0 too (other ranks may pass ``targets=None``).

Results equal the single-process run up to float rounding (batched vs. split convolutions), and
are deterministic for a given number of processes, so a resumed DDP run follows the uninterrupted
one exactly. Per-sample randomness inside the network (dropout, ``xpression`` only) is drawn per
rank, so that model follows the single-process curve only statistically. Each rank materialises
the whole global batch before keeping its shard (crops are cheap NumPy slices next to 3D
convolutions); the data prep is therefore replicated, not split.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from voxelome.errors import VoxelomeError


@dataclass
class DistContext:
    """This process's place in a training job (``world_size == 1``: plain single-process training)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- collectives (no-ops on one process) ---------------------------------------------
    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a CPU tensor (staged through the GPU for ``nccl``)."""
        if not self.enabled:
            return t
        if dist.get_backend() == "nccl":
            staged = t.cuda()
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            return staged.cpu()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """End of a training call: wait for all ranks (with ``wait``; not after an error, so a failing
        rank does not wait for the others). The process group itself stays up for the next call in
        this process (re-creating one under torchrun's store can hang) and is destroyed at exit."""
        if self.enabled and dist.is_initialized() and wait:
            dist.barrier()


def _destroy_group() -> None:
    if not dist.is_initialized():
        return
    # every rank reaches exit before any tears its group down: a rank whose gloo threads still serve another
    # rank's last collective while the interpreter finalises can abort (seen once under heavy load)
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        except RuntimeError:  # a rank failed or left already: tear down anyway
            pass
    dist.destroy_process_group()


def launched_rank() -> int:
    """The rank ``torchrun`` gave this process (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the training job this process belongs to, and pick its device.

    An already initialised ``torch.distributed`` group is used as is; otherwise, when ``torchrun``
    set ``WORLD_SIZE > 1``, a group is created (``nccl`` for CUDA devices, ``gloo`` for CPU) and
    destroyed when the process exits. Without either, a single-process context.

    Returns
    -------
    (DistContext, torch.device)
        The device is ``cuda:LOCAL_RANK`` for a multi-process job on GPUs.
    """
    from voxelome.train.trainer import resolve_device

    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise VoxelomeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; "
                                "run one process, or install a torch with distributed support.")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_group)
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), local, owns_group=True)
    else:
        return DistContext(), device
    if ctx.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)
    return ctx, device


class CrossRankBatchNorm(torch.nn.BatchNorm3d):
    """Batch norm whose training statistics cover the global batch of all ranks, on any device.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors; this one all-reduces the per-channel sums and
    sums of squares with the differentiable ``torch.distributed.nn.functional.all_reduce`` (so
    gradients flow across ranks too) and works with ``gloo``. Parameters and buffers are those of
    :class:`torch.nn.BatchNorm3d`, so checkpoints load into the plain network. In eval mode, or
    outside a process group, it is plain batch norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, 2, 3, 4]
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), n_local]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)) * m)
        shape = (1, c, 1, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``BatchNorm3d`` of ``model`` in place by :class:`CrossRankBatchNorm` (same state)."""
    for name, child in list(model.named_children()):
        if type(child) is torch.nn.BatchNorm3d:
            new = CrossRankBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats).to(next(child.buffers()).device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            sync_batchnorm(child)
    return model


def wrap(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` in a multi-process job (batch norms synchronised across
    ranks, so the statistics are those of the global batch), else ``model`` itself."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(n: int, ctx: DistContext) -> np.ndarray:
    """Indices ``rank, rank + N, ...`` of ``n`` items kept by this rank (sizes differ by at most 1)."""
    return np.arange(ctx.rank, n, ctx.world_size)


def check_batch(batch_size: int, ctx: DistContext) -> None:
    if ctx.enabled and batch_size < ctx.world_size:
        raise VoxelomeError(f"batch_size={batch_size} is smaller than the number of training processes "
                            f"({ctx.world_size}); the global batch is split across them. Use batch_size ≥ "
                            f"{ctx.world_size} (--set batch_size={ctx.world_size}) or fewer processes.")


def shard_step_loss(net, batch, device, ctx: DistContext, dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss on its shard of the global ``batch``.

    Returns ``(loss_to_backprop, global_loss_share)``: the first is scaled by ``world_size`` so
    that DDP's gradient *average* is the gradient of the whole batch's loss; the second (detached)
    sums over ranks to that loss.
    """
    from voxelome.train.losses import footprint_means, kl_to_targets

    if dense:
        x, grids, ys = batch
        keep = shard(len(x), ctx)
        n_total = sum(len(y) for y in ys)
        probs = net(x[torch.from_numpy(keep)].to(device))
        terms = []
        for b, i in enumerate(keep):
            if len(ys[i]) == 0:
                continue
            pred = footprint_means(probs[b], grids[i].to(device))
            terms.append(kl_to_targets(torch.log(pred + 1e-6), ys[i].to(device)) * len(ys[i]))
        share = torch.stack(terms).sum() / max(n_total, 1) if terms else probs.sum() * 0.0
    else:
        x, y = batch
        keep = torch.from_numpy(shard(len(x), ctx))
        share = kl_to_targets(net(x[keep].to(device)), y[keep].to(device)) * (len(keep) / len(x))
    return share * ctx.world_size, share.detach()


def epoch_mean_loss(shares: list[torch.Tensor], ctx: DistContext) -> float:
    """Mean over the epoch's steps of the whole-batch loss (all-reduced across ranks)."""
    total = ctx.all_reduce_sum(torch.stack(shares).double().cpu())
    return float(total.mean())


def predict_spots(predictor, sampler, spots: np.ndarray, ctx: DistContext) -> np.ndarray:
    """:meth:`SpotPredictor.predict` with its batches split across ranks and the rows summed back."""
    if not ctx.enabled:
        return predictor.predict(sampler, spots)
    part = predictor.predict(sampler, spots, part=(ctx.rank, ctx.world_size))
    return ctx.all_reduce_sum(torch.from_numpy(part).double()).float().numpy()
