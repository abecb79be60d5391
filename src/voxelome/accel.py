"""The GPU fast path: mixed precision, channels-last-3D, ``torch.compile``, pinned async copies.

Everything here is optional and off by default (:class:`AccelOptions()` is plain fp32 eager
PyTorch, bit-identical to not using this module). Each helper also runs on CPU, where the test
suite exercises it (bf16/fp16 autocast, channels-last-3D and ``torch.compile`` all work on CPU);
the CUDA-only parts (pinned host buffers, non-blocking copies on a side stream, CUDA-graph replay
through ``torch.compile(mode="reduce-overhead")``) fall back to the plain path when no GPU is
present. None of it has been timed on a GPU in this repository yet (see BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from voxelome.errors import VoxelomeError, check_choice

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class AccelOptions:
    """How to run a network's forward pass.

    Attributes
    ----------
    precision : str
        ``fp32`` (default), ``bf16`` or ``fp16`` autocast. bf16 keeps fp32's range (safe for the
        softmax outputs); fp16 is faster on older GPUs. On CPU both work, mostly slower than fp32.
    channels_last : bool
        Store 5D activations as ``channels_last_3d`` (NDHWC), which cuDNN's 3D convolutions
        prefer under mixed precision on tensor-core GPUs.
    compile : str or None
        ``torch.compile`` mode: ``default``, ``reduce-overhead`` (replays CUDA graphs: pays for
        small batches with fixed shapes), ``max-autotune``; None for eager.
    compile_backend : str
        ``inductor`` (default; needs a C++ compiler on CPU), or ``eager``/``aot_eager`` to
        test the compile plumbing without code generation.
    pin_memory : bool
        On CUDA, stage host → device copies in pinned memory and issue them non-blocking.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None
    compile_backend: str = "inductor"
    pin_memory: bool = True

    def __post_init__(self):
        check_choice("precision", self.precision, PRECISIONS)
        if self.compile is not None:
            check_choice("compile", self.compile, COMPILE_MODES)

    @property
    def is_default(self) -> bool:
        return self == AccelOptions()


def autocast(device: torch.device | str, precision: str = "fp32"):
    """A context manager running ops in ``precision`` on ``device`` (a no-op for ``fp32``)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return contextlib.nullcontext()
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise VoxelomeError("precision='bf16' needs a GPU with bfloat16 support (Ampere or newer); use 'fp16'.")
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def prepare_model(model: torch.nn.Module, device: torch.device | str, options: AccelOptions) -> torch.nn.Module:
    """Move ``model`` to ``device`` in eval mode with the layout and compilation ``options`` ask for.

    Returns the module to call (a compiled wrapper when ``options.compile`` is set; its weights
    are shared with ``model``).
    """
    model = model.to(device).eval()
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if options.compile is not None:
        model = torch.compile(model, mode=options.compile, backend=options.compile_backend, dynamic=False)
    return model


def to_device(x: np.ndarray | torch.Tensor, device: torch.device | str, options: AccelOptions) -> torch.Tensor:
    """Host batch → device tensor; pinned + non-blocking on CUDA, channels-last for 5D when asked."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    device = torch.device(device)
    if device.type == "cuda" and options.pin_memory and not t.is_cuda:
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    if options.channels_last and t.dim() == 5:
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t


def to_host(y: torch.Tensor) -> np.ndarray:
    """Device output → float32 NumPy in standard (C-contiguous) layout."""
    return np.ascontiguousarray(y.detach().float().cpu().numpy())


class Prefetcher:
    """Iterate host batches as device tensors, copying batch ``i + 1`` while batch ``i`` computes.

    On CUDA the copies run on a side stream from pinned memory, so the host → device transfer
    overlaps the kernels of the previous batch; the consumer's stream waits on the copy before
    use. On CPU it is a plain iterator over ``torch.from_numpy`` tensors (same values, same order).

    Parameters
    ----------
    batches : iterable of ndarray or tensor
        Host batches (any shapes).
    device : torch.device or str
    options : AccelOptions
    """

    def __init__(self, batches: Iterable, device, options: AccelOptions = AccelOptions()):
        self.batches, self.device, self.options = batches, torch.device(device), options
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _copy(self, x):
        if self.stream is None:
            return to_device(x, self.device, self.options)
        with torch.cuda.stream(self.stream):
            return to_device(x, self.device, AccelOptions(**{**self.options.__dict__, "pin_memory": True}))

    def __iter__(self) -> Iterator[torch.Tensor]:
        it = iter(self.batches)
        try:
            nxt = self._copy(next(it))
        except StopIteration:
            return
        for host in it:
            cur, nxt = nxt, None
            if self.stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                cur.record_stream(torch.cuda.current_stream(self.device))
            nxt = self._copy(host)  # issued before the consumer's kernels on cur are queued
            yield cur
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            nxt.record_stream(torch.cuda.current_stream(self.device))
        yield nxt
