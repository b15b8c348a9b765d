"""Pieces shared by the networks: weight initialisation."""

from __future__ import annotations

import math

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Conv weights N(0, sqrt(2 / (k^2 * out_channels))) (He, fan_out), BN 1/0.

    This is the initialisation of both reference networks (torchvision's kaiming fan_out for
    ResNet, the explicit normal for DenseNet). DGC layers initialise themselves per head.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
