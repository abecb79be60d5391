"""Dense 2D network: non-negative maps, pluggable encoders, local weights, clear errors, config conventions."""

from __future__ import annotations

import pytest
import torch

from voxelome.errors import VoxelomeError
from voxelome.models.dense2d import DenseExpressionNet2D, build_encoder, register_encoder
from voxelome.train.dense2d_config import (Dense2DConfig, dense2d_config_from_dict, dense2d_config_to_yaml,
                                           make_dense2d_config)


def _net(**kw):
    torch.manual_seed(0)
    return DenseExpressionNet2D(5, width=4, decoder_width=8, **kw).eval()


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_output_is_non_negative_at_the_stated_resolution(stride):
    net = _net(output_stride=stride)
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        y = net(x)
        y_dark = net(torch.zeros(1, 3, 64, 48))
    assert y.shape == (2, 5, 64 // stride, 48 // stride)
    assert (y >= 0).all() and (y_dark >= 0).all()
    # with the head at initialisation every map pixel is close to its output scale (training starts at the mean)
    assert torch.allclose(y.mean((0, 2, 3)), net.output_scale, rtol=0.05)


def test_slice_wise_volume_prediction_equals_per_slice_forward():
    net = _net(output_stride=4)
    stack = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        vol = net.forward_volume(stack, batch=2)
        per = torch.stack([net(stack[:, k][None])[0] for k in range(3)], 1)
    assert vol.shape == (5, 3, 8, 8)
    torch.testing.assert_close(vol, per)


def test_bad_inputs_are_refused_clearly():
    net = _net()
    with pytest.raises(VoxelomeError, match="multiples of 16"):
        net(torch.rand(1, 3, 40, 48))
    with pytest.raises(VoxelomeError, match="RGB"):
        net(torch.rand(1, 1, 32, 32))
    with pytest.raises(VoxelomeError, match="power of two"):
        _net(output_stride=3)


def test_unknown_encoder_says_did_you_mean():
    with pytest.raises(VoxelomeError, match="Did you mean 'small'"):
        build_encoder("smal")


def test_missing_weights_file_names_it_and_says_how_to_pass_one(tmp_path):
    missing = tmp_path / "uni_pytorch_model.bin"
    with pytest.raises(VoxelomeError) as err:
        build_encoder("small", weights=missing)
    msg = str(err.value)
    assert str(missing) in msg and "encoder_weights=" in msg and "does not download" in msg


def test_local_weights_file_is_loaded(tmp_path):
    src = build_encoder("small", width=4)
    for p in src.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "enc.pt"
    torch.save({"state_dict": {"backbone." + k: v for k, v in src.state_dict().items()}}, path)
    net = DenseExpressionNet2D(3, width=4, encoder_weights=path)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(net.encoder.state_dict()[k], v)
    torch.save({"unrelated.weight": torch.zeros(3)}, path)
    with pytest.raises(VoxelomeError, match="match only"):
        build_encoder("small", width=4, weights=path)


def test_optional_backbones_fail_clearly_without_their_package():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(VoxelomeError, match="pip install timm"):
            build_encoder("timm:resnet18")
    else:  # pragma: no cover - timm is not installed in the test environment
        enc = build_encoder("timm:resnet18")
        assert len(enc.channels) == len(enc.strides)


def test_a_registered_encoder_plugs_in():
    class Tiny(torch.nn.Module):
        channels, strides = [6], [8]

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 8, stride=8)

        def forward(self, x):
            return [self.conv(x)]

    register_encoder("tiny-test", Tiny)
    net = DenseExpressionNet2D(2, encoder="tiny-test", output_stride=2)
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 2, 16, 16)


def test_config_presets_yaml_and_did_you_mean():
    cfg = make_dense2d_config("dense2d", n_genes=50, epochs=3)
    assert cfg.output_um == 16.0
    back = dense2d_config_from_dict(__import__("yaml").safe_load(dense2d_config_to_yaml(cfg)))
    assert back == cfg
    with pytest.raises(VoxelomeError, match="Did you mean 'n_genes'"):
        make_dense2d_config("dense2d", n_gene=50)
    with pytest.raises(VoxelomeError, match="Did you mean 'dense2d'"):
        make_dense2d_config("dens2d")
    with pytest.raises(VoxelomeError, match="multiples of 16"):
        Dense2DConfig(tile_px=100)
    with pytest.raises(VoxelomeError, match="Did you mean 'variance'"):
        Dense2DConfig(gene_selection="varience")
