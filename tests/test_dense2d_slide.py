"""Whole-slide tiled prediction: exact under tiling and blocking, bounded reads, 2D OME-Zarr (c, y, x) in µm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from voxelome.errors import VoxelomeError
from voxelome.infer.slide import predict_slide, read_slide_map, write_slide_map
from ngff import assert_ngff_image
from voxelome.models.dense2d import DenseExpressionNet2D


def _pointwise(stride):
    """A point-wise predictor: each output pixel = a fixed function of the RGB mean of its own input block."""

    def f(x):
        b, c, h, w = x.shape
        m = x.reshape(b, c, h // stride, stride, w // stride, stride).mean((3, 5))
        return np.stack([m[:, 0] * 2 + m[:, 1], np.sqrt(m[:, 2] + 0.1), m.sum(1) ** 2], 1)

    return f


def _direct(image, stride):
    h, w = image.shape[:2]
    pad = np.pad(image, ((0, -h % stride), (0, -w % stride), (0, 0)), mode="symmetric")
    x = pad.transpose(2, 0, 1)[None].astype(np.float32) / 255
    return _pointwise(stride)(x)[0]


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("shape,stride,tile,overlap", [((97, 131), 4, 32, 0.25), ((50, 61), 2, 16, 0.5),
                                                       ((33, 20), 1, 16, 0.0)])
def test_tiled_prediction_of_a_pointwise_model_equals_the_direct_pass(shape, stride, tile, overlap, blend):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = predict_slide(image, _pointwise(stride), tile=tile, stride=stride, n_channels=3, overlap=overlap, blend=blend)
    want = _direct(image, stride)
    assert got.shape == (3, -(-shape[0] // stride), -(-shape[1] // stride))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_block_wise_prediction_is_bit_identical_to_one_pass_with_a_cnn():
    torch.manual_seed(0)
    net = DenseExpressionNet2D(4, width=4, decoder_width=8, output_stride=4).eval()

    def pred(x):
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    image = np.random.default_rng(1).integers(0, 256, (90, 77, 3), dtype=np.uint8)
    whole = predict_slide(image, pred, tile=32, stride=4, n_channels=4, overlap=0.25)
    assert (whole >= 0).all()
    parts = np.zeros_like(whole)
    for ys in (slice(0, 7), slice(7, 23)):
        for xs in (slice(0, 11), slice(11, 20)):
            parts[:, ys, xs] = predict_slide(image, pred, tile=32, stride=4, n_channels=4, overlap=0.25,
                                             out_region=(ys, xs))
    np.testing.assert_array_equal(parts, whole)


def test_slide_map_store_is_2d_ome_zarr_in_micrometres_and_matches_memory(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (300, 270, 3), dtype=np.uint8)
    out = write_slide_map(tmp_path / "map.ome.zarr", image, _pointwise(2), tile=32, stride=2,
                          channel_names=["A", "B", "C"], pixel_size_um=4.0, chunk=48,
                          extra_attrs={"voxelome": {"unit": "test"}})
    data, px, names = read_slide_map(out)
    assert_ngff_image(out, "cyx")  # a multiscale 2D image, as napari-ome-zarr reads it
    assert names == ["A", "B", "C"] and px == (8.0, 8.0) and data.shape == (3, 150, 135)
    np.testing.assert_allclose(data[:], predict_slide(image, _pointwise(2), tile=32, stride=2, n_channels=3),
                               rtol=1e-6)
    attrs = json.loads((out / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"] and ms["axes"][1]["unit"] == "micrometer"
    assert len(ms["datasets"]) == 3  # 150 → 75 → 38 (stops below 64 px)
    lvl1, px1, _ = read_slide_map(out, level=1)
    assert px1 == (16.0, 16.0)
    np.testing.assert_allclose(lvl1[:, 0, 0], np.asarray(data[:, :2, :2]).mean((1, 2)), rtol=1e-5)
    assert attrs["voxelome"] == {"unit": "test"}
    with pytest.raises(VoxelomeError, match="exists"):
        write_slide_map(out, image, _pointwise(2), tile=32, stride=2, channel_names=["A", "B", "C"], pixel_size_um=4.0)


def test_bad_tiles_are_refused():
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(VoxelomeError, match="multiple of the output stride"):
        predict_slide(image, _pointwise(4), tile=30, stride=4, n_channels=3)
    with pytest.raises(VoxelomeError, match="RGB"):
        predict_slide(np.zeros((20, 20, 1), np.uint8), _pointwise(4), tile=16, stride=4, n_channels=3)


def test_image_stack_becomes_a_3d_expression_volume(tmp_path):
    from voxelome.infer.slide import write_stack_map
    from voxelome.io.omezarr import read_ome_zarr

    stack = np.random.default_rng(3).integers(0, 256, (3, 70, 90, 3), dtype=np.uint8)
    out = write_stack_map(tmp_path / "stack.ome.zarr", stack, _pointwise(2), tile=32, stride=2,
                          channel_names=["A", "B", "C"], pixel_size_um=4.0, section_spacing_um=50.0, chunk=24)
    data, spacing, names = read_ome_zarr(out)
    assert_ngff_image(out, "czyx")
    assert data.shape == (3, 3, 35, 45) and spacing == (50.0, 8.0, 8.0) and names == ["A", "B", "C"]
    for z in range(3):
        np.testing.assert_allclose(np.asarray(data[:, z]), _direct(stack[z], 2), rtol=1e-5, atol=1e-6)
    with pytest.raises(VoxelomeError, match="RGB sections"):
        write_stack_map(tmp_path / "bad.ome.zarr", stack[..., 0], _pointwise(2), tile=32, stride=2,
                        channel_names=["A"], pixel_size_um=4.0, section_spacing_um=50.0)
