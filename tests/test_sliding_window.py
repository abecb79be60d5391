"""Stitching invariance: block-wise sliding-window output equals the direct result."""

import numpy as np
import pytest

from voxelome.errors import VoxelomeError
from voxelome.infer.blocks import iter_blocks
from voxelome.infer.sliding_window import WindowGrid, patch_grid_inference, sliding_window_inference


def pointwise(stride, n_channels=3):
    """A point-wise predictor: the mean of each stride³ cell, transformed per channel."""

    def predict(x):
        b, _, z, y, w = x.shape
        cells = x[:, 0].reshape(b, z // stride, stride, y // stride, stride, w // stride, stride).mean((2, 4, 6))
        return np.stack([cells * (c + 1) + c for c in range(n_channels)], axis=1)

    return predict


def direct(vol, stride, n_channels=3):
    """The point-wise predictor applied to the whole (edge-padded) volume at once."""
    out = [-(-s // stride) for s in vol.shape]
    padded = np.pad(vol, [(0, o * stride - s) for o, s in zip(out, vol.shape)], mode="edge")
    return pointwise(stride, n_channels)(padded[None, None])[0]


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(13, 29, 31), (8, 40, 17)])
def test_blockwise_equals_direct(shape, stride, blend):
    rng = np.random.default_rng(0)
    vol = rng.random(shape, dtype=np.float32)
    window = (8, 12, 16) if stride == 2 else (5, 7, 9)
    kw = dict(window=window, stride=stride, n_channels=3, overlap=0.4, blend=blend)
    whole = sliding_window_inference(vol, pointwise(stride), **kw)
    np.testing.assert_allclose(whole, direct(vol, stride), rtol=1e-5, atol=1e-6)
    out_shape = whole.shape[1:]
    for chunks in [(3, 5, 7), (4, 4, 4), (1, 64, 2)]:
        stitched = np.zeros_like(whole)
        for _, region in iter_blocks(out_shape, chunks):
            stitched[(slice(None), *region)] = sliding_window_inference(vol, pointwise(stride), out_region=region,
                                                                        batch_size=3, **kw)
        np.testing.assert_array_equal(stitched, whole)  # bit-for-bit, whatever the blocking


def test_nonpointwise_predictor_still_blockwise_exact():
    """With a predictor that depends on window context, blocking must still not change anything."""
    rng = np.random.default_rng(1)
    vol = rng.random((11, 21, 19), dtype=np.float32)

    def contextual(x):  # window mean added to every voxel: depends on the window's position
        return (x + x.mean(axis=(2, 3, 4), keepdims=True))

    kw = dict(window=(6, 8, 8), stride=1, n_channels=1, overlap=0.5, blend="gaussian")
    whole = sliding_window_inference(vol, contextual, **kw)
    stitched = np.zeros_like(whole)
    for _, region in iter_blocks(whole.shape[1:], (4, 5, 6)):
        stitched[(slice(None), *region)] = sliding_window_inference(vol, contextual, out_region=region, **kw)
    np.testing.assert_array_equal(stitched, whole)


def test_window_larger_than_volume_is_padded():
    vol = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    out = sliding_window_inference(vol, pointwise(1, 1), window=(8, 8, 8), stride=1, n_channels=1)
    np.testing.assert_allclose(out[0], vol, rtol=1e-6)


def test_patch_grid_blockwise_equals_whole():
    rng = np.random.default_rng(2)
    vol = rng.random((10, 23, 17), dtype=np.float32)

    def centre_value(x):  # a patch predictor that reports the patch centre and its mean
        c = tuple(s // 2 for s in x.shape[2:])
        return np.stack([x[:, 0, c[0], c[1], c[2]], x[:, 0].mean((1, 2, 3))], 1)

    kw = dict(patch_shape=(3, 5, 5), step=(3, 4, 4), n_channels=2)
    whole = patch_grid_inference(vol, centre_value, **kw)
    assert whole.shape == (2, 4, 6, 5)
    # cell (k, j, i) takes the voxel at its centre, as X-Pression filled blocks without blending
    assert whole[0, 1, 2, 3] == vol[1 * 3 + 1, 2 * 4 + 2, 3 * 4 + 2]
    stitched = np.zeros_like(whole)
    for _, region in iter_blocks(whole.shape[1:], (2, 4, 3)):
        stitched[(slice(None), *region)] = patch_grid_inference(vol, centre_value, out_region=region, **kw)
    np.testing.assert_array_equal(stitched, whole)


def test_window_not_multiple_of_stride_is_rejected():
    with pytest.raises(VoxelomeError, match="multiple of the output stride"):
        WindowGrid((10, 10, 10), (5, 6, 6), 2, 0.25)
