"""What the tests of dgc/ share: the per-head oracle of the DGC layer, layers and networks set
up for comparisons, the layer shapes the native kernels are tested on, and the native mark."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import dgc
from dgc.layers import native
from dgc.layers.dynamic_group_conv import DynamicGroupConv2d


def oracle_forward(layer: DynamicGroupConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference formulation, written out per head: gate -> clone/zero bottom-k -> scale ->
    per-head conv -> concatenate heads -> interleave. Returns (output, lasso)."""
    x = F.relu(layer.norm(x))
    z = x.mean((2, 3))
    n = int(layer.inactive_channels)
    heads, outs, lasso = layer.heads, [], 0.0
    per = layer.out_channels // heads
    for i in range(heads):
        hid = F.relu(z @ layer.gate.fc1_weight[i].t())
        s = F.relu(hid @ layer.gate.fc2_weight[i].t() + layer.gate.fc2_bias[i])
        lasso = lasso + s.mean()
        s_c = s
        if n > 0:
            s_c = s.clone()
            t = s.detach().topk(n, dim=1, largest=False).values.max(dim=1, keepdim=True).values
            s_c[s.detach().le(t)] = 0
        w = layer.weight[i * per : (i + 1) * per]
        outs.append(F.conv2d(x * s_c[:, :, None, None], w, None, layer.stride, layer.padding))
    y = torch.cat(outs, 1)
    b, o, h, w_ = y.shape
    return y.view(b, heads, o // heads, h, w_).transpose(1, 2).reshape(b, o, h, w_), lasso


needs_library = pytest.mark.skipif(
    native.library() is None and not os.environ.get("DGC_NATIVE_REQUIRED"),
    reason="no C compiler here: the native kernels are optional",
)
"""Marks a test of the native kernels: skipped where the library cannot be built, except where
``DGC_NATIVE_REQUIRED`` is set (CI), where such a test fails instead."""


SHAPES = [  # (C, O, k, stride, heads, gate, H, W)
    (16, 8, 3, 1, 2, 0.25, 6, 6),
    (16, 16, 3, 2, 4, 0.25, 7, 7),  # stride 2, odd size
    (12, 8, 3, 1, 4, 0.5, 5, 9),  # not square; O/h = 2
    (16, 12, 3, 1, 4, 0.25, 19, 20),  # O/h = 3 (one channel a tile), two column tiles
    (32, 32, 3, 1, 4, 0.25, 17, 17),  # a tile tail of 1 column
    (16, 8, 1, 1, 2, 0.25, 6, 6),
    (44, 8, 1, 1, 2, 0.25, 5, 5),  # a gate over C = 16 + 16 + 8 + 4 (every vector loop's tail)
    (16, 16, 1, 2, 4, 0.25, 6, 6),  # strided 1x1 (a ResNet downsample)
    (8, 8, 5, 2, 2, 0.5, 11, 11),  # 5x5, stride 2
    (16, 16, 3, 2, 4, 0.25, 9, 17),  # stride 2, rows long enough for the vector gather
    (16, 16, 1, 2, 4, 0.25, 4, 32),  # strided 1x1, the same
]


def assert_matches_oracle(
    layer: DynamicGroupConv2d, ref: DynamicGroupConv2d, x: torch.Tensor
) -> None:
    """``layer`` on ``x`` has ``ref``'s per-head outputs, saliency loss and gradients (input and
    every parameter) under one random output gradient."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = layer(x1)
    y2, lasso = oracle_forward(ref, x2)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(layer.last_saliency_loss, lasso)
    g = torch.randn_like(y1)
    (y1 * g).sum().add(layer.last_saliency_loss).backward()
    (y2 * g).sum().add(lasso).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p1), p2 in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def make_layer(cin, cout, k, stride, heads, gate, seed=0, **kw):
    torch.manual_seed(seed)
    layer = DynamicGroupConv2d(cin, cout, k, stride, k // 2, heads=heads, gate_factor=gate, **kw)
    layer.eval().set_inactive(layer.target_inactive)
    with torch.no_grad():  # non-trivial BN, so that the gate sees varied inputs
        if isinstance(layer.norm, torch.nn.BatchNorm2d):
            layer.norm.running_mean.uniform_(-0.5, 0.5)
            layer.norm.running_var.uniform_(0.5, 2.0)
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.uniform_(-0.2, 0.2)
    return layer


def calibrated(name: str, size: int = 16, progress: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = dgc.create_model(name, num_classes=10)
    dgc.set_progress(model, progress)
    for bn in model.modules():  # one batch's statistics: the defaults overflow 86 layers deep
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = None
    with torch.no_grad():
        model(torch.randn(8, 3, size, size))
    return model.eval()
