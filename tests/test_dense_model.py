"""The dense network is local: an output voxel depends only on its receptive field.

That is what lets overlapping sliding windows agree and makes the whole-volume map match the
crops it was trained on; a normalisation that pools statistics over the window (group norm)
breaks it, and these tests show the difference.
"""

import pytest
import torch

from voxelome.models.dense import DenseSignatureNet3D


def _far_change_moves_near_output(norm: str) -> float:
    """Largest change of the outputs in the left third after changing the input in the right third."""
    torch.manual_seed(0)
    net = DenseSignatureNet3D(3, width=8, input_pool=1, output_stride=1, norm=norm)
    with torch.no_grad():  # leave the norm layers' statistics at a non-trivial state, then evaluate
        net.train()
        net(torch.rand(2, 1, 16, 16, 16))
    net.eval()
    x = torch.rand(1, 1, 16, 16, 128)
    x_far = x.clone()
    x_far[..., 96:] = torch.rand_like(x_far[..., 96:]) * 3.0
    with torch.no_grad():
        y, y_far = net(x), net(x_far)
    return float((y[..., :24] - y_far[..., :24]).abs().max())


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_local_norms_keep_outputs_independent_of_far_input(norm):
    assert _far_change_moves_near_output(norm) == 0.0


def test_group_norm_output_depends_on_the_whole_window():
    assert _far_change_moves_near_output("group") > 1e-4


def test_unknown_norm_is_refused_with_the_choices():
    from voxelome.errors import VoxelomeError
    from voxelome.train.config import make_config

    with pytest.raises(VoxelomeError, match="norm"):
        make_config("dense", norm="instance")
