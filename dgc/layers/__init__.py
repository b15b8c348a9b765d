"""The operators (DGC, SG-CNN, DyNet), the injectable convolution factory and the schedule."""

from __future__ import annotations

from dgc.layers import shipped as _shipped  # noqa: F401  (registers dgc's operator)
from dgc.layers.conv import ConvFactory
from dgc.layers.conv import ConvLayer
from dgc.layers.conv import make_conv_factory
from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.dynamic_kernel import DynamicKernelConv2d
from dgc.layers.saliency import SaliencyGate
from dgc.layers.schedule import GateSchedule
from dgc.layers.schedule import inactive_channels
from dgc.layers.self_grouping import SelfGroupingConv2d

__all__ = [
    "ConvFactory",
    "ConvLayer",
    "DynamicGroupConv2d",
    "DynamicKernelConv2d",
    "GateSchedule",
    "SaliencyGate",
    "SelfGroupingConv2d",
    "inactive_channels",
    "make_conv_factory",
]
