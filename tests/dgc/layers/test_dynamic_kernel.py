"""DyNet's dynamic-kernel convolution: the two paths agree, the cost is counted by hand."""

from __future__ import annotations

import pytest
import torch

import dgc
from dgc.layers.dynamic_kernel import DynamicKernelConv2d


@pytest.mark.parametrize("coefficient,hidden", [("sigmoid", 0), ("softmax", 0), ("sigmoid", 6)])
@pytest.mark.parametrize("stride", [1, 2])
def test_fused_inference_path_equals_mixing_training_path(coefficient, hidden, stride):
    torch.manual_seed(0)
    layer = DynamicKernelConv2d(8, 12, 3, stride, 1, kernels=3, hidden=hidden,
                                coefficient=coefficient)  # fmt: skip
    x = torch.randn(5, 8, 9, 9)
    train = layer(x)  # training mode: mixing path
    layer.eval()
    with torch.no_grad():
        eta = layer.coefficients(x)
        fused = layer._fused(x, eta)
        chosen = layer(x)
    assert torch.allclose(train, fused, atol=1e-5)
    assert torch.allclose(chosen, fused, atol=1e-5)
    # Each sample really has its own kernel: a sample alone gives the same output.
    with torch.no_grad():
        assert torch.allclose(layer._fused(x[2:3], eta[2:3]), fused[2:3], atol=1e-5)


def test_coefficients_are_per_output_channel_and_in_range():
    layer = DynamicKernelConv2d(4, 6, 1, kernels=5)
    eta = layer.coefficients(torch.randn(2, 4, 3, 3))
    assert eta.shape == (2, 6, 5) and torch.all((eta > 0) & (eta < 1))
    soft = DynamicKernelConv2d(4, 6, 1, kernels=5, coefficient="softmax")
    assert torch.allclose(soft.coefficients(torch.randn(2, 4, 3, 3)).sum(-1), torch.ones(2, 6))


def test_coefficients_stay_float32_under_autocast():
    layer = DynamicKernelConv2d(4, 6, 3, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.coefficients(torch.randn(2, 4, 5, 5).bfloat16()).dtype == torch.float32


def test_cost_by_hand():
    layer = DynamicKernelConv2d(8, 12, 3, 2, 1, kernels=4)  # 10x10 -> 5x5
    cost = dgc.count_cost(layer, (8, 10, 10))
    pool, fc, act = 8 * 100, 8 * 12 * 4 + 12 * 4, 12 * 4
    fusion, conv = 4 * 12 * 8 * 9, 12 * 8 * 9 * 25
    assert cost.macs == pool + fc + act + fusion + conv
    assert cost.params == 4 * 12 * 8 * 9 + 8 * 12 * 4 + 12 * 4
    hidden = DynamicKernelConv2d(8, 12, 3, 2, 1, kernels=4, hidden=5)
    extra = 8 * 5 + 5 + 5 + (5 - 8) * 12 * 4  # FC1 + bias + ReLU, FC2 narrower than FC
    assert dgc.count_cost(hidden, (8, 10, 10)).macs == cost.macs + extra


def test_width_mult_thins_the_backbone():
    thin = dgc.count_cost(dgc.create_model("dnresnet20", width_mult=0.5), (3, 32, 32))
    full = dgc.count_cost(dgc.create_model("dnresnet20"), (3, 32, 32))
    dense = dgc.count_cost(dgc.create_model("resnet20"), (3, 32, 32))
    assert thin.macs < dense.macs < full.macs  # the fusion and prediction cost is counted
