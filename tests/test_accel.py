"""The GPU fast-path options, exercised on CPU (no GPU in CI): autocast, channels-last-3D, compile, prefetch.

They must not change what is predicted beyond the precision asked for; timings live in BENCHMARKS.md.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from voxelome.accel import AccelOptions, Prefetcher, autocast
from voxelome.errors import VoxelomeError
from voxelome.infer.predict import TrainedModel

REGION = (slice(0, 8), slice(8, 24), slice(16, 40))


@pytest.fixture(scope="module")
def fp32_block(trained_run, phantom):
    return TrainedModel.load(trained_run, device="cpu").predict_region(phantom.volume, REGION)


@pytest.mark.parametrize("precision, atol", [("bf16", 0.06), ("fp16", 0.01)])
def test_mixed_precision_predicts_the_fp32_proportions_within_its_precision(precision, atol, trained_run, phantom,
                                                                            fp32_block):
    model = TrainedModel.load(trained_run, device="cpu", accel=AccelOptions(precision=precision))
    block = model.predict_region(phantom.volume, REGION)
    assert block.dtype == np.float32 and block.shape == fp32_block.shape
    assert not np.array_equal(block, fp32_block)  # it really ran in reduced precision
    np.testing.assert_allclose(block, fp32_block, atol=atol)
    np.testing.assert_allclose(block.sum(0), 1.0, atol=atol)


def test_channels_last_3d_gives_the_same_prediction(trained_run, phantom, fp32_block):
    model = TrainedModel.load(trained_run, device="cpu", accel=AccelOptions(channels_last=True))
    np.testing.assert_allclose(model.predict_region(phantom.volume, REGION), fp32_block, atol=1e-5)


def test_compiled_forward_gives_the_same_prediction(trained_run, phantom, fp32_block):
    # aot_eager traces and runs the graph through torch.compile without generating C++ (fast on CPU);
    # the inductor backend is checked in the slow test below.
    model = TrainedModel.load(trained_run, device="cpu", accel=AccelOptions(compile="default",
                                                                           compile_backend="aot_eager"))
    np.testing.assert_allclose(model.predict_region(phantom.volume, REGION), fp32_block, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VOXELOME_RUN_SLOW"), reason="slow; set VOXELOME_RUN_SLOW=1")
def test_inductor_compiled_forward_gives_the_same_prediction(trained_run, phantom, fp32_block):
    model = TrainedModel.load(trained_run, device="cpu", accel=AccelOptions(compile="default"))
    np.testing.assert_allclose(model.predict_region(phantom.volume, REGION), fp32_block, atol=1e-4)


def test_prefetcher_yields_every_batch_in_order_on_cpu():
    batches = [np.full((2, 3), i, np.float32) for i in range(5)]
    got = list(Prefetcher(batches, "cpu"))
    assert len(got) == 5 and all(torch.equal(g, torch.from_numpy(b)) for g, b in zip(got, batches))
    assert list(Prefetcher([], "cpu")) == []
    cl = list(Prefetcher([np.zeros((1, 2, 4, 4, 4), np.float32)], "cpu", AccelOptions(channels_last=True)))
    assert cl[0].is_contiguous(memory_format=torch.channels_last_3d)


def test_bad_options_name_the_choices():
    with pytest.raises(VoxelomeError, match="precision.*bf16"):
        AccelOptions(precision="fp8")
    with pytest.raises(VoxelomeError, match="compile"):
        AccelOptions(compile="fastest")
    with autocast("cpu", "fp32"):  # fp32 is a no-op context
        assert not torch.is_autocast_enabled("cpu")
